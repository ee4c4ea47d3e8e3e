"""Stacked experts: every backend against an independent per-expert formula written here (values and gradients;
even and uneven widths, zero-token experts, an EP rank's slice, expert-TP widths, row weights applied in the
activation), the zero padding (exact, zero gradients, stays zero under AdamW with weight decay), the per-expert
state-dict names (values, keep_vars attributes, missing/unexpected keys), bit-exact loading of state dicts written by
the former per-expert modules (LegacyExperts below is that module), the same seeded initialisation, and a profile
showing one grouped GEMM per projection."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamoe.moe import experts as X
from megamoe.moe.experts import Experts

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the former layout: one nn.Linear per projection and expert (what checkpoints before the change hold) -------

class LegacyExpert(nn.Module):
    def __init__(self, hidden, width, std, out_std, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, width, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(width, hidden, bias=False, dtype=dtype)
        for lin, s in ((self.gate_proj, std), (self.up_proj, std), (self.down_proj, out_std)):
            nn.init.normal_(lin.weight, std=s)


class LegacyExperts(nn.Module):
    def __init__(self, hidden, sizes, local_ids, etp=1, std=0.02, num_layers=1, dtype=torch.float32):
        super().__init__()
        self.local_ids = list(local_ids)
        for e in local_ids:
            self.add_module(str(e), LegacyExpert(hidden, sizes[e] // etp, std, std / math.sqrt(2 * num_layers), dtype))

    def forward(self, x, counts):
        outs, s = [], 0
        for e, n in zip(self.local_ids, [int(c) for c in counts]):
            ex = self._modules[str(e)]
            r = x[s:s + n]
            outs.append(ex.down_proj(F.silu(ex.gate_proj(r)) * ex.up_proj(r)))
            s += n
        return torch.cat(outs) if outs else x.new_zeros(x.shape)


def formula(x, counts, weights, probs=None):
    """Independent reference: y_e = (silu(x_e Wg^T) * (x_e Wu^T) [* p]) Wd^T, per expert, concatenated."""
    outs, s = [], 0
    for (wg, wu, wd), n in zip(weights, counts):
        r = x[s:s + n]
        h = F.silu(r @ wg.t()) * (r @ wu.t())
        if probs is not None:
            h = h * probs[s:s + n, None]
        outs.append(h @ wd.t())
        s += n
    return torch.cat(outs)


def per_expert_weights(ex, dtype=None):
    """(gate, up, down) of each local expert as independent leaf tensors (copied from the state dict)."""
    sd = ex.state_dict()
    return [tuple(sd[f"{e}.{p}.weight"].clone().to(dtype or sd[f"{e}.{p}.weight"].dtype).requires_grad_()
                  for p in X.PROJ) for e in ex.local_ids]


CASES = [   # (global sizes, local experts, etp, tokens per local expert)
    ([32, 32, 32, 32], [0, 1, 2, 3], 1, [7, 9, 5, 11]),          # even widths
    ([48, 16, 40, 24], [0, 1, 2, 3], 1, [7, 0, 13, 4]),          # LLaMA-MoE-style uneven widths, an empty expert
    ([20, 36, 28, 44], [2, 3], 1, [0, 0]),                       # EP rank holding experts 2, 3; no tokens at all
    ([20, 36, 28, 44], [2, 3], 1, [6, 1]),
    ([48, 16, 40, 24], [0, 1, 2, 3], 2, [3, 8, 0, 6]),           # expert-TP 2: half of each width here
]


def _run(ex, x0, dy, counts, probs0=None, backend=None, as_tensor=False):
    ex.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    p = None if probs0 is None else probs0.clone().requires_grad_()
    c = torch.tensor(counts) if as_tensor else counts
    if backend == "reference":
        y = ex.forward_reference(x, c, probs=p)
    else:
        ex.backend = backend
        y = ex(x, c, probs=p)
    y.backward(dy)
    return y.detach(), x.grad, None if p is None else p.grad, ex.gate_up.grad.clone(), ex.down.grad.clone()


def _stacked_grads(ex, weights):
    """The per-expert reference gradients placed into the stacked layout (zeros in the padding)."""
    gu, dn = torch.zeros_like(ex.gate_up, dtype=torch.float64), torch.zeros_like(ex.down, dtype=torch.float64)
    for i, (wg, wu, wd) in enumerate(weights):
        g, u, d = ex.views(i, gu, dn)
        g.copy_(wg.grad), u.copy_(wu.grad), d.copy_(wd.grad)
    return gu, dn


@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "reference"])
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("sizes,local,etp,counts", CASES)
def test_backends_equal_the_formula_fp32(sizes, local, etp, counts, with_probs, backend):
    """fp32 against the formula evaluated in fp64 on the same weights: values and all gradients."""
    torch.manual_seed(0)
    H = 24
    ex = Experts(H, sizes, local, etp=etp, std=0.2)
    N = sum(counts)
    x0, dy = torch.randn(N, H), torch.randn(N, H)
    p0 = torch.rand(N) if with_probs else None
    y, gx, gp, ggu, gdn = _run(ex, x0, dy, counts, p0, backend, as_tensor=backend == "grouped_mm")
    w64 = per_expert_weights(ex, torch.float64)
    x64 = x0.double().requires_grad_()
    p64 = None if p0 is None else p0.double().requires_grad_()
    if N:
        ref = formula(x64, counts, w64, p64)
        ref.backward(dy.double())
        torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx.double(), x64.grad, atol=1e-5, rtol=1e-5)
        if with_probs:
            torch.testing.assert_close(gp.double(), p64.grad, atol=1e-5, rtol=1e-5)
    else:
        assert y.shape == (0, H)
    rgu, rdn = _stacked_grads(ex, w64) if N else (torch.zeros_like(ggu).double(), torch.zeros_like(gdn).double())
    torch.testing.assert_close(ggu.double(), rgu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gdn.double(), rdn, atol=1e-5, rtol=1e-5)
    pad_gu, pad_dn = _padding_masks(ex)
    assert torch.count_nonzero(ggu[pad_gu]) == 0 and torch.count_nonzero(gdn[pad_dn]) == 0   # exactly zero


@pytest.mark.parametrize("sizes", [[32, 32, 32, 32], [48, 16, 40, 24], [12] * 8])
def test_dense_backend_equals_the_routed_formula(sizes):
    """forward_dense(x, combine): every expert on every token, weighted, equals routing each token to its top-k
    experts and summing their weighted outputs (the formula per expert, fp64): values, the input's, the combine
    weights' and every expert weight's gradients; experts a token skips get exactly zero gradient from it."""
    torch.manual_seed(1)
    H, T, k = 24, 19, 2
    E = len(sizes)
    ex = Experts(H, sizes, list(range(E)), std=0.2)
    x0, dy = torch.randn(T, H), torch.randn(T, H)
    idx = torch.rand(T, E).topk(k, -1).indices
    w0 = torch.rand(T, k)
    comb0 = torch.zeros(T, E).scatter(1, idx, w0)
    x, comb = x0.clone().requires_grad_(), comb0.clone().requires_grad_()
    y = ex.forward_dense(x, comb)
    y.backward(dy)
    w64 = per_expert_weights(ex, torch.float64)
    x64, c64 = x0.double().requires_grad_(), comb0.double().requires_grad_()
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for e in idx[t].tolist():
            wg, wu, wd = w64[e]
            ref[t] += c64[t, e] * ((F.silu(x64[t] @ wg.t()) * (x64[t] @ wu.t())) @ wd.t())
    ref.backward(dy.double())
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    picked = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    torch.testing.assert_close(comb.grad.double()[picked], c64.grad[picked], **tol)   # the router's gradient
    rgu, rdn = _stacked_grads(ex, w64)
    torch.testing.assert_close(ex.gate_up.grad.double(), rgu, **tol)
    torch.testing.assert_close(ex.down.grad.double(), rdn, **tol)
    pad_gu, pad_dn = _padding_masks(ex)
    assert torch.count_nonzero(ex.gate_up.grad[pad_gu]) == 0 and torch.count_nonzero(ex.down.grad[pad_dn]) == 0
    unused = [e for e in range(E) if not picked[:, e].any()]
    for e in unused:
        assert torch.count_nonzero(ex.gate_up.grad[e]) == 0 and torch.count_nonzero(ex.down.grad[e]) == 0


def test_dense_backend_choice():
    """The CPU default picks the dense backend for many fine-grained experts a caller can run densely (top_k given),
    never without top_k (dispatched rows) or for a few wide experts; forced without top_k it is refused."""
    x = torch.randn(4, 32)
    fine = Experts(32, [12] * 128, list(range(128)))
    assert fine.select_backend(x, top_k=32) == "dense"
    assert fine.select_backend(x, top_k=16) != "dense"           # E/k = 8: it would compute 8x the FLOPs
    assert Experts(32, [24] * 64, list(range(64))).select_backend(x, top_k=16) != "dense"   # 24 wide: GEMMs pay
    assert fine.select_backend(x) != "dense"                     # dispatched rows (EP > 1, expert-TP): not here
    assert Experts(32, [192] * 8, list(range(8))).select_backend(x, top_k=2) == "grouped_mm"
    assert Experts(32, [12] * 8, list(range(8))).select_backend(x, top_k=2) == "grouped_mm"   # few experts
    with pytest.raises(ValueError, match="dense backend .* every expert on this rank"):
        Experts(32, [12] * 128, list(range(128)), backend="dense")(torch.randn(4, 32), [4] + [0] * 127)


def test_loop_fp64_gradcheck_with_probs():
    """fp64 (grouped_mm does not take fp64: the loop backend runs it): torch.autograd.gradcheck over the input, the
    row weights and both stacked parameters, uneven widths and an empty expert."""
    torch.manual_seed(2)
    ex = Experts(6, [4, 2, 3], [0, 1, 2], std=0.5).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    p = torch.rand(9, dtype=torch.float64, requires_grad=True)
    ex.backend = "loop"

    def f(x, p, gu, dn):
        return X._LoopSwiGLU.apply(x, (4, 0, 5), tuple(ex.widths), gu, dn, p)
    assert torch.autograd.gradcheck(f, (x, p, ex.gate_up, ex.down))
    ex.backend = None
    assert ex.select_backend(x) == "loop"       # the default for fp64


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_bf16_close_to_fp32(backend):
    torch.manual_seed(3)
    ex = Experts(32, [16, 24, 8], [0, 1, 2], std=0.2)
    counts = [5, 0, 7]
    x0, dy = torch.randn(12, 32), torch.randn(12, 32)
    ref = _run(ex, x0, dy, counts, None, "loop")
    exb = Experts(32, [16, 24, 8], [0, 1, 2], std=0.2).to(torch.bfloat16)
    exb.load_state_dict(ex.state_dict())
    got = _run(exb, x0.bfloat16(), dy.bfloat16(), counts, None, backend)
    assert got[0].dtype == torch.bfloat16 and exb.gate_up.grad.dtype == torch.bfloat16
    for a, b in zip(got, ref):
        if a is not None:       # bf16: ~3 significant digits; compare the whole tensor (relative Frobenius error)
            assert float((a.float() - b).norm() / b.norm()) < 1e-2


def _padding_masks(ex):
    gu, dn = torch.ones_like(ex.gate_up, dtype=torch.bool), torch.ones_like(ex.down, dtype=torch.bool)
    for i in range(len(ex.local_ids)):
        for v in ex.views(i, gu, dn):
            v.fill_(False)
    return gu, dn


def test_padding_is_zero_and_stays_zero_under_adamw():
    """Uneven widths: the padding starts at zero, gets exactly zero gradients and AdamW (weight decay 0.1) keeps it
    at zero; the gradient norm equals the one over the per-expert tensors alone."""
    torch.manual_seed(4)
    ex = Experts(16, [8, 24, 12], [0, 1, 2], std=0.3)
    assert ex.fmax == 24 and ex.gate_up.shape == (3, 48, 16) and ex.down.shape == (3, 16, 24)
    pad_gu, pad_dn = _padding_masks(ex)
    assert pad_gu.sum() == 2 * (16 + 12) * 16 and pad_dn.sum() == 16 * (16 + 12)
    opt = torch.optim.AdamW(ex.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for backend in ("grouped_mm", "loop"):
            ex.backend = backend
            opt.zero_grad()
            y = ex(torch.randn(20, 16), [6, 9, 5])
            y.square().sum().backward()
            assert not ex.gate_up.grad[pad_gu].any() and not ex.down.grad[pad_dn].any()
            norm = torch.cat([p.grad.flatten() for p in ex.parameters()]).norm()
            per_expert = torch.cat([v.flatten() for i in range(3) for v in ex.views(i, ex.gate_up.grad,
                                                                                     ex.down.grad)]).norm()
            assert float(norm) == pytest.approx(float(per_expert), rel=1e-6)
            opt.step()
    assert not ex.gate_up[pad_gu].any() and not ex.down[pad_dn].any()
    assert ex.gate_up.abs().sum() > 0


def test_counts_must_cover_the_rows():
    ex = Experts(8, [4, 4], [0, 1])
    for backend in ("grouped_mm", "loop"):
        ex.backend = backend
        with pytest.raises(ValueError, match="sums to 4"):
            ex(torch.randn(5, 8), [2, 2])


def test_backend_choice_env_and_errors(monkeypatch, caplog):
    ex = Experts(8, [8, 8], [0, 1])
    x = torch.randn(4, 8)
    monkeypatch.setenv(X.ENV_VAR, "grouped_mm")
    assert ex.select_backend(x) == "grouped_mm"
    monkeypatch.setenv(X.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="MEGAMOE_EXPERTS_BACKEND"):
        ex.select_backend(x)
    monkeypatch.setenv(X.ENV_VAR, "te")
    with pytest.raises(ValueError, match="cannot run here"):
        ex.select_backend(x)
    monkeypatch.delenv(X.ENV_VAR)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):        # fp64 has no grouped_mm
        Experts(8, [8, 8], [0, 1], backend="grouped_mm").double()(x.double(), [2, 2])
    with pytest.raises(ValueError, match="16 bytes"):              # H * 4 bytes must be a multiple of 16
        Experts(6, [8, 8], [0, 1], backend="grouped_mm")(torch.randn(4, 6), [2, 2])
    assert Experts(6, [8, 8], [0, 1]).select_backend(torch.randn(4, 6)) == "loop"


# ---- state dict --------------------------------------------------------------------------------------------------

def test_state_dict_names_views_and_attributes():
    torch.manual_seed(5)
    ex = Experts(16, [8, 24, 12, 16], [1, 3], etp=1, std=0.3)
    sd = ex.state_dict()
    assert list(sd) == [f"{e}.{p}.weight" for e in (1, 3) for p in X.PROJ]
    assert sd["1.gate_proj.weight"].shape == (24, 16) and sd["3.down_proj.weight"].shape == (16, 16)
    assert torch.equal(sd["1.up_proj.weight"], ex.gate_up[0, ex.fmax:ex.fmax + 24])
    kv = ex.state_dict(keep_vars=True)
    for name, t in kv.items():
        assert t.allreduce is False and t.tensor_model_parallel is True and t.stacked_expert_view
        assert t.partition_dim == (1 if "down_proj" in name else 0)
    # experts[e] views write through to the parameters (as the NaN-guard test poisons a weight)
    with torch.no_grad():
        ex[3].up_proj.weight.fill_(float("inf"))
    assert torch.isinf(ex.gate_up[1, ex.fmax:ex.fmax + 16]).all() and torch.isfinite(ex.gate_up[0]).all()
    with pytest.raises(KeyError):
        ex[0]
    assert ex.gate_up.allreduce is False and ex.down.tensor_model_parallel


def test_load_reports_missing_and_unexpected_per_expert_names():
    ex = Experts(8, [8, 8, 8, 8], [2, 3])
    sd = {k: torch.full_like(v, 7.0) for k, v in Experts(8, [8, 8, 8, 8], [0, 1, 2, 3]).state_dict().items()}
    del sd["3.down_proj.weight"]
    before = ex.down.detach().clone()
    missing, unexpected = ex.load_state_dict(sd, strict=False)
    assert missing == ["3.down_proj.weight"]
    assert sorted(unexpected) == sorted(f"{e}.{p}.weight" for e in (0, 1) for p in X.PROJ)
    assert (ex.state_dict()["2.gate_proj.weight"] == 7).all() and torch.equal(ex.down[1], before[1])
    with pytest.raises(RuntimeError, match="size mismatch for 2.gate_proj.weight"):
        ex.load_state_dict({**sd, "2.gate_proj.weight": torch.zeros(4, 8)}, strict=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_init_and_legacy_state_dicts_are_bit_exact(dtype):
    """The same seed gives the same weights as the former per-expert modules (same RNG draws), and a state dict
    written by them loads bit-exactly (and back out unchanged), in an EP slice with uneven widths."""
    sizes, local = [24, 8, 40, 16], [1, 2, 3]
    torch.manual_seed(6)
    old = LegacyExperts(16, sizes, local, std=0.3, num_layers=4, dtype=dtype)
    torch.manual_seed(6)
    new = Experts(16, sizes, local, std=0.3, num_layers=4, dtype=dtype)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(old_sd) == list(new_sd)
    for k in old_sd:
        assert torch.equal(old_sd[k], new_sd[k]), k
    torch.manual_seed(7)
    other = LegacyExperts(16, sizes, local, std=0.5, dtype=dtype)
    new.load_state_dict(other.state_dict(), strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    x = torch.randn(11, 16, dtype=dtype)
    for y in (new(x, [4, 0, 7]), new.forward_reference(x, [4, 0, 7])):
        torch.testing.assert_close(y, other(x, [4, 0, 7]), atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=1e-5)


def test_legacy_shards_load_bit_exactly(tmp_path):
    """Our shard format: a state dict of the former per-expert model written with save_shards, read back with
    load_shards (any EP slice) and loaded into stacked experts: bit-exact."""
    from megamoe import parallel
    from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
    from megamoe.formats.shards import load_shards, save_shards
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=64, num_layers=2, num_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_sizes=[24, 8, 16, 16]))
    parallel.initialize(ParallelConfig(), cfg)
    torch.manual_seed(8)
    legacy = {f"layers.{i}.mlp.experts.{k}": v for i in range(2)
              for k, v in LegacyExperts(16, [24, 8, 16, 16], range(4), std=0.4).state_dict().items()}
    from megamoe.model import LlamaMoEModel
    model = LlamaMoEModel(cfg)
    full = {**{k: v for k, v in model.state_dict().items() if ".experts." not in k}, **legacy}
    save_shards(str(tmp_path / "m"), cfg, full, ParallelConfig(ep=2))
    for ep_rank in (0, 1):
        sd = load_shards(str(tmp_path / "m"), ep=(ep_rank, 2))
        local = [2 * ep_rank, 2 * ep_rank + 1]
        ex = Experts(16, [24, 8, 16, 16], local)
        ex.load_state_dict({k[len("layers.1.mlp.experts."):]: v for k, v in sd.items()
                            if k.startswith("layers.1.mlp.experts.")}, strict=True)
        for k, v in ex.state_dict().items():
            assert torch.equal(v, legacy[f"layers.1.mlp.experts.{k}"]), k
    model.load_state_dict(load_shards(str(tmp_path / "m")), strict=True)
    got = model.state_dict()
    for k, v in legacy.items():
        assert torch.equal(got[k], v), k


# ---- profile: one grouped GEMM per projection -------------------------------------------------------------------

def _op_counts(fn):
    """{op name: calls} of the ops fn runs, leaving out what runs inside an aten::_grouped_mm (on a CPU it lowers
    to one aten::mm per group; on a GPU it is one CUTLASS kernel)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for ev in prof.events():
        parent, inside = ev.cpu_parent, False
        while parent is not None:
            inside |= parent.name == "aten::_grouped_mm"
            parent = parent.cpu_parent
        if not inside:
            counts[ev.name] = counts.get(ev.name, 0) + 1
    return counts


def test_profile_one_grouped_gemm_per_projection():
    torch.manual_seed(9)
    E = 8
    ex = Experts(32, [16] * E, list(range(E)))
    x = torch.randn(64, 32)
    counts = torch.tensor([8, 0, 12, 4, 9, 11, 10, 10])
    with torch.no_grad():
        ex.backend = "grouped_mm"
        g = _op_counts(lambda: ex(x, counts))
        ex.backend = "loop"
        lp = _op_counts(lambda: ex(x, counts))
    assert g.get("aten::_grouped_mm", 0) == 2 and g.get("aten::mm", 0) == 0, g   # gate+up, down
    assert lp.get("aten::_grouped_mm", 0) == 0 and lp.get("aten::mm", 0) == 2 * E, lp
    # backward: dh, d_down, dx, d_gate_up
    ex.backend = "grouped_mm"
    xg = x.clone().requires_grad_()
    y = ex(xg, counts)
    b = _op_counts(lambda: y.sum().backward())
    assert b.get("aten::_grouped_mm", 0) == 4 and b.get("aten::mm", 0) == 0, b


# ---- the MoE layer: probabilities in the activation, static capacity, expert backends ----------------------------

def _moe_layer(router, top_k, cf, policy="zero", dtype=torch.float64):
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.moe.layer import MoELayer
    from megamoe.parallel import megatron_config
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=64, num_layers=1, num_heads=2,
                      moe=MoEConfig(num_experts=8, top_k=top_k, router=router, gate_network="mlp", noise=False,
                                    capacity_factor=cf, drop_policy=policy, score_scale=1.5, gate_init_std=0.5,
                                    expert_sizes=[8, 8, 4, 12, 8, 8, 8, 8], z_loss_weight=1e-3))
    torch.manual_seed(0)
    return MoELayer(cfg, megatron_config(cfg), 0).to(dtype).train()


def _layer_run(layer, x0, probs_in_experts, pad_to_capacity, backend):
    layer.probs_in_experts = probs_in_experts
    layer.dispatcher.pad_to_capacity = pad_to_capacity
    layer.experts.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    y, stats = layer(x)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum() \
        + 10 * stats.balance_loss
    loss.backward()
    return [y.detach(), x.grad, stats.balance_loss.detach()] + [p.grad for p in layer.parameters()
                                                                 if p.grad is not None]


@pytest.mark.usefixtures("world")
@pytest.mark.parametrize("router,top_k,cf,policy", [
    ("mixtral", 2, None, "zero"),
    ("switch", 1, 1.0, "zero"),          # capacity, tokens dropped
    ("topk_noisy", 2, 0.75, "input"),    # capacity, dropped slots pass the input through
])
def test_layer_probs_in_experts_and_static_capacity_equal_the_default(router, top_k, cf, policy):
    """Router weights applied in the experts' activation (and the unweighted combine), experts padded to the
    capacity (static shapes) and the grouped_mm / loop / reference backends: the same output, balance loss, input
    gradient and gradients of every parameter (the router's included) as the default path, fp64 (grouped_mm: fp32
    against the fp64 default)."""
    layer = _moe_layer(router, top_k, cf, policy)
    torch.manual_seed(1)
    x0 = torch.randn(5, 7, 16, dtype=torch.float64)
    ref = _layer_run(layer, x0, False, False, "loop")
    assert len(ref) >= 3 + 4                  # router gate (2 linears), gate_up, down
    for probs_in, pad in ((True, False), (False, True), (True, True)):
        got = _layer_run(layer, x0, probs_in, pad, "loop")
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    layer32 = _moe_layer(router, top_k, cf, policy, torch.float32)
    for probs_in, pad in ((False, False), (True, True)):
        got = _layer_run(layer32, x0.float(), probs_in, pad, "grouped_mm")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


class _HostReads:
    """Counts Python-level reads of tensor values to the host (what costs a device sync on a GPU)."""
    NAMES = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                self.n += 1
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.usefixtures("world")
def test_host_reads_per_layer(monkeypatch):
    """Dispatch + grouped experts + combine: one host read (the permuted row count) without a capacity, none when
    the experts are padded to a capacity (static shapes)."""
    from megamoe.moe.router import Routing
    layer = _moe_layer("mixtral", 2, 1.5, dtype=torch.float32)
    layer.experts.backend = "grouped_mm"
    x = torch.randn(24, 16)
    idx = torch.randint(0, 8, (24, 2))
    w = torch.rand(24, 2)
    for capacity, pad, probs_in, want in ((None, False, False, 1), (None, False, True, 1), (5, True, True, 0),
                                          (5, True, False, 0)):
        layer.dispatcher.pad_to_capacity = pad
        with monkeypatch.context() as m:
            reads = _HostReads(m)
            e_in, rows, h = layer.dispatcher.dispatch(x, Routing(idx, w, capacity, None, None), probs_in)
            y = layer.dispatcher.combine(layer.experts(e_in, rows, probs=h.row_probs), h)
        assert reads.n == want, (capacity, pad, probs_in, reads.n)
        assert y.shape == x.shape


# ---- on a GPU (scripts/gpu_check.sh runs these; skipped without CUDA) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "te"])
def test_cuda_backends_equal_the_fp32_reference(backend):
    """bf16 on CUDA (CUTLASS grouped GEMM for grouped_mm; transformer-engine's GroupedLinear for te, where it
    imports) against the fp32 CPU reference on the same weights: values and gradients, uneven widths, an empty
    expert, row weights."""
    if backend == "te" and X.te_unavailable():
        pytest.skip(X.te_unavailable())
    torch.manual_seed(10)
    sizes, counts = [1376, 1024, 1376, 512], [300, 0, 517, 95]
    ref = Experts(256, sizes, [0, 1, 2, 3], std=0.05)
    x0, dy, p0 = torch.randn(sum(counts), 256), torch.randn(sum(counts), 256), torch.rand(sum(counts))
    want = _run(ref, x0, dy, counts, p0, "reference")
    ex = Experts(256, sizes, [0, 1, 2, 3], std=0.05).cuda().bfloat16()
    ex.load_state_dict(ref.state_dict())
    got = _run(ex, x0.cuda().bfloat16(), dy.cuda().bfloat16(), torch.tensor(counts).cuda(), p0.cuda(), backend,
               as_tensor=False) if backend != "grouped_mm" else \
        _run(ex, x0.cuda().bfloat16(), dy.cuda().bfloat16(), counts, p0.cuda(), backend, as_tensor=True)
    for a, b in zip(got, want):
        a = a.float().cpu()
        assert float((a - b).norm() / b.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.usefixtures("world")
def test_cuda_layer_static_capacity_one_graph_and_no_host_read(monkeypatch):
    """On CUDA the defaults are grouped_mm, the weights in the activation and padding to the capacity: the layer
    equals its CPU fp32 run, and dispatch + experts + combine read nothing back to the host."""
    from megamoe.moe.router import Routing
    layer = _moe_layer("mixtral", 2, 1.25, dtype=torch.float32)
    torch.manual_seed(11)
    x0 = torch.randn(64, 16)
    ref = _layer_run(layer, x0, False, False, "loop")
    lc = _moe_layer("mixtral", 2, 1.25, dtype=torch.bfloat16).cuda()
    lc.load_state_dict(layer.state_dict())
    got = _layer_run(lc, x0.cuda().bfloat16(), None, None, None)
    assert lc.experts.select_backend(x0.cuda().bfloat16()) == "grouped_mm"
    for a, b in zip(got, ref):
        assert float((a.float().cpu() - b).norm() / b.norm().clamp(min=1e-6)) < 2e-2
    x = x0.cuda().bfloat16()
    idx, w = torch.randint(0, 8, (64, 2), device="cuda"), torch.rand(64, 2, device="cuda")
    with monkeypatch.context() as m:
        reads = _HostReads(m)
        e_in, rows, h = lc.dispatcher.dispatch(x, Routing(idx, w, 20, None, None), True)
        lc.dispatcher.combine(lc.experts(e_in, rows, probs=h.row_probs), h)
    assert reads.n == 0
