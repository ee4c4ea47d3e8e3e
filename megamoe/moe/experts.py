"""SwiGLU experts of (possibly) uneven sizes: the local slice of a layer's experts.

Expert e computes down_e(silu(gate_e x) * up_e x). Experts are stored under their GLOBAL index
(`experts.{e}.gate_proj.weight`) so that names do not change with the expert-parallel layout. Under expert tensor
parallelism (etp > 1) each expert's intermediate neurons are split across the etp ranks (gate/up by rows, down by
columns) and the dispatcher sums the partial outputs.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    def __init__(self, hidden: int, width: int, std: float, out_std: float, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, width, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(width, hidden, bias=False, dtype=dtype)
        for lin, s in ((self.gate_proj, std), (self.up_proj, std), (self.down_proj, out_std)):
            nn.init.normal_(lin.weight, std=s)
            lin.weight.allreduce = False  # megatron DDP: reduce over the expert-data-parallel group
            # partitioned over expert-TP (like megatron's expert linears, even at etp = 1): megatron's grad norm then
            # counts expert grads on every TP rank instead of dropping them as "TP duplicates" on tp rank > 0
            lin.weight.tensor_model_parallel = True
            lin.weight.partition_dim = 1 if lin is self.down_proj else 0
            lin.weight.partition_stride = 1

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """The experts this rank holds. `forward(x, tokens_per_expert)` runs them on consecutive row blocks of x."""

    def __init__(self, hidden: int, sizes: list[int], local_ids: list[int], etp: int = 1, std: float = 0.02,
                 num_layers: int = 1, dtype=torch.float32):
        super().__init__()
        self.sizes, self.local_ids = list(sizes), list(local_ids)
        out_std = std / math.sqrt(2 * num_layers)
        for e in local_ids:  # registered under the global index: parameter names `experts.{e}.gate_proj.weight`
            self.add_module(str(e), Expert(hidden, sizes[e] // etp, std, out_std, dtype))

    def __getitem__(self, e: int) -> Expert:
        return self._modules[str(e)]

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """x: [N, H], rows grouped by local expert in `local_ids` order with the given counts -> [N, H]."""
        if not self.local_ids:
            return x.new_zeros(x.shape)
        weights = []
        for e in self.local_ids:
            ex = self[e]
            weights += [ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight]
        return _GroupedSwiGLU.apply(x, tuple(int(n) for n in tokens_per_expert), *weights)

    def forward_reference(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """The same with one autograd graph per expert (nn.Linear modules): what `forward` is tested against."""
        outs = [self[e](rows) for e, rows in zip(self.local_ids, x.split(tokens_per_expert))]
        return torch.cat(outs) if outs else x.new_zeros(x.shape)


class _GroupedSwiGLU(torch.autograd.Function):
    """All local experts in one autograd node: expert e (rows s:s+n of x, weights gate/up [F_e, H], down [H, F_e])
    computes gu = x_e [gate; up]^T (one GEMM), h = silu(g) * u, y_e = h down^T, written in place into y. Backward:
    dh = dy_e down, d_down = dy_e^T h, [dg, du] = [silu'(g) * dh * u, dh * silu(g)], dx_e = [dg, du] [gate; up],
    d[gate; up] = [dg, du]^T x_e. Widths may differ between experts. Same GEMMs as per-expert nn.Linear modules;
    what it saves is the per-expert autograd bookkeeping, the separate gate and up GEMMs and the final concatenation."""

    @staticmethod
    def forward(ctx, x, counts, *weights):
        E = len(counts)
        if sum(counts) != x.shape[0]:
            raise ValueError(f"experts: tokens_per_expert sums to {sum(counts)}, but the input has {x.shape[0]} rows")
        rows = padded_counts(counts) if _pads_rows(x) else counts
        xp = _to_padded(x, counts, rows)
        y = torch.empty_like(xp)
        wgus, gus, hs = [], [], []
        s = 0
        for e in range(E):
            gate, up, down = weights[3 * e:3 * e + 3]
            n, f = rows[e], gate.shape[0]
            wgu = torch.cat([gate, up])                      # [2F, H]
            gu = torch.mm(xp[s:s + n], wgu.t())               # [n, 2F]
            h = F.silu(gu[:, :f]).mul_(gu[:, f:])
            torch.mm(h, down.t(), out=y[s:s + n])
            wgus.append(wgu), gus.append(gu), hs.append(h)
            s += n
        ctx.counts, ctx.rows = counts, rows
        ctx.save_for_backward(xp, *weights, *wgus, *gus, *hs)
        return _from_padded(y, counts, rows)

    @staticmethod
    def backward(ctx, dy):
        counts, rows = ctx.counts, ctx.rows
        E = len(counts)
        saved = ctx.saved_tensors
        x, weights = saved[0], saved[1:1 + 3 * E]
        wgus, gus, hs = saved[1 + 3 * E:1 + 4 * E], saved[1 + 4 * E:1 + 5 * E], saved[1 + 5 * E:]
        dy = _to_padded(dy.contiguous(), counts, rows)       # padding rows of dy are zero: they add nothing below
        dx = torch.empty_like(x)
        grads = []
        s = 0
        for e in range(E):
            gate, up, down = weights[3 * e:3 * e + 3]
            n, f = rows[e], gate.shape[0]
            xe, dye, gu, h = x[s:s + n], dy[s:s + n], gus[e], hs[e]
            g, u = gu[:, :f], gu[:, f:]
            dh = torch.mm(dye, down)                          # [n, F]
            d_down = torch.mm(dye.t(), h)                     # [H, F]
            dgu = torch.empty_like(gu)
            torch.mul(dh, F.silu(g), out=dgu[:, f:])
            torch.ops.aten.silu_backward.grad_input(dh.mul_(u), g, grad_input=dgu[:, :f])
            torch.mm(dgu, wgus[e], out=dx[s:s + n])
            d_gu = torch.mm(dgu.t(), xe)                      # [2F, H]
            grads += [d_gu[:f], d_gu[f:], d_down]
            s += n
        return (_from_padded(dx, counts, rows), None, *grads)


# ---------------------------------------------------------------------------------------------------------------
# Row padding for CPU half precision. A CPU runs bf16/fp16 GEMMs through oneDNN, which builds (JIT-compiles) a
# kernel for every new shape: ~0.5 ms each, against ~0.2 ms for the GEMM of an expert with 512 tokens. The token
# count of an expert changes every step, so every expert GEMM would pay it. Padding each expert's rows with zeros up
# to a bucket (at most 1/8 more rows) keeps the shapes to a few that oneDNN has cached. Zero rows give zero outputs
# and add nothing to the weight gradients, so the result is exactly the unpadded one. fp32 CPU GEMMs (MKL) and GPU
# GEMMs have no per-shape cost and run unpadded.

def _pads_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def padded_counts(counts) -> tuple[int, ...]:
    """Each count rounded up to a multiple of max(16, 2^(floor(log2 n) - 3)): <= 12.5% padding, 8 sizes an octave."""
    out = []
    for n in counts:
        step = max(16, 1 << max(0, int(n).bit_length() - 4))
        out.append(-(-n // step) * step)
    return tuple(out)


def _to_padded(x: torch.Tensor, counts, rows) -> torch.Tensor:
    if rows == counts:
        return x
    xp = x.new_zeros((sum(rows), x.shape[1]))
    s = p = 0
    for n, r in zip(counts, rows):
        xp[p:p + n] = x[s:s + n]
        s, p = s + n, p + r
    return xp


def _from_padded(xp: torch.Tensor, counts, rows) -> torch.Tensor:
    if rows == counts:
        return xp
    starts = itertools.accumulate(rows[:-1], initial=0)
    return torch.cat([xp[p:p + n] for p, n in zip(starts, counts)])
