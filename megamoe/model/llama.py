"""The LLaMA / LLaMA-MoE decoder, readable in one sitting.

Built from our own small modules on megatron-core's tensor-parallel layers (why: docs/architecture.md). Inside the
decoder, activations are [seq, batch, hidden] so that sequence parallelism splits dim 0; the public interface takes
[batch, seq] token ids and returns [batch, seq, vocab] logits (the local vocabulary shard under TP).

    cfg = ModelConfig(...)                    # megamoe.config
    model = LlamaMoEModel(cfg)                # dense layers, or MoE layers where cfg.moe says so
    out = model(input_ids, labels=labels)     # out.loss = lm_loss + aux_loss (the routers' balance losses)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import ModelConfig
from megamoe.moe.layer import MoELayer
from megamoe.moe.router import RouterStats, upcast

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def megatron_config(cfg: ModelConfig):
    """The megatron-core ModelParallelConfig our parallel layers need, from the layout in force."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megamoe import parallel
    pcfg = parallel.ensure_initialized(cfg)
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=pcfg.ep, expert_tensor_parallel_size=pcfg.etp,
        sequence_parallel=pcfg.sequence_parallel, params_dtype=DTYPES[cfg.params_dtype],
        use_cpu_initialization=True,  # same initial weights at every TP size
        perform_initialization=True, gradient_accumulation_fusion=False,
    )


def init_normal(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm and RoPE

class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in fp32, cast back, then scale. Its weight is tagged for megatron's
    sequence-parallel gradient all-reduce (it sees only this rank's slice of the sequence)."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        setattr(self.weight, "sequence_parallel", sequence_parallel)

    def forward(self, x):
        if x.dtype == self.weight.dtype and not x.is_cuda:
            return _RMSNormFunction.apply(x, self.weight, self.eps)       # fewer passes over x on a CPU
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x, weight, eps):
    xf = upcast(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """rms_norm_reference for x and weight of one dtype, with a hand-written backward:
    y = w * x * r, r = rsqrt(mean(x^2) + eps);  dx = r * (w dy) - x * r^3 * mean(w dy * x);  dw = sum_t dy * x * r.
    3 passes over x forward and 5 backward instead of autograd's 6 and ~10 (the norms are memory-bound). Half
    precision as autograd computes it through the reference's casts: statistics and dx in fp32, y = w * half(x r),
    dw = sum_t dy * half(x r); it keeps x (half) rather than x r (fp32) for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        xf = upcast(x)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(H).add_(eps))
        xn = (xf * r).to(x.dtype)
        ctx.save_for_backward(x if xf is not x else xn, r, weight)
        return xn * weight

    @staticmethod
    def backward(ctx, dy):
        saved, r, weight = ctx.saved_tensors
        H = saved.shape[-1]
        half = saved.dtype in (torch.float16, torch.bfloat16)
        xn = saved.float().mul_(r) if half else saved                    # x r, fp32 (or fp64)
        dw = dx = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xn.to(dy.dtype)).reshape(-1, H).sum(0)
        if ctx.needs_input_grad[0]:
            g = upcast(dy * weight)                                       # w dy
            m = (g * xn).sum(-1, keepdim=True).div_(H)                    # mean(w dy * x) * r
            dx = g.sub_(xn * m).mul_(r).to(dy.dtype)                      # r * (w dy - x r * mean(w dy x r))
        return dx, dw, None


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
    """cos, sin of shape [S, d] for positions [S] (HF's rotate_half convention: frequencies repeated twice)."""
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, heads, S, d]; cos/sin: [S, d]."""
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


# ---------------------------------------------------------------------------------------------------------------
# attention

_attn_backend_logged = False


def _importable(name: str) -> bool:
    import importlib.util
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

    def __init__(self, cfg: ModelConfig, mcfg, layer_idx: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        tp = mcfg.tensor_model_parallel_size
        self.cfg = cfg
        self.d = cfg.dim_head
        self.n_heads, self.n_kv = cfg.num_heads // tp, cfg.kv_heads // tp
        H = cfg.hidden_size
        init = init_normal(cfg.init_std)
        out_init = init_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        col = dict(config=mcfg, init_method=init, bias=False, gather_output=False)
        self.q_proj = ColumnParallelLinear(H, cfg.num_heads * self.d, **col)
        self.k_proj = ColumnParallelLinear(H, cfg.kv_heads * self.d, **col)
        self.v_proj = ColumnParallelLinear(H, cfg.kv_heads * self.d, **col)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.d, H, config=mcfg, init_method=out_init, bias=False,
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


class MLP(nn.Module):
    """Dense SwiGLU FFN: down(silu(gate(x)) * up(x)), gate/up column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, mcfg, width: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        H = cfg.hidden_size
        init = init_normal(cfg.init_std)
        col = dict(config=mcfg, init_method=init, bias=False, gather_output=False)
        self.gate_proj = ColumnParallelLinear(H, width, **col)
        self.up_proj = ColumnParallelLinear(H, width, **col)
        self.down_proj = RowParallelLinear(width, H, config=mcfg, bias=False, input_is_parallel=True, skip_bias_add=False,
                                           init_method=init_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers)))

    def forward(self, x):
        g, _ = self.gate_proj(x)
        u, _ = self.up_proj(x)
        out, _ = self.down_proj(F.silu(g) * u)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg, layer_idx: int):
        super().__init__()
        sp, dt = mcfg.sequence_parallel, DTYPES[cfg.params_dtype]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sp, dt)
        self.attn = Attention(cfg, mcfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sp, dt)
        self.is_moe = cfg.moe_index(layer_idx) is not None
        self.mlp = MoELayer(cfg, mcfg, layer_idx) if self.is_moe else MLP(cfg, mcfg, cfg.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        if self.is_moe:
            y, stats = self.mlp(h)
        else:
            y, stats = self.mlp(h), None
        return x + y, stats


# ---------------------------------------------------------------------------------------------------------------
# the model

@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] = field(default_factory=list)


class LlamaMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
        cfg.validate()
        self.cfg = cfg
        mcfg = megatron_config(cfg)
        self.sequence_parallel = mcfg.sequence_parallel
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=init_normal(cfg.init_std),
                                            config=mcfg)
        self.layers = nn.ModuleList([DecoderLayer(cfg, mcfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mcfg.sequence_parallel, DTYPES[cfg.params_dtype])
        self.lm_head = None if cfg.tie_word_embeddings else ColumnParallelLinear(
            cfg.hidden_size, cfg.vocab_size, config=mcfg, init_method=init_normal(cfg.init_std), bias=False,
            gather_output=False)
        if cfg.tie_word_embeddings:  # output projection reusing the embedding weight (megatron's way)
            self._tied_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, config=mcfg, bias=False,
                                                   init_method=init_normal(cfg.init_std), gather_output=False,
                                                   skip_weight_param_allocation=True)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # loss without logits (labels given, return_logits=False) on a CPU at TP = 1: fused chunked projection +
        # cross entropy (megamoe/ops/linear_ce.py); False: lm_head + megatron's vocab-parallel cross entropy
        self.fused_lm_loss = True

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, return_logits: bool = True) -> ModelOutput:
        from megatron.core import tensor_parallel as tpar
        B, S = input_ids.shape
        x = self.embed(input_ids).transpose(0, 1).contiguous()  # [S, B, H]
        if self.sequence_parallel:
            x = tpar.scatter_to_sequence_parallel_region(x)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(S, device=input_ids.device), x.dtype)
        stats = []
        for layer in self.layers:
            if self.cfg.recompute and self.training:
                x, st = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, st = layer(x, cos, sin)
            if st is not None:
                stats.append(st)
        x = self.norm(x)
        aux = sum((st.balance_loss + st.z_loss for st in stats), torch.zeros((), device=x.device))
        if labels is not None and not return_logits and self._fused_loss_applies(x):
            # CPU, TP = 1: projection + cross entropy chunk by chunk, no [S, B, V] logits (megamoe/ops/linear_ce.py)
            from megamoe.ops.linear_ce import linear_cross_entropy
            w = (self.lm_head.weight if self.lm_head is not None else self.embed.weight)
            tok_w = None
            if loss_mask is not None:
                m = loss_mask.transpose(0, 1).reshape(-1).float()
                tok_w = m / m.sum().clamp(min=1)
            lm = linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, labels.transpose(0, 1).reshape(-1), tok_w)
            return ModelOutput(logits=None, loss=lm + aux, lm_loss=lm, aux_loss=aux, router_stats=stats)
        if self.lm_head is not None:
            logits, _ = self.lm_head(x)                       # [S, B, V/tp]
        else:
            logits, _ = self._tied_head(x, weight=self.embed.weight)
        logits = upcast(logits)
        out = ModelOutput(logits=logits.transpose(0, 1) if return_logits else None, aux_loss=aux, router_stats=stats)
        if labels is not None:
            # megatron's cross entropy works in place on its input: give it a copy when the logits are returned
            ce_in = logits.clone() if return_logits else logits
            per_tok = tpar.vocab_parallel_cross_entropy(ce_in, labels.transpose(0, 1).contiguous())  # [S, B]
            if loss_mask is None:
                lm = per_tok.mean()
            else:
                m = loss_mask.transpose(0, 1).float()
                lm = (per_tok * m).sum() / m.sum().clamp(min=1)
            out.lm_loss, out.loss = lm, lm + aux
        return out

    def _fused_loss_applies(self, x: torch.Tensor) -> bool:
        from megatron.core import parallel_state as ps
        return (self.fused_lm_loss and x.device.type == "cpu" and not self.sequence_parallel
                and ps.get_tensor_model_parallel_world_size() == 1)

    def num_params(self) -> dict:
        return self.cfg.param_counts()
