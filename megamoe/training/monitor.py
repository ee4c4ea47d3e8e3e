"""Where metrics go: a console line (progress bar, ETA), a JSONL file, TensorBoard when it is installed.

Only rank 0 writes. One record per log step:

    {"step": 10, "loss": 3.21, "lm_loss": 3.19, "balance_loss": 0.02, "lr": 1e-4, "grad_norm": 0.8,
     "tokens": 40960, "tgs": 812.3, "mfu": null, "flops_per_s": 4.1e11, "domain_weights": {...},
     "expert_load": [[...E...] per MoE layer], "expert_importance": [...], "dropped_tokens": [...], ...}

Evaluation records have `"kind": "eval"` and `eval/<domain>/loss`, `eval/<domain>/ppl`; the routing of the
validation batches per domain (`routing_by_domain`: domain -> per layer -> expert fractions) is what
tools/plot_routing.py draws as the paper's Figure 9.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import torch

log = logging.getLogger("megamoe.train")

__all__ = ["Monitor", "format_duration", "progress_bar"]


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


class Monitor:
    def __init__(self, out_dir: str, total_steps: int, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, stream=None):
        self.enabled, self.total, self.progress = enabled, int(total_steps), progress
        self.stream = stream or sys.stdout
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.tb_dir = None
        self._f = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._f = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb_dir = os.path.join(out_dir, "tensorboard")
                self.tb = SummaryWriter(self.tb_dir)
                log.info("TensorBoard logs in %s", self.tb_dir)
            except Exception as e:  # noqa: BLE001 - optional
                log.info("TensorBoard not available (%s); metrics go to %s only", e, self.jsonl_path)

    def write(self, record: dict):
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._f.write(json.dumps(_jsonable(record)) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k in ("step", "time", "kind"):
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    tag = k if record.get("kind", "train") == "train" else k
                    self.tb.add_scalar(tag, v, step)
                elif k == "domain_weights" and isinstance(v, dict):
                    for d, w in v.items():
                        self.tb.add_scalar(f"domain_weight/{d}", w, step)
                elif k in ("expert_load", "expert_importance") and isinstance(v, list):
                    for li, row in enumerate(v):
                        self.tb.add_histogram(f"{k}/layer{li}", torch.tensor(row, dtype=torch.float32), step)
                elif k == "dropped_tokens" and isinstance(v, list):
                    self.tb.add_scalar("dropped_tokens_total", sum(v), step)

    def console(self, step: int, rec: dict, eta_s: float | None):
        if not self.enabled:
            return
        parts = [progress_bar(step, self.total) if self.progress else f"step {step}/{self.total}"]
        def add(fmt, key):
            v = rec.get(key)
            if v is not None:
                parts.append(fmt.format(v))
        add("loss {:.4f}", "loss")
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

