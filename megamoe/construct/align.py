"""Output alignment (LLaMA-MoE v2's optional step, `align_converted_model.py`): match each MoE layer's output
statistics to the dense FFN's on calibration tokens, per output channel c:

    "v2"   s_c = sqrt(var_dense_c / var_moe_c),  b_c = mean_dense_c - s_c mean_moe_c   (mean and variance matched)
    "lsq"  s_c = <y_moe_c, y_dense_c> / <y_moe_c, y_moe_c>,  b_c = 0                   (least-squares per channel)

The aligned layer computes diag(s) y_moe + b. The scale folds into every expert's down projection (row c of each
`down_proj` times s_c, and the residual block's), so it survives every export. The bias does not: our MoE layer,
HF Mixtral and llama-moe v1 have no bias on the expert outputs (v2 adds one with `add_rescale_bias=True`, a layout
nobody else loads). `align_stats` reports what the bias would have bought (error with and without it), so the
loss from dropping it is measured, not guessed.
"""

from __future__ import annotations

import torch

__all__ = ["channel_alignment", "fold_scale", "ALIGN_MODES"]

ALIGN_MODES = ("none", "v2", "lsq")


def channel_alignment(y_moe: torch.Tensor, y_dense: torch.Tensor, mode: str = "v2") -> dict:
    """Per-channel scale s [H] and bias b [H] for outputs [N, H], and the relative errors of the layer output
    sum ||.||^2 / sum ||y_dense||^2 before, with the scale alone (foldable) and with scale and bias."""
    if mode not in ("v2", "lsq"):
        raise ValueError(f"mode: {mode!r} is not one of v2, lsq")
    ym, yd = y_moe.double(), y_dense.double()
    if mode == "v2":
        s = torch.sqrt(yd.var(0, unbiased=False) / ym.var(0, unbiased=False).clamp_min(1e-30))
        b = yd.mean(0) - s * ym.mean(0)
    else:
        s = (ym * yd).sum(0) / (ym * ym).sum(0).clamp_min(1e-30)
        b = torch.zeros_like(s)
    den = float((yd * yd).sum())

    def err(y):
        return float(((y - yd) ** 2).sum()) / max(den, 1e-300)

    return {"scale": s.float(), "bias": b.float(), "rel_error_before": err(ym), "rel_error_scale": err(ym * s),
            "rel_error_scale_bias": err(ym * s + b), "bias_norm": float(b.norm())}


def fold_scale(down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diag(scale) down: a per-output-channel scale folded into a down projection [H, F] (or an expert's [H, s])."""
    return down * scale.to(down.dtype)[:, None]
