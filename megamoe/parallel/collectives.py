"""Autograd-aware collectives for the MoE layer under TP / SP / EP / DP, and the router-statistics reducer.

Which ranks hold which tokens (megatron-core's parallel_state, "parallel folding"):
  - data parallel (DP) ranks hold different sequences of the global batch;
  - with sequence parallelism (SP) the TP ranks of one DP replica hold different slices of its sequence;
    without SP they hold the same tokens (replicated).
So the ranks that together hold the global batch, once each, are the tensor-and-data-parallel group under SP and
the data-parallel group without it. The router's balance statistics are summed over that group
(`make_stats_reducer`) so that the balance loss is the loss of the whole global batch.

Gradient scale of the reducer. Every rank adds the same (global) balance loss B to its own loss. Megatron's
gradient path then gives, for a replicated parameter, (1/DP) * sum over all ranks r of g_r (SP parameters are summed
over TP by finalize_model_grads, then DDP averages over DP). With an identity backward, sum_r g_r = dB/dtheta, so the
reduced gradient would be dB/dtheta / DP. The reducer's backward therefore multiplies by DP: the result is exactly
the gradient of the single-process loss (tests/test_parallel.py checks it against a single-process run).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = ["AllReduceSum", "all_reduce_sum", "make_stats_reducer", "split_tokens", "gather_tokens",
           "token_split_sizes", "all_gather_uneven", "exchange_counts"]


class AllReduceSum(torch.autograd.Function):
    """Forward: all-reduce SUM over `group`. Backward: the local gradient times `grad_scale` (no communication)."""

    @staticmethod
    def forward(ctx, x, group, grad_scale: float):
        ctx.grad_scale = grad_scale
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.grad_scale, None, None


def all_reduce_sum(x: torch.Tensor, group, grad_scale: float = 1.0) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return AllReduceSum.apply(x, group, grad_scale)


def stats_group(sequence_parallel: bool):
    """The group holding the rest of the global batch: TP x DP under sequence parallelism, DP otherwise; with
    context parallelism the CP ranks too (each holds part of every sequence)."""
    cp = ps.get_context_parallel_world_size() > 1
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        return ps.get_tensor_and_data_parallel_group(with_context_parallel=cp)
    return ps.get_data_parallel_group(with_context_parallel=cp)


def make_stats_reducer(sequence_parallel: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`Router.stats_reducer` for the layout in force: sum over `stats_group`, gradient scaled by the size of the
    group megatron's DDP averages gradients over, DP (x CP) (module docstring). None in a world where one rank holds
    the whole batch."""
    group = stats_group(sequence_parallel)
    if dist.get_world_size(group) == 1:
        return None
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return AllReduceSum.apply(t, group, float(dp))
    return reduce


# ---------------------------------------------------------------------------------------------------------------
# token split / gather over a group that holds the same tokens (TP without SP)

def token_split_sizes(n: int, parts: int) -> list[int]:
    """Near-equal split of n rows into `parts` (the first n % parts get one more)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def all_gather_uneven(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's x (rank i has sizes[i] rows) along dim 0. Pads to the largest size so that it runs
    on gloo (no uneven all_gather) and NCCL alike."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    m = max(sizes)
    if m == 0:
        return x.new_zeros((0,) + tuple(x.shape[1:]))
    pad = x.new_zeros((m,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    out = x.new_empty((m * n,) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, pad.contiguous(), group=group)
    return torch.cat([c[:k] for c, k in zip(out.chunk(n), sizes)])


class _SplitTokens(torch.autograd.Function):
    """Forward: keep this rank's rows of a replicated tensor. Backward: all-gather the row gradients."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        r = dist.get_rank(group)
        start = sum(sizes[:r])
        return x[start:start + sizes[r]].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather_uneven(grad.contiguous(), ctx.group, ctx.sizes), None, None


class _GatherTokens(torch.autograd.Function):
    """Forward: all-gather every rank's rows (the result is replicated). Backward: keep this rank's rows."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return all_gather_uneven(x.contiguous(), group, sizes)

    @staticmethod
    def backward(ctx, grad):
        r = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:r])
        return grad[start:start + ctx.sizes[r]].contiguous(), None, None


def split_tokens(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    return _SplitTokens.apply(x, group, sizes)


def gather_tokens(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    return _GatherTokens.apply(x, group, sizes)


# ---------------------------------------------------------------------------------------------------------------

def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [n, m] int64 (row j: what this rank sends to rank j of `group`) -> [n, m] (row i: what rank i sends
    to this rank). One all-to-all of n*m integers; zero rows are fine."""
    n = dist.get_world_size(group)
    if n == 1:
        return counts
    src = counts.contiguous()
    out = torch.empty_like(src)
    dist.all_to_all_single(out, src, group=group)
    return out
