"""Fused top-k gating in Triton: router logits -> top-k indices, combine weights and balance-loss statistics.

One program handles a 2-D block of BLOCK_T tokens x BLOCK_E experts (BLOCK_E = E rounded up to a power of two) and
does, in registers:

  1. x = logits (+ noise), in fp32
  2. "softmax_topk": p = softmax(x) over all experts, select on p; "topk_softmax": select on x
  3. k rounds of (row max, argmax, mask the winner): ties go to the lower expert index, as torch.topk on CPU.
     The selection is kept as a dense rank matrix (rank[t, e] = slot of e in token t, or -1), so everything after
     is dense, masked arithmetic on the block: no gathers.
  4. weights: softmax over the selected logits, or the selected probabilities (optionally renormalised), times
     `scale`
  5. statistics: per-expert token counts, importance (sum of unscaled weights) and, for "softmax_topk", the sum of
     the full softmax, accumulated across programs with atomic adds
  6. optionally the k-th and (k+1)-th largest logits (Shazeer's noisy-gating load estimate) and, for the switch
     variant (capacity given), each pair's position within its expert in token order: the block's exclusive
     cumulative count plus, in a second tiny kernel, the counts of all earlier blocks.

The backward kernel recomputes the softmax from the logits (cheaper than saving [T, E] probabilities) and writes
d logits in one pass: for "topk_softmax" w * (g - <g, w>) on the selected experts; for "softmax_topk" the
renormalisation's Jacobian followed by the softmax's, with d prob_sum added to every expert of every token; plus the
threshold gradients at their argmax positions.

The semantics are defined by `megamoe.ops.gating.topk_gating_reference`; `megamoe.ops.gating.topk_gating` calls this
module (through an autograd Function) on CUDA tensors, or on CPU tensors when the module was imported with
TRITON_INTERPRET=1 (the Triton interpreter, used by the tests; the variable is read when @triton.jit runs, i.e. at
import). Logits are assumed finite.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter also needs triton.language's own @jit helpers (tl.zeros, tl.sum, tl.max, ...) decorated under
# TRITON_INTERPRET=1, i.e. triton imported with it set; a process that imported triton earlier (megatron does) cannot
# interpret these kernels (megamoe.ops.gating then falls back to the plain-torch path and says why).
LANG_INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def _launch_mode():
    """Interpreted kernels also consult TRITON_INTERPRET while launching (lazy imports inside triton); keep it set
    for the launch even if the caller restored the environment after importing this module."""
    if not INTERPRETED or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


@triton.jit
def _load_x(logits_ptr, noise_ptr, rows, cols, T, E, stride_l, stride_n, HAS_NOISE: tl.constexpr):
    """fp32 logits (+ noise) for a block; padding columns are -inf, padding rows 0 (they are never stored)."""
    rmask = rows < T
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_NOISE:
        x += tl.load(noise_ptr + rows[:, None] * stride_n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    return tl.where(cmask[None, :], x, float("-inf"))


@triton.jit
def _softmax_rows(x):
    mx = tl.max(x, 1)
    ex = tl.exp(x - mx[:, None])
    return ex / tl.sum(ex, 1)[:, None]


@triton.jit
def _topk_gating_fwd(logits_ptr, noise_ptr, idx_ptr, w_ptr, counts_ptr, imp_ptr, psum_ptr, th_ptr, thidx_ptr,
                     pos_ptr, blk_ptr, T, E, stride_l, stride_n, scale,
                     K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                     RENORM: tl.constexpr, HAS_NOISE: tl.constexpr, THRESH: tl.constexpr,
                     POSITIONS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    x = _load_x(logits_ptr, noise_ptr, rows, cols, T, E, stride_l, stride_n, HAS_NOISE)
    cols2 = cols[None, :] + tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)

    if SOFTMAX_FIRST:
        p = _softmax_rows(x)
        work = tl.where(cmask[None, :], p, -1.0)
    else:
        work = x
    # k rounds of argmax; rank[t, e] = slot of expert e for token t, -1 if not selected
    rank = tl.full([BLOCK_T, BLOCK_E], -1, dtype=tl.int32)
    for j in tl.static_range(K):
        a = tl.argmax(work, 1, tie_break_left=True)
        hit = cols2 == a[:, None]
        rank = tl.where(hit, j, rank)
        if SOFTMAX_FIRST:
            work = tl.where(hit, -2.0, work)
        else:
            work = tl.where(hit, float("-inf"), work)
    sel = rank >= 0

    # dense combine weights (zero off the selection), unscaled
    if SOFTMAX_FIRST:
        wd = tl.where(sel, p, 0.0)
        if RENORM:
            wd = wd / tl.sum(wd, 1)[:, None]
    else:
        top = tl.max(tl.where(sel, x, float("-inf")), 1)
        ed = tl.where(sel, tl.exp(x - top[:, None]), 0.0)
        wd = ed / tl.sum(ed, 1)[:, None]

    for j in tl.static_range(K):
        hit = rank == j
        tl.store(idx_ptr + rows * K + j, tl.sum(tl.where(hit, cols2, 0), 1).to(tl.int64), mask=rmask)
        tl.store(w_ptr + rows * K + j, tl.sum(tl.where(hit, wd, 0.0), 1) * scale, mask=rmask)

    # per-expert statistics of this block, added into the global [E] buffers
    selm = sel & rmask[:, None]
    cnt = tl.sum(selm.to(tl.int32), 0)
    tl.atomic_add(counts_ptr + cols, cnt.to(tl.int64), mask=cmask)
    tl.atomic_add(imp_ptr + cols, tl.sum(tl.where(selm, wd, 0.0), 0), mask=cmask)
    if SOFTMAX_FIRST:
        tl.atomic_add(psum_ptr + cols, tl.sum(tl.where(rmask[:, None], p, 0.0), 0), mask=cmask)

    if THRESH:  # k-th and (k+1)-th largest logit and where they are
        tw = x
        th0 = tl.zeros([BLOCK_T], dtype=tl.float32)
        th1 = tl.zeros([BLOCK_T], dtype=tl.float32)
        i0 = tl.zeros([BLOCK_T], dtype=tl.int32)
        i1 = tl.zeros([BLOCK_T], dtype=tl.int32)
        for j in tl.static_range(K + 1):
            v = tl.max(tw, 1)
            a = tl.argmax(tw, 1, tie_break_left=True)
            if j == K - 1:
                th0 = v
                i0 = a
            if j == K:
                th1 = v
                i1 = a
            tw = tl.where(cols2 == a[:, None], float("-inf"), tw)
        tl.store(th_ptr + rows * 2, th0, mask=rmask)
        tl.store(th_ptr + rows * 2 + 1, th1, mask=rmask)
        tl.store(thidx_ptr + rows * 2, i0.to(tl.int64), mask=rmask)
        tl.store(thidx_ptr + rows * 2 + 1, i1.to(tl.int64), mask=rmask)

    if POSITIONS:  # position within the expert, counting only this block's earlier pairs (fixed up later)
        s = selm.to(tl.int32)
        excl = tl.cumsum(s, 0) - s
        for j in tl.static_range(K):
            tl.store(pos_ptr + rows * K + j, tl.sum(tl.where(rank == j, excl, 0), 1).to(tl.int64), mask=rmask)
        tl.store(blk_ptr + pid * BLOCK_E + cols, cnt)


@triton.jit
def _positions_fixup(idx_ptr, pos_ptr, drop_ptr, blk_ptr, T, capacity,
                     K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Adds the per-expert counts of all earlier blocks to each pair's in-block position; drop = pos >= capacity."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    base = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b in range(0, pid):
        base += tl.load(blk_ptr + b * BLOCK_E + cols)
    for j in tl.static_range(K):
        e = tl.load(idx_ptr + rows * K + j, mask=rmask, other=0).to(tl.int32)
        add = tl.sum(tl.where(cols[None, :] == e[:, None], base[None, :], 0), 1)
        pos = tl.load(pos_ptr + rows * K + j, mask=rmask, other=0) + add.to(tl.int64)
        tl.store(pos_ptr + rows * K + j, pos, mask=rmask)
        tl.store(drop_ptr + rows * K + j, (pos >= capacity).to(tl.int8), mask=rmask)


@triton.jit
def _topk_gating_bwd(logits_ptr, noise_ptr, idx_ptr, gw_ptr, gimp_ptr, gps_ptr, gth_ptr, thidx_ptr, gx_ptr,
                     T, E, stride_l, stride_n, scale,
                     K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                     RENORM: tl.constexpr, HAS_NOISE: tl.constexpr, THRESH: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    x = _load_x(logits_ptr, noise_ptr, rows, cols, T, E, stride_l, stride_n, HAS_NOISE)
    cols2 = cols[None, :] + tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)

    # rebuild the selection and the upstream gradient of the unscaled dense weights:
    # g[t, e] = scale * d weights[t, slot of e] + d importance[e]
    sel = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32) > 0
    g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(idx_ptr + rows * K + j, mask=rmask, other=j).to(tl.int32)  # padding rows: any valid pick
        gwj = tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0)
        hit = cols2 == e[:, None]
        sel = sel | hit
        g = tl.where(hit, gwj[:, None] * scale, g)
    gimp = tl.load(gimp_ptr + cols, mask=cmask, other=0.0)
    g = g + tl.where(sel, gimp[None, :], 0.0)

    if SOFTMAX_FIRST:
        p = _softmax_rows(x)
        if RENORM:
            s = tl.sum(tl.where(sel, p, 0.0), 1)
            w = tl.where(sel, p, 0.0) / s[:, None]
            gp = tl.where(sel, (g - tl.sum(g * w, 1)[:, None]) / s[:, None], 0.0)
        else:
            gp = tl.where(sel, g, 0.0)
        gps = tl.load(gps_ptr + cols, mask=cmask, other=0.0)
        gp = gp + gps[None, :]
        gx = p * (gp - tl.sum(gp * p, 1)[:, None])
    else:
        top = tl.max(tl.where(sel, x, float("-inf")), 1)
        ed = tl.where(sel, tl.exp(x - top[:, None]), 0.0)
        w = ed / tl.sum(ed, 1)[:, None]
        gx = w * (g - tl.sum(g * w, 1)[:, None])

    if THRESH:
        for c in tl.static_range(2):
            e = tl.load(thidx_ptr + rows * 2 + c, mask=rmask, other=-1).to(tl.int32)
            gt = tl.load(gth_ptr + rows * 2 + c, mask=rmask, other=0.0)
            gx += tl.where(cols2 == e[:, None], gt[:, None], 0.0)

    m2 = rmask[:, None] & cmask[None, :]
    tl.store(gx_ptr + rows[:, None] * E + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m2)


def _blocks(T: int, E: int):
    block_e = triton.next_power_of_2(max(E, 1))
    # about 4K (GPU) or 32K (interpreter: fewer, larger numpy steps) elements per program
    budget = 32768 if INTERPRETED else 4096
    block_t = max(1, min(budget // block_e, triton.next_power_of_2(max(T, 1))))
    return block_t, block_e


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def topk_gating_forward(logits: torch.Tensor, k: int, softmax_first: bool, renormalize: bool, scale: float,
                        noise: torch.Tensor | None, capacity: int | None, return_thresholds: bool):
    """Runs the forward kernel(s). Returns (indices, weights, counts, importance, prob_sum, thresholds,
    threshold_indices, positions, dropped); the entries a configuration does not produce are None."""
    T, E = logits.shape
    dev = logits.device
    logits = _row_major(logits)
    if noise is not None:
        noise = _row_major(noise)
    indices = torch.empty(T, k, dtype=torch.int64, device=dev)
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    counts = torch.zeros(E, dtype=torch.int64, device=dev)
    sums = torch.zeros(2, E, dtype=torch.float32, device=dev)   # importance, prob_sum
    thresholds = thidx = positions = dropped = None
    if return_thresholds:
        thresholds = torch.empty(T, 2, dtype=torch.float32, device=dev)
        thidx = torch.empty(T, 2, dtype=torch.int64, device=dev)
    block_t, block_e = _blocks(T, E)
    grid = (triton.cdiv(T, block_t),)
    blk = None
    if capacity is not None:
        positions = torch.empty(T, k, dtype=torch.int64, device=dev)
        dropped = torch.empty(T, k, dtype=torch.int8, device=dev)
        blk = torch.empty(grid[0], block_e, dtype=torch.int32, device=dev)
    if T > 0:
        dummy = weights
        with _launch_mode():
            _launch_fwd(grid, logits, noise, indices, weights, counts, sums, thresholds, thidx, positions, dropped,
                        blk, dummy, T, E, k, scale, capacity, softmax_first, renormalize, return_thresholds,
                        block_t, block_e)
    prob_sum = sums[1] if softmax_first else None
    return (indices, weights, counts, sums[0], prob_sum, thresholds, thidx, positions,
            dropped.view(torch.bool) if dropped is not None else None)


def _launch_fwd(grid, logits, noise, indices, weights, counts, sums, thresholds, thidx, positions, dropped, blk,
                dummy, T, E, k, scale, capacity, softmax_first, renormalize, return_thresholds, block_t, block_e):
    _topk_gating_fwd[grid](
        logits, noise if noise is not None else logits, indices, weights, counts, sums[0], sums[1],
        thresholds if thresholds is not None else dummy, thidx if thidx is not None else indices,
        positions if positions is not None else indices, blk if blk is not None else indices,
        T, E, logits.stride(0), noise.stride(0) if noise is not None else 0, float(scale),
        K=k, BLOCK_T=block_t, BLOCK_E=block_e, SOFTMAX_FIRST=softmax_first, RENORM=renormalize,
        HAS_NOISE=noise is not None, THRESH=return_thresholds, POSITIONS=capacity is not None)
    if capacity is not None:
        _positions_fixup[grid](indices, positions, dropped, blk, T, int(capacity),
                               K=k, BLOCK_T=block_t, BLOCK_E=block_e)


def topk_gating_backward(logits: torch.Tensor, noise: torch.Tensor | None, indices: torch.Tensor, k: int,
                         softmax_first: bool, renormalize: bool, scale: float, grad_weights: torch.Tensor,
                         grad_importance: torch.Tensor, grad_prob_sum: torch.Tensor | None,
                         grad_thresholds: torch.Tensor | None, threshold_indices: torch.Tensor | None) -> torch.Tensor:
    """d logits (in the logits' dtype); equals d noise when noise was given (x = logits + noise)."""
    T, E = logits.shape
    logits = _row_major(logits)
    if noise is not None:
        noise = _row_major(noise)
    grad = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad
    block_t, block_e = _blocks(T, E)
    grid = (triton.cdiv(T, block_t),)
    gw = grad_weights.float().contiguous()
    gimp = grad_importance.float().contiguous()
    gps = grad_prob_sum.float().contiguous() if grad_prob_sum is not None else gimp
    thresh = grad_thresholds is not None
    gth = grad_thresholds.float().contiguous() if thresh else gw
    with _launch_mode():
        _launch_bwd(grid, logits, noise, indices, gw, gimp, gps, gth, threshold_indices, thresh, grad, T, E, k,
                    scale, softmax_first, renormalize, block_t, block_e)
    return grad


def _launch_bwd(grid, logits, noise, indices, gw, gimp, gps, gth, threshold_indices, thresh, grad, T, E, k, scale,
                softmax_first, renormalize, block_t, block_e):
    _topk_gating_bwd[grid](
        logits, noise if noise is not None else logits, indices, gw, gimp, gps, gth,
        threshold_indices if thresh else indices, grad, T, E, logits.stride(0),
        noise.stride(0) if noise is not None else 0, float(scale),
        K=k, BLOCK_T=block_t, BLOCK_E=block_e, SOFTMAX_FIRST=softmax_first, RENORM=renormalize,
        HAS_NOISE=noise is not None, THRESH=thresh)
