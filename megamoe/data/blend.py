"""Per-domain blending with static or dynamic weights: deterministic, exactly resumable, reweightable.

    mix = DomainMixture(prefixes={"code": "tok/code/train_text_document", ...}, weights="uniform" | {...},
                        seq_len=256, seed=1234, split="98,2,0")
    tokens, domain_ids = mix.next_batch(8)          # LongTensor [8, 257], LongTensor [8] (index into mix.domains)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    sd = mix.state_dict(); ...; mix.load_state_dict(sd)   # the same samples follow, bit for bit
    mix.set_weights({...})                                 # e.g. from update_domain_weights at an evaluation
    for batch in mix.validation_batches("code", 8, max_batches=4): ...

Design (and why not megatron's BlendedDataset for everything)
-------------------------------------------------------------
Each domain is one megatron-core `GPTDataset` per split, built by `BlendedMegatronDatasetBuilder` from that domain's
prefix: megatron's document shuffling, packing of documents into `seq_len + 1`-token samples (EOS-separated,
crossing document boundaries like Megatron-LM), its `helpers_cpp` index building and its on-disk index cache
(`cache_dir`, megatron's `path_to_cache`; rank 0 builds, the other ranks load). Train/validation/test splits are per
domain (megatron's `split` string applied to each domain's documents), or held-out files (`valid_prefixes`).

Megatron's `BlendedDataset` fixes the domain of every sample at build time from static weights. Sheared-LLaMA's
dynamic batch loading changes the weights during training, so the domain of each sample is drawn here instead:

- the domains of batch `t` are drawn i.i.d. from the weights in force with a counter-based generator seeded by
  `(seed, t)` (`numpy.random.default_rng([seed, t, ...])`), so a batch depends only on the step, the weights and the
  per-domain cursors, never on the history of random calls;
- domain `d` hands out its samples in order with a cursor `c_d`: sample `perm_{d,e}[c_d mod n_d]` of its
  GPTDataset, where `e = c_d div n_d` is the epoch (epoch 0 is the GPTDataset's own shuffled order; later epochs
  use a fresh permutation seeded by `(seed, d, e)`), so a small domain can be revisited without the identical order;
- `state_dict()` holds the step, the cursors, the weights in force and the history of weight changes: json,
  a few hundred bytes; `load_state_dict` resumes the exact sample order, at any step.

Static weights are the same machinery with weights that never change. The realised proportions follow a multinomial
around the weights (LLaMA-MoE also samples each block's domain at random, `rng.choices(weights)`).
`build_megatron_blend` is also provided for users who want Megatron-LM's static `BlendedDataset` as is.

Data parallelism: every rank constructs the mixture with the same arguments plus its `rank` and `world_size`
(the data-parallel rank and size) and calls `next_batch(B)` with its *own* (micro-)batch size B. The domains of the
whole global batch of `B * world_size` rows are drawn (cheap) so all ranks advance the same cursors, and each rank
reads only its contiguous slice of rows `[rank * B, (rank + 1) * B)`: the ranks' batches tile exactly the batch a
single process would draw with `next_batch(B * world_size)`. `rank`/`world_size` can also be passed per call.
The returned `domain_ids` are the slice's. `validation_batches` is the same on every rank.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megamoe.data.dynamic import resolve_weights, update_domain_weights  # noqa: F401  (re-exported for the trainer)
from megamoe.data.indexed import read_sizes
from megamoe.errors import DataError

__all__ = ["DomainMixture", "build_megatron_blend", "IndexTokenizer", "check_split_sizes", "update_domain_weights"]

logger = logging.getLogger(__name__)
_STATE_VERSION = 1


class IndexTokenizer:
    """The duck-typed tokenizer megatron-core's GPTDatasetConfig needs (vocab_size, eod, unique_identifiers),
    for reading already-tokenized data without loading the real tokenizer."""

    def __init__(self, eod: int, vocab_size: Optional[int] = None, pad: Optional[int] = None, name: str = ""):
        self.eod = int(eod)
        self.vocab_size = vocab_size
        if pad is not None:
            self.pad = pad
        self.unique_identifiers = {"class": "IndexTokenizer", "eod": self.eod, "vocab_size": vocab_size,
                                   "name": name}


def _prefix(path: str) -> str:
    """An absolute dataset prefix; a path given with its `.bin`/`.idx` extension is accepted too."""
    path = os.fspath(path)
    if path.endswith((".bin", ".idx")):
        path = path[:-4]
    return os.path.abspath(path)


def _split_vector(split: str) -> List[Optional[Tuple[float, float]]]:
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    try:
        return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError) as err:
        raise DataError(f"split {split!r}: expected 'train,valid,test' non-negative weights, e.g. '98,2,0'") from err


def check_split_sizes(domain: str, prefix: str, split: str, seq_len: int,
                      splits=("train", "valid", "test")) -> Dict[str, int]:
    """Tokens per split of one domain, computed as megatron does (document ranges `round(frac * n_docs)`).

    Raises a ValueError naming the domain, prefix and split when a non-empty split holds fewer than `seq_len + 1`
    tokens: megatron-core's index builder loops forever on such a split."""
    if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
        raise FileNotFoundError(f"domain {domain!r}: {prefix}.bin/.idx not found (run megamoe-preprocess)")
    _, sizes = read_sizes(prefix)
    n = len(sizes)
    out = {}
    for name, rng in zip(("train", "valid", "test"), _split_vector(split)):
        if rng is None or name not in splits:
            continue
        beg, end = int(round(rng[0] * n)), int(round(rng[1] * n))
        tokens = int(sizes[beg:end].sum())
        if tokens < seq_len + 1:
            raise DataError(
                f"domain {domain!r} ({prefix}): the {name} split of '{split}' holds documents [{beg}, {end}) of {n}, "
                f"{tokens} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}; use more data, a larger "
                f"{name} share, a shorter seq_len, or held-out files (valid_prefixes)")
        out[name] = tokens
    return out


def _gpt_config(seq_len: int, seed: int, tokenizer, cache_dir: Optional[str], blend=None, blend_per_split=None,
                split=None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, blend=blend, blend_per_split=blend_per_split,
                            split=split, path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
                            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                            mmap_bin_files=True)


def _build(config, sizes):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _sample_tokens(ds, idx: int) -> np.ndarray:
    """The seq_len + 1 token ids of sample `idx` of a GPTDataset (no masks, no pad munging)."""
    text, _ = ds._query_document_sample_shuffle_indices(int(idx))
    return text


class DomainMixture:
    """Draws fixed-length samples from per-domain megatron datasets under static or dynamic weights.

    Args:
        prefixes: domain -> dataset prefix (`<prefix>.bin/.idx`) of its training data.
        weights: a preset name (`"llama"`, `"sheared_llama"`, `"uniform"`), a dict over exactly these domains, or
            None (uniform). Normalised. See `megamoe.data.dynamic`.
        seq_len: tokens per training position; samples hold `seq_len + 1` ids (inputs `[:-1]`, labels `[1:]`).
        seed: seeds megatron's shuffling and the domain draws.
        split: megatron's "train,valid,test" split of each domain's documents. Default: "100,0,0" when
            `valid_prefixes` covers every domain (train on the whole training files, validate on the held-out
            ones), else "98,2,0". A domain with a held-out prefix validates on it, whatever the split says.
        cache_dir: megatron's `path_to_cache` for the sample indices; None keeps megatron's default
            (`<prefix>/cache/GPTDataset_indices`, next to the data).
        valid_prefixes: optional domain -> prefix of held-out validation data (e.g. from the local corpus).
        eod: the end-of-document id (only hashed into megatron's cache key); default 0 when unknown.
        vocab_size: the tokenizer's vocabulary size (optional; hashed into megatron's cache key).
        rank, world_size: this process's data-parallel rank and the data-parallel size (see the module docstring).
        model_vocab_size: the vocabulary of the model the samples feed; every sample is checked against it (a
            DataError naming the domain, its dataset and the id, instead of an IndexError in the embedding when the
            data was tokenized with another tokenizer).
    """

    def __init__(self, prefixes: Mapping[str, str], weights: Union[None, str, Mapping[str, float]] = None,
                 seq_len: int = 256, seed: int = 1234, split: Optional[str] = None, cache_dir: Optional[str] = None,
                 valid_prefixes: Optional[Mapping[str, str]] = None, eod: Optional[int] = None,
                 vocab_size: Optional[int] = None, tokenizer=None, rank: int = 0, world_size: int = 1,
                 model_vocab_size: Optional[int] = None):
        if not prefixes:
            raise DataError("DomainMixture needs at least one domain prefix")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.domains: List[str] = sorted(prefixes)
        self.prefixes = {d: _prefix(prefixes[d]) for d in self.domains}
        self.valid_prefixes = ({d: _prefix(p) for d, p in valid_prefixes.items()} if valid_prefixes else {})
        unknown = sorted(set(self.valid_prefixes) - set(self.domains))
        if unknown:
            raise DataError(f"valid_prefixes names domains without training data: {unknown}")
        if split is None:  # held-out files for every domain: train on the whole training files
            split = "100,0,0" if set(self.valid_prefixes) == set(self.domains) else "98,2,0"
        self.seq_len, self.seed, self.split = int(seq_len), int(seed), split
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} must be in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.model_vocab_size = model_vocab_size
        if model_vocab_size is not None and vocab_size is not None and vocab_size > model_vocab_size:
            logger.warning("the data's tokenizer has %d tokens, the model %d: a sample with a larger id stops "
                           "training", vocab_size, model_vocab_size)
        self.cache_dir = cache_dir
        self._weights = resolve_weights(weights, self.domains)
        self.initial_weights = dict(self._weights)
        if tokenizer is None:
            tokenizer = IndexTokenizer(0 if eod is None else eod, vocab_size)
        self.tokenizer = tokenizer

        # splits: check sizes first (megatron hangs on a split shorter than one sample)
        self.train: Dict[str, object] = {}
        self.valid: Dict[str, object] = {}
        self.test: Dict[str, object] = {}
        for d in self.domains:
            tp = self.prefixes[d]
            try:
                check_split_sizes(d, tp, split, self.seq_len)
            except ValueError as err:
                if d in self.valid_prefixes:  # the split's own validation share is not even needed here
                    raise DataError(f"{err}. This domain has held-out validation data (valid_prefixes): pass "
                                     f"split='100,0,0' (or 'N,0,M') so its training file keeps all documents") from None
                raise
            if d in self.valid_prefixes:
                check_split_sizes(d, self.valid_prefixes[d], "100,0,0", self.seq_len, splits=("train",))
            cfg = _gpt_config(self.seq_len, self.seed, tokenizer, cache_dir, blend=([tp], None), split=split)
            tr, va, te = _build(cfg, [None, None, None])
            if d in self.valid_prefixes:
                vcfg = _gpt_config(self.seq_len, self.seed, tokenizer, cache_dir,
                                   blend_per_split=[None, ([self.valid_prefixes[d]], None), None])
                _, va, _ = _build(vcfg, [None, None, None])
            if tr is None or len(tr) == 0:
                raise DataError(f"domain {d!r} ({tp}): empty training split for split {split!r}")
            self.train[d], self.valid[d], self.test[d] = tr, va, te
        self._n = {d: len(self.train[d]) for d in self.domains}
        self._perm_cache: Dict[str, Tuple[int, np.ndarray]] = {}
        self.step = 0
        self.cursors = {d: 0 for d in self.domains}
        self.samples_drawn = 0
        self.weight_history: List[Tuple[int, Dict[str, float]]] = [(0, dict(self._weights))]
        self.last_domain_counts = {d: 0 for d in self.domains}

    # -- construction helpers -----------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, manifest_path: str, weights=None, domains: Optional[Sequence[str]] = None,
                      use_valid_files: bool = True, **kwargs) -> "DomainMixture":
        """From the `manifest.json` that `megamoe-preprocess --per-domain` writes (held-out `valid` datasets
        become `valid_prefixes` unless `use_valid_files=False`)."""
        with open(manifest_path) as f:
            man = json.load(f)
        root = os.path.dirname(os.path.abspath(manifest_path))
        avail = man.get("domains", {})
        names = list(domains) if domains is not None else sorted(avail)
        missing = [d for d in names if d not in avail]
        if missing:
            raise DataError(f"{manifest_path}: no domain(s) {missing} (has {sorted(avail)})")
        prefixes = {d: os.path.join(root, avail[d]["train"]) for d in names}
        valid = {d: os.path.join(root, avail[d]["valid"]) for d in names if use_valid_files and "valid" in avail[d]}
        tok = man.get("tokenizer", {})
        kwargs.setdefault("eod", tok.get("eod"))
        kwargs.setdefault("vocab_size", tok.get("vocab_size"))
        return cls(prefixes, weights=weights, valid_prefixes=valid or None, **kwargs)

    # -- weights ------------------------------------------------------------------------------------------------
    @property
    def weights(self) -> Dict[str, float]:
        """The weights in force (normalised; a copy)."""
        return dict(self._weights)

    def set_weights(self, weights: Union[str, Mapping[str, float]]) -> None:
        """Replace the weights from the next batch on (recorded in the weight history and the state)."""
        self._weights = resolve_weights(weights, self.domains)
        self.weight_history.append((self.step, dict(self._weights)))

    def log_record(self, prefix: str = "data") -> Dict[str, float]:
        """Scalars for the step's log line: weight in force and sample count of the last batch, per domain."""
        rec = {f"{prefix}/weight/{d}": w for d, w in self._weights.items()}
        rec.update({f"{prefix}/samples/{d}": float(n) for d, n in self.last_domain_counts.items()})
        return rec

    # -- sampling -----------------------------------------------------------------------------------------------
    def _draw_domains(self, step: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 0x6D6F65])
        u = rng.random(n)
        cdf = np.cumsum([self._weights[d] for d in self.domains])
        cdf /= cdf[-1]
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(self.domains) - 1)

    def _index(self, d: str, cursor: int) -> int:
        n = self._n[d]
        epoch, pos = divmod(cursor, n)
        if epoch == 0:
            return pos
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != epoch:
            di = self.domains.index(d)
            cached = (epoch, np.random.default_rng([self.seed, di, epoch, 0x70]).permutation(n))
            self._perm_cache[d] = cached
        return int(cached[1][pos])

    def next_batch(self, batch_size: int, rank: Optional[int] = None,
                   world_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's next batch: `(tokens LongTensor [B, seq_len+1], domain_ids LongTensor [B])`.

        `batch_size` B is this rank's rows; the global batch drawn is `B * world_size` and this rank gets rows
        `[rank*B, (rank+1)*B)`. `rank`/`world_size` default to the constructor's."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside [0, {world_size})")
        per = batch_size
        batch_size = per * world_size
        dom = self._draw_domains(self.step, batch_size)
        picks = []
        for j in dom:
            d = self.domains[j]
            picks.append((d, self.cursors[d]))
            self.cursors[d] += 1
        lo = rank * per
        out = np.empty((per, self.seq_len + 1), dtype=np.int64)
        for r, (d, cur) in enumerate(picks[lo:lo + per]):
            out[r] = _sample_tokens(self.train[d], self._index(d, cur))
            self._check_ids(out[r], d, self.prefixes[d])
        counts = np.bincount(dom, minlength=len(self.domains))
        self.last_domain_counts = {d: int(counts[i]) for i, d in enumerate(self.domains)}
        self.step += 1
        self.samples_drawn += batch_size
        return torch.from_numpy(out), torch.from_numpy(dom[lo:lo + per].astype(np.int64))

    def epochs(self) -> Dict[str, float]:
        """Passes over each domain's training split so far (samples drawn / samples per epoch)."""
        return {d: self.cursors[d] / self._n[d] for d in self.domains}

    def num_samples(self, split: str = "train") -> Dict[str, int]:
        table = {"train": self.train, "valid": self.valid, "test": self.test}[split]
        return {d: (len(ds) if ds is not None else 0) for d, ds in table.items()}

    # -- validation ---------------------------------------------------------------------------------------------
    def validation_batches(self, domain: str, batch_size: int, max_batches: Optional[int] = None,
                           split: str = "valid") -> Iterator[torch.Tensor]:
        """The domain's validation samples in a fixed order (the same every evaluation), `[B, seq_len+1]` each;
        the last batch may be smaller. Independent of the training cursors."""
        if domain not in self.domains:
            raise KeyError(f"unknown domain {domain!r}; domains: {self.domains}")
        ds = (self.valid if split == "valid" else self.test)[domain]
        if ds is None:
            raise DataError(f"domain {domain!r} has no {split} data (split {self.split!r}, no held-out prefix)")
        n = len(ds)
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        for lo in range(0, n, batch_size):
            rows = [_sample_tokens(ds, i) for i in range(lo, min(lo + batch_size, n))]
            batch = np.stack(rows).astype(np.int64)
            self._check_ids(batch, domain, self.valid_prefixes.get(domain, self.prefixes[domain]))
            yield torch.from_numpy(batch)

    def _check_ids(self, tokens: np.ndarray, domain: str, prefix: str) -> None:
        if self.model_vocab_size is not None and tokens.size and int(tokens.max()) >= self.model_vocab_size:
            raise DataError(f"{prefix}.bin (domain {domain!r}): token id {int(tokens.max())} is outside the model's "
                            f"vocabulary (vocab_size {self.model_vocab_size}): the data was tokenized with another "
                            "tokenizer; re-run megamoe-preprocess with the model's tokenizer")

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the exact sample order (json-serialisable)."""
        return {"version": _STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "domains": list(self.domains), "step": self.step, "samples_drawn": self.samples_drawn,
                "cursors": dict(self.cursors), "weights": dict(self._weights),
                "weight_history": [[s, dict(w)] for s, w in self.weight_history],
                "samples_per_epoch": dict(self._n)}

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore a `state_dict()`; refuses one from a different mixture (domains, seed, seq_len, data)."""
        if sd.get("version") != _STATE_VERSION:
            raise DataError(f"data state version {sd.get('version')!r}, expected {_STATE_VERSION}")
        for key, mine in (("domains", list(self.domains)), ("seed", self.seed), ("seq_len", self.seq_len),
                          ("samples_per_epoch", dict(self._n))):
            if sd.get(key) != mine:
                raise DataError(f"data state does not match this mixture: {key} is {sd.get(key)!r} in the "
                                 f"checkpoint, {mine!r} here")
        self.step = int(sd["step"])
        self.samples_drawn = int(sd["samples_drawn"])
        self.cursors = {d: int(sd["cursors"][d]) for d in self.domains}
        self._weights = {d: float(sd["weights"][d]) for d in self.domains}
        self.weight_history = [(int(s), {d: float(v) for d, v in w.items()}) for s, w in sd["weight_history"]]
        self._perm_cache.clear()


def build_megatron_blend(prefixes: Mapping[str, str], weights: Union[None, str, Mapping[str, float]],
                         num_samples: Sequence[Optional[int]], seq_len: int, seed: int = 1234,
                         split: str = "98,2,0", cache_dir: Optional[str] = None, eod: int = 0,
                         vocab_size: Optional[int] = None) -> list:
    """Megatron-LM's static blending as is: `[train, valid, test]` datasets (a megatron `BlendedDataset` per split
    with `num_samples[i]` samples, or None). Weights as in `DomainMixture`. Domains are blended in sorted order.

    Without torch.distributed, megatron's BlendedDataset cannot use `cache_dir` (it calls get_rank()); the blend
    index is then rebuilt in memory (fast), while the per-domain GPTDataset indices still go to megatron's default
    cache next to the data."""
    import torch.distributed as dist

    domains = sorted(prefixes)
    prefixes = {d: _prefix(prefixes[d]) for d in domains}
    w = resolve_weights(weights, domains)
    for d in domains:
        check_split_sizes(d, prefixes[d], split, seq_len)
    if cache_dir is not None and not dist.is_initialized():
        cache_dir = None
    cfg = _gpt_config(seq_len, seed, IndexTokenizer(eod, vocab_size), cache_dir,
                      blend=([prefixes[d] for d in domains], [w[d] for d in domains]), split=split)
    # megatron asserts a size for every split once weights are given; a 0 for a split the split string leaves empty
    sizes = [0 if n is None else int(n) for n in num_samples]
    return _build(cfg, sizes)
