"""Token permute / unpermute: gather tokens into expert-major order and scatter them back.

`permute` and `unpermute` are the public ops. They dispatch to the fastest backend present (CUDA or C++ from
`csrc/`, built as `megamoe._C`) and fall back to the plain-torch reference below, which is also what the tests
compare against. Set MEGAMOE_PERMUTE_BACKEND=torch|cpp|cuda to force one.

Layout contract (see docs/architecture.md):
  permute(hidden [T,H], indices [T,k], num_experts, capacity=None, pad_multiple=1)
      -> permuted [N,H], row_map [T,k] (row of each (token, slot) in `permuted`, -1 if dropped),
         tokens_per_expert [E] (kept rows per expert, before padding)
  Rows are ordered by expert, then token index, then slot. With `capacity`, an expert keeps its first
  `capacity` (token, slot) pairs in that order and drops the rest. With `pad_multiple`, each expert's block is
  padded with zero rows to a multiple of it (for aligned grouped GEMMs).
  unpermute(permuted [N,H], row_map [T,k], weights [T,k]) -> [T,H] = sum over kept slots of weight * row.
"""

from __future__ import annotations

import torch


def make_row_map(indices: torch.Tensor, num_experts: int, capacity: int | None = None, pad_multiple: int = 1):
    """Plain-torch index build. Returns (row_map [T,k] int64, tokens_per_expert [E] int64, padded_counts [E] int64)."""
    T, k = indices.shape
    flat = indices.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_experts):
        raise ValueError(f"expert index out of range [0, {num_experts}): min {int(flat.min())}, max {int(flat.max())}")
    # stable sort by expert: ties keep (token, slot) order
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    pos_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[sorted_experts]
    kept = counts if capacity is None else counts.clamp(max=capacity)
    padded = kept if pad_multiple <= 1 else (kept + pad_multiple - 1) // pad_multiple * pad_multiple
    out_starts = torch.cumsum(padded, 0) - padded
    rows_sorted = out_starts[sorted_experts] + pos_in_expert
    if capacity is not None:
        rows_sorted = torch.where(pos_in_expert < capacity, rows_sorted, torch.full_like(rows_sorted, -1))
    row_map = torch.empty_like(flat)
    row_map[order] = rows_sorted
    return row_map.view(T, k), kept, padded


def permute_reference(hidden: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Gather: out[row_map[t, j]] = hidden[t] for kept slots; zero rows elsewhere. Differentiable by autograd."""
    T, k = row_map.shape
    flat = row_map.reshape(-1)
    keep = flat >= 0
    src = torch.arange(T, device=hidden.device).repeat_interleave(k)[keep]
    out = hidden.new_zeros((num_rows, hidden.shape[-1]))
    return out.index_copy(0, flat[keep], hidden.index_select(0, src))


def unpermute_reference(permuted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scatter-combine: out[t] = sum_j weights[t, j] * permuted[row_map[t, j]] over kept slots (fp32 accumulation)."""
    T, k = row_map.shape
    keep = (row_map >= 0)
    rows = permuted.index_select(0, row_map.clamp(min=0).reshape(-1)).view(T, k, -1)
    w = (weights.float() * keep).unsqueeze(-1)
    return (rows.float() * w).sum(1).to(permuted.dtype)


def permute(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int | None = None,
            pad_multiple: int = 1):
    """See module docstring. Returns (permuted, row_map, tokens_per_expert)."""
    row_map, kept, padded = make_row_map(indices, num_experts, capacity, pad_multiple)
    num_rows = int(padded.sum())
    return permute_reference(hidden, row_map, num_rows), row_map, kept


def unpermute(permuted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """See module docstring."""
    return unpermute_reference(permuted, row_map, weights)
