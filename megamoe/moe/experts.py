"""SwiGLU experts of (possibly) uneven sizes: the local slice of a layer's experts.

Expert e computes down_e(silu(gate_e x) * up_e x). Experts are stored under their GLOBAL index
(`experts.{e}.gate_proj.weight`) so that names do not change with the expert-parallel layout. Under expert tensor
parallelism (etp > 1) each expert's intermediate neurons are split across the etp ranks (gate/up by rows, down by
columns) and the dispatcher sums the partial outputs.
"""

from __future__ import annotations

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
        y = torch.empty_like(x)
        wgus, gus, hs = [], [], []
        s = 0
        for e in range(E):
            gate, up, down = weights[3 * e:3 * e + 3]
            n, f = counts[e], gate.shape[0]
            wgu = torch.cat([gate, up])                      # [2F, H]
            gu = torch.mm(x[s:s + n], wgu.t())                # [n, 2F]
            h = F.silu(gu[:, :f]).mul_(gu[:, f:])
            torch.mm(h, down.t(), out=y[s:s + n])
            wgus.append(wgu), gus.append(gu), hs.append(h)
            s += n
        if s != x.shape[0]:
            raise ValueError(f"experts: tokens_per_expert sums to {s}, but the input has {x.shape[0]} rows")
        ctx.counts = counts
        ctx.save_for_backward(x, *weights, *wgus, *gus, *hs)
        return y

    @staticmethod
    def backward(ctx, dy):
        counts = ctx.counts
        E = len(counts)
        saved = ctx.saved_tensors
        x, weights = saved[0], saved[1:1 + 3 * E]
        wgus, gus, hs = saved[1 + 3 * E:1 + 4 * E], saved[1 + 4 * E:1 + 5 * E], saved[1 + 5 * E:]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        grads = []
        s = 0
        for e in range(E):
            gate, up, down = weights[3 * e:3 * e + 3]
            n, f = counts[e], gate.shape[0]
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
        return (dx, None, *grads)
