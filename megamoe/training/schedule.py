"""Learning-rate schedule: linear warmup, then cosine (or linear) decay with a floor -- the llama-moe CPT recipe.

For the optimizer step with 0-based index `s` (the first update is s = 0):

    warmup (s < W):   lr(s) = lr * (s + 1) / W
    decay  (s >= W):  p = min(1, (s - W) / max(1, D - W))                 D = decay_steps (default: train steps)
                      cosine:   f = 0.5 * (1 + cos(pi * p))
                      linear:   f = 1 - p
                      constant: f = 1
                      lr(s) = lr * max(min_lr_ratio, f)

The floor is a clamp, as in llama-moe's `get_cosine_schedule_with_warmup(final_lr_portion=0.1)`: the cosine is
followed until it reaches 10% and stays there. (Megatron's `min_lr` instead rescales the cosine to end at the
floor; the two agree at both ends.) Warmup counts from (s+1)/W so the first update is not wasted at lr = 0
(Hugging Face's s/W gives lr = 0 on step 0).

`apply(optimizer, s)` writes lr and weight decay into every parameter group of a megatron-core optimizer (or any
torch optimizer): lr * group["lr_mult"], weight_decay * group["wd_mult"]. megatron-core puts norms, biases and
every other 1-D parameter in groups with wd_mult = 0, so they get no weight decay -- but only the scheduler applies
that multiplier; megatron's AdamW is created with one weight decay for all groups.
"""

from __future__ import annotations

import math

__all__ = ["LRSchedule"]


class LRSchedule:
    def __init__(self, lr: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float = 0.1,
                 style: str = "cosine", weight_decay: float = 0.0):
        if style not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.decay_style: {style!r} is not one of cosine, linear, constant")
        self.lr, self.warmup, self.decay_steps = float(lr), int(warmup_steps), int(decay_steps)
        self.min_ratio, self.style, self.weight_decay = float(min_lr_ratio), style, float(weight_decay)

    @classmethod
    def from_config(cls, optim, total_steps: int) -> "LRSchedule":
        return cls(optim.lr, optim.warmup_steps, optim.decay_steps or total_steps, optim.min_lr_ratio,
                   optim.decay_style, optim.weight_decay)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.style == "constant":
            return 1.0
        p = min(1.0, (step - self.warmup) / max(1, self.decay_steps - self.warmup))
        f = 0.5 * (1.0 + math.cos(math.pi * p)) if self.style == "cosine" else 1.0 - p
        return max(self.min_ratio, f)

    def lr_at(self, step: int) -> float:
        return self.lr * self.factor(step)

    def apply(self, optimizer, step: int) -> float:
        """Set lr and weight decay of every param group for the update with index `step`; returns the base lr."""
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.weight_decay * g.get("wd_mult", 1.0)
        return lr
