"""Rotary position embeddings (RoPE), HF's rotate_half convention, with default, linear and LLaMA-3 scaling.

    inv = rope_inv_freq(cfg)                          # [d/2] fp32, from cfg.rope_theta / cfg.rope_scaling
    cos, sin = rope_cos_sin(inv, positions, dtype)    # positions [S] -> [S, d] each (frequencies repeated twice);
                                                      # position ids [B, S] -> [B, 1, S, d] (one row each)
    q = apply_rope(q, cos, sin)                       # q: [B, heads, S, d]; q*cos + rotate_half(q)*sin

Position ids per row are what packed documents (ids restart at every document) and left-padded or cached
generation (ids continue from the tokens seen) need; both tables broadcast against q and k the same way.

Plain torch only (no megatron): the interchange guard's streaming forward uses the same table.
"""

from __future__ import annotations

import math

import torch

from megamoe.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for RoPE, with the LLaMA-3 ("llama3") or linear scaling when configured."""
    d = cfg.dim_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        mid = (wl <= lo_wl) & (wl >= hi_wl)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos, sin for positions [S] (shape [S, d]) or per-row position ids [B, S] (shape [B, 1, S, d], broadcast over
    the heads). HF's rotate_half convention: frequencies repeated twice."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    if positions.dim() == 2:
        emb = emb[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, heads, S, d]; cos/sin: [S, d] or [B, 1, S, d]."""
    if x.dtype == cos.dtype == sin.dtype and not x.is_cuda:
        return _RopeFunction.apply(x, cos, sin)   # the same without the rotated copy, on a CPU
    return apply_rope_reference(x, cos, sin)


def apply_rope_reference(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class _RopeFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], computed in halves in place (no concatenated
    copy); backward: dx = dy * cos + [dy2 * sin2, -dy1 * sin1] (cos/sin are constants, no gradient)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        h = dy.shape[-1] // 2
        dx = dy * cos
        dx[..., :h].addcmul_(dy[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(dy[..., :h], sin[..., :h], value=-1)
        return dx, None, None
