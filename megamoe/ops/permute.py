"""Token permute / unpermute: gather tokens into expert-major order and scatter them back.

`permute` and `unpermute` are the public ops. They dispatch to the fastest backend present (CUDA or C++ from
`csrc/`, built as `megamoe._C` / `megamoe._C_cuda`) and fall back to the plain-torch reference below, which is also
what the tests compare against. Set MEGAMOE_PERMUTE_BACKEND=torch|cpp|cuda to force one (a forced backend that
cannot run raises instead of falling back). The first call logs one line on the `megamoe.ops.permute` logger
saying which backend runs.

Layout contract (see docs/architecture.md):
  permute(hidden [T,H], indices [T,k], num_experts, capacity=None, pad_multiple=1)
      -> permuted [N,H], row_map [T,k] (row of each (token, slot) in `permuted`, -1 if dropped),
         tokens_per_expert [E] (kept rows per expert, before padding)
  Rows are ordered by expert, then token index, then slot. With `capacity`, an expert keeps its first
  `capacity` (token, slot) pairs in that order and drops the rest. With `pad_multiple`, each expert's block is
  padded with zero rows to a multiple of it (for aligned grouped GEMMs).
  unpermute(permuted [N,H], row_map [T,k], weights [T,k]) -> [T,H] = sum over kept slots of weight * row.

Worked example (E=3, k=2, no capacity, pad_multiple=1):
  indices = [[2, 0],      row_map = [[3, 0],     permuted rows: 0: token0 (expert 0)
             [0, 1]]                 [1, 2]]                     1: token1 (expert 0)
                                                                 2: token1 (expert 1)
  tokens_per_expert = [2, 1, 1], offsets = [0, 2, 3, 4]          3: token0 (expert 2)

`permute_tokens` returns the same plus the padded per-expert counts and the offsets [E+1] of each expert's block
(what a grouped GEMM needs); `permute_routing_map` takes a megatron-style [T,E] boolean routing map instead of
indices.

Gradients: permute's backward sums the k row gradients of a token (fp32 accumulation); unpermute's backward gives
each kept row weight * grad_out[t] and each weight <row, grad_out[t]>; dropped slots and padding rows get zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megamoe.ops import _ext

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "cpp", "cuda")
ENV_VAR = "MEGAMOE_PERMUTE_BACKEND"
CUDA_MAX_EXPERTS = 2048  # the CUDA index build keeps per-expert offsets in shared memory (csrc/permute_cuda.cu)


# ----------------------------------------------------------------------------------------------------------------
# plain-torch reference (the semantics; also the fallback)
# ----------------------------------------------------------------------------------------------------------------

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
    """Scatter-combine: out[t] = sum_j weights[t, j] * permuted[row_map[t, j]] over kept slots (accumulated in fp32,
    or fp64 for fp64 rows)."""
    T, k = row_map.shape
    acc = torch.promote_types(permuted.dtype, torch.float32)
    N, H = permuted.shape
    keep = (row_map >= 0)
    # dropped slots read an appended zero row (also keeps N = 0 valid)
    rows = torch.cat([permuted, permuted.new_zeros(1, H)]).index_select(
        0, torch.where(keep, row_map, N).reshape(-1)).view(T, k, H)
    w = (weights.to(acc) * keep).unsqueeze(-1)
    return (rows.to(acc) * w).sum(1).to(permuted.dtype)


# ----------------------------------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------------------------------

# backend -> (device type it serves, its extension module, what it is, its label in messages)
_NATIVE = {"cpp": ("cpu", "_C", "C++ CPU kernels from megamoe._C", "C++", "CPU"),
           "cuda": ("cuda", "_C_cuda", "CUDA kernels from megamoe._C_cuda", "CUDA", "CUDA")}


def _native_available(backend: str) -> bool:
    return _ext.cpp_available() if backend == "cpp" else _ext.cuda_available()


def select_backend(device: torch.device) -> str:
    """The backend that runs for tensors on `device`: MEGAMOE_PERMUTE_BACKEND if set, else CUDA kernels for CUDA
    tensors, C++ kernels for CPU tensors, plain torch when the extension is missing (or for other devices)."""
    forced = _ext.forced_backend(ENV_VAR, BACKENDS, logger, "permute")
    if forced == "torch":
        return "torch"
    if forced in _NATIVE:
        dev, module, what, ext_name, dev_name = _NATIVE[forced]
        if device.type != dev:
            raise ValueError(f"{ENV_VAR}={forced} needs {dev_name} tensors, got tensors on {device}")
        if not _native_available(forced):
            raise RuntimeError(f"{ENV_VAR}={forced} but the {ext_name} extension is unavailable: "
                               f"{_ext.load_error(module)}")
        _ext.log_backend_once(logger, "permute", forced, f"{what}, forced by {ENV_VAR}")
        return forced
    for backend, (dev, module, what, ext_name, _) in _NATIVE.items():
        if device.type == dev:
            if _native_available(backend):
                _ext.log_backend_once(logger, "permute", backend, what)
                return backend
            _ext.log_backend_once(logger, "permute", "torch",
                                  f"{ext_name} extension unavailable, plain-torch fallback: {_ext.load_error(module)}")
            return "torch"
    _ext.log_backend_once(logger, "permute", "torch", f"no kernels for device type {device.type!r}")
    return "torch"


# ----------------------------------------------------------------------------------------------------------------
# autograd ops over the compiled kernels (torch.ops.megamoe.*, schemas in csrc/permute.cpp)
# ----------------------------------------------------------------------------------------------------------------

class PermuteFunction(torch.autograd.Function):
    """permuted[row_map[t, j]] = hidden[t]; backward: grad_hidden[t] = sum_j grad[row_map[t, j]] (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, hidden, row_map, num_rows: int, zero_fill: bool):
        ctx.save_for_backward(row_map)
        return torch.ops.megamoe.permute_rows(hidden, row_map, None, num_rows, zero_fill)

    @staticmethod
    def backward(ctx, grad):
        (row_map,) = ctx.saved_tensors
        return torch.ops.megamoe.combine_rows(grad.contiguous(), row_map, None), None, None, None


class UnpermuteFunction(torch.autograd.Function):
    """out[t] = sum_j weights[t, j] * permuted[row_map[t, j]]; backward to both `permuted` and `weights`."""

    @staticmethod
    def forward(ctx, permuted, row_map, weights):
        ctx.save_for_backward(permuted, row_map, weights)
        return torch.ops.megamoe.combine_rows(permuted, row_map, weights)

    @staticmethod
    def backward(ctx, grad):
        permuted, row_map, weights = ctx.saved_tensors
        grad_perm, grad_w = torch.ops.megamoe.unpermute_backward(grad.contiguous(), permuted, row_map, weights)
        return (grad_perm if ctx.needs_input_grad[0] else None, None,
                grad_w if ctx.needs_input_grad[2] else None)


# ----------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Permuted:
    """Result of `permute_tokens`. `offsets[e]:offsets[e] + tokens_per_expert[e]` are expert e's real rows,
    `offsets[e] + tokens_per_expert[e]:offsets[e + 1]` its zero padding."""
    permuted: torch.Tensor           # [N, H]
    row_map: torch.Tensor            # [T, k] int64, -1 = dropped
    tokens_per_expert: torch.Tensor  # [E] int64, kept rows (unpadded)
    padded_counts: torch.Tensor      # [E] int64, rows incl. padding (what a grouped GEMM iterates over)
    offsets: torch.Tensor            # [E + 1] int64, start of each expert's block; offsets[E] = N


def _check_permute_args(hidden, indices, num_experts, capacity, pad_multiple):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a [T, H] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != hidden.shape[0]:
        raise ValueError(f"indices must be a [T, k] tensor with T = {hidden.shape[0]} (hidden's rows), "
                         f"got {getattr(indices, 'shape', type(indices))}")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.device != hidden.device:
        raise ValueError(f"indices on {indices.device} but hidden on {hidden.device}")
    if int(num_experts) < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if capacity is not None and int(capacity) < 0:
        raise ValueError(f"capacity must be None or >= 0, got {capacity}")
    if int(pad_multiple) < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")


def _offsets(padded: torch.Tensor) -> torch.Tensor:
    return torch.cat([padded.new_zeros(1), torch.cumsum(padded, 0)])


@dataclass
class RowMap:
    """The index build alone (all on the input's device; nothing read back to the host)."""
    row_map: torch.Tensor            # [T, k] int64, -1 = dropped
    tokens_per_expert: torch.Tensor  # [E] int64, kept rows
    padded_counts: torch.Tensor      # [E] int64
    offsets: torch.Tensor            # [E + 1] int64
    totals: torch.Tensor             # [3] int64: rows N (padding included), kept pairs, out-of-range expert ids
    backend: str


def build_row_map(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int | None = None,
                  pad_multiple: int = 1) -> RowMap:
    """The index build of `permute_tokens` on the backend that runs for `hidden`; `totals` is the one small tensor
    a caller reads back to size the output (`permute_rows`) and to check the input."""
    _check_permute_args(hidden, indices, num_experts, capacity, pad_multiple)
    backend = select_backend(hidden.device)
    if backend == "torch" or (backend == "cuda" and int(num_experts) > CUDA_MAX_EXPERTS):
        row_map, kept, padded = make_row_map(indices, int(num_experts), capacity, int(pad_multiple))
        totals = torch.stack([padded.sum(), kept.sum(), torch.zeros_like(kept.sum())])
        return RowMap(row_map, kept, padded, _offsets(padded), totals, "torch")
    row_map, kept, padded, offsets, totals = torch.ops.megamoe.row_map(
        indices, int(num_experts), -1 if capacity is None else int(capacity), int(pad_multiple))
    return RowMap(row_map, kept, padded, offsets, totals, backend)


def permute_rows(hidden: torch.Tensor, rm: RowMap, num_rows: int, zero_fill: bool = True) -> torch.Tensor:
    """out [num_rows, H]: out[row_map[t, j]] = hidden[t], other rows zero (if zero_fill); differentiable."""
    if rm.backend == "torch":
        return permute_reference(hidden, rm.row_map, num_rows)
    return PermuteFunction.apply(hidden, rm.row_map, num_rows, zero_fill)


def permute_tokens(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int | None = None,
                   pad_multiple: int = 1) -> Permuted:
    """`permute` with the grouped-GEMM metadata (padded counts and offsets). See the module docstring.
    One device-to-host read: `totals` (the output's row count and the input check)."""
    rm = build_row_map(hidden, indices, num_experts, capacity, pad_multiple)
    num_rows, num_kept, invalid = rm.totals.tolist()  # the one device-to-host copy (output size, input check)
    if invalid:
        raise ValueError(f"expert index out of range [0, {int(num_experts)}): {invalid} of {indices.numel()} entries")
    permuted = permute_rows(hidden, rm, num_rows, num_rows > num_kept)
    return Permuted(permuted, rm.row_map, rm.tokens_per_expert, rm.padded_counts, rm.offsets)


def permute_to_capacity(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int) -> Permuted:
    """Static shapes: every expert's block is exactly `capacity` rows (its kept rows, then zero rows), so
    N = E * capacity and offsets = [0, c, 2c, ...] are known without reading anything back from the device
    (megatron's moe_pad_expert_input_to_capacity). Same row order within a block as `permute_tokens`.
    Out-of-range expert ids: an asynchronous device assert (raises at once on a CPU)."""
    rm = build_row_map(hidden, indices, num_experts, capacity, 1)
    E, cap = int(num_experts), int(capacity)
    torch._assert_async(rm.totals[2] == 0, f"expert index out of range [0, {E})")   # no host read on a GPU
    idx = indices.long().clamp(0, E - 1)
    # kept row r of expert e sits at offsets[e] + i in the packed layout; here at e * cap + i
    static = torch.where(rm.row_map >= 0, rm.row_map - rm.offsets[idx] + idx * cap, rm.row_map)
    srm = RowMap(static, rm.tokens_per_expert, torch.full_like(rm.padded_counts, cap),
                 torch.arange(E + 1, device=static.device) * cap, rm.totals, rm.backend)
    permuted = permute_rows(hidden, srm, E * cap, True)
    return Permuted(permuted, srm.row_map, srm.tokens_per_expert, srm.padded_counts, srm.offsets)


def permute(hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int | None = None,
            pad_multiple: int = 1):
    """See module docstring. Returns (permuted, row_map, tokens_per_expert)."""
    p = permute_tokens(hidden, indices, num_experts, capacity, pad_multiple)
    return p.permuted, p.row_map, p.tokens_per_expert


def permute_probs(weights: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The router weights in permuted row order: p [num_rows], p[row_map[t, j]] = weights[t, j], 0 on padding
    rows. Differentiable in `weights` (a gather back). For applying the weights in the experts' activation
    ("memory-efficient permutation") instead of in `unpermute`."""
    flat = row_map.reshape(-1)
    idx = torch.where(flat >= 0, flat, num_rows)           # dropped slots write a scratch element, cut below
    return weights.new_zeros(num_rows + 1).index_copy(0, idx, weights.reshape(-1))[:num_rows]


class CombineFunction(torch.autograd.Function):
    """out[t] = sum_j rows[row_map[t, j]] (no weights); backward: grad_rows[row_map[t, j]] = grad[t]. Nothing large
    is saved for the backward (the weighted unpermute keeps `rows` for the weights' gradient)."""

    @staticmethod
    def forward(ctx, rows, row_map):
        ctx.save_for_backward(row_map)
        ctx.num_rows = rows.shape[0]
        return torch.ops.megamoe.combine_rows(rows, row_map, None)

    @staticmethod
    def backward(ctx, grad):
        (row_map,) = ctx.saved_tensors
        return torch.ops.megamoe.permute_rows(grad.contiguous(), row_map, None, ctx.num_rows, True), None


def unpermute(permuted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """See module docstring. weights=None: the plain sum of each token's kept rows (the weights were applied
    before, e.g. in the experts' activation)."""
    if not isinstance(permuted, torch.Tensor) or permuted.dim() != 2:
        raise ValueError(f"permuted must be a [N, H] tensor, got {getattr(permuted, 'shape', type(permuted))}")
    if not isinstance(row_map, torch.Tensor) or row_map.dim() != 2 or row_map.dtype != torch.int64:
        raise ValueError(f"row_map must be a [T, k] int64 tensor (from permute), got "
                         f"{getattr(row_map, 'shape', type(row_map))} {getattr(row_map, 'dtype', '')}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != row_map.shape
                                or not weights.is_floating_point()):
        raise ValueError(f"weights must be a floating [T, k] = {tuple(row_map.shape)} tensor, got "
                         f"{getattr(weights, 'shape', type(weights))} {getattr(weights, 'dtype', '')}")
    if permuted.device != row_map.device or (weights is not None and weights.device != permuted.device):
        raise ValueError(f"permuted, row_map and weights must share a device, got {permuted.device}, "
                         f"{row_map.device}, {None if weights is None else weights.device}")
    if select_backend(permuted.device) == "torch":
        if weights is None:
            weights = torch.ones(row_map.shape, dtype=torch.float32, device=permuted.device)
        return unpermute_reference(permuted, row_map, weights)
    if weights is None:
        return CombineFunction.apply(permuted, row_map)
    return UnpermuteFunction.apply(permuted, row_map, weights)


def indices_from_routing_map(routing_map: torch.Tensor, probs: torch.Tensor | None = None):
    """Megatron-style [T, E] boolean routing map -> (indices [T, k] int64, weights [T, k] or None).

    Every token must route to the same number k of experts; a token's slots are its experts in ascending order
    (so the permuted row order equals megatron-core's `permute(tokens, routing_map)`). `probs` [T, E] gives the
    weights, gathered at the chosen experts."""
    if routing_map.dim() != 2 or routing_map.dtype != torch.bool:
        raise ValueError(f"routing_map must be a [T, E] bool tensor, got {tuple(routing_map.shape)} {routing_map.dtype}")
    T, E = routing_map.shape
    per_token = routing_map.sum(1)
    k = int(per_token[0]) if T else 0
    if T and not bool((per_token == k).all()):
        raise ValueError(f"every token must route to the same number of experts; counts range "
                         f"{int(per_token.min())}..{int(per_token.max())}")
    expert_ids = torch.arange(E, device=routing_map.device).expand(T, E)
    indices = torch.sort(torch.where(routing_map, expert_ids, E), dim=1).values[:, :k].contiguous()
    weights = None
    if probs is not None:
        if probs.shape != routing_map.shape:
            raise ValueError(f"probs must be [T, E] = {tuple(routing_map.shape)}, got {tuple(probs.shape)}")
        weights = probs.gather(1, indices)
    return indices, weights


def permute_routing_map(hidden: torch.Tensor, routing_map: torch.Tensor, capacity: int | None = None,
                        pad_multiple: int = 1, probs: torch.Tensor | None = None):
    """`permute_tokens` from a [T, E] boolean routing map. Returns (Permuted, weights [T, k] or None)."""
    indices, weights = indices_from_routing_map(routing_map, probs)
    return permute_tokens(hidden, indices, routing_map.shape[1], capacity, pad_multiple), weights


# load the C++ library (and register its fake kernels) at import: torch.compile cannot trace the first load
_ext.load_library("_C")
