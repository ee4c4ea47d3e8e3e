"""The trainer's view of the data: a domain mixture with next_batch / validation_batches / state_dict.

`build_data(cfg.data, vocab_size, dp_rank, dp_size)` returns megamoe.data's DomainMixture over the preprocessed
per-domain datasets (`data.prefixes`), its SFTMixture over a chat manifest (`data.format: chat`), or -- when no
prefixes are configured -- a `SyntheticMixture`: a few "domains" of deterministic, learnable token sequences for
tests and benchmarks (said in one log line).

Interface used by the loop (all three):
    next_batch(B) -> (tokens [B, S+1] int64, domain_ids [B] int64)     inputs tokens[:, :-1], labels tokens[:, 1:]
                  -> SFTBatch (chat: tokens, loss_mask, position_ids, segment_ids, domain_ids)
    validation_batches(domain, B, n) -> [B, S+1] tensors / SFTBatches   the same every call
    domains: list[str]; weights: dict domain -> weight; set_weights(dict)
    state_dict() / load_state_dict(d)                                  exact resume of the sample order

`prepare_embedded_chat(cfg.data)`: `data.build_embedded_chat` -- the embedded chat set built and tokenized into
the manifest's directory when the manifest does not exist yet (rank 0; the others wait at a barrier).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

from megamoe.data import DomainMixture, SFTMixture
from megamoe.data.chat_corpus import build_chat_corpus
from megamoe.data.preprocess import PreprocessConfig, preprocess_domains
from megamoe.errors import ConfigError
from megamoe.formats.embedded import materialize_smollm2

log = logging.getLogger("megamoe.train")

__all__ = ["SyntheticMixture", "build_data", "prepare_embedded_chat", "chat_manifest", "full_weights"]


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


def chat_manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def prepare_embedded_chat(dcfg) -> None:
    """Build the embedded chat set into data.manifest's directory if that manifest does not exist (see
    megamoe.training.config.EmbeddedChatConfig). Collective under torchrun: rank 0 builds, every rank waits."""
    ec = dcfg.build_embedded_chat
    if ec is None:
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.isfile(dcfg.manifest):
        out = os.path.dirname(os.path.abspath(dcfg.manifest))
        jsonl = os.path.join(out, "jsonl")
        shutil.rmtree(jsonl, ignore_errors=True)   # leftovers of an interrupted build (the manifest comes last)
        tok = materialize_smollm2() if ec.tokenizer == "smollm2" else ec.tokenizer
        if not os.path.isdir(tok):
            raise ConfigError(f"data.build_embedded_chat.tokenizer: {tok} is not a directory (\"smollm2\" or an HF "
                              "tokenizer directory)")
        log.info("data: building the embedded chat set (general %d, math %d conversations) into %s with the "
                 "tokenizer of %s", ec.general, ec.math, out, tok)
        build_chat_corpus(jsonl, sizes={"general": ec.general, "math": ec.math}, seed=ec.seed,
                          log=lambda msg: log.info("chat corpus: %s", msg))
        preprocess_domains(jsonl, out, tok, PreprocessConfig(format="chat", workers=ec.workers, progress=False,
                                                             overwrite=True))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def full_weights(weights: dict, domains) -> dict:
    """A stage mixture over some datasets -> weights over every domain of the data (the others 0)."""
    return {d: float(weights.get(d, 0.0)) for d in domains}


def build_data(dcfg, vocab_size: int, dp_rank: int = 0, dp_size: int = 1):
    """The mixture of `dcfg` for data-parallel rank `dp_rank` of `dp_size`."""
    if dcfg.format == "chat":
        man = chat_manifest(dcfg.manifest)
        tv = man.get("tokenizer", {}).get("vocab_size")
        if tv is not None and tv > vocab_size:
            raise ConfigError(f"data.manifest: {dcfg.manifest} was tokenized with a vocabulary of {tv} tokens, the "
                              f"model has {vocab_size}")
        domains = sorted(man.get("domains", {}))
        w = full_weights(dcfg.weights, domains) if isinstance(dcfg.weights, dict) else dcfg.weights
        try:
            mix = SFTMixture.from_manifest(dcfg.manifest, weights=w, seq_len=dcfg.seq_len, seed=dcfg.seed,
                                           rank=dp_rank, world_size=dp_size, pack=dcfg.pack)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.manifest: {e}") from None
        log.info("data: chat, %d domains %s, weights %s, %s rows of %d tokens", len(mix.domains), mix.domains,
                 {d: round(x, 4) for d, x in mix.weights.items()}, "packed" if dcfg.pack else "padded",
                 dcfg.seq_len + 1)
        return mix
    if not dcfg.prefixes and not dcfg.manifest:
        log.info("data: no data.manifest / data.prefixes configured; using the synthetic mixture "
                 "(tests and benchmarks only)")
        w = dcfg.weights if isinstance(dcfg.weights, dict) else None
        return SyntheticMixture(vocab_size, dcfg.seq_len, dcfg.seed, weights=w, rank=dp_rank)
    kw = dict(weights=dcfg.weights, seq_len=dcfg.seq_len, seed=dcfg.seed, rank=dp_rank, world_size=dp_size,
              model_vocab_size=vocab_size)
    if dcfg.split:
        kw["split"] = dcfg.split
    if dcfg.manifest:
        mix = DomainMixture.from_manifest(dcfg.manifest, **kw)
    else:
        mix = DomainMixture(dcfg.prefixes, valid_prefixes=dcfg.valid_prefixes, **kw)
    log.info("data: %d domains %s, weights %s", len(mix.domains), mix.domains,
             {d: round(w, 4) for d, w in mix.weights.items()})
    return mix
