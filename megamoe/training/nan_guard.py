"""NaN/Inf guard: a step whose loss or gradient norm is not finite is skipped (no optimizer update) and counted;
after `max_consecutive` such steps in a row the run stops with an error naming the step and the first layer whose
router or experts went bad."""

from __future__ import annotations

import math
import re

import torch

__all__ = ["NonFiniteGuard", "NonFiniteError", "find_bad_layer"]


class NonFiniteError(RuntimeError):
    pass


_LAYER = re.compile(r"layers\.(\d+)\.(.*)")


def _part(rest: str) -> str:
    if ".router." in "." + rest:
        return "router"
    if ".experts." in "." + rest or rest.startswith("mlp.experts"):
        return "experts"
    if rest.startswith("mlp.shared"):
        return "shared expert"
    if rest.startswith("attn."):
        return "attention"
    return rest.split(".")[0]


def find_bad_layer(model, router_stats=None) -> str:
    """`router_stats`: list of (layer index, RouterStats) of the last forward.
    Describe the first layer with non-finite router statistics, parameters or gradients (router and experts
    first, then anything else), or say that none was found (the loss itself overflowed)."""
    from megamoe.training.optim import unwrap
    module = unwrap(model)
    findings = []
    for layer, st in router_stats or []:
        for field in ("importance", "load", "balance_loss", "z_loss"):
            v = getattr(st, field, None)
            if torch.is_tensor(v) and not torch.isfinite(v.detach().float()).all():
                findings.append((layer, 0, f"router statistic {field}"))
                break
    for name, p in module.named_parameters():
        m = _LAYER.match(name)
        if not m:
            continue
        layer, part = int(m.group(1)), _part(m.group(2))
        prio = 0 if part in ("router", "experts", "shared expert") else 1
        if not torch.isfinite(p.detach().float()).all():
            findings.append((layer, prio, f"{part} parameter {name}"))
            continue
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None and not torch.isfinite(g.detach().float()).all():
            findings.append((layer, prio, f"{part} gradient of {name}"))
    if not findings:
        return "no layer has non-finite router statistics, parameters or gradients (the loss overflowed)"
    layer, _, what = min(findings, key=lambda f: (f[0], f[1]))
    return f"layer {layer}: non-finite {what}"


class NonFiniteGuard:
    def __init__(self, max_consecutive: int = 5):
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.skipped = 0

    @staticmethod
    def finite(*values) -> bool:
        return all(v is not None and math.isfinite(float(v)) for v in values)

    def record(self, ok: bool, step: int, model=None, router_stats=None):
        """Call once per step with whether it was finite. Raises NonFiniteError after too many in a row."""
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            where = find_bad_layer(model, router_stats) if model is not None else "unknown layer"
            raise NonFiniteError(f"step {step}: {self.consecutive} non-finite losses in a row "
                                 f"(train.max_consecutive_nonfinite = {self.max_consecutive}); {where}")

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, d: dict):
        self.consecutive, self.skipped = int(d.get("consecutive", 0)), int(d.get("skipped", 0))
