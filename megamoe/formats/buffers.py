"""Reusable scratch tensors for streaming conversions.

Allocating a fresh 100-500 MB tensor for every weight costs a page fault per 4 KB page, which on a virtual machine
can be 10x the cost of the copy itself. A converter handles the same few shapes in every layer, so it asks an
`Arena` for a named slot instead: the first request allocates, later requests with the same name, shape and dtype
get the same memory back. A slot's content is valid until the next request for that slot name.

    arena = Arena()
    buf = arena.empty("src.q_proj", [4096, 4096], torch.float16)   # same memory for every layer
    f32 = arena.f32("f32.q_proj", buf)                               # converted copy, also reused
    arena.clear()                                                    # drop everything (between passes)
"""

from __future__ import annotations

import torch


class Arena:
    def __init__(self):
        self._slots: dict[str, torch.Tensor] = {}

    def empty(self, slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = [int(s) for s in shape]
        t = self._slots.get(slot)
        if t is None or t.dtype != dtype or list(t.shape) != shape:
            self._slots.pop(slot, None)
            t = self._slots[slot] = torch.empty(shape, dtype=dtype)
        return t

    def f32(self, slot: str, t: torch.Tensor) -> torch.Tensor:
        """`t` as float32, copied into slot `slot` (no copy when it already is float32)."""
        if t.dtype == torch.float32:
            return t
        return self.empty(slot, t.shape, torch.float32).copy_(t)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._slots.values())

    def clear(self):
        self._slots.clear()


def slot_of(name: str) -> str:
    """A slot name shared by every layer: `layers.7.attn.q_proj.weight` -> `layers.*.attn.q_proj.weight`."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "layers":
        parts[1] = "*"
    return ".".join(parts)
