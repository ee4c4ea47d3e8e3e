"""Top-k gating: from router logits to expert indices, combine weights and the statistics balance losses need.

`topk_gating` is the public op. It dispatches to the fused Triton kernel (`kernels/topk_gating.py`, installed as
`megamoe.kernels`) when one can run (a GPU, or TRITON_INTERPRET=1 in tests) and falls back to the plain-torch
reference below, which defines the semantics. MEGAMOE_GATING_BACKEND=torch|triton forces one (a forced Triton that
cannot run raises). The first call logs one line on the `megamoe.ops.gating` logger saying which backend runs.

orders
  "topk_softmax"  top-k of the logits, softmax over the k selected (llama-moe v1 TopKBalancedNoisyGate)
  "softmax_topk"  softmax over all experts, top-k, then renormalise over the k if `renormalize` (Mixtral), or keep
                  the raw probabilities (switch, top-1)
All softmaxes are in fp32. Ties go to the lower expert index on every backend (the reference uses a stable sort:
torch.topk itself does not promise an order among equal values).

Differentiable outputs (both backends): weights, importance, prob_sum and thresholds, with respect to logits and
noise (noise enters as logits + noise, so it gets the same gradient). The Triton path has its own backward kernel.
"""
from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass

import torch

from megamoe.ops import _ext

logger = logging.getLogger(__name__)
ENV_VAR = "MEGAMOE_GATING_BACKEND"
BACKENDS = ("torch", "triton")

ORDERS = ("topk_softmax", "softmax_topk")


@dataclass
class GatingOutput:
    indices: torch.Tensor          # [T, k] int64, descending by logit
    weights: torch.Tensor          # [T, k] fp32, combine weights, multiplied by `scale`
    counts: torch.Tensor           # [E] int64, (token, slot) pairs routed to each expert (before any capacity)
    importance: torch.Tensor       # [E] fp32, sum over tokens of the unscaled gate weight (differentiable)
    prob_sum: torch.Tensor | None  # [E] fp32, sum over tokens of the full softmax ("softmax_topk" only; differentiable)
    thresholds: torch.Tensor | None  # [T, 2] the k-th and (k+1)-th largest logits (if asked; needs k < E)
    positions: torch.Tensor | None   # [T, k] int64, position of the pair within its expert, in token order (if capacity)
    dropped: torch.Tensor | None     # [T, k] bool, position >= capacity (if capacity)


def _topk_lower_index(v: torch.Tensor, k: int):
    """torch.topk along the last dim with a defined tie-break: equal values go to the lower index first."""
    idx = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
    return v.gather(-1, idx), idx


def topk_gating_reference(logits: torch.Tensor, k: int, order: str = "topk_softmax", renormalize: bool = True,
                          scale: float = 1.0, noise: torch.Tensor | None = None, capacity: int | None = None,
                          return_thresholds: bool = False) -> GatingOutput:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, {E}], got {k}")
    x = logits if logits.dtype == torch.float64 else logits.float()  # fp32 math (fp64 kept for gradchecks)
    if noise is not None:
        x = x + noise.to(x.dtype)
    thresholds = None
    if return_thresholds:
        if k >= E:
            raise ValueError("thresholds need k < number of experts")
        top = _topk_lower_index(x, k + 1)[0]
        thresholds = top[:, k - 1:k + 1]
    prob_sum = None
    if order == "topk_softmax":
        vals, idx = _topk_lower_index(x, k)
        w = torch.softmax(vals, dim=-1)
    else:
        probs = torch.softmax(x, dim=-1)
        prob_sum = probs.sum(0)
        w, idx = _topk_lower_index(probs, k)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    importance = torch.zeros(E, dtype=w.dtype, device=logits.device).index_add(0, idx.reshape(-1), w.reshape(-1))
    # not bincount: its output size depends on the data (a host sync on CUDA, a graph break under torch.compile)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).index_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.int64, device=logits.device))
    positions = dropped = None
    if capacity is not None:
        flat = idx.reshape(-1)
        onehot = torch.nn.functional.one_hot(flat, E)
        positions = ((onehot.cumsum(0) - 1) * onehot).sum(-1).view(T, k)
        dropped = positions >= capacity
    return GatingOutput(idx, w * scale, counts, importance, prob_sum, thresholds, positions, dropped)


def _check_args(logits, k, order, noise, capacity, return_thresholds):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [T, E] tensor, got {getattr(logits, 'shape', type(logits))} "
                         f"{getattr(logits, 'dtype', '')}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    E = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, {E}] (number of experts), got {k!r}")
    if noise is not None and (noise.shape != logits.shape or noise.device != logits.device):
        raise ValueError(f"noise must match logits: {tuple(logits.shape)} on {logits.device}, got "
                         f"{tuple(noise.shape)} on {noise.device}")
    if capacity is not None and int(capacity) < 0:
        raise ValueError(f"capacity must be None or >= 0, got {capacity}")
    if return_thresholds and k >= E:
        raise ValueError(f"thresholds need k < number of experts, got k={k}, E={E}")


def _kernels(import_now: bool):
    """The Triton kernel module, imported on first need (never on a CPU-only run without TRITON_INTERPRET=1)."""
    import sys
    mod = sys.modules.get("megamoe.kernels.topk_gating")
    if mod is None and import_now:
        try:
            from megamoe.kernels import topk_gating as mod
        except ImportError as exc:  # no triton
            logger.debug("Triton gating kernel unavailable: %s", exc)
            return None
    return mod


def _triton_can_run(device: torch.device, forced: bool) -> tuple[bool, str]:
    """(can run, why). CPU tensors run in the Triton interpreter: automatically only while TRITON_INTERPRET=1 is
    set, when forced also if the kernel module was imported interpreted earlier."""
    interpret_env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        mod = _kernels(True)
        if mod is None:
            return False, "triton is not installed"
        return True, "Triton kernel, " + ("interpreted (TRITON_INTERPRET=1 at import)" if mod.INTERPRETED
                                          else "native GPU")
    if device.type == "cpu":
        mod = _kernels(interpret_env)
        if mod is None:
            return False, ("triton is not installed" if interpret_env
                           else "CPU tensors need TRITON_INTERPRET=1 set before megamoe.kernels is imported")
        if not mod.INTERPRETED:
            return False, "megamoe.kernels.topk_gating was imported before TRITON_INTERPRET=1 was set"
        if not mod.LANG_INTERPRETED:
            return False, ("triton was imported before TRITON_INTERPRET=1 was set (the interpreter needs triton.language "
                           "decorated under it too)")
        if not (forced or interpret_env):
            return False, "CPU tensors and TRITON_INTERPRET is not 1"
        return True, "Triton kernel, interpreted (TRITON_INTERPRET=1)"
    return False, f"no Triton path for device type {device.type!r}"


def select_backend(device: torch.device) -> str:
    """The backend that runs for logits on `device` (see the module docstring)."""
    forced = _ext.forced_backend(ENV_VAR, BACKENDS, logger, "gating")
    if forced == "torch":
        return "torch"
    ok, why = _triton_can_run(device, forced == "triton")
    if forced == "triton":
        if not ok:
            raise RuntimeError(f"{ENV_VAR}=triton but Triton cannot run: {why}")
        _ext.log_backend_once(logger, "gating", "triton", f"{why}, forced by {ENV_VAR}")
        return "triton"
    if ok:
        _ext.log_backend_once(logger, "gating", "triton", why)
        return "triton"
    _ext.log_backend_once(logger, "gating", "torch", f"plain-torch reference ({why})")
    return "torch"


class TritonGatingFunction(torch.autograd.Function):
    """Autograd over the fused kernel: forward `topk_gating_forward`, backward `topk_gating_backward`."""

    @staticmethod
    def forward(ctx, logits, noise, k, order, renormalize, scale, capacity, return_thresholds):
        kern = _kernels(True)
        softmax_first = order == "softmax_topk"
        (indices, weights, counts, importance, prob_sum, thresholds, thidx, positions,
         dropped) = kern.topk_gating_forward(logits, k, softmax_first, renormalize, scale, noise, capacity,
                                             return_thresholds)
        ctx.save_for_backward(logits, noise, indices, thidx)
        ctx.cfg = (k, softmax_first, renormalize, scale)
        empty = logits.new_empty(0, dtype=torch.float32)
        none_long = indices.new_empty(0)
        outs = (indices, weights, counts, importance, prob_sum if prob_sum is not None else empty,
                thresholds if thresholds is not None else empty,
                positions if positions is not None else none_long,
                dropped if dropped is not None else none_long.bool())
        ctx.mark_non_differentiable(outs[0], outs[2], outs[6], outs[7])
        return outs

    @staticmethod
    def backward(ctx, g_idx, g_w, g_counts, g_imp, g_ps, g_th, g_pos, g_drop):
        logits, noise, indices, thidx = ctx.saved_tensors
        k, softmax_first, renormalize, scale = ctx.cfg
        grad = _kernels(True).topk_gating_backward(
            logits, noise, indices, k, softmax_first, renormalize, scale, g_w, g_imp,
            g_ps if softmax_first else None, g_th if thidx is not None else None, thidx)
        g_logits = grad if ctx.needs_input_grad[0] else None
        g_noise = grad.to(noise.dtype) if noise is not None and ctx.needs_input_grad[1] else None
        return g_logits, g_noise, None, None, None, None, None, None


def topk_gating(logits: torch.Tensor, k: int, order: str = "topk_softmax", renormalize: bool = True,
                scale: float = 1.0, noise: torch.Tensor | None = None, capacity: int | None = None,
                return_thresholds: bool = False) -> GatingOutput:
    """Route each of T tokens to k of E experts. See the module docstring and GatingOutput.

    logits [T, E] (any float dtype; maths in fp32), noise [T, E] added to the logits before selection (noisy
    gating), scale multiplies the returned weights (not importance), capacity (switch variant) adds each pair's
    position within its expert in token order and the drop mask, return_thresholds the k-th and (k+1)-th largest
    noisy logits."""
    _check_args(logits, k, order, noise, capacity, return_thresholds)
    k = int(k)
    if select_backend(logits.device) == "torch":
        return topk_gating_reference(logits, k, order, renormalize, scale, noise, capacity, return_thresholds)
    (indices, weights, counts, importance, prob_sum, thresholds, positions,
     dropped) = TritonGatingFunction.apply(logits, noise, k, order, bool(renormalize), float(scale),
                                           None if capacity is None else int(capacity), bool(return_thresholds))
    return GatingOutput(indices, weights, counts, importance, prob_sum if order == "softmax_topk" else None,
                        thresholds if return_thresholds else None,
                        positions if capacity is not None else None, dropped if capacity is not None else None)


def switch_gating(logits: torch.Tensor, capacity: int, scale: float = 1.0,
                  noise: torch.Tensor | None = None) -> GatingOutput:
    """Switch-Transformer routing: top-1 of the full softmax (raw probability as the weight), with each token's
    position within its expert and the drop mask for `capacity`."""
    return topk_gating(logits, 1, "softmax_topk", renormalize=False, scale=scale, noise=noise, capacity=capacity)
