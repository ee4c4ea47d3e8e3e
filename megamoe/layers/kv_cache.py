"""Key/value cache for incremental decoding: one small object per attention layer, one list of them per model.

    cache = KVCache(num_layers)                                # empty; grows with every forward given it
    out = model(prompt, position_ids=pos, segment_ids=seg, cache=cache)      # prefill: P tokens
    out = model(next_tok[:, None], position_ids=pos[:, -1:] + 1, cache=cache)  # one more token per row

What is stored (B rows, T tokens seen so far, this rank's heads):

    KVCache.positions  int64 [B, T]   position id of every token seen (the RoPE position; causal order)
    KVCache.segments   int32 [B, T]   0 = padding (no real token ever attends to it), else the document id
    KVCache.layers[i]  LayerKVCache   k, v [B, n_kv_local, T, d]: keys after RoPE, values

Every forward first appends its tokens' positions and segments (`KVCache.extend`, called by the model), then each
attention layer appends its keys and values (`LayerKVCache.update(k, v)`) and attends over everything stored, under
the mask rule of `megamoe.layers.attention.attention_mask`: a query (position p, segment s != 0) sees the stored keys
of segment s with position <= p. Under tensor parallelism each rank caches its own kv heads; with GQA the cache
holds the n_kv heads, not the repeated ones.

Extending it (e.g. LLaMA-MoE v2's attention experts, each caching only the tokens routed to it): subclass
`LayerKVCache` with a per-expert store, keep its own positions and segments per expert (`update` receives them,
see `LayerKVCache.update`), and hand `KVCache(num_layers, layer_factory=...)` to the model. The model-level
`positions`/`segments` stay the sequence as a whole (they give the next position of each row).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["LayerKVCache", "KVCache"]


class LayerKVCache:
    """One attention layer's keys and values: k, v [B, n_kv, T, d] (None before the first update)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
               segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's k, v [B, n_kv, S, d] (post-RoPE) and return everything stored, [B, n_kv, T+S, d].
        `positions`/`segments` [B, S] are those of the new tokens; this plain cache does not need them (the model's
        `KVCache` keeps them for all layers), a cache that stores a subset of the tokens does."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows: `rows` indexes dim 0 (finished prompts dropped, beams reordered)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class KVCache:
    """The model's cache: a `LayerKVCache` per decoder layer plus the positions and segments of the tokens seen."""

    def __init__(self, num_layers: int, layer_factory: Callable[[], LayerKVCache] = LayerKVCache):
        self.layers = [layer_factory() for _ in range(num_layers)]
        self.positions: torch.Tensor | None = None   # [B, T] int64
        self.segments: torch.Tensor | None = None    # [B, T] int32

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def next_positions(self, batch: int, length: int, device) -> torch.Tensor:
        """Default position ids [B, S] of `length` new tokens: one past the largest position of each row's real
        tokens so far (0, 1, ... for an empty cache)."""
        steps = torch.arange(length, device=device)
        if self.positions is None:
            return steps.expand(batch, length)
        real = torch.where(self.segments != 0, self.positions, torch.full_like(self.positions, -1))
        return real.amax(dim=1, keepdim=True) + 1 + steps

    def extend(self, positions: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the new tokens' positions and segments [B, S]; return the key side of this forward (all tokens,
        [B, T+S] each)."""
        positions, segments = positions.long(), segments.int()
        if self.positions is None:
            self.positions, self.segments = positions, segments
        else:
            if positions.shape[0] != self.positions.shape[0]:
                raise ValueError(f"KVCache: {positions.shape[0]} rows given, the cache holds "
                                 f"{self.positions.shape[0]}")
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.segments = torch.cat([self.segments, segments], dim=1)
        return self.positions, self.segments

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows in every layer."""
        if self.positions is not None:
            self.positions, self.segments = self.positions[rows], self.segments[rows]
        for layer in self.layers:
            layer.reorder(rows)
