"""Continual pre-training of a LLaMA-MoE model: `torchrun --nproc_per_node=N -m megamoe.train --config run.yaml`
(or the console script `megamoe-train`). The loop reads top to bottom:

    config -> parallel init -> model (our shards / a dense HF LLaMA / random) -> DDP + AdamW + LR schedule
    -> data -> resume? -> loop: accumulate micro-batches, finalize grads, NaN guard, step, log, eval, save -> exit

Command line:
    megamoe-train --config configs/quickstart.yaml [--resume] [--set optim.lr=1e-4 --set train.steps=50]
                  [--train.steps 50 --optim.lr=1e-4]          (any dotted field, as --set does)

Writes under `out_dir`: config.yaml (the config in force; also beside the checkpoints), metrics.jsonl,
tensorboard/ (when installed), plots/ (at each evaluation), checkpoints/ (step_N, latest), final_model/ (our shard
format, for tools/checkpoint_convert.py moe-to-hf), summary.json. SIGTERM saves a checkpoint at the next step
boundary and exits 0; `--resume` continues from checkpoints/latest and reproduces the uninterrupted run's losses.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

from megamoe.config import ConfigError
from megamoe.training.config import (PARAMS_DTYPES, TrainConfig, cpu_has_native_bf16, load_train_config,
                                     resolve_precision, save_train_config)

log = logging.getLogger("megamoe.train")

__all__ = ["main", "run", "parse_args", "train_step", "StepResult"]


# ---------------------------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="megamoe-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML training config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint.dir>/latest")
    args, rest = p.parse_known_args(argv)
    overrides = list(args.set)
    i = 0
    while i < len(rest):  # --a.b value / --a.b=value
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok:
            p.error(f"unrecognized argument {tok!r} (config fields are written --section.field VALUE)")
        key = tok[2:]
        if "=" in key:
            overrides.append(key)
            i += 1
        else:
            if i + 1 >= len(rest):
                p.error(f"{tok} needs a value")
            overrides.append(f"{key}={rest[i + 1]}")
            i += 2
    args.overrides = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _setup_logging()
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.resume:
            cfg.checkpoint.resume = True
        run(cfg)
    except ConfigError as e:
        print(f"megamoe-train: config error: {e}", file=sys.stderr)
        return 2
    return 0


def _setup_logging():
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_library_warnings()


def _quiet_library_warnings():
    import warnings
    for mod in ("megatron", "torch.distributed", "megamoe.compat", "torch.utils.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)
        warnings.filterwarnings("ignore", category=UserWarning, module=mod)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*.grad attribute of a Tensor that is not a leaf.*")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------
# model source

def _resolve_model(cfg: TrainConfig):
    """(ModelConfig, full state dict or None) from cfg.init; cfg.model (if given) must agree on the architecture."""
    src, path = cfg.init.source, cfg.init.path
    if src == "random":
        return cfg.model, None
    if src == "megamoe":
        from megamoe.checkpoint.shards import ShardedCheckpoint, is_shard_dir
        if not is_shard_dir(path):
            raise ConfigError(f"init.path: {path} has no manifest.json (not a megamoe shard directory)")
        ck = ShardedCheckpoint(path)
        mcfg = ck.config
        ck.close()
    elif src == "hf":
        from megamoe.checkpoint.hf_llama import config_from_hf
        cj = os.path.join(path, "config.json")
        if not os.path.isfile(cj):
            raise ConfigError(f"init.path: {path} has no config.json (not a Hugging Face model directory)")
        with open(cj) as f:
            mcfg = config_from_hf(json.load(f), cj)
    if cfg.model is not None:  # runtime fields may differ; the architecture must not
        mine, theirs = cfg.model.to_dict(), mcfg.to_dict()
        for k in ("recompute", "attention_backend", "params_dtype", "init_std"):
            mine.pop(k), theirs.pop(k)
        if mine.get("moe") and not theirs.get("moe"):
            raise ConfigError(f"model.moe: {path} is a dense model; convert it to LLaMA-MoE first "
                              "(tools/checkpoint_convert.py hf-to-moe) and train from init.source: megamoe")
        if mine != theirs:
            bad = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ConfigError(f"model.{bad[0]}: {mine[bad[0]]!r} disagrees with {path} ({theirs.get(bad[0])!r})")
        for k in ("recompute", "attention_backend", "params_dtype"):
            setattr(mcfg, k, getattr(cfg.model, k))
    return mcfg, None


def _load_init_weights(cfg: TrainConfig, model, mcfg):
    from megatron.core import parallel_state as ps
    src, path = cfg.init.source, cfg.init.path
    if src == "random":
        return
    if src == "megamoe":
        from megamoe.checkpoint.shards import load_shards
        sd = load_shards(path, tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
                         ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
                         etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()))
    else:
        from megamoe.checkpoint.hf_llama import load_hf_llama
        if ps.get_tensor_model_parallel_world_size() > 1:
            raise ConfigError("init.source: 'hf' loads full tensors; convert to our shards first for tp > 1 "
                              "(tools/checkpoint_convert.py)")
        _, sd = load_hf_llama(path)
    dtype = next(model.parameters()).dtype
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ConfigError(f"init.path: {path} does not match the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    log.info("loaded initial weights from %s (%s)", path, src)


# ---------------------------------------------------------------------------------------------------------------
# the run

def _dp_group():
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_group()


def _all_mean(values: list[float], group, device) -> list[float]:
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t.tolist()


@dataclass
class StepResult:
    lm_loss: float              # mean over micro-batches and data-parallel ranks
    aux_loss: float             # the router balance loss, likewise
    ok: bool                    # False: a non-finite loss or gradient norm; the update was skipped
    grad_norm: float            # before clipping (nan when skipped before the norm)
    router_stats: list          # the model's per-layer router statistics, one list per micro-batch
    last_batch: torch.Tensor    # the last micro-batch's token ids (for the NaN guard's report)


def train_step(ddp, opt, next_batch, n_micro: int = 1, *, device=None, finite=lambda lm, aux: True) -> StepResult:
    """One optimizer step as the trainer runs it (the LR schedule is the caller's): zero the grad buffers;
    forward/backward `n_micro` micro-batches, each `next_batch()` -> [B, S+1] token ids, the loss scaled by 1/n_micro;
    finalize the grads (data-parallel reduction, skipped at DP = 1); average the losses over the data-parallel group;
    then, when `finite(lm, aux)` allows, clip and update (guarded_step: a non-finite gradient norm skips the update)."""
    from megatron.core.distributed import finalize_model_grads

    from megamoe.compat.cpu import cuda_to_cpu
    from megamoe.training.optim import guarded_step
    ddp.zero_grad_buffer()
    opt.zero_grad()
    lm_sum = aux_sum = 0.0
    stats, batch = [], None
    for _ in range(n_micro):
        batch = next_batch()
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        out = ddp(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        (out.loss / n_micro).backward()
        lm_sum += float(out.lm_loss.detach()) / n_micro
        aux_sum += float(out.aux_loss.detach()) / n_micro
        stats.append(out.router_stats)
    with cuda_to_cpu():
        finalize_model_grads([ddp])
        lm_loss, aux_loss = _all_mean([lm_sum, aux_sum], _dp_group(), batch.device)
        ok, grad_norm = False, float("nan")
        if finite(lm_loss, aux_loss):
            ok, grad_norm = guarded_step(opt)
    return StepResult(lm_loss, aux_loss, ok, grad_norm, stats, batch)


def run(cfg: TrainConfig, callbacks: dict | None = None) -> dict:
    """Train according to `cfg`. `callbacks` (tests, tools): {"step_start": fn(step, model)}. Returns a summary."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megamoe import parallel
    from megamoe.model import LlamaMoEModel
    from megamoe.training.checkpointing import CheckpointManager, StopSignal
    from megamoe.training.data import build_data
    from megamoe.training.evaluate import evaluate
    from megamoe.training.metrics import (RouterStatsAccumulator, ThroughputMeter, flops_per_token, mfu,
                                          peak_flops_for_device)
    from megamoe.training.monitor import Monitor
    from megamoe.training.nan_guard import NonFiniteGuard
    from megamoe.training.optim import build_optimizer, unwrap, wrap_model
    from megamoe.training.schedule import LRSchedule
    callbacks = callbacks or {}

    # ---- config, device, precision ----
    mcfg, _ = _resolve_model(cfg)
    if mcfg is None:
        raise ConfigError("model: no model section and no init.path to take the architecture from")
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.precision, cuda)
    mcfg.params_dtype = PARAMS_DTYPES[precision]
    mcfg.recompute = bool(cfg.train.activation_checkpointing or mcfg.recompute)
    cfg.model = mcfg
    cfg.validate()

    # ---- parallel state ----
    parallel.initialize(cfg.parallel, mcfg, seed=cfg.train.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    is_main = rank == 0
    n_micro = cfg.micro_batches_per_step(dp_size)
    log.info("device %s, precision %s, world %d (dp %d), %d micro-batches of %d x %d per rank per step",
             device, precision, world, dp_size, n_micro, cfg.train.micro_batch_size, cfg.data.seq_len)
    if is_main and not cuda and precision == "fp32" and cpu_has_native_bf16():
        log.info("this CPU computes bf16 natively: train.precision=bf16 trains faster (docs/training.md, Precision)")

    # ---- model, optimizer, schedule ----
    torch.manual_seed(cfg.train.seed)                      # identical initial weights on every rank
    model = LlamaMoEModel(mcfg)
    _load_init_weights(cfg, model, mcfg)
    model.to(device)
    ddp = wrap_model(model, mcfg, cfg.parallel, precision)
    opt = build_optimizer(ddp, cfg.optim, cfg.parallel, precision)
    sched = LRSchedule.from_config(cfg.optim, cfg.train.steps)
    torch.manual_seed(cfg.train.seed + 100_003 * dp_rank)  # router noise differs across data-parallel ranks
    counts = mcfg.param_counts()
    fpt = flops_per_token(mcfg, cfg.data.seq_len)
    peak = cfg.log.peak_flops or peak_flops_for_device(device, precision)
    moe_layer_ids = [i for i in range(mcfg.num_layers) if mcfg.moe_index(i) is not None]
    log.info("model: %d layers (%d MoE), %.1fM total / %.1fM activated parameters, %.3g FLOPs per token; "
             "MFU peak %s", mcfg.num_layers, len(moe_layer_ids), counts["total"] / 1e6, counts["active"] / 1e6,
             fpt, f"{peak:.4g} FLOP/s" if peak else "unknown (CPU: achieved FLOP/s reported instead)")

    try:  # the ranks that together hold the global batch once (TP x DP under sequence parallelism)
        from megamoe.distributed import stats_group as _sg
        stats_group = _sg(cfg.parallel.sequence_parallel)
    except ImportError:
        stats_group = _dp_group()

    # ---- data ----
    data = build_data(cfg.data, mcfg.vocab_size, dp_rank, dp_size)

    # ---- resume ----
    ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last)
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    start_step, tokens_seen = 0, 0
    if cfg.checkpoint.resume:
        path = ckpt.find_latest()
        if path is None:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", ckpt.root)
        else:
            ts, rs = ckpt.load(path, ddp, opt)
            start_step, tokens_seen = int(ts["step"]), int(ts["tokens"])
            guard.load_state_dict(ts.get("nan_guard", {}))
            if "data" in rs:
                data.load_state_dict(rs["data"])
            elif ts.get("domain_weights"):
                data.set_weights(ts["domain_weights"])
            log.info("resumed from %s at step %d (%d tokens)", path, start_step, tokens_seen)
    if is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_train_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
        save_train_config(cfg, os.path.join(ckpt.root, "config.yaml"))

    monitor = Monitor(cfg.out_dir, cfg.train.steps, enabled=is_main, tensorboard=cfg.log.tensorboard,
                      progress=cfg.log.progress)
    meter = ThroughputMeter(cfg.log.tgs_window, world)
    stop = StopSignal()
    tokens_per_step = cfg.train.global_batch_tokens
    router_acc = RouterStatsAccumulator()
    losses: dict[int, float] = {}
    eval_results = None
    eval_history: list[dict] = []
    last_saved = start_step if cfg.checkpoint.resume and start_step else None

    def state_for_checkpoint(step):
        return ({"tokens": tokens_seen, "nan_guard": guard.state_dict(), "domain_weights": dict(data.weights),
                 "config": cfg.to_dict()},
                {"data": data.state_dict()})

    def save(step):
        nonlocal last_saved
        t0 = time.perf_counter()
        ts, rs = state_for_checkpoint(step)
        path = ckpt.save(step, ddp, opt, ts, rs)
        last_saved = step
        log.info("saved checkpoint %s (%.1fs)", path, time.perf_counter() - t0)

    def run_eval(step):
        nonlocal eval_results
        res, routing = evaluate(ddp, data, cfg.eval.batch_size, cfg.eval.batches, device)
        eval_results = res
        eval_history.append({"step": step, "results": res, "routing": routing})
        rec = {"kind": "eval", "step": step, "tokens": tokens_seen, "routing_by_domain": routing}
        for d, r in res.items():
            rec[f"eval/{d}/loss"], rec[f"eval/{d}/ppl"] = r["loss"], r["ppl"]
        if cfg.data.dynamic:
            new_w = _dynamic_weights(cfg, data, res)
            data.set_weights(new_w)
            rec["domain_weights"] = new_w
        monitor.write(rec)
        monitor.message("eval step %d: " % step + ", ".join(f"{d} loss {r['loss']:.3f} ppl {r['ppl']:.2f}"
                                                          for d, r in res.items()))
        if is_main and cfg.eval.plots:
            try:
                from megamoe.training.plots import plot_run
                plot_run(monitor.jsonl_path, os.path.join(cfg.out_dir, "plots"))
            except Exception as e:  # noqa: BLE001 - plots never stop training
                log.warning("plots failed: %s", e)

    # ---- the loop ----
    step = start_step
    if cfg.eval.at_start and start_step == 0:
        run_eval(0)
    stopped_by = None
    t_loop = time.perf_counter()
    try:
        for step in range(start_step, cfg.train.steps):
            if "step_start" in callbacks:
                callbacks["step_start"](step, unwrap(ddp))
            meter.start()
            lr = sched.apply(opt, step)
            r = train_step(ddp, opt, lambda: data.next_batch(cfg.train.micro_batch_size)[0], n_micro,
                           device=device, finite=guard.finite)
            lm_loss, aux_loss, ok, grad_norm = r.lm_loss, r.aux_loss, r.ok, r.grad_norm
            done = step + 1
            if done % cfg.log.interval == 0 or done == cfg.train.steps:
                for micro_stats in r.router_stats:
                    router_acc.add(micro_stats)
            tokens_seen += tokens_per_step
            dt = meter.stop(tokens_per_step)
            if ok:
                losses[done] = lm_loss + aux_loss
            else:
                log.warning("step %d: non-finite loss/grad (lm %s, aux %s, grad norm %s); update skipped (%d in a row)",
                            done, lm_loss, aux_loss, grad_norm, guard.consecutive + 1)
            guard.record(ok, done, ddp, list(zip(moe_layer_ids, r.router_stats[-1])), r.last_batch)

            # ---- log ----
            if done % cfg.log.interval == 0 or done == cfg.train.steps:
                router_acc.reduce(stats_group)
                rs = router_acc.summary()
                router_acc.reset()
                tgs = meter.tgs
                rec = {"kind": "train", "step": done, "loss": lm_loss + aux_loss, "lm_loss": lm_loss,
                       "balance_loss": aux_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                       "step_time": dt, "tgs": tgs, "flops_per_s": tgs * fpt, "mfu": mfu(tgs, fpt, peak),
                       "skipped_steps": guard.skipped, "domain_weights": dict(data.weights)}
                if rs:
                    rec.update({k: rs[k] for k in ("expert_load", "expert_importance", "dropped_tokens",
                                                   "dropped_total", "z_loss")})
                    rec["router_balance_loss"] = rs["balance_loss"]
                monitor.write(rec)
                eta = meter.step_seconds * (cfg.train.steps - done)
                monitor.console(done, rec, eta)

            # ---- eval / save / stop ----
            if cfg.eval.interval and done % cfg.eval.interval == 0 and done != cfg.train.steps:
                run_eval(done)
            if cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done != cfg.train.steps:
                save(done)
            over_time = bool(cfg.train.max_minutes) and done < cfg.train.steps and \
                time.perf_counter() - t_loop + meter.step_seconds > 60 * cfg.train.max_minutes
            if stop.should_stop(over_time):
                stopped_by = stop.requested or ("time limit" if over_time else "signal on another rank")
                log.info("%s: saving at step %d and exiting (resume with --resume)", stopped_by, done)
                if stopped_by == "time limit" and (cfg.eval.at_end or cfg.eval.interval):
                    run_eval(done)
                save(done)
                break
        else:
            done = cfg.train.steps if cfg.train.steps > start_step else start_step
            if cfg.eval.at_end or cfg.eval.interval:
                run_eval(done)
            if cfg.checkpoint.save_at_end and last_saved != done:
                save(done)
    finally:
        stop.restore()
        monitor.close()

    final_dir = None
    if stopped_by in (None, "time limit"):
        final_dir = export_final_model(ddp, mcfg, os.path.join(cfg.out_dir, "final_model"))
    summary = {"steps": step + 1 if stopped_by or cfg.train.steps > start_step else start_step,
               "start_step": start_step, "tokens": tokens_seen, "stopped_by": stopped_by,
               "skipped_steps": guard.skipped, "losses": losses, "eval": eval_results, "eval_history": eval_history,
               "params": counts, "out_dir": os.path.abspath(cfg.out_dir),
               "checkpoint_dir": ckpt.root, "metrics": os.path.abspath(monitor.jsonl_path),
               "final_model": final_dir, "tgs": meter.tgs, "flops_per_token": fpt}
    if is_main:
        from megamoe.fileio import atomic_write_text
        atomic_write_text(os.path.join(cfg.out_dir, "summary.json"),
                          json.dumps({k: v for k, v in summary.items() if k not in ("losses", "eval_history")},
                                     indent=1, default=str))
    return summary


def _dynamic_weights(cfg: TrainConfig, data, results: dict) -> dict:
    """Sheared-LLaMA dynamic batch loading (megamoe.data.update_domain_weights; docs/data.md)."""
    from megamoe.data import update_domain_weights
    return update_domain_weights(data.weights, {d: r["loss"] for d, r in results.items()},
                                 cfg.data.reference_losses, rule=cfg.data.dynamic_rule, eta=cfg.data.dynamic_eta,
                                 smoothing=cfg.data.dynamic_smoothing)


def export_final_model(ddp, mcfg, out_dir: str) -> str | None:
    """Write the trained model in our shard format (TP1/EP1) for tools/checkpoint_convert.py (world of one only;
    after a model-parallel run, `--resume` its last checkpoint in a world of one, which reshards and writes it).
    Written through checkpoint.shards.save_shards into out_dir.new, then swapped in: a failure leaves the previous
    export intact."""
    import shutil

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megamoe.config import ParallelConfig
    from megamoe.training.optim import unwrap
    if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_expert_model_parallel_world_size() > 1 \
            or ps.get_expert_tensor_parallel_world_size() > 1:
        if dist.get_rank() == 0:
            log.info("final model not exported from a model-parallel run; write it from the last checkpoint in a "
                     "world of one (the checkpoint reshards):  megamoe-train --config %s --resume "
                     "--set parallel.tp=1 --set parallel.ep=1 --set parallel.etp=1 "
                     "--set parallel.sequence_parallel=false",
                     os.path.join(os.path.dirname(out_dir), "config.yaml"))
        return None
    if dist.get_rank() != 0:
        return None
    from megamoe.checkpoint.shards import save_shards
    fresh = out_dir + ".new"              # the previous export (if any) stays until the new one is complete
    shutil.rmtree(fresh, ignore_errors=True)
    save_shards(fresh, mcfg, unwrap(ddp).state_dict(), ParallelConfig(tp=1, ep=1, etp=1),
                info={"source": "megamoe.train"})
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(fresh, out_dir)
    log.info("final model written to %s (our shard format)", out_dir)
    return os.path.abspath(out_dir)


if __name__ == "__main__":
    sys.exit(main())
