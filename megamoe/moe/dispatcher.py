"""Token dispatchers: bring each token to its experts and the results back.

`dispatch(x, routing)` returns the expert inputs grouped by this rank's experts and a handle; `combine(y, handle)`
returns [T, H], each token's expert outputs summed with the router weights. Both are built on the permute/unpermute
ops (megamoe/ops/permute.py), so gradients flow to the expert weights through the GEMMs and the permute, and to the
router through the combine weights.

LocalDispatcher: every expert is on this rank (EP = 1).
The all-to-all dispatcher for EP > 1 lives beside it (AllToAllDispatcher) once parallelism is set up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.moe.router import Routing
from megamoe.ops.permute import permute, unpermute


@dataclass
class LocalHandle:
    row_map: torch.Tensor
    weights: torch.Tensor


class LocalDispatcher:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing):
        permuted, row_map, tokens_per_expert = permute(x, routing.indices, self.num_experts, capacity=routing.capacity)
        return permuted, tokens_per_expert.tolist(), LocalHandle(row_map, routing.weights)

    def combine(self, y: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return unpermute(y, handle.row_map, handle.weights)
