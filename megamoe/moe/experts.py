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
        outs = []
        for e, rows in zip(self.local_ids, x.split(tokens_per_expert)):
            outs.append(self[e](rows))
        if not outs:
            return x.new_zeros(x.shape)
        return torch.cat(outs)
