"""Where metrics go: a console line (progress bar, ETA), a JSONL file, TensorBoard when it is installed.

Only rank 0 writes. One record per log step:

    {"step": 10, "loss": 3.21, "lm_loss": 3.19, "balance_loss": 0.02, "lr": 1e-4, "grad_norm": 0.8,
     "tokens": 40960, "tgs": 812.3, "mfu": null, "flops_per_s": 4.1e11, "domain_weights": {...},
     "expert_load": [[...E...] per MoE layer], "expert_importance": [...], "dropped_tokens": [...], ...}

Evaluation records have `"kind": "eval"` and `eval/<domain>/loss`, `eval/<domain>/ppl`; the routing of the
validation batches per domain (`routing_by_domain`: domain -> per layer -> expert fractions) is what
`megamoe-plot` draws as the paper's Figures 8 and 9. Token-loss records have `"kind": "token_loss"`
(megamoe/training/token_loss.py).

Loggers (the same scalars in each; megamoe.training.monitor.scalars):
- metrics.jsonl: every record, whole (the source of the plots);
- TensorBoard (`log.tensorboard`, when the tensorboard package is installed): the scalars, and histograms of the
  expert load / importance per layer;
- Weights & Biases (`log.wandb: {project, mode: offline | online | disabled, dir, name, entity, tags}`, when the
  wandb package is installed; `pip install megamoe[wandb]`): the scalars at the record's step, the expert load and
  importance per layer and expert as scalars `expert_load/L{layer}/e{expert}` (a line per expert, not a histogram),
  and at each evaluation a table of the routing by domain (domain, layer, expert, share) and of the domains'
  Jensen-Shannon distances per layer (megamoe.divergence). Offline runs are written under `<dir>/wandb/offline-run-*`
  (`wandb sync` uploads them later); the run's config is the training config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import torch

from megamoe.divergence import routing_js_distances

log = logging.getLogger("megamoe.train")

__all__ = ["Monitor", "format_duration", "progress_bar", "scalars"]


def format_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def progress_bar(done: int, total: int, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    n = int(round(frac * width))
    return "[" + "#" * n + "." * (width - n) + f"] {done}/{total} {100 * frac:3.0f}%"


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


_NOT_SCALARS = ("step", "time", "kind", "stage_index", "rows")


def scalars(record: dict) -> dict[str, float]:
    """The scalars of a record, as TensorBoard and W&B log them: numeric top-level fields (eval records carry
    `eval/<domain>/loss` etc.), `domain_weight/<domain>`, `dropped_tokens_total`, and for token-loss records
    `token_loss/<domain>/loss`. Non-finite values are kept (the loggers show them as NaN/inf)."""
    out = {}
    if record.get("kind") == "token_loss":
        if isinstance(record.get("loss"), (int, float)):
            out[f"token_loss/{record.get('domain', 'batch')}/loss"] = float(record["loss"])
        return out
    for k, v in record.items():
        if k in _NOT_SCALARS:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif k == "domain_weights" and isinstance(v, dict):
            out.update({f"domain_weight/{d}": float(w) for d, w in v.items()})
        elif k == "dropped_tokens" and isinstance(v, list):
            out["dropped_tokens_total"] = float(sum(v))
    return out


def _per_expert(record: dict) -> dict[str, float]:
    """expert_load / expert_importance [layer][expert] -> {"expert_load/L{layer}/e{expert}": share}."""
    out = {}
    for k in ("expert_load", "expert_importance"):
        for li, row in enumerate(record.get(k) or []):
            out.update({f"{k}/L{li}/e{e}": float(x) for e, x in enumerate(row)})
    return out


class Monitor:
    def __init__(self, out_dir: str, total_steps: int, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, stream=None, wandb: dict | None = None, run_config: dict | None = None):
        self.enabled, self.total, self.progress = enabled, int(total_steps), progress
        self.stream = stream or sys.stdout
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.tb_dir = None
        self.wandb = None          # the wandb run
        self.wandb_dir = None
        self._f = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._f = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard package
                self.tb_dir = os.path.join(out_dir, "tensorboard")
                self.tb = SummaryWriter(self.tb_dir)
                log.info("TensorBoard logs in %s", self.tb_dir)
            except Exception as e:  # noqa: BLE001 - optional
                log.info("TensorBoard not available (%s: pip install tensorboard); metrics go to %s", e,
                         self.jsonl_path)
        if wandb and wandb.get("mode", "offline") != "disabled":
            self._start_wandb(out_dir, wandb, run_config)

    def _start_wandb(self, out_dir: str, opts: dict, run_config: dict | None):
        try:
            import wandb  # optional: pip install megamoe[wandb]
        except ImportError:
            log.warning("log.wandb is set but the wandb package is not installed (pip install wandb); metrics go "
                        "to %s%s", self.jsonl_path, " and TensorBoard" if self.tb is not None else "")
            return
        self.wandb_dir = os.path.abspath(opts.get("dir") or out_dir)
        os.makedirs(self.wandb_dir, exist_ok=True)
        self.wandb = wandb.init(project=opts.get("project") or "megamoe", mode=opts.get("mode", "offline"),
                                dir=self.wandb_dir, name=opts.get("name") or os.path.basename(os.path.abspath(out_dir)),
                                entity=opts.get("entity"), tags=opts.get("tags"), config=run_config,
                                settings=wandb.Settings(console="off", quiet=True))
        log.info("Weights & Biases run %s (%s) in %s", self.wandb.name, opts.get("mode", "offline"),
                 getattr(self.wandb, "dir", self.wandb_dir))

    def write(self, record: dict):
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._f.write(json.dumps(_jsonable(record)) + "\n")
        step = int(record.get("step", 0))
        flat = scalars(record) if (self.tb is not None or self.wandb is not None) else {}
        if self.tb is not None:
            for tag, v in flat.items():
                self.tb.add_scalar(tag, v, step)
            for k in ("expert_load", "expert_importance"):
                for li, row in enumerate(record.get(k) or []):
                    self.tb.add_histogram(f"{k}/layer{li}", torch.tensor(row, dtype=torch.float32), step)
        if self.wandb is not None:
            self._wandb_log(record, flat, step)

    def _wandb_log(self, record: dict, flat: dict, step: int):
        import wandb  # optional; imported in _start_wandb already
        data = {**flat, **_per_expert(record)}
        routing = record.get("routing_by_domain")
        if record.get("kind") == "eval" and routing:
            data["eval/routing_by_domain"] = wandb.Table(
                columns=["domain", "layer", "expert", "share"],
                data=[[d, li, e, float(x)] for d, layers in routing.items() if layers
                      for li, row in enumerate(layers) for e, x in enumerate(row)])
            js = routing_js_distances(routing)
            if js["domains"]:
                data["eval/routing_js_distance"] = wandb.Table(
                    columns=["layer", "domain_a", "domain_b", "js_distance"],
                    data=[[li, a, b, float(m[i][j])] for li, m in enumerate(js["layers"])
                          for i, a in enumerate(js["domains"]) for j, b in enumerate(js["domains"]) if i < j])
        if record.get("kind") == "token_loss" and record.get("loss_by_position"):
            dom = record.get("domain", "batch")
            data[f"token_loss/{dom}/by_position"] = wandb.Table(
                columns=["position", "loss", "tokens"],
                data=[[t, v, n] for t, (v, n) in enumerate(zip(record["loss_by_position"],
                                                               record.get("tokens_by_position") or [])) if v is not None])
        if data:
            self.wandb.log(data, step=step)

    def console(self, step: int, rec: dict, eta_s: float | None):
        if not self.enabled:
            return
        parts = [progress_bar(step, self.total) if self.progress else f"step {step}/{self.total}"]
        def add(fmt, key):
            v = rec.get(key)
            if v is not None:
                parts.append(fmt.format(v))
        add("loss {:.4f}", "loss")
        if rec.get("kd_loss") is not None:   # distillation: the cross entropy and the teacher's KL apart
            add("ce {:.4f}", "lm_loss")
            add("kd {:.4f}", "kd_loss")
        add("bal {:.4f}", "balance_loss")
        add("lr {:.2e}", "lr")
        add("gnorm {:.3f}", "grad_norm")
        add("tok {:,}", "tokens")
        add("TGS {:,.0f}", "tgs")
        if rec.get("mfu") is not None:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        elif rec.get("flops_per_s") is not None:
            parts.append(f"{rec['flops_per_s'] / 1e9:.1f} GFLOP/s")
        if rec.get("dropped_total"):
            parts.append(f"drop {rec['dropped_total']:.0f}")
        if rec.get("skipped_steps"):
            parts.append(f"skipped {rec['skipped_steps']}")
        parts.append(f"ETA {format_duration(eta_s)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def message(self, text: str):
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

