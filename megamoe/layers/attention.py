"""Grouped-query attention with RoPE on megatron-core's tensor-parallel linears.

q/k/v are column-parallel (heads split over TP), o is row-parallel. Inside the decoder activations are
[S, B, H]; attention itself runs on [B, heads, S, d] through one of three backends (one log line says which):
torch SDPA (default; GQA through `enable_gqa` on a CPU), flash-attn, or transformer-engine.

Which keys a query sees
-----------------------
`Attention.forward(x, cos, sin, ctx=None, cache=None)`:

- `ctx is None` (pre-training rows: one document per row, positions 0..S-1, no cache): plain causal attention
  (`is_causal`; flash_attn_func / TE's causal mask on a GPU).
- `ctx` an `AttentionContext` (built once per forward by the model from position ids, segment ids and the cache):
  a query at position p of segment s (s != 0) sees the keys of segment s with position <= p,

      allowed[b, i, j] = seg_k[b, j] == seg_q[b, i]  and  pos_k[b, j] <= pos_q[b, i]          (`attention_mask`)

  so packed documents (segment ids 1..n, positions restarting per document) never see each other: a block-diagonal
  causal mask. Padding (segment 0) sees only padding (at least itself: its own key is always among the keys) and no
  real token sees padding; outputs at padding positions are finite and meaningless (never trained, never read).
  With a cache the key side is every token seen so far (`megamoe.layers.kv_cache`), so left-padded prompts,
  per-row lengths and incremental decoding follow the same rule.
  Paths: on a CPU (and on a GPU without flash-attn) SDPA with this boolean mask [B, 1, Sq, Sk]; with flash-attn on
  a GPU and no cache, `flash_attn_varlen_func` with `cu_seqlens` from the segment ids (`cu_seqlens_from_segments`:
  every maximal run of one segment id in a row is a sequence, so a document must be one contiguous run, as
  megamoe.data.SFTMixture writes them; padding runs become sequences of their own, whose outputs are don't-care).
  transformer-engine runs causal rows only here; with segments or a cache the SDPA mask path runs (logged once).

Extension points (attention experts, LLaMA-MoE v2): an expert attention gets the same `ctx` (query positions and
segments, key positions and segments of the whole sequence) and its `cache` entry (a `LayerKVCache` subclass with
per-expert stores, `update(k, v, positions, segments)`), and builds its own mask with `attention_mask` from the
positions and segments of the tokens routed to each expert.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megamoe.config import ModelConfig
from megamoe.layers.init import init_normal
from megamoe.layers.kv_cache import LayerKVCache
from megamoe.layers.rope import apply_rope
from megamoe.parallel.context import ring_attention

log = logging.getLogger(__name__)

__all__ = ["Attention", "AttentionContext", "attention_mask", "attention_mask_reference", "cu_seqlens_from_segments",
           "qkvo_projections"]

_attn_backend_logged = False
_paths_logged: set[str] = set()


def _log_path_once(path: str) -> None:
    if path not in _paths_logged:
        _paths_logged.add(path)
        log.info("attention: %s", path)


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _pick_attention_backend(cfg: ModelConfig, x: torch.Tensor) -> str:
    """sdpa (default), flash (flash-attn) or te (transformer-engine). "auto" takes flash-attn, then
    transformer-engine, when installed and the tensors are half precision on a GPU; one log line says which runs."""
    global _attn_backend_logged
    want = cfg.attention_backend
    gpu_half = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    backend = "sdpa"
    if want in ("flash", "te"):
        module = {"flash": "flash_attn", "te": "transformer_engine"}[want]
        if not _importable(module):
            raise RuntimeError(f"attention_backend: {want!r} asked for, but {module} is not installed")
        if not gpu_half:
            raise RuntimeError(f"attention_backend: {want!r} needs bf16/fp16 tensors on a GPU")
        backend = want
    elif want == "auto" and gpu_half:
        backend = "flash" if _importable("flash_attn") else ("te" if _importable("transformer_engine") else "sdpa")
    if not _attn_backend_logged:
        log.info("attention: %s", {"sdpa": "torch scaled_dot_product_attention", "flash": "flash-attn",
                                   "te": "transformer-engine DotProductAttention"}[backend])
        _attn_backend_logged = True
    return backend


# ---------------------------------------------------------------------------------------------------------------
# masks

def attention_mask(q_pos: torch.Tensor, q_seg: torch.Tensor, k_pos: torch.Tensor, k_seg: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, Sq, Sk], True = query i may attend key j: same segment and key position <= query position.
    q_pos/q_seg [B, Sq], k_pos/k_seg [B, Sk] (segment 0 = padding)."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return (same & causal)[:, None]


def attention_mask_reference(q_pos, q_seg, k_pos, k_seg) -> torch.Tensor:
    """The same rule one (row, query, key) at a time (the plain reference for `attention_mask`)."""
    B, Sq = q_pos.shape
    Sk = k_pos.shape[1]
    out = torch.zeros(B, 1, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        for i in range(Sq):
            for j in range(Sk):
                out[b, 0, i, j] = bool(k_seg[b, j] == q_seg[b, i] and k_pos[b, j] <= q_pos[b, i])
    return out


def cu_seqlens_from_segments(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Varlen layout of packed rows [B, S]: (cu_seqlens int32 [n+1], max_seqlen) over the flattened B*S tokens,
    one sequence per maximal run of equal segment ids within a row (padding runs included)."""
    B, S = segments.shape
    start = torch.ones(B, S, dtype=torch.bool, device=segments.device)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    idx = start.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([idx, torch.tensor([B * S], device=segments.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class AttentionContext:
    """The token layout of one forward, built once by the model and shared by every attention layer.

    positions [B, Sq] int64 and segments [B, Sq] int32 of the queries; key_positions / key_segments [B, Sk] of the
    keys (the cache's tokens after this forward's; without a cache the queries themselves). `mask` (bool
    [B, 1, Sq, Sk]) and `varlen` (cu_seqlens, max_seqlen; packed rows without a cache) are built on first use."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor, key_positions: torch.Tensor | None = None,
                 key_segments: torch.Tensor | None = None):
        self.positions, self.segments = positions, segments
        self.cached = key_positions is not None
        self.key_positions = positions if key_positions is None else key_positions
        self.key_segments = segments if key_segments is None else key_segments
        self._mask = self._varlen = None
        self.ring = None   # context parallelism: megamoe.parallel.context.RingContext (ring attention)

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = attention_mask(self.positions, self.segments, self.key_positions, self.key_segments)
        return self._mask

    @property
    def varlen(self) -> tuple[torch.Tensor, int]:
        if self.cached:
            raise ValueError("AttentionContext.varlen: not for a forward with a cache (the keys are not the queries)")
        if self._varlen is None:
            self._varlen = cu_seqlens_from_segments(self.segments)
        return self._varlen


def qkvo_projections(cfg: ModelConfig, mp_cfg, kv_heads: int):
    """LLaMA attention's four projections, megatron-initialised (created in this order: the RNG stream is part of a
    seeded model): q [num_heads*d, H], k and v [kv_heads*d, H] column-parallel (heads split over TP), o [H,
    num_heads*d] row-parallel, no biases. `kv_heads`: the model's KV heads, or one per attention expert
    (megamoe/moe/attention.py)."""
    d, H = cfg.dim_head, cfg.hidden_size
    out_init = init_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    col = dict(config=mp_cfg, init_method=init_normal(cfg.init_std), bias=False, gather_output=False)
    q = ColumnParallelLinear(H, cfg.num_heads * d, **col)
    k = ColumnParallelLinear(H, kv_heads * d, **col)
    v = ColumnParallelLinear(H, kv_heads * d, **col)
    o = RowParallelLinear(cfg.num_heads * d, H, config=mp_cfg, init_method=out_init, bias=False,
                          input_is_parallel=True, skip_bias_add=False)
    return q, k, v, o


class Attention(nn.Module):
    """Grouped-query attention with RoPE. q/k/v are column-parallel (heads split over TP), o is row-parallel."""

    def __init__(self, cfg: ModelConfig, mp_cfg, layer_idx: int):
        super().__init__()
        tp = mp_cfg.tensor_model_parallel_size
        self.cfg = cfg
        self.d = cfg.dim_head
        self.n_heads, self.n_kv = cfg.num_heads // tp, cfg.kv_heads // tp
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = qkvo_projections(cfg, mp_cfg, cfg.kv_heads)
        self._te = None  # transformer-engine attention module, built on first use when that backend runs

    def forward(self, x, cos, sin, ctx: AttentionContext | None = None, cache: LayerKVCache | None = None):
        # x: [S, B, H] (the full sequence: column-parallel layers all-gather it under sequence parallelism);
        # cos/sin: [S, d] or [B, 1, S, d] (per-row position ids); ctx/cache: see the module docstring
        q, _ = self.q_proj(x)
        k, _ = self.k_proj(x)
        v, _ = self.v_proj(x)
        S, B = q.shape[:2]
        q = q.view(S, B, self.n_heads, self.d).permute(1, 2, 0, 3)   # [B, h, S, d]
        k = k.view(S, B, self.n_kv, self.d).permute(1, 2, 0, 3)
        v = v.view(S, B, self.n_kv, self.d).permute(1, 2, 0, 3)
        dt = q.dtype
        if not q.is_cuda and dt in (torch.float16, torch.bfloat16):
            # on a CPU, RoPE and attention run in fp32: SDPA's CPU kernel is faster in fp32 than in half precision
            # (it accumulates in fp32 either way), and so are elementwise ops on these strided views
            q, k, v, cos, sin = q.float(), k.float(), v.float(), cos.float(), sin.float()
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if ctx is None:
                raise ValueError("Attention: a cache needs the AttentionContext of the forward (the model builds it)")
            k, v = cache.update(k, v, ctx.positions, ctx.segments)      # [B, n_kv, T, d]: every token seen
        if ctx is not None and ctx.ring is not None:
            # context parallelism: this rank's queries against every CP rank's keys, K/V passed around the ring
            _log_path_once("ring attention over the context-parallel group (megamoe/parallel/context.py)")
            o = ring_attention(q, k, v, ctx.positions, ctx.segments, ctx.ring).permute(2, 0, 1, 3).to(dt)
            out, _ = self.o_proj(o.reshape(S, B, self.n_heads * self.d))
            return out
        backend = _pick_attention_backend(self.cfg, q)
        if ctx is not None:
            o = self._masked(q, k, v, ctx, backend).to(dt)                # [S, B, h, d]
        elif backend == "te":
            if self._te is None:
                from transformer_engine.pytorch import DotProductAttention  # optional dependency
                self._te = DotProductAttention(self.n_heads, self.d, num_gqa_groups=self.n_kv, qkv_format="sbhd",
                                               attn_mask_type="causal")
            o = self._te(*(t.permute(2, 0, 1, 3).contiguous() for t in (q, k, v)))  # [S,B,h*d]
            out, _ = self.o_proj(o.reshape(S, B, self.n_heads * self.d))
            return out
        elif backend == "flash":
            from flash_attn import flash_attn_func  # optional dependency
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # [B,S,h,d]
            o = o.permute(1, 0, 2, 3)
        else:
            o = self._sdpa(q, k, v, None).to(dt)
        out, _ = self.o_proj(o.reshape(S, B, self.n_heads * self.d))
        return out

    def _sdpa(self, q, k, v, mask):
        """torch SDPA, causal (mask None) or under a boolean mask [B, 1, Sq, Sk]; returns [S, B, h, d]."""
        # query head h uses kv head h // (n_heads / n_kv), as HF's repeat_kv. On a CPU, SDPA's flash kernel
        # does that itself (enable_gqa: no repeated copies of k, v and their gradients); elsewhere repeat them
        gqa = self.n_kv != self.n_heads
        if gqa and q.is_cuda:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = gqa and not q.is_cuda
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return o.permute(2, 0, 1, 3)  # [S,B,h,d]

    def _masked(self, q, k, v, ctx: AttentionContext, backend: str):
        """Attention under the context's rule (module docstring): flash-attn varlen for packed rows on a GPU, else
        SDPA with the boolean mask. Returns [S, B, h, d]."""
        if backend == "flash" and not ctx.cached:
            from flash_attn import flash_attn_varlen_func  # optional dependency
            _log_path_once("flash-attn varlen (packed documents: cu_seqlens from segment_ids)")
            cu, max_len = ctx.varlen
            B, h, S, d = q.shape
            flat = [t.transpose(1, 2).reshape(B * S, t.shape[1], d) for t in (q, k, v)]   # [B*S, heads, d]
            o = flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, causal=True)
            return o.view(B, S, h, d).permute(1, 0, 2, 3)
        why = "a cache" if ctx.cached else "packed documents / padding"
        if backend != "sdpa":
            _log_path_once(f"torch SDPA with the segment/position mask ({why}; {backend} runs causal rows only here)")
        else:
            _log_path_once(f"torch SDPA with the segment/position mask ({why})")
        return self._sdpa(q, k, v, ctx.mask)
