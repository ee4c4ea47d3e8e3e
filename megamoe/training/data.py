"""The trainer's view of the data: a domain mixture with next_batch / validation_batches / state_dict.

`build_data(cfg.data, vocab_size, dp_rank, dp_size)` returns megamoe.data's DomainMixture over the preprocessed
per-domain datasets (`data.prefixes`), or -- when no prefixes are configured -- a `SyntheticMixture`: a few
"domains" of deterministic, learnable token sequences for tests and benchmarks (said in one log line).

Interface used by the loop (both classes):
    next_batch(B) -> (tokens [B, S+1] int64, domain_ids [B] int64)     inputs tokens[:, :-1], labels tokens[:, 1:]
    validation_batches(domain, B, n) -> list of [B, S+1] tensors       the same every call
    domains: list[str]; weights: dict domain -> weight; set_weights(dict)
    state_dict() / load_state_dict(d)                                  exact resume of the sample order
"""

from __future__ import annotations

import logging

import torch

from megamoe.data import DomainMixture

log = logging.getLogger("megamoe.train")

__all__ = ["SyntheticMixture", "build_data"]


class SyntheticMixture:
    """Domain d generates x_{t+1} = (a_d * x_t + b_d) mod m from a random start: a bigram rule per domain that a
    model learns in a few dozen steps, so a falling loss is a real learning signal. Deterministic in (seed, rank,
    draw counter)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, domains=("alpha", "beta", "gamma"),
                 weights: dict | None = None, rank: int = 0, modulus: int | None = None):
        self.vocab_size, self.seq_len, self.seed, self.rank = vocab_size, seq_len, seed, rank
        self.domains = list(domains)
        self.m = min(vocab_size, modulus or 97)
        self.rules = [(3 + 2 * i, 1 + 5 * i) for i in range(len(self.domains))]
        self.weights = dict(weights) if weights else {d: 1.0 / len(self.domains) for d in self.domains}
        self.draws = 0

    def set_weights(self, w: dict):
        s = sum(w.values())
        self.weights = {d: float(w[d]) / s for d in self.domains}

    def _gen(self, g: torch.Generator, dom: torch.Tensor) -> torch.Tensor:
        B, S = dom.numel(), self.seq_len + 1
        out = torch.empty(B, S, dtype=torch.int64)
        out[:, 0] = torch.randint(0, self.m, (B,), generator=g)
        a = torch.tensor([self.rules[int(d)][0] for d in dom])
        b = torch.tensor([self.rules[int(d)][1] for d in dom])
        for t in range(1, S):
            out[:, t] = (a * out[:, t - 1] + b) % self.m
        return out

    def next_batch(self, B: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.draws)
        self.draws += 1
        p = torch.tensor([self.weights[d] for d in self.domains])
        dom = torch.multinomial(p, B, replacement=True, generator=g)
        return self._gen(g, dom), dom

    def validation_batches(self, domain: str, B: int, n: int):
        i = self.domains.index(domain)
        out = []
        for j in range(n):
            g = torch.Generator().manual_seed(10_000_019 + 1009 * i + j)
            out.append(self._gen(g, torch.full((B,), i)))
        return out

    def state_dict(self) -> dict:
        return {"draws": self.draws, "weights": dict(self.weights)}

    def load_state_dict(self, d: dict):
        self.draws = int(d["draws"])
        self.weights = dict(d["weights"])


def build_data(dcfg, vocab_size: int, dp_rank: int = 0, dp_size: int = 1):
    if not dcfg.prefixes and not dcfg.manifest:
        log.info("data: no data.manifest / data.prefixes configured; using the synthetic mixture "
                 "(tests and benchmarks only)")
        w = dcfg.weights if isinstance(dcfg.weights, dict) else None
        return SyntheticMixture(vocab_size, dcfg.seq_len, dcfg.seed, weights=w, rank=dp_rank)
    kw = dict(weights=dcfg.weights, seq_len=dcfg.seq_len, seed=dcfg.seed, rank=dp_rank, world_size=dp_size)
    if dcfg.split:
        kw["split"] = dcfg.split
    if dcfg.manifest:
        mix = DomainMixture.from_manifest(dcfg.manifest, **kw)
    else:
        mix = DomainMixture(dcfg.prefixes, valid_prefixes=dcfg.valid_prefixes, vocab_size=vocab_size, **kw)
    log.info("data: %d domains %s, weights %s", len(mix.domains), mix.domains,
             {d: round(w, 4) for d, w in mix.weights.items()})
    return mix
