"""The conversion guard: logits of source and result must agree, or the conversion is refused.

Megatron's Mixtral importer once wrote every expert at its initial weights and reported success
(reference/anchors-perf.md section 7). Every megamoe conversion therefore evaluates a few tokens through the source
and through the files it has just written, and fails (non-zero exit, output removed) when

    max |logits_result - logits_source| > tolerance * max |logits_source|        (fp32 compute; default 1e-4)

Both sides compute in fp32 from the same stored values, so an exact conversion differs only by summation order
(about 1e-7 relative); a missing, permuted, mis-sliced or mis-scaled tensor differs by orders of magnitude more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamoe.errors import GuardError

DEFAULT_TOLERANCE = 1e-4


@dataclass
class Check:
    name: str                  # what was compared with what
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float
    note: str = ""

    @property
    def rel(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-12)

    @property
    def ok(self) -> bool:
        return self.rel <= self.tolerance and self.max_abs_diff == self.max_abs_diff  # NaN fails

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        s = (f"[{mark}] {self.name}: max|diff| {self.max_abs_diff:.3g} vs max|logit| {self.max_abs_ref:.3g} "
             f"(rel {self.rel:.2g}, tolerance {self.tolerance:g})")
        return s + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict:
        return {"check": self.name, "max_abs_diff": self.max_abs_diff, "max_abs_ref": self.max_abs_ref,
                "rel": self.rel, "tolerance": self.tolerance, "ok": self.ok, "note": self.note}


def check(name: str, ref: torch.Tensor, got: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE, note: str = "") -> Check:
    if ref.shape != got.shape:
        return Check(name, float("inf"), 0.0, tolerance, f"shape {list(got.shape)} vs {list(ref.shape)}")
    diff = (got.float() - ref.float()).abs().max().item()
    if not torch.isfinite(got).all():
        diff = float("nan")
    return Check(name, diff, ref.float().abs().max().item(), tolerance, note)


@dataclass
class Skipped:
    name: str
    reason: str
    ok: bool = True

    def line(self) -> str:
        return f"[skip] {self.name}: {self.reason}"

    def to_dict(self) -> dict:
        return {"check": self.name, "skipped": self.reason}


@dataclass
class GuardReport:
    checks: list = field(default_factory=list)

    def add(self, c):
        self.checks.append(c)
        return c

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]

    def raise_if_failed(self, what: str):
        if not self.ok:
            raise GuardError(f"{what}: the result does not reproduce the source; refusing to keep it.\n  "
                             + "\n  ".join(self.lines()))


def guard_ids(vocab_size: int, tokens: int = 8, batch: int = 1, seed: int = 1234) -> torch.Tensor:
    """The token ids the guard evaluates: fixed pseudo-random ids (the check must not depend on a tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, tokens), generator=g)
