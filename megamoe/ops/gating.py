"""Top-k gating: from router logits to expert indices, combine weights and the statistics balance losses need.

`topk_gating` is the public op. It dispatches to the fused Triton kernel (`kernels/`, installed as
`megamoe.kernels`) when one can run (a GPU, or TRITON_INTERPRET=1 in tests) and falls back to the plain-torch
reference below, which defines the semantics. MEGAMOE_GATING_BACKEND=torch|triton forces one.

orders
  "topk_softmax"  top-k of the logits, softmax over the k selected (llama-moe v1 TopKBalancedNoisyGate)
  "softmax_topk"  softmax over all experts, top-k, then renormalise over the k if `renormalize` (Mixtral), or keep
                  the raw probabilities (switch, top-1)
All softmaxes are in fp32. Ties go to the lower expert index (torch.topk on CPU; the kernels match it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        top = torch.topk(x, k + 1, dim=-1).values
        thresholds = top[:, k - 1:k + 1]
    prob_sum = None
    if order == "topk_softmax":
        vals, idx = torch.topk(x, k, dim=-1)
        w = torch.softmax(vals, dim=-1)
    else:
        probs = torch.softmax(x, dim=-1)
        prob_sum = probs.sum(0)
        w, idx = torch.topk(probs, k, dim=-1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    importance = torch.zeros(E, dtype=w.dtype, device=logits.device).index_add(0, idx.reshape(-1), w.reshape(-1))
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    positions = dropped = None
    if capacity is not None:
        flat = idx.reshape(-1)
        onehot = torch.nn.functional.one_hot(flat, E)
        positions = ((onehot.cumsum(0) - 1) * onehot).sum(-1).view(T, k)
        dropped = positions >= capacity
    return GatingOutput(idx, w * scale, counts, importance, prob_sum, thresholds, positions, dropped)


def topk_gating(logits: torch.Tensor, k: int, order: str = "topk_softmax", renormalize: bool = True,
                scale: float = 1.0, noise: torch.Tensor | None = None, capacity: int | None = None,
                return_thresholds: bool = False) -> GatingOutput:
    """See module docstring and GatingOutput."""
    return topk_gating_reference(logits, k, order, renormalize, scale, noise, capacity, return_thresholds)
