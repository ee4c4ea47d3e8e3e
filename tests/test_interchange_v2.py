"""LLaMA-MoE v2 interchange (issue 15): attention experts built by hf-to-moe (the guard's identity: every attention
expert at weight 1 reproduces the dense model), the v2 layout written by moe-to-hf and read back (bit-exact), checked
against an independent forward of what the released v2 code computes (interchange/reference_v2.py; the released
code itself was run on these exports outside CI: docs/interchange.md), residual models, full_kv, Mixtral-typed
directories with v2 fields, inspect / reshard / megamoe.eval, and bad flags refused before any work."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megamoe import interchange as convert
from megamoe.config import AttnMoEConfig, ModelConfig, MoEConfig
from megamoe.construct.partition import Partition, write_partitions
from megamoe.errors import ConfigError, GuardError
from megamoe.formats import llama_moe_v2 as v2
from megamoe.formats.layout import expected_names, expected_shape
from megamoe.formats.shards import ShardedCheckpoint, load_shards, save_shards
from megamoe.interchange.forward import reference_logits
from megamoe.interchange.reference_v2 import v2_logits
from megamoe.model import LlamaMoEModel

pytestmark = pytest.mark.usefixtures("world", "one_thread")
transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama(path, heads=4, kv=2, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    c = dict(vocab_size=96, hidden_size=8 * heads, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
             num_key_value_heads=kv, rope_theta=1000.0, tie_word_embeddings=tie)
    m = LlamaForCausalLM(LlamaConfig(**c)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(path)
    return m


IDS = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(3))


def model_logits(path, ids=IDS):
    ck = ShardedCheckpoint(path)
    m = LlamaMoEModel(ck.config).eval()
    m.load_state_dict(load_shards(path), strict=True)
    with torch.no_grad():
        return m(ids).logits


MIXTRAL = dict(num_experts=4, top_k=2, router="mixtral", gate_network="linear")


@pytest.mark.parametrize("heads,kv,split,tie", [(4, 2, 1, False), (4, 2, 2, True), (9, 3, 3, False)])
def test_hf_to_moe_attention_experts_pass_the_identity_guard(tmp_path, heads, kv, split, tie):
    src = str(tmp_path / "dense")
    tiny_llama(src, heads, kv, tie)
    A = kv * split
    s = convert.hf_to_moe(src, str(tmp_path / "moe"), **MIXTRAL, attn_experts=A, attn_top_k=max(1, A - 1),
                          progress=False)
    assert s["guard"][0].startswith("[ok  ] construct identity") and s["attn_experts"] == A
    ck = ShardedCheckpoint(str(tmp_path / "moe"))
    assert ck.config.attn_moe.num_experts == A and ck.shape("layers.0.attn.k_proj.weight") == [A * 8, 8 * heads]
    # the guard's reference and our model agree on the real routing of the written shards
    ours = model_logits(str(tmp_path / "moe"))
    ref = reference_logits(ck.config, ck.get, IDS)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    assert "attention experts: %d" % A in convert.inspect(str(tmp_path / "moe"))["model"]


def test_the_guard_catches_attention_experts_built_wrong(tmp_path, monkeypatch):
    """KV heads copied into the wrong sibling experts: the identity check refuses the conversion."""
    from megamoe.interchange import attn_experts, dense_to_moe
    src = str(tmp_path / "dense")
    tiny_llama(src)

    def wrong(cfg, i, s, gate_init, gen):
        out = attn_experts.attn_layer_state(cfg, i, s, gate_init, gen)
        for x in ("k_proj.weight", "v_proj.weight"):
            t = out[f"layers.{i}.attn.{x}"]
            out[f"layers.{i}.attn.{x}"] = t.roll(8, 0)   # expert e gets expert e-1's KV head
        return out
    monkeypatch.setattr(dense_to_moe, "attn_layer_state", wrong)
    with pytest.raises(GuardError, match="construct identity"):
        convert.hf_to_moe(src, str(tmp_path / "moe"), **MIXTRAL, attn_experts=2, attn_top_k=1, progress=False)
    assert not os.path.exists(tmp_path / "moe")


def v2_model(tmp_path, name="shards", mode="token_sparse", residual=16, dense_ends=True, seed=1, layers=4):
    """A LLaMA-MoE v2-shaped model of ours: attention experts (split 2) everywhere, a residual MLP block, dense first
    and last layers (v2's contract layers), random weights with a non-uniform router."""
    torch.manual_seed(seed)
    E, size = 4, 8
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=E * size + residual, num_layers=layers,
                      num_heads=4, num_kv_heads=2, rope_theta=5e5, init_std=0.1, tie_word_embeddings=False,
                      moe=MoEConfig(num_experts=E, top_k=2, router="mixtral", gate_network="linear",
                                    residual_size=residual, score_scale=1.5, gate_init_std=0.5,
                                    moe_layers=list(range(1, layers - 1)) if dense_ends else None),
                      attn_moe=AttnMoEConfig(num_experts=4, top_k=2, score_scale=2.0, mode=mode, gate_init_std=0.5))
    m = LlamaMoEModel(cfg)
    path = str(tmp_path / name)
    save_shards(path, cfg, {k: v.detach() for k, v in m.state_dict().items() if torch.is_tensor(v)})
    return path, cfg


def test_v2_export_import_is_bit_exact_and_computes_the_v2_reference(tmp_path):
    path, cfg = v2_model(tmp_path, residual=0)   # dense first/last layers need no residual (v2: E x I wide)
    s = convert.moe_to_hf(path, str(tmp_path / "v2"), "llama-moe-v2", progress=False)
    assert s["format"] == "llama-moe-v2" and "llama-moe v2 reference" in s["guard"][0]
    conf = json.load(open(tmp_path / "v2" / "config.json"))
    assert conf["auto_map"] == v2.AUTO_MAP and conf["use_cache"] is False and conf["sliding_window"] is None
    assert (conf["attn_experts"], conf["top_k_attn"], conf["scale_factor_attn"]) == (4, 2, 2.0)
    assert (conf["num_moe_contract_layers"], conf["scale_factor"], conf["intermediate_size"]) == (1, 1.5, 8)
    assert "attn_mode" not in conf and "eager" in open(tmp_path / "v2" / "README.md").read()
    keys = set(load_file(str(tmp_path / "v2" / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.3.weight" in keys and "model.layers.0.block_sparse_moe.w1.weight" in keys
    # the independent v2 reference on the written keys equals our model on the shards
    tensors = load_file(str(tmp_path / "v2" / "model.safetensors"))
    ref = v2_logits(conf, tensors.__getitem__, IDS)
    ours = model_logits(path)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    # import (hf-to-moe routes a Mixtral-typed v2 directory to the v2 importer), TP2 layout, then export again
    s = convert.hf_to_moe(str(tmp_path / "v2"), str(tmp_path / "back"), tp=2, progress=False)
    assert s["method"] == "import llama-moe-v2"
    a, b = load_shards(path), load_shards(str(tmp_path / "back"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    convert.moe_to_hf(str(tmp_path / "back"), str(tmp_path / "v2b"), "llama-moe-v2", progress=False)
    t2 = load_file(str(tmp_path / "v2b" / "model.safetensors"))
    assert set(t2) == set(tensors) and all(torch.equal(t2[k], tensors[k]) for k in tensors)
    # megamoe.eval loads the v2 directory itself (one key per attention expert, stacked on load)
    from megamoe.eval.load import load_model
    lm = load_model(str(tmp_path / "v2"))
    assert lm.layout == "llama-moe-v2"
    with torch.no_grad():
        assert torch.allclose(lm.model(IDS).logits, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))
    lm = load_model(str(tmp_path / "back"))              # and our TP2 shards with attention experts
    assert lm.layout == "megamoe" and lm.cfg.attn_moe.num_experts == 4
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, ours)


def test_residual_models_export_to_v2(tmp_path):
    """Shared-expert (residual) MLP models export (both earlier layouts refuse them), in every layer."""
    path, cfg = v2_model(tmp_path, residual=16, dense_ends=False)
    with pytest.raises(ConfigError, match="residual"):
        convert.moe_to_hf(path, str(tmp_path / "mx"), "mixtral", progress=False)
    s = convert.moe_to_hf(path, str(tmp_path / "v2"), "auto", progress=False)
    assert s["format"] == "llama-moe-v2"
    conf = json.load(open(tmp_path / "v2" / "config.json"))
    assert conf["intermediate_size_residual"] == 16 and conf["num_moe_contract_layers"] == 0
    assert "model.layers.1.mlp_residual.w2.weight" in load_file(str(tmp_path / "v2" / "model.safetensors"))
    convert.hf_to_moe(str(tmp_path / "v2"), str(tmp_path / "back"), progress=False)
    a, b = load_shards(path), load_shards(str(tmp_path / "back"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a residual MLP model without attention experts exports too
    torch.manual_seed(2)
    cfg2 = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                       moe=MoEConfig(num_experts=4, top_k=1, router="mixtral", gate_network="linear",
                                     residual_size=16))
    m = LlamaMoEModel(cfg2)
    save_shards(str(tmp_path / "r"), cfg2, {k: v.detach() for k, v in m.state_dict().items() if torch.is_tensor(v)})
    s = convert.moe_to_hf(str(tmp_path / "r"), str(tmp_path / "r2"), "auto", progress=False)
    assert s["format"] == "llama-moe-v2" and json.load(open(tmp_path / "r2" / "config.json"))["use_attn_moe"] is False


def test_residual_construction_defaults_to_scale_one(tmp_path):
    """LLaMA-MoE v2's residual models use scale_factor 1.0; without a residual block the default stays E/k."""
    src = str(tmp_path / "dense")
    tiny_llama(src)
    parts = {i: Partition(experts=[list(range(j * 8, j * 8 + 8)) for j in range(4)], residual=list(range(32, 48)),
                          method="file", ffn_width=48) for i in range(2)}
    write_partitions(str(tmp_path / "parts"), parts)
    s = convert.hf_to_moe(src, str(tmp_path / "moe"), partitions_dir=str(tmp_path / "parts"), **MIXTRAL, progress=False)
    assert s["residual_size"] == 16 and s["score_scale"] == 1.0
    s = convert.hf_to_moe(src, str(tmp_path / "moe2"), **MIXTRAL, method="random", progress=False)
    assert s["score_scale"] == 2.0


def test_full_kv_export_says_which_loader_computes_it(tmp_path):
    path, cfg = v2_model(tmp_path, mode="full_kv", residual=0)
    s = convert.moe_to_hf(path, str(tmp_path / "v2"), "llama-moe-v2", progress=False)
    assert any("released v2 code ignores it" in n for n in s["notes"]) and "full_kv" in s["guard"][0]
    conf = json.load(open(tmp_path / "v2" / "config.json"))
    assert conf["attn_mode"] == "full_kv"
    assert "only megamoe computes it" in open(tmp_path / "v2" / "README.md").read()
    tensors = load_file(str(tmp_path / "v2" / "model.safetensors"))
    ours = model_logits(path)
    released = v2_logits(conf, tensors.__getitem__, IDS)          # what their code computes: token-sparse
    assert (released - ours).abs().max() > 1e-2 * ours.abs().max()
    convert.hf_to_moe(str(tmp_path / "v2"), str(tmp_path / "back"), progress=False)
    assert ShardedCheckpoint(str(tmp_path / "back")).config.attn_moe.mode == "full_kv"


def test_what_v2_cannot_express_is_refused(tmp_path):
    path, cfg = v2_model(tmp_path, residual=0)
    import dataclasses
    bad = [
        (dataclasses.replace(cfg, attn_moe=dataclasses.replace(cfg.attn_moe, layers=[1, 2])), "attn_moe.layers"),
        (dataclasses.replace(cfg, attn_moe=dataclasses.replace(cfg.attn_moe, score_order="softmax_topk")),
         "attn_moe.score_order"),
        (dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, moe_layers=[0, 1])), "moe.moe_layers"),
        (dataclasses.replace(cfg, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    ]
    for c, field in bad:
        assert field in v2.why_not_v2(c)
    assert v2.why_not_v2(cfg) is None
    with pytest.raises(ConfigError, match="attention experts"):
        convert.moe_to_hf(path, str(tmp_path / "mx"), "mixtral", progress=False)


def test_mixtral_typed_v2_fields_import_as_llama_moe_v2(tmp_path):
    """A Mixtral-layout directory with v2 fields goes to the v2 importer (scale_factor honoured, checked against
    the v2 reference); what even v2 cannot express is still refused, naming the field, with nothing left behind."""
    src = str(tmp_path / "dense")
    tiny_llama(src)
    convert.hf_to_moe(src, str(tmp_path / "moe"), **MIXTRAL, progress=False)
    convert.moe_to_hf(str(tmp_path / "moe"), str(tmp_path / "mx"), "mixtral", progress=False)
    conf = json.load(open(tmp_path / "mx" / "config.json"))
    json.dump({**conf, "scale_factor": 3.0}, open(tmp_path / "mx" / "config.json", "w"))
    s = convert.hf_to_moe(str(tmp_path / "mx"), str(tmp_path / "v2imp"), progress=False)
    assert s["method"] == "import llama-moe-v2" and s["score_scale"] == 3.0
    for extra, field in (({"add_rescale_bias": True}, "add_rescale_bias"), ({"moe_type": "megablocks"}, "moe_type"),
                         ({"scale_factor": 3.0, "sliding_window": 3}, "sliding_window"),
                         ({"use_attn_moe": True}, "attn_experts")):
        json.dump({**conf, **extra}, open(tmp_path / "mx" / "config.json", "w"))
        with pytest.raises(ConfigError, match=field):
            convert.hf_to_moe(str(tmp_path / "mx"), str(tmp_path / f"back_{field}"), progress=False)
        assert not os.path.exists(tmp_path / f"back_{field}")


def test_reshard_keeps_attention_experts(tmp_path):
    path, cfg = v2_model(tmp_path, residual=0)
    convert.reshard_checked(path, str(tmp_path / "tp2"), tp=2, progress=False)
    ck = ShardedCheckpoint(str(tmp_path / "tp2"))
    assert ck.manifest["parallel"]["tp"] == 2
    a, b = load_shards(path), load_shards(str(tmp_path / "tp2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the stacked k_proj is split between the TP ranks on expert boundaries (2 experts each)
    assert ck.get_local("layers.1.attn.k_proj.weight", tp=(1, 2)).shape == (16, 32)


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint_convert.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("heads,kv,flags,msg", [
    (4, 2, ["--attn-experts", "3"], "does not divide into the KV heads x split"),
    (4, 2, ["--attn-experts", "4", "--attn-top-k", "5"], "more than the 4 attention experts"),
    (4, 4, ["--attn-experts", "8"], "not GQA"),
    (4, 2, ["--attn-experts", "6"], "split must divide"),
    (4, 2, ["--attn-top-k", "2"], "give --attn-experts"),
])
def test_bad_attention_flags_are_refused_before_any_work(tmp_path, heads, kv, flags, msg):
    src = str(tmp_path / "dense")
    tiny_llama(src, heads, kv)
    p = _cli("hf-to-moe", "--src", src, "--out", str(tmp_path / "out"), "--experts", "4", "--top-k", "2",
             "--method", "random", "--guard-tokens", "4", "--quiet", *flags)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")


def test_expected_names_and_shapes_of_attention_experts():
    cfg = ModelConfig(vocab_size=32, hidden_size=72, intermediate_size=64, num_layers=2, num_heads=9, num_kv_heads=3,
                      attn_moe=AttnMoEConfig(num_experts=9, top_k=4, layers=[1]))
    names = expected_names(cfg)
    assert "layers.1.attn.router.gate.weight" in names and "layers.0.attn.router.gate.weight" not in names
    assert expected_shape(cfg, "layers.1.attn.k_proj.weight") == [9 * 8, 72]
    assert expected_shape(cfg, "layers.0.attn.k_proj.weight") == [3 * 8, 72]
    assert expected_shape(cfg, "layers.1.attn.router.gate.weight") == [9, 72]
