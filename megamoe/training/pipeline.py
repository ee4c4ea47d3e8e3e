"""Pipeline-parallel training and evaluation of LlamaMoEModel stages (megamoe/parallel/pipeline.py) on megatron-core's
schedules.

    chunks = build_model(model_cfg, pcfg)                  # pp > 1: [stage model of each virtual stage on this rank]
    ddp = wrap_model(chunks, ...)                          # one megatron DDP per chunk; one optimizer over all
    lm, aux, stats, attn_stats, last = pipeline_forward_backward(ddp, micro_batches, n_micro, device)
    finalize_model_grads(ddp)                              # DP reduction + embedding-group all-reduce of tied weights
    evaluate(PipelineModel(ddp), ...)                      # forward-only: the whole pipeline as one model

Training (`pipeline_forward_backward`): megatron.core.pipeline_parallel.get_forward_backward_func() runs the 1F1B
schedule (interleaved when vpp > 1) over the step's micro-batches, all drawn first (every stage of a data-parallel
replica draws the same ones: the first stage uses the tokens, the last the labels and masks, every stage the position
and segment ids). Our forward step runs one chunk on one micro-batch:
  - the last stage returns its loss; megatron divides it by the number of micro-batches (text: the micro-batch mean
    lm + balance loss, as the single-stage train_step's loss / n_micro; chat data: lm (already over the global token
    count) x n_micro + balance, so that after the division it is train_step's lm + balance / n_micro);
  - a stage before the last returns its hidden state with its own layers' balance losses attached (`_AttachAux`:
    identity forward; backward gives the balance loss the gradient 1/n_micro, what the single-stage loss gives it).
Hence every parameter's gradient is the single-process one (tests/test_pipeline.py). Losses for logging: lm from the
last stage and the balance losses of every stage, summed over the pipeline group; router statistics stay per stage
(this rank's layers) and are merged in layer order on the logging rank (`gather_router_stats`).

Evaluation (`PipelineModel`): forward only, one batch at a time, the virtual stages in order (blocking send/recv of
the hidden state to the next stage's rank); the last stage's loss and every stage's router statistics reach every
rank, so megamoe.eval.perplexity.domain_perplexity works unchanged on it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import nn

from megamoe.compat.cpu import cuda_to_cpu, without_cuda_to_cpu
from megamoe.config import ModelConfig, ParallelConfig
from megamoe.data import SFTBatch
from megamoe.model import LlamaMoEModel
from megamoe.model.llama import ModelOutput
from megamoe.parallel import current
from megamoe.parallel.context import cp_size
from megamoe.parallel.pipeline import (broadcast_from_last_stage, gather_over_pipeline, pipeline_size, recv_activation,
                                       send_activation, stage_rank)
from megamoe.training.optim import unwrap

__all__ = ["build_model", "pipelined", "pipeline_forward_backward", "PipelineModel", "gather_router_stats",
           "local_moe_layer_ids"]


def build_model(cfg: ModelConfig, pcfg: ParallelConfig):
    """The model this rank holds: a LlamaMoEModel, or under pipeline parallelism the list of its virtual stages'."""
    if pcfg.pp == 1:
        return LlamaMoEModel(cfg)
    return [LlamaMoEModel(cfg, vp_stage=v) for v in range(pcfg.vpp)]


def pipelined(model) -> bool:
    return isinstance(model, (list, tuple))


def local_moe_layer_ids(model, cfg: ModelConfig) -> list[int]:
    """Global indices of the MoE layers this rank holds, in order (all of them without pipeline parallelism)."""
    chunks = unwrap(model) if pipelined(model) else [unwrap(model)]
    return [i for m in chunks for i in m.stage.layer_ids if cfg.moe_index(i) is not None]


class _AttachAux(torch.autograd.Function):
    """Forward: x unchanged. Backward: x's gradient, and `scale` for the scalar `aux` (megatron's
    MoEAuxLossAutoScaler): a stage before the last adds its balance losses to the loss this way."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale, ctx.dtype, ctx.device = scale, aux.dtype, aux.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=ctx.dtype, device=ctx.device), None


def _to(b, device):
    if device is None:
        return b
    if isinstance(b, SFTBatch):
        return SFTBatch(*(t.to(device, non_blocking=True) for t in (b.tokens, b.loss_mask, b.position_ids,
                                                                     b.segment_ids, b.domain_ids)))
    return b.to(device, non_blocking=True)


def _dp_sum(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    group = ps.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t[0])


def pipeline_forward_backward(chunks, micro: list, n_micro: int, device=None):
    """Forward and backward of the step's micro-batches (text [B, S+1] token ids or SFTBatch) through this rank's
    pipeline chunks (megatron DDPs) on megatron's schedule; gradients accumulate in the DDP buffers (not reduced).
    Returns (lm_sum, aux_sum, MLP and attention router stats per micro-batch (this rank's layers), the last
    micro-batch's tokens): the losses as train_step sums them, summed over the pipeline stages."""
    micro = [_to(b, device) for b in micro]
    chat = isinstance(micro[0], SFTBatch)
    tokens = micro[0].tokens if chat else micro[0]
    dev = tokens.device
    denominator = None
    if chat:   # the global token-weighted mean (trainer module docstring)
        trained = _dp_sum(sum(float(b.loss_mask.sum()) for b in micro), dev)
        denominator = max(trained, 1.0) / ps.get_data_parallel_world_size()
    index = {id(c): i for i, c in enumerate(chunks)}
    calls = [0] * len(chunks)
    per_micro = [[[] for _ in chunks] for _ in range(n_micro)]
    attn_per_micro = [[[] for _ in chunks] for _ in range(n_micro)]
    sums = torch.zeros(2, dtype=torch.float64)      # lm (last stage), aux (this rank's stages)
    one = torch.ones((), dtype=torch.int)

    def forward_step(data_iterator, model):
        ci = index[id(model)]
        j = calls[ci]
        calls[ci] += 1
        b = micro[j]
        with without_cuda_to_cpu():
            if chat:
                out = model(b.inputs, labels=b.labels, loss_mask=b.loss_mask, return_logits=False,
                            position_ids=b.position_ids, segment_ids=b.segment_ids, loss_denominator=denominator)
            else:
                out = model(b[:, :-1], labels=b[:, 1:], return_logits=False)
        per_micro[j][ci], attn_per_micro[j][ci] = out.router_stats, out.attn_router_stats
        sums[1] += float(out.aux_loss.detach()) / n_micro
        if out.hidden is not None:      # a stage before the last: hidden state out, balance losses attached
            h = out.hidden
            if out.aux_loss.requires_grad:
                h = _AttachAux.apply(h, out.aux_loss, 1.0 / n_micro)
            return h, None
        sums[0] += float(out.lm_loss.detach()) if chat else float(out.lm_loss.detach()) / n_micro
        loss = out.lm_loss * n_micro + out.aux_loss if chat else out.loss

        def loss_func(t):
            return t, one, {}          # megatron: t / 1 / n_micro
        return loss, loss_func

    inputs = tokens[:, :-1]
    single = len(chunks) == 1
    with cuda_to_cpu():   # the schedules allocate with device="cuda"; the model runs outside the mode
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=None if single else [None] * len(chunks),
            model=chunks[0] if single else list(chunks), num_microbatches=n_micro, seq_length=inputs.shape[1],
            micro_batch_size=inputs.shape[0], forward_only=False)
    if pipeline_size() > 1:
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    stats = [[st for per_chunk in m for st in per_chunk] for m in per_micro]
    attn_stats = [[st for per_chunk in m for st in per_chunk] for m in attn_per_micro]
    return float(sums[0]), float(sums[1]), stats, attn_stats, tokens


# ---------------------------------------------------------------------------------------------------------------
# evaluation: the whole pipeline as one (forward-only) model

class PipelineModel(LlamaMoEModel):
    """This rank's pipeline chunks as one LlamaMoEModel for forward-only use (evaluation: domain_perplexity). Every
    rank of the pipeline group calls forward with the same batch; each returns the last stage's lm_loss and the
    router statistics of all stages in layer order. Loss only: no logits, no KV cache."""

    def __init__(self, chunks):
        nn.Module.__init__(self)
        self.chunks = nn.ModuleList(unwrap(list(chunks)))
        self.cfg = self.chunks[0].cfg
        self.sequence_parallel = self.chunks[0].sequence_parallel
        self.pcfg = current()

    def forward(self, input_ids, labels=None, loss_mask=None, return_logits: bool | str = True, position_ids=None,
                segment_ids=None, cache=None, loss_denominator=None) -> ModelOutput:
        if return_logits or cache is not None or labels is None:
            raise ValueError("PipelineModel: under pipeline parallelism the forward computes the loss only "
                             "(labels given, return_logits=False, no KV cache)")
        B, S = input_ids.shape
        S_loc = S // cp_size() // (ps.get_tensor_model_parallel_world_size() if self.sequence_parallel else 1)
        dtype = next(self.chunks[0].parameters()).dtype
        pcfg, me = self.pcfg, ps.get_pipeline_model_parallel_rank()
        n = pcfg.pp * pcfg.vpp
        mine, result = {}, None
        for s in range(n):
            if s % pcfg.pp != me:
                continue
            chunk = self.chunks[s // pcfg.pp]
            if s > 0:
                chunk.set_input_tensor(recv_activation((S_loc, B, self.cfg.hidden_size), dtype, input_ids.device,
                                                       stage_rank(pcfg, s - 1)))
            out = chunk(input_ids, labels=labels, loss_mask=loss_mask, return_logits=False, position_ids=position_ids,
                        segment_ids=segment_ids, loss_denominator=loss_denominator)
            chunk.set_input_tensor(None)
            mine[s] = (_detached(out.router_stats), _detached(out.attn_router_stats), float(out.aux_loss))
            if s < n - 1:
                send_activation(out.hidden, stage_rank(pcfg, s + 1))
            else:
                result = out
        lm = broadcast_from_last_stage([float(result.lm_loss) if result is not None else 0.0], input_ids.device)[0]
        stages = {}
        for part in gather_over_pipeline(mine):
            stages.update(part)
        order = sorted(stages)
        aux = sum(stages[s][2] for s in order)
        lm_t, aux_t = torch.tensor(lm), torch.tensor(aux)
        return ModelOutput(logits=None, loss=lm_t + aux_t, lm_loss=lm_t, aux_loss=aux_t,
                           router_stats=[st for s in order for st in stages[s][0]],
                           attn_router_stats=[st for s in order for st in stages[s][1]])


def _detached(stats: list) -> list:
    """RouterStats with detached CPU tensors (they travel to the other stages)."""
    out = []
    for st in stats:
        d = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in vars(st).items()}
        out.append(type(st)(**d))
    return out


# ---------------------------------------------------------------------------------------------------------------
# router statistics of every stage for the logging rank

def gather_router_stats(acc, layer_ids: list[int]) -> None:
    """Merge the RouterStatsAccumulator of every pipeline stage (each holds the rows of its own MoE layers
    `layer_ids`, already reduced over data parallelism) into the rows of all MoE layers in layer order, on every rank
    of the pipeline group. Collective over the pipeline group."""
    if pipeline_size() == 1:
        return
    mine = None if acc.n == 0 else (list(layer_ids), acc.n, acc.tpe, acc.imp, acc.load, acc.dropped, acc.balance,
                                    acc.zloss)
    parts = [p for p in gather_over_pipeline(mine) if p is not None]
    if not parts:
        return
    rows = sorted(((lid, p, i) for p in parts for i, lid in enumerate(p[0])), key=lambda r: r[0])
    acc.n = parts[0][1]
    acc.tpe, acc.imp, acc.load, acc.dropped, acc.balance, acc.zloss = (
        torch.stack([p[k][i] for _, p, i in rows]) for k in range(2, 8))
