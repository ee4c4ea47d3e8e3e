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

Pipeline parallelism (megamoe/parallel/pipeline.py): under pp > 1 a LlamaMoEModel is one virtual stage (`vp_stage`
picks which of this rank's): its layers only, the embedding on the first stage, norm + head + loss on the last
(megatron's pre_process / post_process). A stage that is not the first takes its input from `set_input_tensor` (the
previous stage's output [S, B, H], set by megatron's schedule); a stage that is not the last returns that hidden
state in `ModelOutput.hidden` (no loss) with its layers' balance losses in `aux_loss`. Layer names stay global
(`layers.{i}.` for the model's layer i on any stage). With tied embeddings the last stage holds a copy of the
embedding weight (`embed.weight`, marked `shared`), equal to the first stage's at construction (embedding-group
all-reduce) and kept equal by megatron's embedding-group gradient all-reduce.

Context parallelism (megamoe/parallel/context.py): under cp > 1 the forward takes the whole sequence and keeps this
CP rank's two load-balanced chunks of it (tokens, labels, masks, positions, segments); attention runs as ring
attention over the CP group; lm_loss = (sum over this rank's tokens of CE * m) / N with N counted over the whole
sequence, summed over CP ranks (the gradient scaled by cp, which megatron's DDP averages away). Logits, a KV cache
and attention experts are not available under CP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tpar
from megatron.core.enums import ModelType
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
from megamoe.parallel import megatron_config, require
from megamoe.parallel.collectives import all_reduce_sum
from megamoe.parallel.context import RingContext, cp_group, cp_size, local_positions
from megamoe.parallel.pipeline import local_stages


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


class StageLayers(nn.ModuleList):
    """The decoder layers a model (or pipeline stage) holds, named by their GLOBAL index: `layers.{first + i}.` for
    the i-th local one, so state dicts, checkpoints and shard files use the same names under every pipeline layout.
    Indexing and iteration are local (layers[0] is the stage's first layer). With first = 0 it is a ModuleList."""

    def __init__(self, layers, first: int = 0):
        super().__init__()
        self.first = first
        for i, layer in enumerate(layers):
            self._modules[str(first + i)] = layer

    def _get_abs_string_index(self, idx):
        return str(self.first + int(super()._get_abs_string_index(idx)))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return self._modules[self._get_abs_string_index(idx)]


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
    hidden: torch.Tensor | None = None  # a pipeline stage before the last: its output [S, B, H] (SP: its slice)


class LlamaMoEModel(nn.Module):
    """Built for the parallel layout in force (megamoe.parallel.initialize; a clear error when none is set up)."""

    def __init__(self, cfg: ModelConfig, vp_stage: int | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mp_cfg = megatron_config(cfg)
        self.sequence_parallel = mp_cfg.sequence_parallel
        stage = self.stage = local_stages(require(), cfg.num_layers)[vp_stage or 0]
        self.pre_process, self.post_process = stage.pre_process, stage.post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = cfg.tie_word_embeddings
        self.input_tensor = None   # a later pipeline stage's input (megatron's set_input_tensor)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=init_normal(cfg.init_std),
                                            config=mp_cfg) if self._holds_embedding() else None
        self.layers = StageLayers([DecoderLayer(cfg, mp_cfg, i) for i in stage.layer_ids], stage.first_layer)
        self.norm = self.lm_head = None
        if self.post_process:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mp_cfg.sequence_parallel,
                                DTYPES[cfg.params_dtype])
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
        if self.embed is not None and cfg.tie_word_embeddings and not (self.pre_process and self.post_process):
            self._sync_tied_embedding()

    # ---- pipeline stages (megatron's model interface: schedules and finalize_model_grads read these) ----
    model_type = ModelType.encoder_or_decoder

    def _holds_embedding(self) -> bool:
        return self.pre_process or (self.post_process and self.cfg.tie_word_embeddings)

    def set_input_tensor(self, t) -> None:
        """The previous pipeline stage's output (megatron's schedules call this before each forward)."""
        self.input_tensor = t[0] if isinstance(t, (list, tuple)) else t

    def shared_embedding_or_output_weight(self):
        return self.embed.weight if self.embed is not None else None

    def _sync_tied_embedding(self) -> None:
        """Tied embeddings over pipeline stages (megatron's setup_embeddings_and_output_layer): the last stage's copy
        is zeroed and all-reduced with the first stage's over the embedding group, so both start equal; it is marked
        `shared` (left out of the gradient norm, which counts the first stage's)."""
        w = self.embed.weight
        if not self.pre_process:
            w.shared = w.shared_embedding = True
            w.data.zero_()
        else:
            w.shared_embedding = True
        group = ps.get_embedding_group(check_initialized=False)
        if group is not None and torch.distributed.get_world_size(group) > 1 and ps.is_rank_in_embedding_group():
            torch.distributed.all_reduce(w.data, group=group)

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
        cp = cp_size()
        if cache is not None and not (self.pre_process and self.post_process):
            raise ValueError("LlamaMoEModel: a KV cache needs the whole model on one rank (no pipeline parallelism)")
        if cp > 1:
            input_ids, labels, loss_mask, position_ids, segment_ids, loss_denominator = self._cp_split(
                input_ids, labels, loss_mask, position_ids, segment_ids, loss_denominator, return_logits, cache)
            S = input_ids.shape[1]
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
        if cp > 1:   # ring attention over the CP group (megamoe/parallel/context.py)
            ctx.ring = RingContext(cp_group(), ctx.positions, ctx.segments)
        if self.pre_process:
            x = self.embed(input_ids).transpose(0, 1).contiguous()  # [S, B, H]
            if self.sequence_parallel:
                x = tpar.scatter_to_sequence_parallel_region(x)
        else:   # the previous pipeline stage's output (its sequence-parallel slice under SP)
            if self.input_tensor is None:
                raise RuntimeError("LlamaMoEModel: a pipeline stage after the first needs set_input_tensor() first")
            x = self.input_tensor
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
        if not self.post_process:
            aux = sum((st.balance_loss + st.z_loss for st in stats + attn_stats), torch.zeros((), device=x.device))
            return ModelOutput(logits=None, aux_loss=aux, router_stats=stats, attn_router_stats=attn_stats, hidden=x)
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
            if cp > 1:
                lm = all_reduce_sum(lm, cp_group(), grad_scale=float(cp))
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
            if cp > 1:
                lm = all_reduce_sum(lm, cp_group(), grad_scale=float(cp))
            out.lm_loss, out.loss = lm, lm + aux
        return out

    def _cp_split(self, input_ids, labels, loss_mask, position_ids, segment_ids, loss_denominator, return_logits,
                  cache):
        """Context parallelism: this CP rank's two load-balanced chunks of every per-token input (module
        docstring), with positions and segments always given (attention then runs on the ring through the
        AttentionContext); the loss denominator counted over the whole sequence."""
        if cache is not None or return_logits:
            raise ValueError("LlamaMoEModel: under context parallelism the forward computes the loss only "
                             "(return_logits=False; no KV cache): each CP rank holds a part of the sequence")
        if any(layer.is_attn_moe for layer in self.layers):
            raise ValueError("LlamaMoEModel: attention experts do not run under context parallelism")
        B, S = input_ids.shape
        dev = input_ids.device
        if labels is not None and loss_denominator is None:
            loss_denominator = _denominator(_mask_or_ones(loss_mask, labels).float(), None)
        idx = local_positions(S, device=dev)
        pick = lambda t: None if t is None else t[:, idx]   # noqa: E731
        # positions: the given ones, else the global positions of this rank's tokens (RoPE and the causal rule)
        position_ids = idx.expand(B, -1) if position_ids is None else pick(position_ids)
        segment_ids = torch.ones(B, idx.numel(), dtype=torch.int32, device=dev) if segment_ids is None else \
            pick(segment_ids)
        return pick(input_ids), pick(labels), pick(loss_mask), position_ids, segment_ids, loss_denominator

    def _fused_loss_applies(self, x: torch.Tensor) -> bool:
        return (self.fused_lm_loss and x.device.type == "cpu" and not self.sequence_parallel
                and ps.get_tensor_model_parallel_world_size() == 1)

    def num_params(self) -> dict:
        return self.cfg.param_counts()
