"""Token dispatchers: bring each token to its experts and the results back.

`dispatch(x, routing, probs_in_experts=False)` returns the expert inputs grouped by this rank's experts, the rows per
local expert (a device tensor [E_local] for LocalDispatcher, a host list for AllToAllDispatcher) and a handle;
`combine(y, handle)` returns [T, H], each token's expert outputs summed with the router weights. Both are built on the
permute/unpermute ops (megamoe/ops/permute.py), so gradients flow to the expert weights through the GEMMs and the
permute, and to the router through the combine weights.

probs_in_experts ("memory-efficient permutation", megatron's moe_apply_probs_on_input path since MCore 0.13): the
router weight of each row travels with it (`handle.row_probs` [N], permuted like the rows) and the experts apply it
in their activation, y_e = down(silu(g) * u * p); the combine is then an unweighted sum, whose backward needs
nothing saved, where the weighted unpermute keeps the expert output [N, H] for the weights' gradient.

Host reads (device -> host copies) per layer:
  LocalDispatcher      one (`totals`: the permuted row count and the input check); none with a capacity when
                       `pad_to_capacity` (default on CUDA): every expert block is `capacity` rows, static shapes
  AllToAllDispatcher   one: the index build's totals, the counts sent and the counts received (and, under expert-TP,
                       the gathered counts) in a single copy, after the count exchange; the all-to-all splits need
                       them on the host (as megatron's alltoall dispatcher)
The per-expert counts stay on the device for the experts (grouped_mm takes device offsets).

LocalDispatcher: every expert is on this rank (EP = 1).
The all-to-all dispatcher for EP > 1 lives beside it (AllToAllDispatcher) once parallelism is set up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import mappings

from megamoe.moe.router import Routing
from megamoe.ops import _ext
from megamoe.ops.permute import (build_row_map, permute_probs, permute_rows, permute_to_capacity, permute_tokens,
                                 unpermute)
from megamoe.parallel.collectives import all_gather_uneven, exchange_counts


@dataclass
class LocalHandle:
    row_map: torch.Tensor
    weights: torch.Tensor
    row_probs: torch.Tensor | None = None    # [N]: the weights were applied in the experts (combine unweighted)


def _pad_to_capacity_default(device: torch.device) -> bool:
    env = os.environ.get("MEGAMOE_MOE_PAD_TO_CAPACITY", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return device.type == "cuda"      # no host read on a GPU; on a CPU the padding rows would cost FLOPs


class LocalDispatcher:
    """Every expert on this rank. With a capacity and `pad_to_capacity` (None: MEGAMOE_MOE_PAD_TO_CAPACITY=0|1, else
    on for CUDA tensors), every expert block is padded with zero rows to the capacity: static shapes, no host read."""

    def __init__(self, num_experts: int, pad_to_capacity: bool | None = None):
        self.num_experts = num_experts
        self.pad_to_capacity = pad_to_capacity

    def dispatch(self, x: torch.Tensor, routing: Routing, probs_in_experts: bool = False):
        pad = self.pad_to_capacity if self.pad_to_capacity is not None else _pad_to_capacity_default(x.device)
        if routing.capacity is not None and pad:
            p = permute_to_capacity(x, routing.indices, self.num_experts, routing.capacity)
            rows = p.padded_counts
        else:
            p = permute_tokens(x, routing.indices, self.num_experts, capacity=routing.capacity)
            rows = p.tokens_per_expert
        row_probs = permute_probs(routing.weights, p.row_map, p.permuted.shape[0]) if probs_in_experts else None
        return p.permuted, rows, LocalHandle(p.row_map, routing.weights, row_probs)

    def combine(self, y: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return unpermute(y, handle.row_map, None if handle.row_probs is not None else handle.weights)


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
    row_probs: torch.Tensor | None = None   # [rows here]: the weights, applied in the experts (combine unweighted)


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

    def dispatch(self, x: torch.Tensor, routing: Routing, probs_in_experts: bool = False):
        rm = build_row_map(x, routing.indices, self.num_experts, capacity=routing.capacity)
        send = rm.tokens_per_expert.to(torch.long).view(self.ep, self.num_local)
        recv = exchange_counts(send, self.ep_group)                      # [ep sources, local experts], device
        gathered = None
        if self.etp > 1:
            gathered = all_gather_uneven(recv.reshape(1, -1), self.etp_group, [1] * self.etp)   # [etp, ep*L]
        # the one device-to-host copy of the layer: row count + input check, send and receive counts
        host = torch.cat([rm.totals.to(torch.long), send.reshape(-1),
                          (gathered if gathered is not None else recv).reshape(-1)]).tolist()
        num_rows, num_kept, invalid = host[:3]
        if invalid:
            raise ValueError(f"expert index out of range [0, {self.num_experts}): {invalid} of "
                             f"{routing.indices.numel()} entries")
        send_h = torch.tensor(host[3:3 + send.numel()]).view(self.ep, self.num_local)
        counts = torch.tensor(host[3 + send.numel():]).view(-1, self.num_local)   # [(etp x) ep sources, L]
        permuted = permute_rows(x, rm, num_rows, num_rows > num_kept)
        row_probs = permute_probs(routing.weights, rm.row_map, num_rows).unsqueeze(-1) if probs_in_experts else None
        input_splits = send_h.sum(1).tolist()
        recv_h = counts[:self.ep] if self.etp == 1 else counts.view(self.etp, self.ep, self.num_local)[
            dist.get_rank(self.etp_group)]
        output_splits = recv_h.sum(1).tolist()
        y, p = permuted, row_probs
        if self.ep > 1:
            y = mappings.all_to_all(self.ep_group, y, output_splits, input_splits)
            if p is not None:
                p = mappings.all_to_all(self.ep_group, p, output_splits, input_splits)
        etp_sizes = None
        if self.etp > 1:
            etp_sizes = counts.view(self.etp, -1).sum(1).tolist()
            y = mappings.gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=True,
                                                              group=self.etp_group, output_split_sizes=etp_sizes)
            if p is not None:
                p = mappings.gather_from_sequence_parallel_region(p, tensor_parallel_output_grad=True,
                                                                  group=self.etp_group, output_split_sizes=etp_sizes)
        unsort = None
        if counts.shape[0] > 1 and self.num_local > 1:
            idx = _chunk_sort_index(counts).to(y.device)
            y = y.index_select(0, idx)
            if p is not None:
                p = p.index_select(0, idx)
            unsort = torch.empty_like(idx)
            unsort[idx] = torch.arange(idx.numel(), device=idx.device)
        per_expert = counts.sum(0).tolist()
        handle = AllToAllHandle(rm.row_map, routing.weights, input_splits, output_splits, etp_sizes, unsort,
                                None if p is None else p.reshape(-1))
        return y, per_expert, handle

    def combine(self, y: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        if handle.unsort is not None:
            y = y.index_select(0, handle.unsort)
        if self.etp > 1:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, group=self.etp_group,
                                                                    input_split_sizes=handle.etp_sizes)
        if self.ep > 1:
            y = mappings.all_to_all(self.ep_group, y, handle.input_splits, handle.output_splits)
        return unpermute(y, handle.row_map, None if handle.row_probs is not None else handle.weights)
