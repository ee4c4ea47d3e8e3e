"""permute / unpermute: the compiled backends (C++ here, CUDA on a GPU) against the plain-torch reference.

Indices (row_map, counts, offsets) must match exactly; values within the dtype's tolerance; gradients of both
inputs of unpermute and of permute's input likewise. Shapes are drawn by hypothesis, including T = 0, experts with
no tokens, capacity 0, duplicated experts within a token and padding.
"""

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megamoe.ops import _ext
from megamoe.ops import permute as P

HAS_CPP = _ext.cpp_available()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="megamoe._C not built (pip install --no-build-isolation -e .)")
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}
DTYPES = list(TOL)


def _run(backend, monkeypatch, hidden, indices, weights, E, capacity, pad, grad_out):
    """Forward + backward under one backend; returns everything to compare."""
    monkeypatch.setenv(P.ENV_VAR, backend)
    h = hidden.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    res = P.permute_tokens(h, indices, E, capacity, pad)
    # make the permuted rows depend on their position so that a wrong row order shows in the gradients
    rows = torch.arange(res.permuted.shape[0], device=h.device)
    scale = (1 + (rows % 7) / 8).to(h.dtype)[:, None]
    out = P.unpermute(res.permuted * scale, res.row_map, w)
    out.backward(grad_out)
    return res, out.detach(), h.grad, w.grad


def _case(T, k, E, H, dtype, device, seed, duplicates=False, skew=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    if duplicates:
        indices = torch.randint(0, E, (T, k), generator=g)
    elif k <= E:
        scores = torch.rand(T, E, generator=g)
        if skew:  # leave high experts empty
            scores[:, E // 2:] -= 2
        indices = torch.topk(scores, k, dim=1).indices
    else:
        indices = torch.randint(0, E, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g)
    grad_out = torch.randn(T, H, generator=g).to(dtype)
    return hidden.to(device), indices.to(device), weights.to(device), grad_out.to(device)


def check_backend_matches_reference(backend, monkeypatch, T, k, E, H, capacity, pad, dtype, device="cpu",
                                    seed=0, duplicates=False, skew=False):
    hidden, indices, weights, grad_out = _case(T, k, E, H, dtype, device, seed, duplicates, skew)
    ref = _run("torch", monkeypatch, hidden, indices, weights, E, capacity, pad, grad_out)
    got = _run(backend, monkeypatch, hidden, indices, weights, E, capacity, pad, grad_out)
    rr, gr = ref[0], got[0]
    # exact: indices and metadata
    assert torch.equal(gr.row_map, rr.row_map)
    assert torch.equal(gr.tokens_per_expert, rr.tokens_per_expert)
    assert torch.equal(gr.padded_counts, rr.padded_counts)
    assert torch.equal(gr.offsets, rr.offsets)
    # exact: permute is a copy (padding rows zero)
    assert gr.permuted.dtype == dtype and torch.equal(gr.permuted, rr.permuted)
    atol, rtol = TOL[dtype]
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(1.0, H ** 0.5), rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------
# the reference itself, against a dense (one-hot) formulation: guards the semantics everything else is compared to
# ---------------------------------------------------------------------------------------------------------------

def test_reference_row_order_and_example_from_docstring():
    indices = torch.tensor([[2, 0], [0, 1]])
    row_map, kept, padded = P.make_row_map(indices, 3)
    assert row_map.tolist() == [[3, 0], [1, 2]]
    assert kept.tolist() == [2, 1, 1] and padded.tolist() == [2, 1, 1]
    row_map, kept, padded = P.make_row_map(indices, 3, capacity=1, pad_multiple=2)
    assert row_map.tolist() == [[4, 0], [-1, 2]]
    assert kept.tolist() == [1, 1, 1] and padded.tolist() == [2, 2, 2]


def test_reference_unpermute_of_permute_is_weighted_identity():
    torch.manual_seed(0)
    T, k, E, H = 33, 3, 5, 8
    hidden = torch.randn(T, H, dtype=torch.float64)
    indices = torch.randint(0, E, (T, k))
    weights = torch.rand(T, k, dtype=torch.float64)
    row_map, kept, padded = P.make_row_map(indices, E, capacity=4, pad_multiple=3)
    permuted = P.permute_reference(hidden, row_map, int(padded.sum()))
    out = P.unpermute_reference(permuted, row_map, weights)
    torch.testing.assert_close(out, hidden * (weights * (row_map >= 0)).sum(1, keepdim=True))
    # each expert's block holds exactly its kept tokens, in token order
    offsets = P._offsets(padded)
    for e in range(E):
        toks = [t for t in range(T) for j in range(k) if indices[t, j] == e][:4]
        block = permuted[offsets[e]:offsets[e] + len(toks)]
        torch.testing.assert_close(block, hidden[toks])
        assert not permuted[offsets[e] + len(toks):offsets[e + 1]].any()


# ---------------------------------------------------------------------------------------------------------------
# C++ backend vs reference
# ---------------------------------------------------------------------------------------------------------------

@needs_cpp
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(0, 48), k=st.integers(1, 4), E=st.integers(1, 9), H=st.integers(1, 24),
       capacity=st.one_of(st.none(), st.integers(0, 10)), pad=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       duplicates=st.booleans(), skew=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_cpp_matches_reference_randomized(monkeypatch, T, k, E, H, capacity, pad, dtype, duplicates, skew, seed):
    check_backend_matches_reference("cpp", monkeypatch, T, k, E, H, capacity, pad, dtype,
                                    seed=seed, duplicates=duplicates, skew=skew)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,H,capacity,pad", [
    (0, 2, 4, 16, None, 1),        # no tokens
    (0, 2, 4, 16, 3, 8),
    (1, 1, 1, 1, None, 1),
    (64, 2, 8, 33, None, 16),      # odd H, padding for aligned GEMMs
    (257, 4, 16, 64, 40, 8),       # capacity drops tokens
    (100, 2, 8, 32, 0, 4),         # capacity 0: everything dropped, N = 0
])
def test_cpp_matches_reference_edge_cases(monkeypatch, T, k, E, H, capacity, pad, dtype):
    check_backend_matches_reference("cpp", monkeypatch, T, k, E, H, capacity, pad, dtype, skew=True)


@needs_cpp
def test_cpp_bench_shape_fp32(monkeypatch):
    check_backend_matches_reference("cpp", monkeypatch, 4096, 2, 8, 1024, None, 1, torch.float32)


@needs_cpp
def test_cpp_ops_gradcheck(monkeypatch):
    """fp64 numerical gradients of the autograd Functions themselves (independent of the reference)."""
    monkeypatch.setenv(P.ENV_VAR, "cpp")
    torch.manual_seed(0)
    T, k, E, H = 9, 2, 4, 3
    hidden = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, E, (T, k))

    def f(h, w):
        res = P.permute_tokens(h, indices, E, capacity=3, pad_multiple=2)
        return P.unpermute(res.permuted.sin(), res.row_map, w)

    assert torch.autograd.gradcheck(f, (hidden, weights))


# ---------------------------------------------------------------------------------------------------------------
# routing-map entry point: same row order as megatron-core's own permute
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_routing_map_matches_megatron_core(monkeypatch, backend):
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    monkeypatch.setenv(P.ENV_VAR, backend)
    torch.manual_seed(1)
    T, E, k, H = 50, 6, 2, 8
    probs = torch.softmax(torch.randn(T, E), -1)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, torch.topk(probs, k).indices, True)
    hidden = torch.randn(T, H)
    res, weights = P.permute_routing_map(hidden, routing_map, probs=probs)
    mc_perm, _, mc_sorted = moe_utils.permute(hidden, routing_map, num_out_tokens=T * k)
    torch.testing.assert_close(res.permuted, mc_perm, rtol=0, atol=0)
    assert torch.equal(res.tokens_per_expert, routing_map.sum(0))
    mc_out = moe_utils.unpermute(mc_perm, mc_sorted, hidden.shape, probs=probs, routing_map=routing_map)
    torch.testing.assert_close(P.unpermute(res.permuted, res.row_map, weights), mc_out, atol=1e-6, rtol=1e-6)


def test_routing_map_rejects_uneven_rows():
    rm = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="same number of experts"):
        P.indices_from_routing_map(rm)


# ---------------------------------------------------------------------------------------------------------------
# errors, backend choice, logging
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_bad_input_errors(monkeypatch, backend):
    monkeypatch.setenv(P.ENV_VAR, backend)
    h = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"out of range \[0, 2\)"):
        P.permute(h, torch.tensor([[0], [1], [2], [0]]), 2)
    with pytest.raises(ValueError, match=r"indices must be a \[T, k\] tensor with T = 4"):
        P.permute(h, torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="integer"):
        P.permute(h, torch.zeros(4, 1), 2)
    with pytest.raises(ValueError, match="hidden must be a \\[T, H\\]"):
        P.permute(torch.randn(4), torch.zeros(4, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="pad_multiple"):
        P.permute(h, torch.zeros(4, 1, dtype=torch.long), 2, pad_multiple=0)
    with pytest.raises(ValueError, match="weights must be a floating"):
        P.unpermute(h, torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 1))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="MEGAMOE_PERMUTE_BACKEND must be one of"):
        P.permute(torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long), 1)


def test_forced_cuda_on_cpu_tensors_is_an_error(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        P.permute(torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long), 1)


def test_fallback_to_torch_when_extension_missing(monkeypatch, caplog):
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    monkeypatch.setattr(_ext, "cpp_available", lambda: False)
    monkeypatch.setattr(_ext, "_announced", set())
    with caplog.at_level(logging.INFO, logger="megamoe.ops.permute"):
        for _ in range(3):
            out, row_map, _ = P.permute(torch.randn(5, 2), torch.zeros(5, 1, dtype=torch.long), 2)
    assert out.shape == (5, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "megamoe.ops.permute"]
    assert len(lines) == 1 and "torch" in lines[0] and "fallback" in lines[0]


@needs_cpp
def test_auto_picks_cpp_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    monkeypatch.setattr(_ext, "_announced", set())
    with caplog.at_level(logging.INFO, logger="megamoe.ops.permute"):
        for _ in range(3):
            P.permute(torch.randn(5, 2), torch.zeros(5, 1, dtype=torch.long), 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "megamoe.ops.permute"]
    assert lines == ["permute: cpp backend (C++ CPU kernels from megamoe._C)"]
    assert P.select_backend(torch.device("cpu")) == "cpp"


# ---------------------------------------------------------------------------------------------------------------
# GPU: the same checks with the CUDA kernels
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,k,E,H,capacity,pad", [
    (0, 2, 4, 16, None, 1), (1, 1, 1, 8, None, 1), (64, 2, 8, 33, None, 16), (257, 4, 16, 64, 40, 8),
    (100, 2, 8, 32, 0, 4), (4096, 2, 64, 4096, None, 1), (3000, 8, 128, 136, 100, 16)])
def test_cuda_matches_reference(monkeypatch, T, k, E, H, capacity, pad, dtype):
    check_backend_matches_reference("cuda", monkeypatch, T, k, E, H, capacity, pad, dtype, device="cuda",
                                    skew=True)
    check_backend_matches_reference("cuda", monkeypatch, T, k, E, H, capacity, pad, dtype, device="cuda",
                                    duplicates=True, seed=1)


def test_bench_kernels_runs_and_prints_ratios(capsys):
    """The benchmark script stays runnable (tiny shapes; speed goals live in the script, not here)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--device", "cpu", "--T", "64", "--H", "32", "--E", "4", "--reps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "## permute / unpermute (cpu)" in out and "## top-k gating (cpu)" in out
    assert "permute+unpermute" in out and "fwd+bwd" in out and "x |" in out
