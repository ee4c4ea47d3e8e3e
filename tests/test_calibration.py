"""Calibration statistics: the layer-streamed passes against the full transformers LlamaForCausalLM (hooks + one
ordinary backward), the token sources (JSONL, megatron datasets), and the pipeline that feeds the partitions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megamoe.construct.calib_data import (CalibrationData, CalibrationDataError, tokens_from_indexed,
                                          tokens_from_jsonl)
from megamoe.construct.calibration import activation_stats, gradient_importance, router_centroids
from megamoe.construct.partition import PartitionError, read_partitions
from megamoe.construct.pipeline import ConstructionSpec, construct, write_construction

V, H, F, L = 61, 32, 48, 3


# tiny matrices: one intra-op torch thread for this module (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny LLaMA saved as a *sharded* safetensors HF directory, and the model itself."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                     rope_theta=500.0)
    model = LlamaForCausalLM(hc).eval()
    d = str(tmp_path_factory.mktemp("tiny_llama"))
    model.save_pretrained(d, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    return d, model


def full_model_capture(model, ids, labels=True):
    """Run the whole HF model once, capturing each layer's MLP input x and down_proj input h (with grads)."""
    xs, hs, handles = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        def mlp_in(mod, args, i=i):
            xs[i] = args[0]

        def down_in(mod, args, i=i):
            hs[i] = args[0]
            if args[0].requires_grad:
                args[0].retain_grad()
        handles += [layer.mlp.register_forward_pre_hook(mlp_in), layer.mlp.down_proj.register_forward_pre_hook(down_in)]
    try:
        out = model(ids, labels=ids if labels else None)
        if labels:
            out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return out, xs, hs


def ids_for(n=6, s=16, seed=0):
    return torch.randint(0, V, (n, s), generator=torch.Generator().manual_seed(seed))


def test_activation_stats_equal_full_model(tiny):
    d, model = tiny
    ids = ids_for()
    with torch.no_grad():
        _, xs, hs = full_model_capture(model, ids, labels=False)
    data = CalibrationData(ids)
    for kernel in ("abs", "square", "binary"):
        stats = list(activation_stats(d, data, kernel=kernel, feature_tokens=20, micro_batch=4))
        assert [s.layer for s in stats] == list(range(L))
        for st in stats:
            h = hs[st.layer].reshape(-1, F).double()
            k = {"abs": h.abs(), "square": h * h, "binary": (h > 0).double()}[kernel]
            np.testing.assert_allclose(st.mean_abs, h.abs().mean(0).numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(st.coact, (k.T @ k).numpy(), rtol=1e-5, atol=1e-6)
            assert st.num_tokens == ids.numel()
            x = xs[st.layer].reshape(-1, H).numpy()
            assert st.features.shape == (20, H)
            dist = ((st.features[:, None, :] - x[None]) ** 2).sum(-1).min(1)   # every feature is a real MLP input
            assert dist.max() < 1e-8
    # act(gate x) instead of the SwiGLU product, only two layers requested
    gate = list(activation_stats(d, data, activation="gate", coact=False, layers=[1]))
    assert [s.layer for s in gate] == [1] and gate[0].coact is None
    with torch.no_grad():
        g = torch.nn.functional.silu(xs[1] @ model.model.layers[1].mlp.gate_proj.weight.T).reshape(-1, F)
    np.testing.assert_allclose(gate[0].mean_abs, g.abs().mean(0).double().numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="kernel"):
        next(activation_stats(d, data, kernel="l3"))
    with pytest.raises(ValueError, match="layers"):
        next(activation_stats(d, data, layers=[L]))
    with pytest.raises(ValueError, match="vocabulary"):
        next(activation_stats(d, CalibrationData(ids + V)))


def test_gradient_importance_equals_full_backward(tiny, tmp_path):
    d, model = tiny
    ids = ids_for(n=6, seed=1)
    out, xs, hs = full_model_capture(model, ids)
    domains = ["web", "code", "web", "math", "code", "web"]
    data = CalibrationData(ids, domains)
    g = gradient_importance(d, data, clusters="domain", micro_batch=4)
    assert g.loss == pytest.approx(out.loss.item(), rel=1e-5)
    lab = torch.tensor([{"code": 0, "math": 1, "web": 2}[x] for x in domains]).repeat_interleave(ids.shape[1])
    for i in range(L):
        score = (hs[i].detach() * hs[i].grad).abs().reshape(-1, F).double()
        want = torch.stack([score[lab == c].mean(0) for c in range(3)]).numpy()
        np.testing.assert_allclose(g.importance[i], want, rtol=1e-4, atol=1e-12)
        assert g.counts[i].tolist() == [32, 16, 48]
        xm = torch.stack([xs[i].detach().reshape(-1, H)[lab == c].mean(0) for c in range(3)]).numpy()
        np.testing.assert_allclose(g.cluster_means[i], xm, rtol=1e-4, atol=1e-6)
    assert g.meta["cluster_names"] == ["code", "math", "web"]
    # v2 per-token clusters from given centroids; hidden states offloaded to disk in bf16
    rng = np.random.default_rng(0)
    cents = {i: rng.standard_normal((4, H)).astype(np.float32) for i in range(L)}
    off = tmp_path / "off"
    g2 = gradient_importance(d, data, clusters="centroids", centroids=cents, micro_batch=3, offload_dir=str(off),
                             store_dtype=torch.float32)
    assert os.listdir(off) == []                      # temporary files removed
    for i in range(L):
        score = (hs[i].detach() * hs[i].grad).abs().reshape(-1, F).double()
        tl = (xs[i].detach().reshape(-1, H) @ torch.as_tensor(cents[i]).T).argmax(-1)
        want = np.stack([score[tl == c].mean(0).numpy() if (tl == c).any() else np.zeros(F) for c in range(4)])
        np.testing.assert_allclose(g2.importance[i], want, rtol=1e-4, atol=1e-12)
        assert g2.counts[i].tolist() == torch.bincount(tl, minlength=4).tolist()
    # bf16 storage of the hidden states: close, not equal
    g3 = gradient_importance(d, data, clusters="domain", store_dtype=torch.bfloat16)
    for i in range(L):
        np.testing.assert_allclose(g3.importance[i], g.importance[i], rtol=0.1, atol=1e-3 * g.importance[i].max())
    with pytest.raises(ValueError, match="clusters"):
        gradient_importance(d, data, clusters="topic")
    with pytest.raises(CalibrationDataError, match="domains"):
        gradient_importance(d, CalibrationData(ids), clusters="domain")


def test_router_centroids_respect_size_bounds():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((90, 8)) + 6, rng.standard_normal((10, 8)) - 6])  # 90/10 imbalance
    c = router_centroids(x, 2, jitter=0.4)
    from megamoe.construct.balanced import balanced_assign
    # the constrained solution cannot put 90 points in one cluster: at most ceil(50*1.4) = 70
    cost = ((x[:, None] - c[None]) ** 2).sum(-1)
    lab = balanced_assign(cost, 70, 30)
    assert np.bincount(lab, minlength=2).max() == 70
    with pytest.raises(ValueError, match="features"):
        router_centroids(x[:1], 2)


# ---------------------------------------------------------------------------------------------------------------
# token sources


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    d = str(tmp_path_factory.mktemp("tok"))
    fast.save_pretrained(d)
    return d


def test_jsonl_blocks_domains_budget_and_errors(tok_dir, tmp_path):
    p = tmp_path / "calib.jsonl"
    docs = [("a", [1, 2, 3]), ("b", [4, 5]), ("a", [6, 7, 8, 9]), ("b", [10, 11, 12, 13, 14]), ("a", [15])]
    with open(p, "w") as f:
        for dom, ws in docs:
            f.write(json.dumps({"text": " ".join(f"w{w}" for w in ws), "meta": {"set": dom}}) + "\n")
    # expected: per domain, BOS(1) + word ids (w_k -> k + 3) + EOS(2), concatenated and cut into blocks of 4
    streams = {"a": [], "b": []}
    for dom, ws in docs:
        streams[dom] += [1] + [w + 3 for w in ws] + [2]
    data = tokens_from_jsonl(str(p), tok_dir, seq_len=4, token_budget=100, domain_key="meta.set")
    got = {"a": [], "b": []}
    for row, dom in zip(data.ids.tolist(), data.domains):
        got[dom] += row
    for dom in "ab":
        assert got[dom] == streams[dom][:len(streams[dom]) // 4 * 4]
    budget = tokens_from_jsonl(str(p), tok_dir, seq_len=4, token_budget=9)
    assert budget.ids.shape == (2, 4) and budget.domains is None
    assert budget.ids.reshape(-1).tolist() == [1, 4, 5, 6, 2, 1, 7, 8]   # no domains: one stream in file order
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1"}\n{oops\n')
    with pytest.raises(CalibrationDataError, match=r"bad.jsonl:2: not valid JSON"):
        tokens_from_jsonl(str(bad), tok_dir, seq_len=2, token_budget=8)
    with pytest.raises(CalibrationDataError, match="no string field 'body'"):
        tokens_from_jsonl(str(p), tok_dir, seq_len=2, token_budget=8, text_key="body")
    with pytest.raises(CalibrationDataError, match="fewer than seq_len"):
        tokens_from_jsonl(str(p), tok_dir, seq_len=1000, token_budget=1000)
    with pytest.raises(CalibrationDataError, match="token_budget"):
        tokens_from_jsonl(str(p), tok_dir, seq_len=4, token_budget=3)


def test_indexed_dataset_blocks(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    streams = {}
    for dom, base in (("x", 100), ("y", 200)):
        pre = str(tmp_path / dom)
        b = IndexedDatasetBuilder(pre + ".bin", dtype=np.int32)
        toks = []
        for doc in range(5):
            t = list(range(base + doc * 10, base + doc * 10 + 3 + doc))
            b.add_document(torch.tensor(t), [len(t)])
            toks += t
        b.finalize(pre + ".idx")
        streams[dom] = toks
    data = tokens_from_indexed({"x": str(tmp_path / "x"), "y": str(tmp_path / "y")}, seq_len=5, token_budget=20)
    assert data.ids.shape == (4, 5) and data.domains == ["x", "x", "y", "y"]
    assert data.ids[:2].reshape(-1).tolist() == streams["x"][:10]
    assert data.ids[2:].reshape(-1).tolist() == streams["y"][:10]
    one = tokens_from_indexed(str(tmp_path / "x"), seq_len=5, token_budget=100)
    assert one.ids.reshape(-1).tolist() == streams["x"][:len(streams["x"]) // 5 * 5] and one.domains is None
    with pytest.raises(CalibrationDataError, match="no megatron dataset"):
        tokens_from_indexed(str(tmp_path / "nope"), seq_len=5, token_budget=10)


# ---------------------------------------------------------------------------------------------------------------
# the pipeline the converter calls


def test_construct_pipeline_all_methods(tiny, tmp_path):
    d, model = tiny
    data = CalibrationData(ids_for(n=8, seed=2), ["a", "b", "c", "d"] * 2)
    cases = [("random", {}), ("clustering", {}), ("coactivation", {}), ("gradient", {"clusters": "domain"}),
             ("gradient", {"clusters": "centroids"}), ("sharing-inner", {"expert_size": 16}),
             ("sharing-inter", {"residual_size": 8, "clusters": "kmeans"})]
    for method, kw in cases:
        spec = ConstructionSpec(method=method, num_experts=4, gate_init="centroids", **kw)
        r = construct(d, spec, data)
        assert sorted(r.partitions) == list(range(L))
        for i, p in r.partitions.items():
            assert p.method == method and p.ffn_width == F
            assert r.centroids[i].shape == (4, H)
            if method != "sharing-inner":
                assert p.is_exact_cover
        assert r.report["duplicated"] == {i: p.duplicated for i, p in r.partitions.items()}
    assert r.partitions[0].residual_size == 8 and r.partitions[0].expert_sizes == [10] * 4
    paths = write_construction(str(tmp_path), r, spec)
    assert read_partitions(str(tmp_path)) == r.partitions
    summary = json.load(open(os.path.join(tmp_path, "partition", "construction.json")))
    assert summary["spec"]["method"] == "sharing-inter" and "calibration_loss" in summary["report"]
    from safetensors.numpy import load_file
    cent = load_file(paths[-1])
    np.testing.assert_array_equal(cent["layers.2"], r.centroids[2])
    # domain clusters give the gradient experts their own tokens' mean input as the router row
    spec = ConstructionSpec(method="gradient", num_experts=4, clusters="domain", gate_init="centroids", layers=[1])
    r = construct(d, spec, data)
    assert list(r.partitions) == [1]
    # bad input names the field
    with pytest.raises(PartitionError, match="num_experts: 5 does not divide the FFN width"):
        construct(d, ConstructionSpec(method="random", num_experts=5))
    with pytest.raises(PartitionError, match="num_experts: 3 experts, but clusters='domain'"):
        construct(d, ConstructionSpec(method="gradient", num_experts=3, clusters="domain"), data)
    with pytest.raises(PartitionError, match="data: method 'coactivation'"):
        construct(d, ConstructionSpec(method="coactivation", num_experts=4))
    with pytest.raises(PartitionError, match="expert_size"):
        construct(d, ConstructionSpec(method="sharing-inner", num_experts=4), data)
    with pytest.raises(PartitionError, match="method"):
        construct(d, ConstructionSpec(method="metis", num_experts=4), data)
    with pytest.raises(PartitionError, match="layers"):
        construct(d, ConstructionSpec(method="random", num_experts=4, layers=[7]))


def test_smollm2_streamed_gradient_equals_full_model(smollm2_dir):
    """The real embedded model (tied embeddings, GQA 9/3, rope theta 1e5): streamed importance = full backward."""
    from transformers import LlamaForCausalLM
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    g = gradient_importance(smollm2_dir, CalibrationData(ids), clusters=np.array([1, 0]), micro_batch=2)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    layers = (0, 29)
    hs = {}
    for i in layers:
        def pre(mod, args, i=i):
            hs[i] = args[0]
            args[0].retain_grad()
        model.model.layers[i].mlp.down_proj.register_forward_pre_hook(pre)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert g.loss == pytest.approx(out.loss.item(), rel=1e-5)
    for i in layers:
        score = (hs[i].detach() * hs[i].grad).abs().double()
        want = torch.stack([score[1].mean(0), score[0].mean(0)]).numpy()   # sequence 1 is cluster 0
        np.testing.assert_allclose(g.importance[i], want, rtol=1e-3, atol=1e-6 * want.max())


def test_jsonl_domains_by_file(tok_dir, tmp_path):
    files = {}
    for dom, base in (("law", 0), ("code", 20)):
        p = tmp_path / f"{dom}.jsonl"
        p.write_text("".join(json.dumps({"text": " ".join(f"w{base + k}" for k in range(j, j + 5))}) + "\n"
                             for j in range(0, 15, 5)))
        files[dom] = str(p)
    data = tokens_from_jsonl(files, tok_dir, seq_len=7, token_budget=28)
    assert data.domains == ["law", "law", "code", "code"]
    assert data.ids[2].tolist() == [1, 23, 24, 25, 26, 27, 2]          # BOS, w20..w24 (ids +3), EOS
    with pytest.raises(CalibrationDataError, match="not both"):
        tokens_from_jsonl(files, tok_dir, seq_len=7, token_budget=28, domain_key="d")
    with pytest.raises(CalibrationDataError, match="token_budget"):
        tokens_from_jsonl(files, tok_dir, seq_len=7, token_budget=7)


def test_module_cli(tiny, tok_dir, tmp_path, capsys):
    from megamoe.construct.__main__ import main
    d, _ = tiny
    calib = tmp_path / "c.jsonl"
    calib.write_text("".join(json.dumps({"text": " ".join(f"w{(7 * j + k) % 40}" for k in range(30))}) + "\n"
                             for j in range(6)))
    out = tmp_path / "parts"
    rc = main(["--model", d, "--out", str(out), "--method", "coactivation", "--num-experts", "4",
               "--jsonl", str(calib), "--tokenizer", tok_dir, "--seq-len", "16", "--token-budget", "64",
               "--layers", "0", "2"])
    assert rc == 0
    parts = read_partitions(str(out))
    assert sorted(parts) == [0, 2] and all(p.method == "coactivation" and p.is_exact_cover for p in parts.values())
    assert main(["--model", d, "--out", str(tmp_path / "x"), "--method", "random", "--num-experts", "5"]) == 2
    assert "num_experts: 5 does not divide the FFN width (48)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_too_few_sequences_for_kmeans_clusters_fails_before_any_forward(tiny, monkeypatch):
    """k-means into E clusters needs E calibration sequences; with fewer, the run used to fail only after the whole
    calibration forward/backward (85 s on SmolLM2). Now it fails first, naming --token-budget."""
    from megamoe.construct import pipeline
    d, _ = tiny

    def forward_must_not_run(*a, **k):
        raise AssertionError("the calibration pass ran before the check")
    monkeypatch.setattr(pipeline, "gradient_importance", forward_must_not_run)
    spec = ConstructionSpec(method="gradient", num_experts=4, clusters="kmeans")
    with pytest.raises(PartitionError, match="token_budget.*only 2 sequences"):
        construct(d, spec, CalibrationData(ids_for(n=2, s=16)))
