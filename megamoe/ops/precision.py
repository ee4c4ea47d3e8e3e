"""Dtype helpers shared by the ops, the layers and the routers."""

from __future__ import annotations

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for reductions and routing math; fp32 and fp64 (gradient checks) are kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
