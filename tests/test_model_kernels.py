"""The model's hand-written CPU autograd functions (RMSNorm, RoPE in megamoe/layers/) against the plain
formulas written here: values, gradients (gradcheck in fp64) and the fallback dtypes."""

import pytest
import torch

from megamoe.layers.norm import RMSNorm
from megamoe.layers.rope import apply_rope


def rms_plain(x, w, eps):
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_plain(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_matches_plain_formula(dtype):
    torch.manual_seed(0)
    n = RMSNorm(24, 1e-5, dtype=dtype)
    with torch.no_grad():
        n.weight.normal_()
    x0, dy = torch.randn(7, 3, 24, dtype=dtype) * 3, torch.randn(7, 3, 24, dtype=dtype)
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    wb = n.weight.detach().clone().requires_grad_()
    ya, yb = n(xa), rms_plain(xb, wb, 1e-5)
    ya.backward(dy), yb.backward(dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(n.weight.grad, wb.grad, **tol)


def test_rmsnorm_gradcheck_and_half_fallback():
    n = RMSNorm(8, 1e-6, dtype=torch.float64)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: n(x), (x, n.weight))
    nb = RMSNorm(8, 1e-6, dtype=torch.bfloat16)
    xb = torch.randn(5, 8).bfloat16()
    torch.testing.assert_close(nb(xb), rms_plain(xb, nb.weight, 1e-6))   # bf16: the upcasting path, unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_matches_rotate_half(dtype):
    torch.manual_seed(1)
    q0 = torch.randn(3, 4, 9, 2, 8).select(-2, 0).to(dtype)            # a non-contiguous view, as in attention
    cos, sin = torch.randn(9, 8).to(dtype), torch.randn(9, 8).to(dtype)
    dy = torch.randn(3, 4, 9, 8).to(dtype)
    qa, qb = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    ya, yb = apply_rope(qa, cos, sin), rope_plain(qb, cos, sin)
    ya.backward(dy), yb.backward(dy)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(qa.grad, qb.grad, **tol)


def test_rope_gradcheck():
    q = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: apply_rope(q, cos, sin), (q,))
