"""RMSNorm (LLaMA): y = w * x / sqrt(mean(x^2) + eps), statistics in fp32.

`RMSNorm` is the module; `rms_norm_reference` the plain-torch formula; `_RMSNormFunction` the same with a hand-written
backward that the module uses on a CPU (fewer passes over x; tests/test_model_kernels.py compares them).
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.ops.precision import upcast


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in fp32, cast back, then scale. Its weight is tagged for megatron's
    sequence-parallel gradient all-reduce (it sees only this rank's slice of the sequence)."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        setattr(self.weight, "sequence_parallel", sequence_parallel)

    def forward(self, x):
        if x.dtype == self.weight.dtype and not x.is_cuda:
            return _RMSNormFunction.apply(x, self.weight, self.eps)       # fewer passes over x on a CPU
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x, weight, eps):
    xf = upcast(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """rms_norm_reference for x and weight of one dtype, with a hand-written backward:
    y = w * x * r, r = rsqrt(mean(x^2) + eps);  dx = r * (w dy) - x * r^3 * mean(w dy * x);  dw = sum_t dy * x * r.
    3 passes over x forward and 5 backward instead of autograd's 6 and ~10 (the norms are memory-bound). Half
    precision as autograd computes it through the reference's casts: statistics and dx in fp32, y = w * half(x r),
    dw = sum_t dy * half(x r); it keeps x (half) rather than x r (fp32) for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        xf = upcast(x)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(H).add_(eps))
        xn = (xf * r).to(x.dtype)
        ctx.save_for_backward(x if xf is not x else xn, r, weight)
        return xn * weight

    @staticmethod
    def backward(ctx, dy):
        saved, r, weight = ctx.saved_tensors
        H = saved.shape[-1]
        half = saved.dtype in (torch.float16, torch.bfloat16)
        xn = saved.float().mul_(r) if half else saved                    # x r, fp32 (or fp64)
        dw = dx = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xn.to(dy.dtype)).reshape(-1, H).sum(0)
        if ctx.needs_input_grad[0]:
            g = upcast(dy * weight)                                       # w dy
            m = (g * xn).sum(-1, keepdim=True).div_(H)                    # mean(w dy * x) * r
            dx = g.sub_(xn * m).mul_(r).to(dy.dtype)                      # r * (w dy - x r * mean(w dy x r))
        return dx, dw, None
