"""NaN/Inf guard: a step whose loss or gradient norm is not finite is skipped (no optimizer update) and counted;
after `max_consecutive` such steps in a row the run stops with an error naming the step and the first layer whose
router or experts went bad."""

from __future__ import annotations

import math
import re

import torch

from megamoe.training.optim import unwrap

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


def _probe_forward(module, batch) -> str | None:
    """Re-run the forward on `batch` with hooks; name the first sub-module (in execution order) of a decoder
    layer whose output is not finite."""
    first = []
    handles = []

    def hook(name):
        def fn(mod, inp, out):
            if first:
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            t = getattr(t, "weights", t)           # a Routing object: its combine weights
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t.detach()).all():
                first.append(name)
        return fn
    for name, mod in module.named_modules():
        m = _LAYER.match(name)
        if m and m.group(2).count(".") <= 1 and m.group(2).split(".")[-1] in (
                "attn", "router", "experts", "shared", "mlp", "attn_norm", "mlp_norm"):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            module(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
    except Exception:  # noqa: BLE001 - a diagnostic must not mask the real error
        return None
    finally:
        for h in handles:
            h.remove()
    if not first:
        return None
    m = _LAYER.match(first[0])
    return f"layer {m.group(1)}: {_part(m.group(2))} output is non-finite ({first[0]})"


def find_bad_layer(model, router_stats=None, batch=None) -> str:
    """Name the layer whose router or experts went bad. Evidence, in order of trust:
    1. a non-finite parameter (lowest layer; router/experts before the rest of that layer);
    2. a forward re-run of the last batch with hooks: the first sub-module whose output is non-finite;
    3. non-finite router statistics of the last forward (`router_stats`: list of (layer index, RouterStats));
    4. non-finite gradients (least specific: a NaN loss makes every gradient NaN)."""
    module = unwrap(model)
    params, grads = [], []
    for name, p in module.named_parameters():
        m = _LAYER.match(name)
        if not m:
            continue
        layer, part = int(m.group(1)), _part(m.group(2))
        prio = 0 if part in ("router", "experts", "shared expert") else 1
        if not torch.isfinite(p.detach().float()).all():
            params.append((layer, prio, f"layer {layer}: non-finite {part} parameter {name}"))
            continue
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None and not torch.isfinite(g.detach().float()).all():
            grads.append((layer, prio, f"layer {layer}: non-finite {part} gradient of {name}"))
    if params:
        return min(params)[2]
    if batch is not None:
        probe = _probe_forward(module, batch)
        if probe:
            return probe
    for layer, st in router_stats or []:
        for field in ("importance", "load", "balance_loss", "z_loss"):
            v = getattr(st, field, None)
            if torch.is_tensor(v) and not torch.isfinite(v.detach().float()).all():
                return f"layer {layer}: non-finite router statistic {field}"
    if grads:
        return min(grads)[2] + " (gradients only: the first layer listed, not necessarily the cause)"
    return "no layer has non-finite router statistics, parameters or gradients (the loss overflowed)"


class NonFiniteGuard:
    def __init__(self, max_consecutive: int = 5):
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.skipped = 0

    @staticmethod
    def finite(*values) -> bool:
        return all(v is not None and math.isfinite(float(v)) for v in values)

    def record(self, ok: bool, step: int, model=None, router_stats=None, batch=None):
        """Call once per step with whether it was finite. Raises NonFiniteError after too many in a row."""
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            where = find_bad_layer(model, router_stats, batch) if model is not None else "unknown layer"
            raise NonFiniteError(f"step {step}: {self.consecutive} non-finite losses in a row "
                                 f"(train.max_consecutive_nonfinite = {self.max_consecutive}); {where}")

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, d: dict):
        self.consecutive, self.skipped = int(d.get("consecutive", 0)), int(d.get("skipped", 0))
