"""Routers against the formulas, computed independently here (numpy/scipy, transformers' own Mixtral loss)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.parallel import megatron_config
from megamoe.moe.layer import MoELayer
from megamoe.moe.router import Router

pytestmark = pytest.mark.usefixtures("world")

H, E = 16, 6


def make_router(**kw):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=E, **kw)
    r = Router(moe, H, score_scale=kw.get("score_scale", 1.0))
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.7)
    return r


def np_cv2(x):
    x = np.asarray(x, dtype=np.float64)
    return x.var(ddof=1) / (x.mean() ** 2 + 1e-10)


def gate_logits_np(r, x):
    xs = x.double().numpy()
    if isinstance(r.gate, torch.nn.Linear):
        return xs @ r.gate.weight.double().detach().numpy().T
    w1, w2 = r.gate[0].weight.double().detach().numpy(), r.gate[2].weight.double().detach().numpy()
    return np.tanh(xs @ w1.T) @ w2.T


def softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("gate_network", ["mlp", "linear"])
def test_topk_noisy_eval_matches_formula(gate_network):
    k, scale, w = 2, 3.0, 0.01
    r = make_router(top_k=k, router="topk_noisy", gate_network=gate_network, score_scale=scale).eval()
    x = torch.randn(40, H)
    out = r(x)
    g = gate_logits_np(r, x)
    idx = np.argsort(-g, axis=-1, kind="stable")[:, :k]
    probs = softmax_np(np.take_along_axis(g, idx, -1))
    np.testing.assert_array_equal(out.indices.numpy(), idx)
    np.testing.assert_allclose(out.weights.detach().numpy(), probs * scale, rtol=1e-5, atol=1e-6)
    importance = np.zeros(E)
    np.add.at(importance, idx.reshape(-1), probs.reshape(-1))
    load = np.bincount(idx.reshape(-1), minlength=E).astype(float)
    np.testing.assert_allclose(out.stats.importance.numpy(), importance, rtol=1e-5)
    np.testing.assert_allclose(out.stats.load.numpy(), load)
    np.testing.assert_allclose(out.stats.balance_loss.item(), w * (np_cv2(importance) + np_cv2(load)), rtol=1e-4)


@pytest.mark.parametrize("estimate", ["shazeer", "llama_moe"])
def test_topk_noisy_training_noise_and_smooth_load(estimate):
    k, eps = 2, 0.01
    r = make_router(top_k=k, router="topk_noisy", gate_network="mlp", load_estimate=estimate).train()
    x = torch.randn(64, H)
    torch.manual_seed(123)
    out = r(x)
    torch.manual_seed(123)
    z = torch.randn(64, E).double().numpy()  # the router draws its noise with one randn_like call
    clean = gate_logits_np(r, x)
    sigma = np.log1p(np.exp(x.double().numpy() @ r.noise.weight.double().detach().numpy().T)) + eps
    noise = z * sigma
    noisy = clean + noise
    order = np.argsort(-noisy, axis=-1, kind="stable")
    idx = order[:, :k]
    np.testing.assert_array_equal(out.indices.numpy(), idx)
    np.testing.assert_allclose(out.weights.detach().numpy(), softmax_np(np.take_along_axis(noisy, idx, -1)), rtol=1e-5,
                               atol=1e-6)
    top = np.take_along_axis(noisy, order[:, :k + 1], -1)
    thr_in, thr_out = top[:, k:k + 1], top[:, k - 1:k]
    probe = noisy if estimate == "shazeer" else noise
    load = np.where(probe > thr_in, norm.cdf((clean - thr_in) / sigma), norm.cdf((clean - thr_out) / sigma)).sum(0)
    np.testing.assert_allclose(out.stats.load.numpy(), load, rtol=1e-4, atol=1e-5)
    imp = np.zeros(E)
    np.add.at(imp, idx.reshape(-1), softmax_np(np.take_along_axis(noisy, idx, -1)).reshape(-1))
    np.testing.assert_allclose(out.stats.balance_loss.item(), 0.01 * (np_cv2(imp) + np_cv2(load)), rtol=1e-4)
    # the smooth load carries gradient to the noise network (that is its purpose)
    out.stats.balance_loss.backward()
    assert r.noise.weight.grad.abs().sum() > 0 and r.gate[0].weight.grad.abs().sum() > 0


def test_no_noise_in_eval():
    r = make_router(top_k=2, router="topk_noisy").eval()
    x = torch.randn(10, H)
    a, b = r(x), r(x)
    assert torch.equal(a.weights, b.weights)


def test_mixtral_router_matches_transformers_aux_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    k, coef = 2, 0.02
    r = make_router(top_k=k, router="mixtral", gate_network="linear", balance_loss_weight=coef,
                    z_loss_weight=1e-3).eval()
    x = torch.randn(50, H)
    out = r(x)
    logits = r.gate(x).detach()
    p = torch.softmax(logits.double(), -1)
    w, idx = torch.topk(p, k, -1)
    w = w / w.sum(-1, keepdim=True)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.weights.double(), w, rtol=1e-5, atol=1e-6)
    ref = load_balancing_loss_func((logits,), E, k)
    torch.testing.assert_close(out.stats.balance_loss.double(), coef * ref.double(), rtol=1e-5, atol=1e-7)
    z = 1e-3 * torch.logsumexp(logits.double(), -1).pow(2).mean()
    torch.testing.assert_close(out.stats.z_loss.double(), z, rtol=1e-5, atol=1e-8)


def _layer(router, policy, cf, scale=2.0):
    cfg = ModelConfig(vocab_size=32, hidden_size=H, intermediate_size=E * 4, num_layers=1, num_heads=2,
                      moe=MoEConfig(num_experts=E, top_k=1, router=router, gate_network="linear", noise=False,
                                    capacity_factor=cf, drop_policy=policy, score_scale=scale, gate_init_std=1.0))
    torch.manual_seed(0)
    return MoELayer(cfg, megatron_config(cfg), 0).eval()


@pytest.mark.parametrize("policy", ["zero", "input"])
def test_switch_capacity_dropping_and_aux_loss(policy):
    cf, T, scale = 0.5, 48, 2.0
    layer = _layer("switch", policy, cf, scale)
    x = torch.randn(T, 1, H)
    y, stats = layer(x)
    flat = x.view(T, H)
    logits = layer.router.gate(flat).detach().double()
    p = torch.softmax(logits, -1)
    top, e = p.max(-1)
    cap = math.ceil(cf * T / E)
    assert layer.router.capacity(T) == cap
    seen = [0] * E
    ref = torch.zeros(T, H, dtype=torch.float64)
    dropped = 0
    for t in range(T):
        ex = int(e[t])
        if seen[ex] < cap:
            with torch.no_grad():
                ref[t] = top[t] * scale * layer.experts[ex](flat[t:t + 1]).double()[0]
        else:
            dropped += 1
            if policy == "input":
                ref[t] = top[t] * scale * flat[t].double()
        seen[ex] += 1
    assert int(stats.num_dropped) == dropped > 0
    torch.testing.assert_close(y.view(T, H).double().detach(), ref, rtol=1e-4, atol=1e-5)
    counts = torch.bincount(e, minlength=E).double()
    aux = 0.01 * E * ((counts / T) * p.mean(0)).sum()
    torch.testing.assert_close(stats.balance_loss.double(), aux, rtol=1e-5, atol=1e-8)
    assert torch.equal(stats.tokens_per_expert, torch.bincount(e, minlength=E))


def test_switch_default_capacity_factor_and_training_noise_changes_choice():
    layer = _layer("switch", "zero", None)
    assert layer.router.capacity(100) == math.ceil(1.25 * 100 / E)
    moe = MoEConfig(num_experts=E, top_k=1, router="switch", gate_network="linear", noise=True)
    r = Router(moe, H, 1.0).train()
    x = torch.randn(200, H)
    a = r(x).indices
    r.eval()
    b, c = r(x).indices, r(x).indices
    assert torch.equal(b, c) and not torch.equal(a, b)  # Gumbel noise in training only


@pytest.mark.parametrize("gate_network", ["mlp", "linear"])
def test_bf16_router_scores_in_fp32(gate_network):
    """Under bf16 training the router's weights are bf16 like every other parameter (one dtype for megatron's DDP and
    distributed optimizer), but the scores are computed in fp32: same routing as an fp32 router holding the same
    (bf16-representable) weights, from bf16 activations."""
    r32 = make_router(top_k=2, router="topk_noisy", gate_network=gate_network).eval()
    with torch.no_grad():
        for p in r32.parameters():
            p.copy_(p.bfloat16().float())
    r16 = Router(MoEConfig(num_experts=E, top_k=2, router="topk_noisy", gate_network=gate_network), H,
                 score_scale=1.0, dtype=torch.bfloat16).eval()
    r16.load_state_dict(r32.state_dict())
    assert {p.dtype for p in r16.parameters()} == {torch.bfloat16}
    x = torch.randn(64, H).bfloat16()
    a, b = r16(x), r32(x.float())
    assert a.weights.dtype == torch.float32
    torch.testing.assert_close(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-6, atol=1e-6)
    # gradients reach the bf16 weights
    r16.train()
    out = r16(x.requires_grad_())
    (out.weights.sum() + out.stats.balance_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in r16.gate.parameters())


@pytest.mark.parametrize("router,order,gets_grad", [
    ("topk_noisy", None, False),                   # llama-moe v1: softmax over the one selected logit = 1.0
    ("mixtral", None, False),                      # renormalised over the one selected = 1.0 (v2's "1+7 top-1")
    ("mixtral", "softmax_topk", True),             # pre-softmax: the weight is the probability itself
    ("topk_noisy", "softmax_topk", True),
])
def test_top1_router_gradient_from_the_lm_loss(router, order, gets_grad, caplog):
    """Top-1 routing with top-k-then-softmax (or renormalised) ordering gives the router exactly zero gradient from
    the LM loss; the pre-softmax ordering (softmax over all, top-k, no renormalisation) does not; the zero-gradient
    configurations are warned about when the router is built. Reference: the weights' formula p_e = softmax(g)_e."""
    import logging
    from megamoe.moe import router as router_mod
    router_mod._warned.clear()
    moe = MoEConfig(num_experts=E, top_k=1, router=router, gate_network="linear", noise=False,
                    balance_loss_weight=0.0, score_order=order)
    ModelConfig(vocab_size=32, hidden_size=H, intermediate_size=E * 4, num_layers=1, num_heads=2, moe=moe).validate()
    with caplog.at_level(logging.WARNING, logger="megamoe.moe.router"):
        r = Router(moe, H, 1.0).train()
    assert ("no gradient from the LM loss" in caplog.text) == (not gets_grad)
    x = torch.randn(32, H)
    out = r(x)
    target = torch.randn(32)                       # an LM-like loss through the combine weights only
    loss = (out.weights[:, 0] * target).sum()
    loss.backward()
    g = r.gate.weight.grad.abs().max()
    assert (g > 1e-3) if gets_grad else (g < 1e-5)   # renormalising p/p gives 0 up to rounding (~1e-7)
    if gets_grad:                                  # the weight is softmax(g)[e], not renormalised
        p = torch.softmax(x @ r.gate.weight.detach().t(), -1)
        torch.testing.assert_close(out.weights[:, 0], p.gather(1, out.indices).squeeze(1), rtol=1e-5, atol=1e-6)


def test_score_order_validation():
    base = dict(vocab_size=32, hidden_size=H, intermediate_size=E * 4, num_layers=1, num_heads=2)
    for moe, msg in [(MoEConfig(num_experts=E, top_k=2, router="mixtral", score_order="topk_softmax"),
                      "moe.score_order"),
                     (MoEConfig(num_experts=E, top_k=1, router="switch", score_order="softmax_topk_renorm"),
                      "moe.score_order"),
                     (MoEConfig(num_experts=E, top_k=2, score_order="sorted"), "moe.score_order")]:
        with pytest.raises(ConfigError, match=msg):
            ModelConfig(**base, moe=moe).validate()
