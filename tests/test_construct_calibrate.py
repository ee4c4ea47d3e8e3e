"""Router calibration, layer-wise reconstruction and output alignment (megamoe.construct.{ffn, router_fit,
reconstruct, align, calibrate}), each against an independent computation:

- the oracle router (top-k experts by output norm) against explicit per-expert SwiGLU modules cut from the
  dense weights by build.moe_layer_state (no Gram matrices, no masks);
- the masked-dense MoE output and the pair-statistics quadratic form against the explicit sum over selected experts;
- a fitted router beats a random one on held-out tokens of a layer with planted structure;
- router reconstruction, down_proj refitting and alignment never raise the layer error on the tokens they fit;
- calibrate_weights' closed-form score scale against a brute-force scan.
"""

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import MoEConfig
from megamoe.construct import router_fit as R
from megamoe.construct.align import channel_alignment, fold_scale
from megamoe.construct.build import moe_layer_state
from megamoe.construct.calibrate import CalibrationSpec, calibrate_layer, mlp_gate_from_linear
from megamoe.construct.ffn import PartitionedFFN
from megamoe.construct.partition import Partition, PartitionError, split_random
from megamoe.construct.reconstruct import layer_error, reconstruct_down, reconstruct_router

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_ffn(h=16, f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(f, h, generator=g) * 0.3, torch.randn(f, h, generator=g) * 0.3,
            torch.randn(h, f, generator=g) * 0.3)


def explicit_experts(gate, up, down, part):
    """Per-expert (gate, up, down) as the converter writes them (build.moe_layer_state)."""
    moe = MoEConfig(num_experts=part.num_experts, top_k=1, gate_network="linear", router="mixtral")
    sd = moe_layer_state("l.", gate, up, down, part, moe, gate_init="zeros")
    return [(sd[f"l.experts.{e}.gate_proj.weight"], sd[f"l.experts.{e}.up_proj.weight"],
             sd[f"l.experts.{e}.down_proj.weight"]) for e in range(part.num_experts)]


def expert_out(w, x):
    g, u, d = w
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def test_oracle_norms_and_moe_output_match_explicit_experts():
    gate, up, down = dense_ffn()
    part = split_random(64, 16, seed=3)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    f = PartitionedFFN(gate, up, down, part)
    experts = explicit_experts(gate, up, down, part)
    ys = torch.stack([expert_out(w, x) for w in experts], 1)                # [T, E, H], one module per expert
    norms = ys.norm(dim=-1)
    torch.testing.assert_close(f.expert_norms(f.hidden(x)), norms, rtol=1e-4, atol=1e-6)
    k = 4
    ref = torch.stack([torch.tensor(sorted(range(16), key=lambda e: -float(norms[t, e]))[:k]) for t in range(50)])
    assert torch.equal(R.oracle_topk(f.expert_norms(f.hidden(x)), k).sort(-1).values, ref.sort(-1).values)
    # the masked-dense MoE output = the weighted sum over the selected experts
    idx = ref
    w = torch.rand(50, k, generator=torch.Generator().manual_seed(2))
    want = torch.stack([sum(w[t, j] * ys[t, idx[t, j]] for j in range(k)) for t in range(50)])
    torch.testing.assert_close(f.moe(x, idx, w), want, rtol=1e-4, atol=1e-5)
    # all experts weight 1 = the dense FFN (the partition lost no neuron)
    torch.testing.assert_close(ys.sum(1), F.linear(F.silu(x @ gate.T) * (x @ up.T), down), rtol=1e-4, atol=1e-5)


def test_pair_stats_give_the_layer_error_for_any_weights():
    gate, up, down = dense_ffn(seed=4)
    part = Partition([list(range(0, 40)), list(range(40, 50)), list(range(50, 64))])  # uneven sizes
    f = PartitionedFFN(gate, up, down, part)
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(5))
    a, b, c = f.pair_stats(x, chunk=7)
    idx = torch.randint(0, 3, (30, 2), generator=torch.Generator().manual_seed(6))
    w = torch.rand(30, 2, generator=torch.Generator().manual_seed(7))
    direct = layer_error(f, x, f.dense(x), idx, w, chunk=11)
    assert abs(R.quality_at_scale(a, b, c, idx, w) - direct) < 1e-5 * max(1.0, direct)


def test_calibrated_scale_is_the_best_of_a_scan():
    gate, up, down = dense_ffn(seed=8)
    part = split_random(64, 8, seed=0)
    f = PartitionedFFN(gate, up, down, part)
    x = torch.randn(80, 16, generator=torch.Generator().manual_seed(9))
    logits = torch.randn(80, 8, generator=torch.Generator().manual_seed(10))
    cal = R.calibrate_weights(logits, 2, *f.pair_stats(x), temperatures=[1.0])
    idx, p = R.topk_softmax(logits, 2)
    y = f.dense(x)
    scan = {s: layer_error(f, x, y, idx, p * s) for s in [cal["scale"] * m for m in (0.5, 0.9, 0.99, 1.01, 1.1, 2)]}
    best = layer_error(f, x, y, idx, p * cal["scale"])
    assert abs(best - cal["rel_error"]) < 1e-5 and all(best <= v + 1e-9 for v in scan.values())


def planted_layer(seed=0, h=24, e=8, s=4, n=1200):
    """Tokens from e clusters; the neurons of expert j fire on cluster j (their gate rows point at its centre)."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(e, h, generator=g), dim=-1) * 3
    gate = torch.cat([mu[j].repeat(s, 1) + 0.3 * torch.randn(s, h, generator=g) for j in range(e)])
    up = torch.randn(e * s, h, generator=g) * 0.5
    down = torch.randn(h, e * s, generator=g) * 0.5
    lab = torch.randint(0, e, (n,), generator=g)
    x = mu[lab] + 0.8 * torch.randn(n, h, generator=g)
    part = Partition([list(range(j * s, (j + 1) * s)) for j in range(e)])
    return gate, up, down, part, x


@pytest.mark.parametrize("method", R.FIT_METHODS)
def test_fitted_router_beats_random_on_held_out_tokens(method):
    gate, up, down, part, x = planted_layer()
    f = PartitionedFFN(gate, up, down, part)
    k, fit, held = 2, slice(0, 900), slice(900, None)
    norms = f.expert_norms(f.hidden(x))
    w = R.fit_router(x[fit], norms[fit], k, method=method)
    q_fit = R.routing_quality(x[held] @ w.T, norms[held], k)
    w_rand = torch.randn(8, 24, generator=torch.Generator().manual_seed(1)) * 0.02
    q_rand = R.routing_quality(x[held] @ w_rand.T, norms[held], k)
    assert q_fit.recall > 0.7 and q_fit.recall > q_rand.recall + 0.3, (q_fit, q_rand)
    y = f.dense(x[held])
    err = [layer_error(f, x[held], y, *[t for t in R.topk_softmax(x[held] @ ww.T, k)]) for ww in (w, w_rand)]
    assert err[0] < err[1], err


def test_router_and_down_reconstruction_never_raise_the_error():
    gate, up, down, part, x = planted_layer(seed=3)
    f = PartitionedFFN(gate, up, down, part)
    k = 2
    w0 = torch.randn(8, 24, generator=torch.Generator().manual_seed(2)) * 0.1
    a, b, c = f.pair_stats(x)
    w, s, hist = reconstruct_router(x, w0, 4.0, k, a, b, c, steps=25)
    assert all(h1 <= h0 for h0, h1 in zip(hist, hist[1:])) and hist[-1] < hist[0], hist
    y = f.dense(x)
    idx, p = R.topk_softmax(x @ w.T, k)
    assert abs(layer_error(f, x, y, idx, p * s) - hist[-1]) < 1e-4
    before = layer_error(f, x, y, idx, p * s)
    d = reconstruct_down(f, x, y, idx, p * s, ridge=1e-3, chunk=333)
    after = layer_error(f, x, y, idx, p * s, down=d)
    assert after < before
    # the ridge pulls towards the dense down_proj: a huge ridge gives it back
    d_far = reconstruct_down(f, x, y, idx, p * s, ridge=1e9)
    torch.testing.assert_close(d_far, down, rtol=1e-4, atol=1e-6)


def test_alignment_matches_statistics_and_folds_into_down():
    gate, up, down = dense_ffn(seed=11)
    part = split_random(64, 8, seed=1)
    f = PartitionedFFN(gate, up, down, part)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(12))
    idx, p = R.topk_softmax(torch.randn(200, 8, generator=torch.Generator().manual_seed(13)), 2)
    ym, yd = f.moe(x, idx, p), f.dense(x)
    al = channel_alignment(ym, yd, "v2")
    z = ym * al["scale"] + al["bias"]
    torch.testing.assert_close(z.mean(0), yd.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.var(0), yd.var(0), rtol=1e-3, atol=1e-6)
    # the scale folded into down_proj = the scaled output (every expert's down rows times s)
    torch.testing.assert_close(f.moe(x, idx, p, down=fold_scale(down, al["scale"])), ym * al["scale"],
                               rtol=1e-4, atol=1e-5)
    ls = channel_alignment(ym, yd, "lsq")
    assert ls["rel_error_scale"] <= ls["rel_error_before"] + 1e-12
    assert al["rel_error_scale_bias"] <= al["rel_error_scale"] + 1e-12


def test_calibrate_layer_report_and_mlp_gate():
    gate, up, down, part, x = planted_layer(seed=5, n=640)
    spec = CalibrationSpec(router="rank", reconstruct=("router", "experts"), align="lsq", router_steps=10)
    res = calibrate_layer(gate, up, down, part, x, 2, spec, seq_len=32)
    steps = [s["step"] for s in res.report["steps"]]
    assert steps == ["rank", "weights", "reconstruct-router", "reconstruct-experts", "align-lsq"]
    hist = res.report["steps"][2]["fit_history"]
    assert all(b <= a for a, b in zip(hist, hist[1:]))
    assert res.report["tokens_held"] == 64 and res.report["tokens_fit"] == 576     # whole sequences held out
    assert res.down is not None and res.down.shape == down.shape and res.scale > 0
    # the mlp gate (Linear, Tanh, Linear) ranks the experts as the linear router does
    w1, w2 = mlp_gate_from_linear(res.router, x)
    lin, mlp = x @ res.router.T, torch.tanh(x @ w1.T) @ w2.T
    assert torch.equal(lin.topk(2, -1).indices.sort(-1).values, mlp.topk(2, -1).indices.sort(-1).values)
    with pytest.raises(PartitionError, match="calibration.router"):
        calibrate_layer(gate, up, down, part, x, 2, CalibrationSpec(router="oracle"))
    with pytest.raises(PartitionError, match="keeps the converter's router"):
        calibrate_layer(gate, up, down, part, x, 2, CalibrationSpec(router="random"))
    dup = Partition([[0, 1, 2], [2, 3]], ffn_width=32)
    with pytest.raises(PartitionError, match="several blocks"):
        PartitionedFFN(gate, up, down, dup)
