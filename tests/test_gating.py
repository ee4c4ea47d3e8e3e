"""Fused top-k gating (Triton) against the plain-torch reference, forward and backward.

On a CPU machine the kernel runs in the Triton interpreter: TRITON_INTERPRET is read when @triton.jit decorates the
kernels, so this module sets it just around the import of megamoe.kernels.topk_gating and restores the environment
afterwards (other test modules keep the torch path). With CUDA the kernel is imported natively and the same checks
run on the GPU (marked `gpu`).
"""

import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_import import import_topk_gating

HAS_CUDA = torch.cuda.is_available()
K = import_topk_gating()   # interpreted on a CPU machine (TRITON_INTERPRET=1 around the import only), or None

from megamoe.ops import _ext  # noqa: E402
from megamoe.ops import gating as G  # noqa: E402

CPU_OK = K is not None and K.INTERPRETED
needs_interp = pytest.mark.skipif(not CPU_OK, reason="Triton interpreter unavailable (triton missing, or the kernel "
                                  "module was imported before TRITON_INTERPRET=1)")
ORDERS = [("topk_softmax", True), ("softmax_topk", True), ("softmax_topk", False)]


def _inputs(T, E, dtype, device, seed, ties=False, noisy=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties
        logits = torch.randint(0, 3, (T, E), generator=g).float()
    else:
        logits = torch.randn(T, E, generator=g) * 2
    noise = torch.randn(T, E, generator=g) * 0.3 if noisy else None
    logits = logits.to(dtype).to(device)
    return logits, (noise.to(device) if noise is not None else None)


def _run(backend, monkeypatch, logits, noise, k, order, renorm, scale, capacity, thresholds, seed):
    """Forward, then backward of a random linear function of every differentiable output."""
    monkeypatch.setenv(G.ENV_VAR, backend)
    x = logits.clone().requires_grad_(True)
    n = noise.clone().requires_grad_(True) if noise is not None else None
    out = G.topk_gating(x, k, order, renorm, scale, n, capacity, thresholds)
    g = torch.Generator().manual_seed(seed + 1)
    dev = logits.device
    loss = (out.weights * torch.randn(out.weights.shape, generator=g).to(dev)).sum()
    loss = loss + (out.importance * torch.randn(out.importance.shape, generator=g).to(dev)).sum()
    if out.prob_sum is not None:
        loss = loss + (out.prob_sum * torch.randn(out.prob_sum.shape, generator=g).to(dev)).sum()
    if out.thresholds is not None:
        loss = loss + (out.thresholds * torch.randn(out.thresholds.shape, generator=g).to(dev)).sum()
    if loss.requires_grad:
        loss.backward()
    return out, x.grad, (n.grad if n is not None else None)


def check_matches_reference(monkeypatch, T, E, k, order, renorm, device="cpu", dtype=torch.float32, scale=1.0,
                            noisy=False, capacity=None, thresholds=False, ties=False, seed=0, backward=True):
    logits, noise = _inputs(T, E, dtype, device, seed, ties, noisy)
    got, gx, gn = _run("triton", monkeypatch, logits, noise, k, order, renorm, scale, capacity, thresholds, seed)
    ref, rx, rn = _run("torch", monkeypatch, logits, noise, k, order, renorm, scale, capacity, thresholds, seed)
    # exact: selection, counts, positions, drop mask
    assert torch.equal(got.indices, ref.indices)
    assert got.counts.dtype == torch.int64 and torch.equal(got.counts, ref.counts)
    for name in ("positions", "dropped"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    # values: fp32 maths on both sides
    close = dict(atol=2e-6 * max(1, T) ** 0.5, rtol=1e-5)
    torch.testing.assert_close(got.weights, ref.weights, **close)
    torch.testing.assert_close(got.importance, ref.importance, **close)
    for name in ("prob_sum", "thresholds"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **close)
    if backward and T > 0:
        assert gx is not None and gx.dtype == dtype
        gtol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(gx, rx, **gtol)
        if noisy:
            torch.testing.assert_close(gn, rn, **gtol)


# ---------------------------------------------------------------------------------------------------------------
# the reference itself, on hand-worked rows
# ---------------------------------------------------------------------------------------------------------------

def test_reference_hand_worked():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    out = G.topk_gating_reference(logits, 2, "topk_softmax", return_thresholds=True)
    assert out.indices.tolist() == [[1, 3]]                         # tie: lower index first
    torch.testing.assert_close(out.weights, torch.tensor([[0.5, 0.5]]))
    assert out.thresholds.tolist() == [[3.0, 2.0]]
    out = G.topk_gating_reference(logits, 1, "softmax_topk", renormalize=False, capacity=0)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(out.weights, p[:, 1:2])
    torch.testing.assert_close(out.prob_sum, p[0])
    assert out.dropped.tolist() == [[True]] and out.positions.tolist() == [[0]]


def test_switch_positions_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(50, 4)
    out = G.switch_gating(logits, capacity=9)
    seen = [0] * 4
    for t in range(50):
        e = int(out.indices[t, 0])
        assert int(out.positions[t, 0]) == seen[e] and bool(out.dropped[t, 0]) == (seen[e] >= 9)
        seen[e] += 1
    assert seen == out.counts.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreted on CPU) vs reference
# ---------------------------------------------------------------------------------------------------------------

@needs_interp
@pytest.mark.parametrize("E", [8, 16, 64, 128])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("order,renorm", ORDERS)
def test_triton_matches_reference_all_features(monkeypatch, E, k, order, renorm):
    """noise, score scale, thresholds and capacity on at once; T odd and not a multiple of the row block."""
    T = 97
    check_matches_reference(monkeypatch, T, E, k, order, renorm, scale=0.7, noisy=True,
                            capacity=max(1, T * k // E), thresholds=True, seed=E * 10 + k)


@needs_interp
@pytest.mark.parametrize("E,k", [(8, 2), (64, 4), (16, 1)])
@pytest.mark.parametrize("order,renorm", ORDERS)
def test_triton_ties(monkeypatch, E, k, order, renorm):
    check_matches_reference(monkeypatch, 203, E, k, order, renorm, ties=True, thresholds=True, capacity=20)


@needs_interp
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 1, 1), (1, 3, 3), (5, 12, 3), (300, 7, 2), (33, 100, 4),
                                   (2500, 64, 2)])
@pytest.mark.parametrize("order,renorm", ORDERS[:2])
def test_triton_odd_sizes(monkeypatch, T, E, k, order, renorm):
    check_matches_reference(monkeypatch, T, E, k, order, renorm, capacity=3)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order,renorm", ORDERS[:2])
def test_triton_half_logits(monkeypatch, dtype, order, renorm):
    check_matches_reference(monkeypatch, 129, 64, 2, order, renorm, dtype=dtype, noisy=True)


@needs_interp
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(0, 70), E=st.integers(2, 40), k=st.integers(1, 4), order=st.sampled_from(ORDERS),
       noisy=st.booleans(), thresholds=st.booleans(), capacity=st.one_of(st.none(), st.integers(0, 20)),
       scale=st.floats(0.1, 4.0), ties=st.booleans(), seed=st.integers(0, 1000))
def test_triton_matches_reference_randomized(monkeypatch, T, E, k, order, noisy, thresholds, capacity, scale, ties,
                                             seed):
    k = min(k, E - 1)
    check_matches_reference(monkeypatch, T, E, k, order[0], order[1], noisy=noisy, thresholds=thresholds,
                            capacity=capacity, scale=scale, ties=ties, seed=seed)


@needs_interp
def test_switch_gating_triton(monkeypatch):
    logits, _ = _inputs(333, 16, torch.float32, "cpu", 3)
    monkeypatch.setenv(G.ENV_VAR, "triton")
    got = G.switch_gating(logits, capacity=15, scale=2.0)
    monkeypatch.setenv(G.ENV_VAR, "torch")
    ref = G.switch_gating(logits, capacity=15, scale=2.0)
    assert torch.equal(got.positions, ref.positions) and torch.equal(got.dropped, ref.dropped)
    assert got.dropped.any() and not got.dropped.all()
    torch.testing.assert_close(got.weights, ref.weights)


# ---------------------------------------------------------------------------------------------------------------
# errors, backend choice, logging
# ---------------------------------------------------------------------------------------------------------------

def test_bad_input_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 8\]"):
        G.topk_gating(x, 9)
    with pytest.raises(ValueError, match="order must be one of"):
        G.topk_gating(x, 2, order="sigmoid")
    with pytest.raises(ValueError, match=r"logits must be a floating \[T, E\]"):
        G.topk_gating(x[0], 2)
    with pytest.raises(ValueError, match="noise must match logits"):
        G.topk_gating(x, 2, noise=torch.randn(4, 7))
    with pytest.raises(ValueError, match="thresholds need k < number of experts"):
        G.topk_gating(x, 8, return_thresholds=True)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv(G.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MEGAMOE_GATING_BACKEND must be one of"):
        G.topk_gating(torch.randn(3, 4), 1)


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rule")
def test_auto_uses_torch_on_cpu_without_interpreter_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv(G.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_ext, "_announced", set())
    with caplog.at_level(logging.INFO, logger="megamoe.ops.gating"):
        for _ in range(3):
            G.topk_gating(torch.randn(3, 4), 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "megamoe.ops.gating"]
    assert len(lines) == 1 and lines[0].startswith("gating: torch backend")


@needs_interp
def test_auto_uses_triton_when_interpret_is_set(monkeypatch):
    monkeypatch.delenv(G.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert G.select_backend(torch.device("cpu")) == "triton"
    out = G.topk_gating(torch.randn(6, 8, requires_grad=True), 2)
    assert out.weights.grad_fn is not None and "TritonGating" in type(out.weights.grad_fn).__name__


# ---------------------------------------------------------------------------------------------------------------
# GPU: the same checks, natively compiled
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or K is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("E", [8, 16, 64, 128])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("order,renorm", ORDERS)
def test_triton_gpu_matches_reference(monkeypatch, E, k, order, renorm):
    for T in (1, 97, 4096):
        check_matches_reference(monkeypatch, T, E, k, order, renorm, device="cuda", scale=0.7, noisy=True,
                                capacity=max(1, T * k // E), thresholds=True, seed=E + k + T)
    check_matches_reference(monkeypatch, 203, E, k, order, renorm, device="cuda", ties=True, capacity=20)



# ---------------------------------------------------------------------------------------------------------------
# the GPU compile path, without a GPU: the interpreter accepts programs the compiler rejects, so lower every kernel
# (all optional features on) through Triton's real pipeline to an sm_90 cubin. Triton caches the result.
# ---------------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megamoe.kernels import topk_gating as K

def build(fn, types, consts):
    sig = dict(zip(fn.arg_names, types + ["constexpr"] * len(consts)))
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert out.asm["cubin"], fn.__name__
    print(fn.__name__, "ok")

flags = dict(K=2, BLOCK_T=64, BLOCK_E=64, SOFTMAX_FIRST=True, RENORM=True, HAS_NOISE=True, THRESH=True)
build(K._topk_gating_fwd, ["*bf16", "*fp32", "*i64", "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "*i64", "*i64",
                           "*i32", "i32", "i32", "i32", "i32", "fp32"], dict(flags, POSITIONS=True))
build(K._topk_gating_fwd, ["*fp32"] * 2 + ["*i64", "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "*i64", "*i64",
                           "*i64", "i32", "i32", "i32", "i32", "fp32"],
      dict(flags, SOFTMAX_FIRST=False, HAS_NOISE=False, THRESH=False, POSITIONS=False))
build(K._positions_fixup, ["*i64", "*i64", "*i8", "*i32", "i32", "i32"], dict(K=2, BLOCK_T=64, BLOCK_E=64))
build(K._topk_gating_bwd, ["*bf16", "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "*fp32", "*i64", "*bf16",
                           "i32", "i32", "i32", "i32", "fp32"], flags)
"""


@pytest.mark.skipif(K is None, reason="triton missing")
def test_triton_kernels_compile_for_sm90():
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count(" ok") == 4


def test_triton_imported_before_interpret_falls_back_with_the_reason():
    """A process that imported triton before setting TRITON_INTERPRET=1 (megatron imports it) has triton.language's
    own helpers compiled-mode only: the interpreted kernel cannot run there, so gating takes the plain-torch path and
    says why instead of raising inside the interpreter (CI saw "Cannot call @triton.jit'd outside of a kernel")."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    script = ("import os, torch, triton.language\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "from megamoe.kernels import topk_gating as K\n"
              "from megamoe.ops import gating as G\n"
              "assert K.INTERPRETED and not K.LANG_INTERPRETED\n"
              "ok, why = G._triton_can_run(torch.device('cpu'), forced=True)\n"
              "assert not ok and 'TRITON_INTERPRET' in why, why\n"
              "print(G.select_backend(torch.device('cpu')))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "torch"
