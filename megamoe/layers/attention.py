"""Grouped-query attention with RoPE on megatron-core's tensor-parallel linears.

q/k/v are column-parallel (heads split over TP), o is row-parallel. Inside the decoder activations are
[S, B, H]; attention itself runs on [B, heads, S, d] through one of three backends (one log line says which):
torch SDPA (default; GQA through `enable_gqa` on a CPU), flash-attn, or transformer-engine.
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
from megamoe.layers.rope import apply_rope

log = logging.getLogger(__name__)

_attn_backend_logged = False


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


class Attention(nn.Module):
    """Grouped-query attention with RoPE. q/k/v are column-parallel (heads split over TP), o is row-parallel."""

    def __init__(self, cfg: ModelConfig, mp_cfg, layer_idx: int):
        super().__init__()
        tp = mp_cfg.tensor_model_parallel_size
        self.cfg = cfg
        self.d = cfg.dim_head
        self.n_heads, self.n_kv = cfg.num_heads // tp, cfg.kv_heads // tp
        H = cfg.hidden_size
        init = init_normal(cfg.init_std)
        out_init = init_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        col = dict(config=mp_cfg, init_method=init, bias=False, gather_output=False)
        self.q_proj = ColumnParallelLinear(H, cfg.num_heads * self.d, **col)
        self.k_proj = ColumnParallelLinear(H, cfg.kv_heads * self.d, **col)
        self.v_proj = ColumnParallelLinear(H, cfg.kv_heads * self.d, **col)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.d, H, config=mp_cfg, init_method=out_init, bias=False,
                                        input_is_parallel=True, skip_bias_add=False)
        self._te = None  # transformer-engine attention module, built on first use when that backend runs

    def forward(self, x, cos, sin):
        # x: [S, B, H] (the full sequence: column-parallel layers all-gather it under sequence parallelism)
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
        backend = _pick_attention_backend(self.cfg, q)
        if backend == "te":
            if self._te is None:
                from transformer_engine.pytorch import DotProductAttention
                self._te = DotProductAttention(self.n_heads, self.d, num_gqa_groups=self.n_kv, qkv_format="sbhd",
                                               attn_mask_type="causal")
            o = self._te(*(t.permute(2, 0, 1, 3).contiguous() for t in (q, k, v)))  # [S,B,h*d]
            out, _ = self.o_proj(o.reshape(S, B, self.n_heads * self.d))
            return out
        if backend == "flash":
            from flash_attn import flash_attn_func
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # [B,S,h,d]
            o = o.permute(1, 0, 2, 3)
        else:
            # query head h uses kv head h // (n_heads / n_kv), as HF's repeat_kv. On a CPU, SDPA's flash kernel
            # does that itself (enable_gqa: no repeated copies of k, v and their gradients); elsewhere repeat them
            gqa = self.n_kv != self.n_heads
            if gqa and q.is_cuda:
                rep = self.n_heads // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa and not q.is_cuda)
            o = o.permute(2, 0, 1, 3).to(dt)  # [S,B,h,d]
        out, _ = self.o_proj(o.reshape(S, B, self.n_heads * self.d))
        return out
