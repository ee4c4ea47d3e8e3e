"""The next token from a row of logits: greedy, or sampled with temperature, top-k and top-p (nucleus).

    pick = Sampler()                                           # greedy: argmax
    pick = Sampler(temperature=0.8, top_k=50, top_p=0.95, seed=0)
    next_ids = pick(logits)                                    # logits [B, V] fp32 -> LongTensor [B]

Sampling follows transformers' order (megamoe.model.generate.next_token_logits_filter): logits / temperature, then
keep the top_k largest (0: all), then keep the smallest set of tokens whose probabilities sum to at least top_p (the
most likely token always stays), then draw from the renormalised softmax with the sampler's own torch.Generator
(seeded: the same draws on every run and every rank, and the same as megamoe.model.generate's with that seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamoe.errors import InputError
from megamoe.model.generate import next_token_logits_filter

__all__ = ["Sampler"]


@dataclass
class Sampler:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    _gen: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.temperature <= 0 and not self.greedy:
            raise InputError(f"--temperature: {self.temperature} must be > 0 for sampling (use --greedy for argmax)")
        if self.top_k < 0:
            raise InputError(f"--top-k: {self.top_k} must be >= 0 (0: no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"--top-p: {self.top_p} must be in (0, 1]")

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits after temperature, top-k and top-p (-inf where a token is excluded): the filter of
        megamoe.model.generate, so both draw from the same distribution."""
        return next_token_logits_filter(logits.float() / self.temperature, self.top_k, self.top_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        if self._gen is None:  # on the logits' device, seeded once: the same draws as megamoe.model.generate's
            self._gen = torch.Generator(device=logits.device)
            self._gen.manual_seed(int(self.seed) if self.seed is not None else torch.initial_seed())
        probs = torch.softmax(self.filtered_logits(logits), dim=-1)
        return torch.multinomial(probs, 1, generator=self._gen).squeeze(-1)
