"""Expert construction: partitions (every method), the exact balanced solver, the per-layer files, and
construct-then-check (the MoE built from each partition reproduces the dense model's logits)."""

from __future__ import annotations

import collections
import itertools
import json
import os

import numpy as np
import pytest
import torch

from megamoe.config import ConfigError, MoEConfig, ModelConfig
from megamoe.construct.balanced import balanced_assign, balanced_kmeans
from megamoe.construct.build import build_moe
from megamoe.construct.partition import (Partition, PartitionError, greedy_assign, read_partitions, select_residual,
                                         split_clustering, split_coactivation, split_gradient, split_random,
                                         split_sharing_inner, split_sharing_inter, write_partitions)


# tiny matrices: one intra-op torch thread for this module (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread", "world")


def assert_exact_balanced(p: Partition, f: int, e: int):
    assert p.num_experts == e and p.ffn_width == f
    assert sorted(itertools.chain(*p.experts)) == list(range(f))
    assert p.expert_sizes == [f // e] * e
    assert p.duplicated == 0 and p.missing == 0 and p.residual == []
    for b in p.experts:
        assert b == sorted(b)


# ---------------------------------------------------------------------------------------------------------------
# the exact balanced assignment against a brute-force optimum


def brute_force_assign(cost, cap):
    """Minimum over every assignment respecting the capacities (tiny problems only)."""
    n, k = cost.shape
    best = np.inf
    for lab in itertools.product(range(k), repeat=n):
        if np.all(np.bincount(lab, minlength=k) <= cap):
            best = min(best, cost[np.arange(n), list(lab)].sum())
    return best


def test_balanced_assign_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for t in range(60):
        n, k = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        cost = rng.standard_normal((n, k)) if t % 2 else rng.integers(0, 3, (n, k)).astype(float)
        cap = rng.integers(0, n + 1, k)
        cap[0] += max(0, n - cap.sum())
        lab = balanced_assign(cost, cap, order=rng.permutation(n))
        assert np.all(np.bincount(lab, minlength=k) <= cap)
        assert cost[np.arange(n), lab].sum() == pytest.approx(brute_force_assign(cost, cap), abs=1e-9)


def test_balanced_assign_min_sizes_and_errors():
    rng = np.random.default_rng(1)
    cost = rng.standard_normal((9, 3))
    cost[:, 0] -= 10  # everyone wants cluster 0
    lab = balanced_assign(cost, capacity=9, min_size=[1, 2, 3])
    cnt = np.bincount(lab, minlength=3)
    assert cnt[1] >= 2 and cnt[2] >= 3
    # brute force with min sizes
    best = min(cost[np.arange(9), list(l)].sum() for l in itertools.product(range(3), repeat=9)
               if np.all(np.bincount(l, minlength=3) >= [1, 2, 3]))
    assert cost[np.arange(9), lab].sum() == pytest.approx(best)
    with pytest.raises(ValueError, match="capacity"):
        balanced_assign(cost, 2)
    with pytest.raises(ValueError, match="min_size"):
        balanced_assign(cost, 9, min_size=4)


def test_price_assign_respects_bounds_when_it_answers():
    from megamoe.construct.balanced import price_assign
    rng = np.random.default_rng(13)
    answered = 0
    for _ in range(20):
        cost = rng.standard_normal((200, 5))
        cost[:, 0] -= 1.5                                   # crowding into cluster 0
        lab = price_assign(cost, 24, 56)
        if lab is None:
            continue
        answered += 1
        cnt = np.bincount(lab, minlength=5)
        assert cnt.min() >= 24 and cnt.max() <= 56
    assert answered >= 15


def test_balanced_kmeans_recovers_planted_clusters_exactly_balanced():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((4, 16)) * 5
    truth = rng.permutation(np.repeat(np.arange(4), 25))
    x = centers[truth] + 0.1 * rng.standard_normal((100, 16))
    lab, cent, _ = balanced_kmeans(x, 4, seed=0)
    assert np.all(np.bincount(lab) == 25)
    # same grouping up to a relabelling
    assert len({(a, b) for a, b in zip(truth, lab)}) == 4
    lab2, cent2, _ = balanced_kmeans(x, 4, seed=0)
    assert np.array_equal(lab, lab2) and np.allclose(cent, cent2)


# ---------------------------------------------------------------------------------------------------------------
# methods


def test_random_split_balanced_deterministic():
    p = split_random(48, 4, seed=3)
    assert_exact_balanced(p, 48, 4)
    assert p.experts == split_random(48, 4, seed=3).experts
    assert p.experts != split_random(48, 4, seed=4).experts
    with pytest.raises(PartitionError, match="num_experts: 5 does not divide the FFN width"):
        split_random(48, 5, 0)


def test_clustering_split_groups_similar_rows():
    rng = np.random.default_rng(4)
    dirs = rng.standard_normal((4, 32))
    truth = rng.permutation(np.repeat(np.arange(4), 12))
    rows = dirs[truth] * rng.uniform(0.5, 3.0, (48, 1)) + 0.05 * rng.standard_normal((48, 32))
    p, cent = split_clustering(rows, 4, seed=0)
    assert_exact_balanced(p, 48, 4)
    assert cent.shape == (4, 32)
    for b in p.experts:  # each expert is one planted group (row scale removed by the normalisation)
        assert len(set(truth[b])) == 1
    assert p.experts == split_clustering(rows, 4, seed=0)[0].experts
    with pytest.raises(PartitionError, match="num_experts"):
        split_clustering(rows, 5)


def test_coactivation_split_finds_planted_groups():
    rng = np.random.default_rng(5)
    f, e, t = 48, 4, 400
    group = rng.permutation(np.repeat(np.arange(e), f // e))
    topic = rng.integers(0, e, t)                       # each token activates one group of neurons
    h = (group[None, :] == topic[:, None]) * rng.uniform(0.5, 1.5, (t, f)) + 0.05 * rng.random((t, f))
    a = np.abs(h).T @ np.abs(h)
    p = split_coactivation(a, e, seed=0)
    assert_exact_balanced(p, f, e)
    for b in p.experts:
        assert len(set(group[b])) == 1
    assert p.experts == split_coactivation(a, e, seed=0, normalize=False).experts
    dn = np.sqrt(np.diag(a))
    a = a / dn[:, None] / dn[None, :]                   # the fraction is reported on the normalised graph
    off = a - np.diag(np.diag(a))
    planted = sum(off[np.ix_(group == g, group == g)].sum() for g in range(e)) / off.sum()
    assert p.meta["within_weight_fraction"] == pytest.approx(planted)
    assert p.experts == split_coactivation(a, e, seed=0).experts
    with pytest.raises(PartitionError, match="num_experts"):
        split_coactivation(a, 5)
    with pytest.raises(PartitionError, match="coact: expected a square"):
        split_coactivation(a[:4], 4)


def naive_greedy(v, size):
    """Independent, literal transcription of the rule: O(F^2 E)."""
    e_count, f = v.shape
    used, out = set(), [[] for _ in range(e_count)]
    while len(used) < f:
        best = None
        for e in range(e_count):
            if len(out[e]) >= size:
                continue
            # the expert's best unused neuron (lowest index among equal scores, as a stable sort ranks them)
            j = min((n for n in range(f) if n not in used), key=lambda n: (-v[e, n], n))
            if best is None or v[e, j] >= best[0]:       # >= : ties go to the later expert
                best = (v[e, j], e, j)
        _, e, j = best
        out[e].append(j)
        used.add(j)
    return [sorted(b) for b in out]


def test_gradient_greedy_matches_brute_force():
    rng = np.random.default_rng(6)
    for t in range(30):
        e = int(rng.integers(1, 5))
        size = int(rng.integers(1, 5))
        v = rng.random((e, e * size)) if t % 2 else rng.integers(0, 3, (e, e * size)).astype(float)  # many ties
        p = split_gradient(v)
        assert p.experts == naive_greedy(v, size)
        assert_exact_balanced(p, e * size, e)
    with pytest.raises(PartitionError, match="expert_size"):
        split_gradient(rng.random((3, 10)), 3)


def test_sharing_inner_top_neurons_and_duplicates():
    rng = np.random.default_rng(7)
    v = rng.random((4, 40))
    p = split_sharing_inner(v, 15)
    for e in range(4):
        assert set(p.experts[e]) == set(sorted(range(40), key=lambda n: -v[e, n])[:15])
    counts = collections.Counter(itertools.chain(*p.experts))
    assert p.duplicated == sum(1 for c in counts.values() if c > 1) > 0
    assert p.missing == 40 - len(counts)
    assert p.meta["duplicated"] == p.duplicated


def naive_residual(v, r, size):
    counts = collections.Counter()
    for e in range(v.shape[0]):
        counts.update(sorted(range(v.shape[1]), key=lambda n: (-v[e, n], n))[:size])
    order = sorted(counts, key=lambda n: (-counts[n], -v[:, n].sum(), n))
    return sorted(order[:r])


def test_sharing_inter_residual_rule_and_cover():
    rng = np.random.default_rng(8)
    v = rng.random((3, 48))
    v[:, [5, 17, 30]] += 2.0       # important for everyone: must land in the residual
    p = split_sharing_inter(v, residual_size=12, expert_size=12)
    assert {5, 17, 30} <= set(p.residual)
    assert p.residual == naive_residual(v, 12, 12)
    assert p.is_exact_cover and p.duplicated == 0 and p.expert_sizes == [12, 12, 12]
    assert p.experts == [sorted(b) for b in greedy_assign(v, 12, np.setdiff1d(np.arange(48), p.residual))]
    q = split_sharing_inter(v, residual_size=12, expert_size=16, routed_rule="share")
    assert q.residual == naive_residual(v, 12, 16)
    assert not set(q.residual) & set(itertools.chain(*q.experts))
    assert q.duplicated == q.meta["duplicated"]
    with pytest.raises(PartitionError, match="expert_size"):
        split_sharing_inter(v, residual_size=10, expert_size=12)
    with pytest.raises(PartitionError, match="residual_size"):
        split_sharing_inter(v, residual_size=48)


def test_residual_counts_repeat_when_lists_are_small():
    v = np.array([[3.0, 2, 1, 0], [3.0, 0, 1, 2]])
    # top-1 lists are {0},{0}: 0 goes first, then the lists are recomputed without it
    assert select_residual(v, 2, 1) == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# files


def test_partition_files_roundtrip_and_bad_files(tmp_path):
    parts = {0: split_random(12, 3, 0), 1: split_sharing_inter(np.random.default_rng(0).random((2, 12)), 4)}
    paths = write_partitions(str(tmp_path), parts)
    assert [os.path.basename(p) for p in paths] == ["layers.0.mlp.json", "layers.1.mlp.json"]
    text = open(paths[1]).read()
    d = json.loads(text)
    assert d["method"] == "sharing-inter" and d["residual_size"] == 4 and d["expert_sizes"] == [4, 4]
    assert text.count("\n") > 10                    # human-readable: one line per field / expert
    back = read_partitions(str(tmp_path))
    assert back == parts
    assert not [n for n in os.listdir(tmp_path / "partition") if n.endswith(".tmp")]
    d["experts"][0][0] = 99
    with pytest.raises(PartitionError, match=r"experts\[0\]: neuron indices must lie in \[0, 12\)"):
        Partition.from_dict(d)
    d["experts"][0][0] = "a"
    with pytest.raises(PartitionError, match="integers"):
        Partition.from_dict(d)
    with pytest.raises(PartitionError, match="format"):
        Partition.from_dict({"experts": [[0]]})
    with pytest.raises(PartitionError, match="not valid JSON"):
        Partition.from_json("{")


# ---------------------------------------------------------------------------------------------------------------
# construct-then-check: dense logits reproduced by every method's MoE


H, F, E, V, L = 32, 48, 4, 61, 3


def tiny_dense():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hc).eval()
    cfg = ModelConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_layers=L, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64, rms_norm_eps=hc.rms_norm_eps, rope_theta=10000.0)
    ren = {"self_attn": "attn", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    ours = {}
    for k, v in hf.state_dict().items():
        k = k.replace("model.embed_tokens", "embed").replace("model.norm", "norm").replace("model.layers", "layers")
        for a, b in ren.items():
            k = k.replace(f".{a}.", f".{b}.")
        ours[k] = v.clone()
    return hf, cfg, ours


class RefMoE(torch.nn.Module):
    """Plain-torch llama-moe v1 MoE MLP (eval): top-k of the gate logits, softmax over the k, x score scale."""

    def __init__(self, state, i, cfg):
        super().__init__()
        self.s, self.pre, self.cfg = state, f"layers.{i}.mlp.", cfg

    def swiglu(self, x, name):
        g, u, d = (self.s[f"{self.pre}{name}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        return torch.nn.functional.silu(x @ g.T) * (x @ u.T) @ d.T

    def forward(self, x):
        m = self.cfg.moe
        if m.gate_network == "linear":
            logits = x @ self.s[self.pre + "router.gate.weight"].T
        else:
            logits = torch.tanh(x @ self.s[self.pre + "router.gate.0.weight"].T) @ self.s[self.pre + "router.gate.2.weight"].T
        top, idx = logits.topk(m.top_k, dim=-1)
        w = torch.softmax(top.float(), -1) * m.score_scale
        out = torch.zeros_like(x)
        for slot in range(m.top_k):
            for e in range(m.num_experts):
                sel = idx[..., slot] == e
                if sel.any():
                    out[sel] += w[..., slot][sel, None] * self.swiglu(x[sel], f"experts.{e}")
        if m.residual_size:
            out = out + self.swiglu(x, "shared")
        return out


def moe_logits(hf, cfg, state, ids):
    import copy
    m = copy.deepcopy(hf)
    for i in range(cfg.num_layers):
        if cfg.moe_index(i) is not None:
            m.model.layers[i].mlp = RefMoE(state, i, cfg)
    with torch.no_grad():
        return m(ids).logits


def all_method_partitions(rng):
    v = rng.random((E, F))
    h = rng.random((200, F))
    rows = rng.standard_normal((F, H))
    return {
        "random": split_random(F, E, 1),
        "clustering": split_clustering(rows, E, seed=0)[0],
        "coactivation": split_coactivation(h.T @ h, E),
        "gradient": split_gradient(v),
        "sharing-inter": split_sharing_inter(v, residual_size=8, expert_size=10),
    }


@pytest.mark.parametrize("gate_network", ["mlp", "linear"])
def test_construct_then_check_reproduces_dense_logits(gate_network):
    hf, cfg, dense = tiny_dense()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    rng = np.random.default_rng(9)
    for method, p in all_method_partitions(rng).items():
        parts = {i: p for i in range(L)}
        moe = MoEConfig(num_experts=E, top_k=E, router="topk_noisy", gate_network=gate_network, score_scale=float(E))
        mcfg, state = build_moe(cfg, dense, parts, moe, gate_init="zeros")
        assert mcfg.moe.residual_size == p.residual_size and mcfg.intermediate_size == F
        assert mcfg.expert_sizes(1) == p.expert_sizes
        got = moe_logits(hf, mcfg, state, ids)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=method)
        # a random router (top_k < E) must NOT reproduce the dense model: the check can fail
        moe2 = MoEConfig(num_experts=E, top_k=1, gate_network=gate_network, score_scale=1.0)
        mcfg2, state2 = build_moe(cfg, dense, parts, moe2, gate_init="random", seed=1)
        assert (moe_logits(hf, mcfg2, state2, ids) - ref).abs().max() > 1e-3


def test_sharing_inner_reports_duplicates_and_matches_multiplicity_reference():
    hf, cfg, dense = tiny_dense()
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(1))
    v = np.random.default_rng(10).random((E, F))
    p = split_sharing_inner(v, 16)             # 4 x 16 = 64 slots over 48 neurons: overlaps
    assert p.duplicated > 0
    parts = {i: p for i in range(L)}
    moe = MoEConfig(num_experts=E, top_k=E, score_scale=float(E))
    mcfg, state = build_moe(cfg, dense, parts, moe, gate_init="zeros")
    assert mcfg.intermediate_size == 64
    # reference: dense model whose neuron j counts multiplicity(j) times
    mult = torch.as_tensor(p.multiplicity(), dtype=torch.float32)
    import copy
    ref = copy.deepcopy(hf)
    for layer in ref.model.layers:
        layer.mlp.down_proj.weight.data *= mult[None, :]
    with torch.no_grad():
        want = ref(ids).logits
        dense_logits = hf(ids).logits
    torch.testing.assert_close(moe_logits(hf, mcfg, state, ids), want, rtol=1e-5, atol=1e-5)
    assert (want - dense_logits).abs().max() > 1e-4


def test_build_centroid_gate_and_bad_input():
    hf, cfg, dense = tiny_dense()
    rng = np.random.default_rng(11)
    parts = {i: split_random(F, E, i) for i in range(L)}
    cent = {i: rng.standard_normal((E, H)).astype(np.float32) for i in range(L)}
    moe = MoEConfig(num_experts=E, top_k=2, gate_network="mlp", router="mixtral")
    mcfg, st = build_moe(cfg, dense, parts, moe, gate_init="centroids", centroids=cent)
    assert torch.equal(st["layers.2.mlp.router.gate.0.weight"], torch.as_tensor(cent[2]))
    assert torch.equal(st["layers.2.mlp.router.gate.2.weight"], torch.eye(E))
    assert "layers.2.mlp.router.noise.weight" not in st and "layers.0.mlp.gate_proj.weight" not in st
    e1 = st["layers.1.mlp.experts.1.up_proj.weight"]
    assert torch.equal(e1, dense["layers.1.mlp.up_proj.weight"][parts[1].experts[1]])
    # routers are seeded and independent of other layers
    _, a = build_moe(cfg, dense, parts, MoEConfig(num_experts=E, top_k=2), seed=5)
    _, b = build_moe(cfg, dense, parts, MoEConfig(num_experts=E, top_k=2), seed=5)
    assert torch.equal(a["layers.0.mlp.router.gate.0.weight"], b["layers.0.mlp.router.gate.0.weight"])
    assert a["layers.0.mlp.router.noise.weight"].abs().sum() == 0
    # only some layers MoE
    mcfg3, st3 = build_moe(cfg, dense, {1: parts[1]}, MoEConfig(num_experts=E, top_k=2, moe_layers=[1]))
    assert "layers.0.mlp.gate_proj.weight" in st3 and "layers.1.mlp.experts.0.gate_proj.weight" in st3
    with pytest.raises(ConfigError, match="partitions: no partition for MoE layers"):
        build_moe(cfg, dense, {0: parts[0]}, moe)
    with pytest.raises(ConfigError, match="centroids"):
        build_moe(cfg, dense, parts, moe, gate_init="centroids")
    with pytest.raises(ConfigError, match="gate_init"):
        build_moe(cfg, dense, parts, moe, gate_init="kaiming")
    with pytest.raises(ConfigError, match="ffn_width"):
        build_moe(cfg, dense, {i: split_random(F * 2, E, 0) for i in range(L)}, moe)
    with pytest.raises(ConfigError, match="top_k"):
        build_moe(cfg, dense, parts, MoEConfig(num_experts=E, top_k=E + 1))


@pytest.mark.parametrize("router", ["topk_noisy", "mixtral"])
def test_construct_then_check_on_our_model(router):
    """The same identity on megamoe.model.LlamaMoEModel (our decoder + MoE layer), loaded strictly from build_moe."""
    from megamoe.model import LlamaMoEModel
    hf, cfg, dense = tiny_dense()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    rng = np.random.default_rng(12)
    parts = all_method_partitions(rng)
    for method in ("clustering", "sharing-inter"):
        layers = {i: parts[method] for i in range(L)}
        moe = MoEConfig(num_experts=E, top_k=E, router=router, gate_network="mlp", score_scale=float(E))
        mcfg, state = build_moe(cfg, dense, layers, moe, gate_init="zeros")
        model = LlamaMoEModel(mcfg).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=1e-4, msg=method)
