"""The training loop, as explicit phases that read top to bottom (in the spirit of torchtitan's train loop):

    run(cfg)                      resolve the model, set up the process groups of cfg.parallel, then
      Trainer(cfg, model_cfg)     setup: device, model + initial weights, DDP + AdamW + LR schedule, data, resume
      .fit()                      for each step:  train_step -> log -> evaluate? -> save? -> stop?
                                  then: final evaluation and checkpoint, export (world of one), summary.json

One step (`train_step`): zero the grad buffers; forward/backward every micro-batch (loss / n_micro); finalize the
grads (data-parallel reduction); average the losses over data-parallel ranks; clip and update unless the loss or the
gradient norm is non-finite (then the update is skipped and counted by the NaN guard).

Chat data (SFT, `data.format: chat`): the loss is the global token-weighted mean over the trained (assistant) tokens
of the whole global batch, sum(CE * mask) / N with N counted over all micro-batches and data-parallel ranks (one
all-reduce of a scalar per step, before the forwards): each micro-batch's forward divides by N / dp, DDP averages
over dp, so a batch split into micro-batches or over ranks gives the gradient of the same single batch (megatron's
per-token loss). Mean over micro-batch means instead would weight a token by 1 / (trained tokens of its micro-batch).

Stages (`stages:` in the config, megamoe/training/config.py StageConfig): the loop moves to the next stage at its
first step by itself -- new data weights, the stage's LR schedule (restarting), and, when it resets the optimizer or
changes which routers are frozen, a new megatron DDP and optimizer (megamoe/training/stages.py). At the end of each
stage: an evaluation and, for chat data, generation samples. Checkpoints record the stage and the step in it; a
resume rebuilds the layout of the stage the checkpoint was written in, then continues exactly.

Writes under `out_dir`: config.yaml (the config in force; also beside the checkpoints), metrics.jsonl,
tensorboard/ (when installed), plots/ (at each evaluation), checkpoints/ (step_N, latest), final_model/ (our shard
format), summary.json. SIGTERM saves a checkpoint at the next step boundary and exits; `--resume` continues from
checkpoints/latest and reproduces the uninterrupted run's losses. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads

from megamoe import parallel
from megamoe.compat.cpu import cuda_to_cpu
from megamoe.config import BatchShape
from megamoe.data import SFTBatch, update_domain_weights
from megamoe.errors import ConfigError
from megamoe.eval.lm_eval_backend import PeriodicTasks
from megamoe.fileio import atomic_write_text
from megamoe.parallel.collectives import stats_group
from megamoe.training.checkpoint import CheckpointManager
from megamoe.training.config import (PARAMS_DTYPES, TrainConfig, build_schedule, cpu_has_native_bf16,
                                     resolve_precision, save_train_config)
from megamoe.training.data import build_data, chat_manifest, full_weights, prepare_embedded_chat
from megamoe.training.distill import Teacher, kd_loss, mixed_loss
from megamoe.training.evaluate import chat_samples, evaluate
from megamoe.training.export import export_final_model
from megamoe.training.init import load_initial_weights, resolve_model_config
from megamoe.training.metrics import (RouterStatsAccumulator, ThroughputMeter, flops_per_token, mfu,
                                      peak_flops_for_device)
from megamoe.training.monitor import Monitor
from megamoe.training.nan_guard import NonFiniteGuard
from megamoe.training.optim import build_optimizer, guarded_step, unwrap, wrap_model
from megamoe.training.pipeline import (PipelineModel, build_model, gather_router_stats, local_moe_layer_ids,
                                       pipeline_forward_backward, pipelined)
from megamoe.training.plots import plot_run
from megamoe.training.signals import StopSignal
from megamoe.training.stages import fresh_parameters, set_router_freeze, stage_index
from megamoe.training.token_loss import TokenLossProbe

log = logging.getLogger("megamoe.train")

__all__ = ["run", "Trainer", "train_step", "StepResult"]


def run(cfg: TrainConfig, callbacks: dict | None = None) -> dict:
    """Train according to `cfg` and return the summary. Sets up the process groups of `cfg.parallel` (a world of one
    outside torchrun). `callbacks` (tests, tools): {"step_start": fn(step, model)}."""
    model_cfg = resolve_model_config(cfg)
    precision = resolve_precision(cfg.train.precision, torch.cuda.is_available())
    model_cfg.params_dtype = PARAMS_DTYPES[precision]
    model_cfg.recompute = bool(cfg.train.activation_checkpointing or model_cfg.recompute)
    cfg.model = model_cfg
    cfg.validate()
    _check_model_parallel_features(cfg)
    parallel.initialize(cfg.parallel, model_cfg, seed=cfg.train.seed,
                        batch=BatchShape(cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_tokens))
    prepare_embedded_chat(cfg.data)          # data.build_embedded_chat: the chat set, when not built yet
    cfg.validate_stage_data()                # stage mixtures name datasets of the (now existing) manifest
    return Trainer(cfg, precision, callbacks).fit()


def _check_model_parallel_features(cfg: TrainConfig) -> None:
    """Features that need the logits or the whole model on one rank are refused under pipeline / context
    parallelism, before any work (docs/parallel.md, Limits); token-loss rows and chat samples are skipped there."""
    p = cfg.parallel
    if p.pp == 1 and p.cp == 1:
        return
    what = f"parallel.pp {p.pp}" if p.pp > 1 else f"parallel.cp {p.cp}"
    if cfg.eval.lm_eval_tasks:
        raise ConfigError(f"eval.lm_eval_tasks: lm-eval scores logits on one rank; not available under {what} "
                          f"(evaluate the exported model with megamoe-eval instead)")


# ---------------------------------------------------------------------------------------------------------------
# one optimizer step

@dataclass
class StepResult:
    lm_loss: float              # mean over micro-batches and data-parallel ranks
    aux_loss: float             # the router balance loss, likewise
    ok: bool                    # False: a non-finite loss or gradient norm; the update was skipped
    grad_norm: float            # before clipping (nan when skipped before the norm)
    router_stats: list          # the model's per-layer router statistics, one list per micro-batch
    last_batch: torch.Tensor    # the last micro-batch's token ids (for the NaN guard's report)
    attn_router_stats: list = dataclasses.field(default_factory=list)  # attention experts' routers, likewise
    kd_loss: float | None = None  # distillation: the teacher's KL (mean over the tokens lm_loss counts); else None


def _dp_mean(values: list[float], device) -> list[float]:
    group = ps.get_data_parallel_group()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t.tolist()


def _dp_sum(value: float, device) -> float:
    group = ps.get_data_parallel_group()
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t[0])


def _sft_forward(ddp, b: SFTBatch, device, denominator: float, distill=None):
    if device is not None:
        b = SFTBatch(*(t.to(device, non_blocking=True) for t in (b.tokens, b.loss_mask, b.position_ids,
                                                                  b.segment_ids, b.domain_ids)))
    out = ddp(b.inputs, labels=b.labels, loss_mask=b.loss_mask, return_logits=distill is not None,
              position_ids=b.position_ids, segment_ids=b.segment_ids, loss_denominator=denominator)
    kd = None
    if distill is not None:   # the cross entropy's weights: mask / N
        kd = _kd(distill, out, b.inputs, b.loss_mask.float() / denominator, b.position_ids, b.segment_ids)
    return out, b.tokens, kd


def _kd(distill, out, inputs, weights, position_ids=None, segment_ids=None) -> torch.Tensor:
    """The distillation term of one micro-batch (megamoe/training/distill.py): teacher forward, then the KL."""
    teacher, dcfg = distill
    t_logits = teacher.logits(inputs, position_ids=position_ids, segment_ids=segment_ids)
    return kd_loss(out.logits, t_logits, weights, dcfg.temperature)


def train_step(ddp, opt, next_batch, n_micro: int = 1, *, device=None, finite=lambda lm, aux: True,
               distill=None) -> StepResult:
    """One optimizer step as the trainer runs it (the LR schedule is the caller's): zero the grad buffers;
    forward/backward `n_micro` micro-batches, each `next_batch()` -> [B, S+1] token ids, the loss scaled by 1/n_micro
    (or an SFTBatch: all micro-batches are drawn first, and the loss is the global token-weighted mean, see the
    module docstring); finalize the grads (data-parallel reduction, skipped at DP = 1); average the losses over the
    data-parallel group; then, when `finite(lm, aux)` allows, clip and update (guarded_step: a non-finite gradient
    norm skips the update). Pipeline parallelism: `ddp` is the list of this rank's model chunks, and the
    micro-batches run through megatron's schedule (megamoe/training/pipeline.py). `distill`: (Teacher, DistillConfig)
    adds the teacher's KL to each micro-batch's loss (megamoe/training/distill.py); StepResult.kd_loss reports it."""
    chunks = list(ddp) if pipelined(ddp) else [ddp]
    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    lm_sum = aux_sum = kd_sum = 0.0
    stats, attn_stats, batch = [], [], None
    first = next_batch()
    if pipelined(ddp):
        micro = [first] + [next_batch() for _ in range(n_micro - 1)]
        lm_sum, aux_sum, stats, attn_stats, batch = pipeline_forward_backward(chunks, micro, n_micro, device)
    elif isinstance(first, SFTBatch):
        micro = [first] + [next_batch() for _ in range(n_micro - 1)]
        trained = _dp_sum(sum(float(b.loss_mask.sum()) for b in micro), device or first.tokens.device)
        denominator = max(trained, 1.0) / ps.get_data_parallel_world_size()
        for b in micro:
            out, batch, kd = _sft_forward(ddp, b, device, denominator, distill)
            # lm and kd are already global token means; aux is per micro-batch
            if kd is None:
                (out.lm_loss + out.aux_loss / n_micro).backward()
            else:
                mixed_loss(out.lm_loss, kd, out.aux_loss / n_micro, distill[1].weight).backward()
                kd_sum += float(kd.detach())
            lm_sum += float(out.lm_loss.detach())
            aux_sum += float(out.aux_loss.detach()) / n_micro
            stats.append(out.router_stats)
            attn_stats.append(out.attn_router_stats)
    else:
        for i in range(n_micro):
            batch = first if i == 0 else next_batch()
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            inputs = batch[:, :-1]
            out = ddp(inputs, labels=batch[:, 1:], return_logits=distill is not None)
            kd = None
            if distill is not None:   # the cross entropy's weights: the mean over the micro-batch's tokens
                kd = _kd(distill, out, inputs, torch.full(inputs.shape, 1.0 / inputs.numel(), device=inputs.device))
                kd_sum += float(kd.detach()) / n_micro
            loss = out.loss if kd is None else mixed_loss(out.lm_loss, kd, out.aux_loss, distill[1].weight)
            (loss / n_micro).backward()
            lm_sum += float(out.lm_loss.detach()) / n_micro
            aux_sum += float(out.aux_loss.detach()) / n_micro
            stats.append(out.router_stats)
            attn_stats.append(out.attn_router_stats)
    with cuda_to_cpu():
        finalize_model_grads(chunks)   # under PP also the embedding-group all-reduce of a tied embedding's grad
        lm_loss, aux_loss, kd_loss_ = _dp_mean([lm_sum, aux_sum, kd_sum], batch.device)
        ok, grad_norm = False, float("nan")
        if finite(lm_loss, aux_loss + kd_loss_):
            ok, grad_norm = guarded_step(opt)
    return StepResult(lm_loss, aux_loss, ok, grad_norm, stats, batch, attn_stats,
                      kd_loss_ if distill is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """One run. `__init__` is the setup phase; `fit()` the loop; the phases in between are methods."""

    def __init__(self, cfg: TrainConfig, precision: str, callbacks: dict | None = None):
        self.cfg, self.precision, self.callbacks = cfg, precision, callbacks or {}
        model_cfg = self.model_cfg = cfg.model
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_main = self.rank == 0
        self.n_micro = cfg.micro_batches_per_step(dp_size)
        log.info("device %s, precision %s, world %d (dp %d), %d micro-batches of %d x %d per rank per step",
                 self.device, precision, self.world, dp_size, self.n_micro, cfg.train.micro_batch_size,
                 cfg.data.seq_len)
        if self.is_main and not cuda and precision == "fp32" and cpu_has_native_bf16():
            log.info("this CPU computes bf16 natively: train.precision=bf16 trains faster (docs/training.md, "
                     "Precision)")

        # ---- model, optimizer, schedule (of the stage the run starts or resumes in) ----
        self.plan = cfg.stage_plan()
        self.chat = cfg.data.format == "chat"
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last)
        resume_path = self.ckpt.find_latest() if cfg.checkpoint.resume else None
        resume_step = self._checkpoint_step(resume_path) if resume_path else 0
        self.stage_idx = stage_index(self.plan, max(resume_step - 1, 0))   # the stage that wrote the checkpoint
        stage = self.plan[self.stage_idx]
        # identical initial weights on every rank of a pipeline stage (megatron's seed offset per stage under PP)
        torch.manual_seed(cfg.train.seed + 100 * ps.get_pipeline_model_parallel_rank())
        model = build_model(model_cfg, cfg.parallel)   # pipeline parallelism: the list of this rank's stages
        load_initial_weights(cfg, model)
        self.chunks = model if pipelined(model) else [model]
        for m in self.chunks:
            m.to(self.device)
        self.model, self.ddp, self.opt = model, None, None
        self._wrap(stage)
        self.sched = build_schedule(stage.optim, stage.steps)
        torch.manual_seed(cfg.train.seed + 100_003 * self.dp_rank)  # router noise differs across data-parallel ranks
        self.counts = model_cfg.param_counts()
        self.fpt = flops_per_token(model_cfg, cfg.data.seq_len)
        self.peak = cfg.log.peak_flops or peak_flops_for_device(self.device, precision)
        self.moe_layer_ids = local_moe_layer_ids(model, model_cfg)   # this rank's (its pipeline stages')
        self.attn_layer_ids = [i for m in self.chunks for i in m.stage.layer_ids if model_cfg.is_attn_moe_layer(i)]
        log.info("model: %d layers (%d MoE), %.1fM total / %.1fM activated parameters, %.3g FLOPs per token; "
                 "MFU peak %s", model_cfg.num_layers, model_cfg.num_moe_layers, self.counts["total"] / 1e6,
                 self.counts["active"] / 1e6, self.fpt,
                 f"{self.peak:.4g} FLOP/s" if self.peak else "unknown (CPU: achieved FLOP/s reported instead)")
        self.stats_group = stats_group(cfg.parallel.sequence_parallel)  # ranks holding the global batch once
        # knowledge distillation (megamoe/training/distill.py): the teacher, frozen, on this rank
        self.distill = None
        if cfg.distill.teacher:
            self.distill = (Teacher.load(cfg.distill, model_cfg.vocab_size, self.device, model_cfg.params_dtype),
                            cfg.distill)

        # ---- data, state, resume ----
        self.data = build_data(cfg.data, model_cfg.vocab_size, self.dp_rank, dp_size)
        if stage.weights is not None and resume_path is None and cfg.stages:
            self.data.set_weights(full_weights(stage.weights, self.data.domains))
        self.guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
        self.start_step, self.tokens_seen = 0, 0
        self.last_saved = None
        if cfg.checkpoint.resume:
            self.resume(resume_path)
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            save_train_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
            save_train_config(cfg, os.path.join(self.ckpt.root, "config.yaml"))
        self.monitor = Monitor(cfg.out_dir, cfg.train.steps, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                               progress=cfg.log.progress, run_config=cfg.to_dict(),
                               wandb=dataclasses.asdict(cfg.log.wandb) if cfg.log.wandb is not None else None)
        # token-level loss rows (megamoe/training/token_loss.py): a fixed held-out batch at log steps, every domain at
        # evaluations
        token_loss = cfg.log.token_loss and cfg.parallel.pp == 1 and cfg.parallel.cp == 1
        if cfg.log.token_loss and not token_loss:
            log.info("token-loss rows skipped: they need the logits of whole sequences on one rank (pp 1, cp 1)")
        self.token_probe = TokenLossProbe(self.data, cfg.eval.batch_size, self.device) if token_loss else None
        self.meter = ThroughputMeter(cfg.log.tgs_window, self.world)
        self.router_acc = RouterStatsAccumulator()
        self.attn_router_acc = RouterStatsAccumulator()   # attention experts' routers (LLaMA-MoE v2), "attn_" rows
        self.losses: dict[int, float] = {}       # lm + aux per step (what the update followed, without distillation)
        self.lm_losses: dict[int, float] = {}    # the cross entropy alone
        self.eval_results, self.eval_history, self.samples = None, [], []
        ev = cfg.eval  # eval.lm_eval_tasks: lm-eval tasks at every evaluation (megamoe.eval.lm_eval_backend)
        self.lm_tasks = PeriodicTasks(ev.lm_eval_tasks, ev.lm_eval_include_path, ev.lm_eval_limit, ev.batch_size, [
            ev.lm_eval_tokenizer, cfg.init.path, cfg.data.manifest]) if ev.lm_eval_tasks else None
        if len(self.plan) > 1:
            log.info("stages: %s", "; ".join(f"{s.name} steps {s.start + 1}-{s.end}" for s in self.plan))

    # ---- stages ----
    @property
    def stage(self):
        return self.plan[self.stage_idx]

    def _checkpoint_step(self, path: str) -> int:
        with open(os.path.join(path, "train_state.json")) as f:
            return int(json.load(f)["step"])

    def _wrap(self, stage):
        """megatron DDP + optimizer around self.model with this stage's frozen routers and optimizer settings (a
        second call replaces both: megamoe/training/stages.py)."""
        cfg = self.cfg
        if self.ddp is not None:
            for m in self.chunks:
                fresh_parameters(m)
            self.ddp = self.opt = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        frozen = sum(set_router_freeze(m, stage.freeze_routers) for m in self.chunks)
        if frozen:
            log.info("stage %s: %d router parameter tensors frozen", stage.name, frozen)
        self.ddp = wrap_model(self.model, self.model_cfg, cfg.parallel, self.precision)
        self.opt = build_optimizer(self.ddp, stage.optim, cfg.parallel, self.precision)

    def enter_stage(self, i: int, step: int):
        """Move to stage i before its first step `step` (0-based)."""
        prev, st = self.stage, self.plan[i]
        if st.reset_optimizer or st.freeze_routers != prev.freeze_routers:
            self._wrap(st)
        self.sched = build_schedule(st.optim, st.steps)
        if st.weights is not None:
            self.data.set_weights(full_weights(st.weights, self.data.domains))
        self.stage_idx = i
        rec = {"kind": "stage", "stage": st.name, "stage_index": i, "step": step, "steps": st.steps,
               "lr": st.optim.lr, "freeze_routers": st.freeze_routers, "reset_optimizer": st.reset_optimizer,
               "domain_weights": dict(self.data.weights)}
        self.monitor.write(rec)
        self.monitor.message(f"stage {i + 1}/{len(self.plan)} '{st.name}': steps {st.start + 1}-{st.end}, lr "
                             f"{st.optim.lr:g}, weights " + ", ".join(f"{d} {w:.2f}" for d, w in
                                                                      self.data.weights.items() if w)
                             + (", routers frozen" if st.freeze_routers else ""))

    def end_of_stage(self, done: int):
        """After the last step of a stage that is not the run's last: evaluation and chat samples."""
        cfg = self.cfg
        if cfg.eval.at_end or cfg.eval.interval:
            self.evaluate(done)
        self.sample(done)

    def sample(self, done: int):
        """Chat data: greedy replies to held-out prompts (metrics.jsonl rows of kind "sample" and the console)."""
        cfg = self.cfg
        if not self.chat or not cfg.eval.sample_tokens or not cfg.eval.samples_per_domain:
            return
        if cfg.parallel.sequence_parallel or cfg.parallel.pp > 1 or cfg.parallel.cp > 1:
            log.info("chat samples skipped: generation needs sequence_parallel off and the whole sequence and model "
                     "on one rank (pp 1, cp 1)")
            return
        tok = chat_manifest(cfg.data.manifest).get("tokenizer", {}).get("path")
        samples = chat_samples(self.ddp, self.data, tok, cfg.eval.sample_tokens, cfg.eval.samples_per_domain,
                               self.device)
        for smp in samples:
            rec = {"kind": "sample", "step": done, "stage": self.stage.name, **smp}
            self.samples.append(rec)
            self.monitor.write(rec)
            self.monitor.message(f"sample ({self.stage.name}, {smp['domain']}, step {done}): "
                                 f"{smp['prompt'][-80:]!r} -> {smp['completion']!r}")

    # ---- resume ----
    def resume(self, path: str | None):
        if path is None:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", self.ckpt.root)
            return
        ts, rs = self.ckpt.load(path, self.ddp, self.opt)
        self.start_step, self.tokens_seen = int(ts["step"]), int(ts["tokens"])
        if "stage" in ts and (int(ts["stage"]) != self.stage_idx or ts.get("stage_name") != self.stage.name):
            raise ConfigError(f"stages: {path} was written in stage {int(ts['stage']) + 1} "
                              f"({ts.get('stage_name')!r}) at step {self.start_step}; this config puts that step in "
                              f"stage {self.stage_idx + 1} ({self.stage.name!r}). Resume with the stages of that run")
        self.guard.load_state_dict(ts.get("nan_guard", {}))
        if "data" in rs:
            self.data.load_state_dict(rs["data"])
        elif ts.get("domain_weights"):
            self.data.set_weights(ts["domain_weights"])
        self.last_saved = self.start_step or None
        log.info("resumed from %s at step %d (%d tokens)%s", path, self.start_step, self.tokens_seen,
                 f", stage '{self.stage.name}' step {self.start_step - self.stage.start}" if len(self.plan) > 1
                 else "")

    # ---- the loop ----
    def fit(self) -> dict:
        cfg = self.cfg
        stop = StopSignal()
        step, stopped_by = self.start_step, None
        if cfg.eval.at_start and self.start_step == 0:
            self.evaluate(0)
            self.sample(0)                   # chat data: the replies before training
        t_loop = time.perf_counter()
        try:
            for step in range(self.start_step, cfg.train.steps):
                done = step + 1
                r = self.step(step)
                if self.logs_at(done):
                    self.log(done, r)
                if done == self.stage.end and done != cfg.train.steps:
                    self.end_of_stage(done)          # evaluation (and chat samples) at the end of a stage
                elif cfg.eval.interval and done % cfg.eval.interval == 0 and done != cfg.train.steps:
                    self.evaluate(done)
                if cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done != cfg.train.steps:
                    self.save(done)
                over_time = bool(cfg.train.max_minutes) and done < cfg.train.steps and \
                    time.perf_counter() - t_loop + self.meter.step_seconds > 60 * cfg.train.max_minutes
                if stop.should_stop(over_time):
                    stopped_by = stop.requested or ("time limit" if over_time else "signal on another rank")
                    log.info("%s: saving at step %d and exiting (resume with --resume)", stopped_by, done)
                    if stopped_by == "time limit" and (cfg.eval.at_end or cfg.eval.interval):
                        self.evaluate(done)
                    self.save(done)
                    break
            else:
                done = cfg.train.steps if cfg.train.steps > self.start_step else self.start_step
                if cfg.eval.at_end or cfg.eval.interval:
                    self.evaluate(done)
                if cfg.train.steps > self.start_step:
                    self.sample(done)
                if cfg.checkpoint.save_at_end and self.last_saved != done:
                    self.save(done)
        finally:
            stop.restore()
            self.monitor.close()
        steps = step + 1 if stopped_by or cfg.train.steps > self.start_step else self.start_step
        return self.finish(steps, stopped_by)

    def logs_at(self, done: int) -> bool:
        return done % self.cfg.log.interval == 0 or done == self.cfg.train.steps

    # ---- step ----
    def step(self, step: int) -> StepResult:
        cfg = self.cfg
        want = stage_index(self.plan, step)
        if want != self.stage_idx:
            self.enter_stage(want, step)
        if "step_start" in self.callbacks:
            self.callbacks["step_start"](step, unwrap(self.ddp))
        self.meter.start()
        self.lr = self.sched.apply(self.opt, step - self.stage.start)
        B = cfg.train.micro_batch_size
        next_batch = (lambda: self.data.next_batch(B)) if self.chat else (lambda: self.data.next_batch(B)[0])
        r = train_step(self.ddp, self.opt, next_batch, self.n_micro, device=self.device, finite=self.guard.finite,
                       distill=self.distill)
        done = step + 1
        if self.logs_at(done):
            for micro_stats in r.router_stats:
                self.router_acc.add(micro_stats)
            for micro_stats in r.attn_router_stats:
                self.attn_router_acc.add(micro_stats)
        self.tokens_seen += cfg.train.global_batch_tokens
        self.step_time = self.meter.stop(cfg.train.global_batch_tokens)
        if r.ok:
            self.losses[done] = r.lm_loss + r.aux_loss
            self.lm_losses[done] = r.lm_loss
        else:
            log.warning("step %d: non-finite loss/grad (lm %s, aux %s, grad norm %s); update skipped (%d in a row)",
                        done, r.lm_loss, r.aux_loss, r.grad_norm, self.guard.consecutive + 1)
        self.guard.record(r.ok, done, None if pipelined(self.ddp) else self.ddp,
                          list(zip(self.moe_layer_ids, r.router_stats[-1])), r.last_batch)
        return r

    # ---- log ----
    def log(self, done: int, r: StepResult):
        self.router_acc.reduce(self.stats_group)
        gather_router_stats(self.router_acc, self.moe_layer_ids)       # pipeline: every stage's layers, in order
        rs = self.router_acc.summary()
        self.router_acc.reset()
        self.attn_router_acc.reduce(self.stats_group)
        gather_router_stats(self.attn_router_acc, self.attn_layer_ids)
        ars = self.attn_router_acc.summary()
        self.attn_router_acc.reset()
        tgs = self.meter.tgs
        rec = {"kind": "train", "step": done, "stage": self.stage.name, "loss": r.lm_loss + r.aux_loss,
               "lm_loss": r.lm_loss,
               "balance_loss": r.aux_loss, "lr": self.lr, "grad_norm": r.grad_norm, "tokens": self.tokens_seen,
               "step_time": self.step_time, "tgs": tgs, "flops_per_s": tgs * self.fpt,
               "mfu": mfu(tgs, self.fpt, self.peak), "skipped_steps": self.guard.skipped,
               "domain_weights": dict(self.data.weights)}
        if r.kd_loss is not None:   # distillation: the teacher's KL, and the loss the update followed
            rec["kd_loss"] = r.kd_loss
            rec["loss"] = mixed_loss(r.lm_loss, r.kd_loss, r.aux_loss, self.cfg.distill.weight)
        if rs:
            rec.update({k: rs[k] for k in ("expert_load", "expert_importance", "dropped_tokens", "dropped_total",
                                           "z_loss")})
            rec["router_balance_loss"] = rs["balance_loss"]
        if ars:   # attention experts: the same statistics, labelled attn_ (per attention-MoE layer)
            rec.update({f"attn_{k}": ars[k] for k in ("expert_load", "expert_importance", "z_loss")})
            rec["attn_router_balance_loss"] = ars["balance_loss"]
        self.monitor.write(rec)
        self.monitor.console(done, rec, self.meter.step_seconds * (self.cfg.train.steps - done))
        every = self.cfg.log.token_loss_interval
        if self.token_probe is not None and every and done % every == 0:
            for row in self.token_probe.rows(self.ddp, first_only=True):
                self.monitor.write({"kind": "token_loss", "step": done, "stage": self.stage.name, **row})

    # ---- evaluate ----
    def evaluate(self, step: int):
        cfg = self.cfg
        model = PipelineModel(self.ddp) if pipelined(self.ddp) else self.ddp   # pipeline: forward-only, all stages
        res, routing = evaluate(model, self.data, cfg.eval.batch_size, cfg.eval.batches, self.device)
        self.eval_results = res
        self.eval_history.append({"step": step, "stage": self.stage.name, "results": res, "routing": routing})
        rec = {"kind": "eval", "step": step, "stage": self.stage.name, "tokens": self.tokens_seen,
               "routing_by_domain": routing}
        attn = {d: r["attn_expert_load"] for d, r in res.items() if r.get("attn_expert_load")}
        if attn:  # attention experts' routing per domain (LLaMA-MoE v2)
            rec["attn_routing_by_domain"] = attn
        for d, r in res.items():
            rec[f"eval/{d}/loss"], rec[f"eval/{d}/ppl"] = r["loss"], r["ppl"]
        if self.lm_tasks is not None:
            rec.update(self.lm_tasks(self.ddp, self.model_cfg))
        if cfg.data.dynamic:  # Sheared-LLaMA dynamic batch loading (docs/data.md)
            new_w = update_domain_weights(self.data.weights, {d: r["loss"] for d, r in res.items()},
                                          cfg.data.reference_losses, rule=cfg.data.dynamic_rule,
                                          eta=cfg.data.dynamic_eta, smoothing=cfg.data.dynamic_smoothing)
            self.data.set_weights(new_w)
            rec["domain_weights"] = new_w
        self.monitor.write(rec)
        if self.token_probe is not None:
            for row in self.token_probe.rows(self.ddp):
                self.monitor.write({"kind": "token_loss", "step": step, "stage": self.stage.name, "at": "eval", **row})
        self.monitor.message(f"eval step {step} ({self.stage.name}): " + ", ".join(f"{d} loss {r['loss']:.3f} ppl {r['ppl']:.2f}"
                                                               for d, r in res.items()))
        if self.is_main and cfg.eval.plots:
            try:
                plot_run(self.monitor.jsonl_path, os.path.join(cfg.out_dir, "plots"))
            except Exception as e:  # noqa: BLE001 - plots never stop training
                log.warning("plots failed: %s", e)

    # ---- save ----
    def save(self, step: int):
        t0 = time.perf_counter()
        train_state = {"tokens": self.tokens_seen, "nan_guard": self.guard.state_dict(),
                       "domain_weights": dict(self.data.weights), "config": self.cfg.to_dict(),
                       "stage": self.stage_idx, "stage_name": self.stage.name,
                       "stage_step": step - self.stage.start}
        path = self.ckpt.save(step, self.ddp, self.opt, train_state, {"data": self.data.state_dict()})
        self.last_saved = step
        log.info("saved checkpoint %s (%.1fs)", path, time.perf_counter() - t0)

    # ---- finish ----
    def finish(self, steps: int, stopped_by: str | None) -> dict:
        cfg = self.cfg
        final_dir = None
        if stopped_by in (None, "time limit"):
            final_dir = export_final_model(self.ddp, self.model_cfg, os.path.join(cfg.out_dir, "final_model"),
                                           training={"tokens": self.tokens_seen, "steps": steps,
                                                     "init": cfg.init.path, "init_source": cfg.init.source,
                                                     "data": cfg.data.manifest or cfg.data.prefixes})
        summary = {"steps": steps, "start_step": self.start_step, "tokens": self.tokens_seen,
                   "stopped_by": stopped_by, "skipped_steps": self.guard.skipped, "losses": self.losses, "lm_losses": self.lm_losses,
                   "eval": self.eval_results, "eval_history": self.eval_history, "params": self.counts,
                   "out_dir": os.path.abspath(cfg.out_dir), "checkpoint_dir": self.ckpt.root,
                   "metrics": os.path.abspath(self.monitor.jsonl_path), "final_model": final_dir,
                   "tgs": self.meter.tgs, "flops_per_token": self.fpt, "samples": self.samples,
                   "stages": [{"name": s.name, "start": s.start, "end": s.end} for s in self.plan]}
        if self.is_main:
            atomic_write_text(os.path.join(cfg.out_dir, "summary.json"),
                              json.dumps({k: v for k, v in summary.items() if k not in ("losses", "lm_losses", "eval_history")},
                                         indent=1, default=str))
        return summary
