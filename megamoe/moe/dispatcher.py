"""Token dispatchers: bring each token to its experts and the results back.

`dispatch(x, routing)` returns the expert inputs grouped by this rank's experts and a handle; `combine(y, handle)`
returns [T, H], each token's expert outputs summed with the router weights. Both are built on the permute/unpermute
ops (megamoe/ops/permute.py), so gradients flow to the expert weights through the GEMMs and the permute, and to the
router through the combine weights.

LocalDispatcher: every expert is on this rank (EP = 1).
The all-to-all dispatcher for EP > 1 lives beside it (AllToAllDispatcher) once parallelism is set up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import mappings

from megamoe.moe.router import Routing
from megamoe.ops import _ext
from megamoe.ops.permute import permute, unpermute
from megamoe.parallel.collectives import all_gather_uneven, exchange_counts


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


# ---------------------------------------------------------------------------------------------------------------
# expert parallelism: all-to-all over the expert-model-parallel group (megatron's alltoall dispatcher as the model)

@dataclass
class AllToAllHandle:
    row_map: torch.Tensor            # [T, k] rows of this rank's permuted tokens
    weights: torch.Tensor            # [T, k]
    input_splits: list[int]          # rows sent to each EP rank
    output_splits: list[int]         # rows received from each EP rank
    etp_sizes: list[int] | None      # rows held by each expert-TP rank before the all-gather (etp > 1)
    unsort: torch.Tensor | None      # inverse of the (source, expert) -> (expert, source) chunk sort


def _chunk_sort_index(counts: torch.Tensor) -> torch.Tensor:
    """counts [S, L] rows in source-major order -> index that reorders them expert-major (l, then s), each chunk's
    rows kept in order."""
    S, L = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat                          # start of chunk (s, l) in source-major order
    order = torch.arange(S * L).view(S, L).t().reshape(-1)         # chunk ids in expert-major order
    lens, st = flat[order], starts[order]
    total = int(flat.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    # row r of the output belongs to chunk c = repeat_interleave; its offset within the chunk is r - cum_start
    chunk_of_row = torch.repeat_interleave(torch.arange(order.numel()), lens)
    out_starts = torch.cumsum(lens, 0) - lens
    return st[chunk_of_row] + torch.arange(total) - out_starts[chunk_of_row]


class AllToAllDispatcher:
    """Tokens to experts on other ranks and back, for EP > 1 and/or expert-TP > 1.

    dispatch: permute this rank's tokens expert-major (our permute op) -> exchange per-expert counts over the EP group
    (zero counts are fine) -> all-to-all the rows (autograd-aware; megatron's mappings.all_to_all) -> with expert-TP,
    all-gather the rows within the expert-TP group -> reorder from (source rank, local expert) to (local expert,
    source rank) so each local expert sees one contiguous block.
    combine: the reverse (reduce-scatter of the partial expert outputs over expert-TP), then unpermute with the router
    weights. Groups come from megatron-core's parallel_state: with parallel folding the EP group may span TP ranks,
    which under sequence parallelism hold different tokens, so every rank routes and sends its own tokens."""

    def __init__(self, num_experts: int, local_ids: list[int], ep_group=None, etp_group=None):
        self.num_experts, self.local_ids = num_experts, list(local_ids)
        self.ep_group = ep_group if ep_group is not None else ps.get_expert_model_parallel_group()
        self.etp_group = etp_group if etp_group is not None else ps.get_expert_tensor_parallel_group()
        self.ep = dist.get_world_size(self.ep_group)
        self.etp = dist.get_world_size(self.etp_group)
        if num_experts % self.ep:
            raise ValueError(f"parallel.ep: {self.ep} does not divide moe.num_experts ({num_experts})")
        self.num_local = num_experts // self.ep
        ep_rank = dist.get_rank(self.ep_group)
        expect = list(range(ep_rank * self.num_local, (ep_rank + 1) * self.num_local))
        if self.local_ids != expect:
            raise ValueError(f"AllToAllDispatcher: local experts {self.local_ids} are not the block {expect} of "
                             f"EP rank {ep_rank}")
        _ext.log_backend_once(logging.getLogger(__name__), "MoE dispatch", "all-to-all",
                              f"an EP group of {self.ep} ranks, {self.num_local} experts each, expert-TP {self.etp}")

    def dispatch(self, x: torch.Tensor, routing: Routing):
        permuted, row_map, tokens_per_expert = permute(x, routing.indices, self.num_experts, capacity=routing.capacity)
        send = tokens_per_expert.to(torch.long).view(self.ep, self.num_local)
        recv = exchange_counts(send, self.ep_group)                      # [ep sources, local experts]
        input_splits = send.sum(1).tolist()
        output_splits = recv.sum(1).tolist()
        if self.ep > 1:
            y = mappings.all_to_all(self.ep_group, permuted, output_splits, input_splits)
        else:
            y = permuted
        etp_sizes = None
        counts = recv.cpu()
        if self.etp > 1:
            etp_sizes_t = all_gather_uneven(recv.reshape(1, -1), self.etp_group, [1] * self.etp)   # [etp, ep*L]
            counts = etp_sizes_t.view(self.etp * self.ep, self.num_local).cpu()
            etp_sizes = etp_sizes_t.sum(1).tolist()
            y = mappings.gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=True,
                                                              group=self.etp_group, output_split_sizes=etp_sizes)
        unsort = None
        if counts.shape[0] > 1 and self.num_local > 1:
            idx = _chunk_sort_index(counts).to(y.device)
            y = y.index_select(0, idx)
            unsort = torch.empty_like(idx)
            unsort[idx] = torch.arange(idx.numel(), device=idx.device)
        per_expert = counts.sum(0).tolist()
        return y, per_expert, AllToAllHandle(row_map, routing.weights, input_splits, output_splits, etp_sizes, unsort)

    def combine(self, y: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        if handle.unsort is not None:
            y = y.index_select(0, handle.unsort)
        if self.etp > 1:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, group=self.etp_group,
                                                                    input_split_sizes=handle.etp_sizes)
        if self.ep > 1:
            y = mappings.all_to_all(self.ep_group, y, handle.input_splits, handle.output_splits)
        return unpermute(y, handle.row_map, handle.weights)
