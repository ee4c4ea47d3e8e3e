"""Triton kernels of megamoe, installed as `megamoe.kernels` (see docs/kernels.md)."""
