"""The LLaMA / LLaMA-MoE decoder, readable in one sitting.

Built from our own small blocks (megamoe/layers: RMSNorm, RoPE, attention, dense MLP; megamoe/moe: the MoE layer) on
megatron-core's tensor-parallel layers (why: docs/architecture.md). Inside the decoder, activations are
[seq, batch, hidden] so that sequence parallelism splits dim 0; the public interface takes [batch, seq] token ids
and returns [batch, seq, vocab] logits (the local vocabulary shard under TP).

    parallel.initialize(ParallelConfig(), cfg)  # an entry point sets up the layout (a world of one here)
    model = LlamaMoEModel(cfg)                  # dense layers, or MoE layers where cfg.moe says so
    out = model(input_ids, labels=labels)       # out.loss = lm_loss + aux_loss (the routers' balance losses)
    out.router_stats, out.attn_router_stats     # RouterStats per MLP-MoE layer / per attention-MoE layer

Attention experts (cfg.attn_moe, LLaMA-MoE v2): those layers' attention is megamoe/moe/attention.py's AttentionMoE
(GQA head groups chosen per token by a router); everything else, the cache included, works the same way.

`forward(input_ids [B, S], labels=None [B, S], loss_mask=None [B, S], return_logits=True | False | "last",
position_ids=None [B, S], segment_ids=None [B, S], cache=None, loss_denominator=None)`:

- labels are aligned with the inputs (megatron style: labels[t] is the target of position t, i.e. input t+1).
- lm_loss = sum_t CE_t * m_t / N with m = loss_mask (1 everywhere when None) and N = loss_denominator, by default
  sum(m) (the mean over this batch's trained tokens). The trainer passes N = the trained tokens of the whole global
  batch / data-parallel size, so that summing micro-batches and averaging ranks gives the global token-weighted mean
  (megamoe/training/trainer.py). Fused on a CPU at TP = 1 when return_logits is False (megamoe/ops/linear_ce.py),
  megatron's vocab-parallel cross entropy elsewhere; the same formula either way.
- position_ids: RoPE positions per row (packed documents restart them; default 0..S-1, or after the cache's).
- segment_ids: document ids per row (0 = padding, 1..n = documents): attention never crosses a document and no real
  token attends to padding (megamoe/layers/attention.py); padding positions must carry loss_mask 0.
- cache: a `KVCache` (megamoe/layers/kv_cache.py): keys and values of every token seen; each forward appends its
  tokens and attends over all of them (incremental decoding; megamoe/model/generate.py). Not under sequence
  parallelism. return_logits="last": logits of the last position only, [B, 1, V] (decoding).

Without position_ids, segment_ids and cache the forward is plain causal attention over positions 0..S-1 (the
pre-training path, unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tpar
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from torch import nn

from megamoe.config import DTYPES, ModelConfig
from megamoe.layers.attention import Attention, AttentionContext
from megamoe.layers.init import init_normal
from megamoe.layers.kv_cache import KVCache
from megamoe.layers.mlp import MLP
from megamoe.layers.norm import RMSNorm
from megamoe.layers.rope import rope_cos_sin, rope_inv_freq
from megamoe.moe.attention import AttentionMoE
from megamoe.moe.layer import MoELayer
from megamoe.moe.router import RouterStats
from megamoe.ops.linear_ce import linear_cross_entropy
from megamoe.ops.precision import upcast
from megamoe.parallel import megatron_config


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_cfg, layer_idx: int):
        super().__init__()
        sp, dt = mp_cfg.sequence_parallel, DTYPES[cfg.params_dtype]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sp, dt)
        self.is_attn_moe = cfg.is_attn_moe_layer(layer_idx)
        self.attn = AttentionMoE(cfg, mp_cfg, layer_idx) if self.is_attn_moe else Attention(cfg, mp_cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sp, dt)
        self.is_moe = cfg.moe_index(layer_idx) is not None
        self.mlp = MoELayer(cfg, mp_cfg, layer_idx) if self.is_moe else MLP(cfg, mp_cfg, cfg.intermediate_size)

    def forward(self, x, cos, sin, ctx: AttentionContext | None = None, cache=None):
        """-> (x, MLP router stats or None, attention router stats or None)."""
        if self.is_attn_moe:
            a, attn_stats = self.attn(self.attn_norm(x), cos, sin, ctx, cache)
        else:
            a, attn_stats = self.attn(self.attn_norm(x), cos, sin, ctx, cache), None
        x = x + a
        h = self.mlp_norm(x)
        if self.is_moe:
            y, stats = self.mlp(h)
        else:
            y, stats = self.mlp(h), None
        return x + y, stats, attn_stats


# ---------------------------------------------------------------------------------------------------------------
# the model

def _mask_or_ones(loss_mask, labels):
    return torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask


def _denominator(m: torch.Tensor, given) -> torch.Tensor | float:
    """N of lm_loss = sum(CE * m) / N: `given` (a positive number or scalar tensor, the caller's), else sum(m) (at
    least 1: a batch without trained tokens has loss 0)."""
    if given is None:
        return m.sum().clamp(min=1)
    return given if torch.is_tensor(given) else float(given)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] = field(default_factory=list)       # one per MLP-MoE layer
    attn_router_stats: list[RouterStats] = field(default_factory=list)  # one per attention-MoE layer


class LlamaMoEModel(nn.Module):
    """Built for the parallel layout in force (megamoe.parallel.initialize; a clear error when none is set up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mp_cfg = megatron_config(cfg)
        self.sequence_parallel = mp_cfg.sequence_parallel
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=init_normal(cfg.init_std),
                                            config=mp_cfg)
        self.layers = nn.ModuleList([DecoderLayer(cfg, mp_cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mp_cfg.sequence_parallel, DTYPES[cfg.params_dtype])
        self.lm_head = None if cfg.tie_word_embeddings else ColumnParallelLinear(
            cfg.hidden_size, cfg.vocab_size, config=mp_cfg, init_method=init_normal(cfg.init_std), bias=False,
            gather_output=False)
        if cfg.tie_word_embeddings:  # output projection reusing the embedding weight (megatron's way)
            self._tied_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, config=mp_cfg, bias=False,
                                                   init_method=init_normal(cfg.init_std), gather_output=False,
                                                   skip_weight_param_allocation=True)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # loss without logits (labels given, return_logits=False) on a CPU at TP = 1: fused chunked projection +
        # cross entropy (megamoe/ops/linear_ce.py); False: lm_head + megatron's vocab-parallel cross entropy
        self.fused_lm_loss = True

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, return_logits: bool | str = True,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, loss_denominator=None) -> ModelOutput:
        """See the module docstring for the arguments and the loss."""
        B, S = input_ids.shape
        dev = input_ids.device
        if (cache is not None or return_logits == "last") and self.sequence_parallel:
            raise ValueError("LlamaMoEModel: a KV cache / last-position logits need sequence_parallel off (the same "
                             "weights load into a model built without it)")
        ctx = None
        if cache is not None or segment_ids is not None:
            if position_ids is None:
                position_ids = cache.next_positions(B, S, dev) if cache is not None else \
                    torch.arange(S, device=dev).expand(B, S)
            if segment_ids is None:
                segment_ids = torch.ones(B, S, dtype=torch.int32, device=dev)
            position_ids, segment_ids = position_ids.to(dev).long(), segment_ids.to(dev).int()
            if cache is None:
                ctx = AttentionContext(position_ids, segment_ids)
            else:
                if len(cache.layers) != len(self.layers):
                    raise ValueError(f"KVCache: {len(cache.layers)} layer caches for {len(self.layers)} layers")
                ctx = AttentionContext(position_ids, segment_ids, *cache.extend(position_ids, segment_ids))
        x = self.embed(input_ids).transpose(0, 1).contiguous()  # [S, B, H]
        if self.sequence_parallel:
            x = tpar.scatter_to_sequence_parallel_region(x)
        positions = torch.arange(S, device=dev) if position_ids is None else position_ids.to(dev)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)   # [S, d] or [B, 1, S, d]
        stats, attn_stats = [], []
        for i, layer in enumerate(self.layers):
            lc = None
            if cache is not None:
                if layer.is_attn_moe:  # token_sparse attention experts cache per expert (ExpertKVCache)
                    cache.layers[i] = layer.attn.prepare_cache(cache.layers[i])
                lc = cache.layers[i]
            if self.cfg.recompute and self.training:
                x, st, ast = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, ctx, lc, use_reentrant=False)
            else:
                x, st, ast = layer(x, cos, sin, ctx, lc)
            if st is not None:
                stats.append(st)
            if ast is not None:
                attn_stats.append(ast)
        x = self.norm(x)
        aux = sum((st.balance_loss + st.z_loss for st in stats + attn_stats), torch.zeros((), device=x.device))
        if return_logits == "last":
            x = x[-1:]
            if labels is not None:
                raise ValueError("LlamaMoEModel: return_logits='last' computes no loss (labels given)")
        if labels is not None and not return_logits and self._fused_loss_applies(x):
            # CPU, TP = 1: projection + cross entropy chunk by chunk, no [S, B, V] logits (megamoe/ops/linear_ce.py)
            w = (self.lm_head.weight if self.lm_head is not None else self.embed.weight)
            tok_w = None
            if loss_mask is not None or loss_denominator is not None:
                m = _mask_or_ones(loss_mask, labels).transpose(0, 1).reshape(-1).float()
                tok_w = m / _denominator(m, loss_denominator)
            lm = linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, labels.transpose(0, 1).reshape(-1), tok_w)
            return ModelOutput(logits=None, loss=lm + aux, lm_loss=lm, aux_loss=aux, router_stats=stats,
                               attn_router_stats=attn_stats)
        if self.lm_head is not None:
            logits, _ = self.lm_head(x)                       # [S, B, V/tp]
        else:
            logits, _ = self._tied_head(x, weight=self.embed.weight)
        logits = upcast(logits)
        out = ModelOutput(logits=logits.transpose(0, 1) if return_logits else None, aux_loss=aux, router_stats=stats,
                          attn_router_stats=attn_stats)
        if labels is not None:
            # megatron's cross entropy works in place on its input: give it a copy when the logits are returned
            ce_in = logits.clone() if return_logits else logits
            per_tok = tpar.vocab_parallel_cross_entropy(ce_in, labels.transpose(0, 1).contiguous())  # [S, B]
            if loss_mask is None and loss_denominator is None:
                lm = per_tok.mean()
            else:
                m = _mask_or_ones(loss_mask, labels).transpose(0, 1).float()
                lm = (per_tok * m).sum() / _denominator(m, loss_denominator)
            out.lm_loss, out.loss = lm, lm + aux
        return out

    def _fused_loss_applies(self, x: torch.Tensor) -> bool:
        return (self.fused_lm_loss and x.device.type == "cpu" and not self.sequence_parallel
                and ps.get_tensor_model_parallel_world_size() == 1)

    def num_params(self) -> dict:
        return self.cfg.param_counts()
