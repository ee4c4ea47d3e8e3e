"""SFT batches from chat datasets: packing or padding, a domain mixture, the response-only loss mask, exact resume.

    mix = SFTMixture({"general": "tok/general/train_chat_document", "math": ...},   # mask prefix derived
                     weights={"general": 0.3, "math": 0.7}, seq_len=2048, seed=1234, pack=True, pad_id=2)
    b = mix.next_batch(8)           # SFTBatch
    b.tokens        int64 [B, S+1]  inputs tokens[:, :-1], labels tokens[:, 1:]
    b.loss_mask     float32 [B, S]  1 = the label at t (token t+1) is trained
    b.position_ids  int64 [B, S]    restart at 0 at every document (0 on padding)
    b.segment_ids   int32 [B, S]    0 = padding, 1..n = the row's documents in order
    b.domain_ids    int64 [B]       index into mix.domains (every document of a row is from that domain)
    sd = mix.state_dict(); mix.load_state_dict(sd)          # json, exact resume
    mix.set_weights({...}); for vb in mix.validation_batches("math", 8, 4): ...

The same interface as `megamoe.data.DomainMixture` (`domains`, `weights`, `set_weights`, `log_record`,
`state_dict`/`load_state_dict`, `validation_batches`, `rank`/`world_size`), with an `SFTBatch` instead of a
`(tokens, domain_ids)` pair.

Data: each domain is a `ChatDataset`, a token dataset and its loss-mask dataset written by
`megamoe-preprocess --format chat` (one document = one conversation; mask 1 = assistant token, see
`megamoe.data.chat` for which tokens those are). Sizes must agree document by document (checked when opened).

Rows (S = seq_len, a row holds S+1 token slots)
-----------------------------------------------
- `pack=True`: greedy filling with whole conversations, in the domain's order: conversations are appended while
  they fit in the S+1 slots; the first one that does not fit closes the row (the rest is padding) and opens the next
  row of the same domain. A conversation longer than S+1 tokens gets a row of its own and keeps its first S+1 tokens
  (counted in `stats()["truncated"]`, logged once per domain). Every conversation is placed exactly once per pass.
- `pack=False`: one conversation per row (truncated the same way), the rest padding.
- Padding slots hold `pad_id`, segment 0, position 0, and are never trained.

Loss mask (labels = tokens[:, 1:]): with `m` the per-token assistant mask and `seg` the segment of each slot,

    loss_mask[b, t] = 1  iff  seg[b, t+1] == seg[b, t] != 0  and  m[b, t+1] == 1

i.e. position t is trained iff it predicts an assistant token of the same conversation: never across a document
boundary, never into padding, never on system/user/header tokens. The attention side (block-diagonal causal mask from
`segment_ids`, or varlen kernels) belongs to the model.

Mixture and determinism
-----------------------
Weights are shares of rows: of token slots with packing, of conversations with padding. The domains of step t's
global batch (`B * world_size` rows) are drawn i.i.d. from the weights in force by a generator seeded with
`(seed, t)`, as in `DomainMixture`. Domain d serves its conversations through a cursor over a permutation seeded
by `(seed, crc32(d), epoch)` (a new one each pass), plus at most one pending conversation (drawn but not placed:
it opens the domain's next row). Every rank plans all rows of the global batch from the document sizes alone (no
token reads), so all ranks advance the same cursors, and builds only its rows `[rank*B, (rank+1)*B)`: the ranks'
batches tile what `next_batch(B * world_size)` gives one process. `state_dict()` (step, cursors, pending
conversations, weights and their history, counters) restores the exact continuation.

Validation batches read a domain's held-out dataset in file order, packed (or padded) the same way, and are the same
on every call and every rank.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megamoe.data.chat import mask_prefix
from megamoe.data.dynamic import resolve_weights
from megamoe.data.indexed import IndexedReader

__all__ = ["SFTBatch", "SFTMixture", "ChatDataset", "label_loss_mask", "label_loss_mask_reference"]

logger = logging.getLogger(__name__)
_STATE_VERSION = 1
PrefixSpec = Union[str, Tuple[str, str]]


# ----------------------------------------------------------------------------------------------------------------
# one chat dataset (tokens + aligned loss mask)
# ----------------------------------------------------------------------------------------------------------------
def _strip_ext(path: str) -> str:
    path = os.fspath(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else path


class ChatDataset:
    """A chat token dataset and its loss-mask dataset, aligned: `ds[i] -> (ids int64[n_i], mask uint8[n_i])`.

    `mask_prefix_` defaults to `<prefix>_loss_mask`. Raises ValueError when either dataset is missing, truncated
    (`IndexedReader` checks), not uint8 (the mask), or when the document sizes of the two differ."""

    def __init__(self, prefix: str, mask_prefix_: Optional[str] = None):
        self.prefix = os.path.abspath(_strip_ext(prefix))
        self.mask_prefix = os.path.abspath(_strip_ext(mask_prefix_)) if mask_prefix_ else mask_prefix(self.prefix)
        if not os.path.isfile(self.mask_prefix + ".idx") and os.path.isfile(self.prefix + ".idx"):
            raise FileNotFoundError(f"{self.mask_prefix}.idx: no loss-mask dataset beside {self.prefix}.bin/.idx "
                                    f"(chat data is written by megamoe-preprocess --format chat)")
        self.tokens = IndexedReader(self.prefix)
        self.mask = IndexedReader(self.mask_prefix)
        if self.mask.dtype != np.uint8:
            raise ValueError(f"{self.mask_prefix}: a loss-mask dataset holds uint8, this one {self.mask.dtype}")
        if len(self.tokens) != len(self.mask) or not np.array_equal(self.tokens.sizes, self.mask.sizes):
            bad = (np.flatnonzero(self.tokens.sizes != self.mask.sizes)[:1].tolist()
                   if len(self.tokens) == len(self.mask) else [])
            raise ValueError(f"{self.prefix} and {self.mask_prefix}: document boundaries differ ("
                             + (f"document {bad[0]}: {self.tokens.sizes[bad[0]]} tokens vs {self.mask.sizes[bad[0]]} "
                                f"mask values" if bad else f"{len(self.tokens)} vs {len(self.mask)} documents")
                             + "); rewrite both with megamoe-preprocess --format chat")
        if len(self.tokens) == 0:
            raise ValueError(f"{self.prefix}: no conversations")
        self.sizes = self.tokens.sizes.astype(np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.tokens[i].astype(np.int64), np.asarray(self.mask[i])

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum())


# ----------------------------------------------------------------------------------------------------------------
# the batch and its loss mask
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SFTBatch:
    """One rank's batch; see the module docstring for the shapes and the loss-mask rule."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    domain_ids: torch.Tensor

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def num_trained(self) -> int:
        return int(self.loss_mask.sum().item())


def label_loss_mask(token_mask: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Label-position loss mask `[..., S]` from the per-token assistant mask and the segments of S+1 slots:
    `out[t] = m[t+1] and seg[t+1] == seg[t] != 0` (vectorised)."""
    m = np.asarray(token_mask, dtype=bool)
    seg = np.asarray(segments)
    return m[..., 1:] & (seg[..., 1:] == seg[..., :-1]) & (seg[..., 1:] != 0)


def label_loss_mask_reference(token_mask: Sequence[int], segments: Sequence[int]) -> List[int]:
    """The same rule, one position at a time (the plain reference for `label_loss_mask`, one row)."""
    out = []
    for t in range(len(segments) - 1):
        same_doc = segments[t + 1] != 0 and segments[t + 1] == segments[t]
        out.append(1 if same_doc and token_mask[t + 1] else 0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# per-domain conversation stream
# ----------------------------------------------------------------------------------------------------------------
class _Stream:
    """A domain's conversations in epoch permutations, a cursor and at most one pending conversation."""

    def __init__(self, name: str, ds: ChatDataset, seed: int):
        self.name, self.ds, self.seed = name, ds, seed
        self.key = zlib.crc32(name.encode("utf-8"))
        self.n = len(ds)
        self.cursor = 0
        self.pending: Optional[int] = None  # stream position of a drawn conversation not placed yet
        self._perm: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def doc_at(self, pos: int) -> int:
        epoch, k = divmod(pos, self.n)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, self.key, epoch, 0x5F7]).permutation(self.n))
        return int(self._perm[1][k])

    def take(self) -> int:
        if self.pending is not None:
            pos, self.pending = self.pending, None
            return pos
        self.cursor += 1
        return self.cursor - 1


def _plan_row(next_pos, doc_of, size_of, cap: int, pack: bool) -> Tuple[List[Tuple[int, int]], Optional[int], int]:
    """One row: `([(doc, length placed)], position to hand back as pending or None, truncated count)`.

    `next_pos()` gives the next stream position, `doc_of(pos)` its document, `size_of(doc)` its token count."""
    row: List[Tuple[int, int]] = []
    used = 0
    while used < cap:
        pos = next_pos()
        if pos is None:  # finite streams (validation): nothing left
            break
        doc = doc_of(pos)
        n = size_of(doc)
        if n > cap or not pack:
            if row:  # pack=True only: a too-long conversation gets a row of its own
                return row, pos, 0
            row.append((doc, min(n, cap)))
            return row, None, int(n > cap)
        if used + n > cap:
            return row, pos, 0
        row.append((doc, n))
        used += n
    return row, None, 0


def _build_rows(plans: Sequence[Tuple[ChatDataset, List[Tuple[int, int]]]], seq_len: int, pad_id: int):
    """numpy (tokens [R, S+1], loss_mask [R, S], positions [R, S], segments [R, S]) of planned rows."""
    R, cap = len(plans), seq_len + 1
    tokens = np.full((R, cap), pad_id, dtype=np.int64)
    tmask = np.zeros((R, cap), dtype=np.uint8)
    seg = np.zeros((R, cap), dtype=np.int32)
    pos = np.zeros((R, cap), dtype=np.int64)
    for r, (ds, row) in enumerate(plans):
        at = 0
        for k, (doc, n) in enumerate(row, 1):
            ids, m = ds[doc]
            tokens[r, at:at + n] = ids[:n]
            tmask[r, at:at + n] = m[:n]
            seg[r, at:at + n] = k
            pos[r, at:at + n] = np.arange(n)
            at += n
    loss = label_loss_mask(tmask, seg).astype(np.float32)
    return tokens, loss, pos[:, :-1], seg[:, :-1]


def _batch(tokens, loss, pos, seg, dom) -> SFTBatch:
    return SFTBatch(tokens=torch.from_numpy(tokens), loss_mask=torch.from_numpy(loss),
                    position_ids=torch.from_numpy(np.ascontiguousarray(pos)),
                    segment_ids=torch.from_numpy(np.ascontiguousarray(seg)),
                    domain_ids=torch.as_tensor(np.asarray(dom, dtype=np.int64)))


def _spec(p: PrefixSpec) -> Tuple[str, Optional[str]]:
    if isinstance(p, (tuple, list)):
        if len(p) != 2:
            raise ValueError(f"a chat dataset is a token prefix or a (token prefix, mask prefix) pair, got {p!r}")
        return str(p[0]), str(p[1])
    return str(p), None


# ----------------------------------------------------------------------------------------------------------------
# the mixture
# ----------------------------------------------------------------------------------------------------------------
class SFTMixture:
    """Packed (or padded) SFT batches from per-domain chat datasets under static or changing weights.

    Args:
        prefixes: domain -> token prefix (its mask is `<prefix>_loss_mask`) or a (token prefix, mask prefix) pair.
        weights: a dict over exactly these domains, "uniform" or None (normalised; zero weights allowed).
        seq_len: S; rows hold S+1 token slots (inputs `[:-1]`, labels `[1:]`).
        seed: seeds the domain draws and the per-domain permutations.
        rank, world_size: the data-parallel rank and size (see the module docstring).
        pack: True = greedy packing of whole conversations; False = one conversation per row.
        pad_id: the token id of padding slots (never trained; the tokenizer's pad, or its EOS).
        valid_prefixes: optional domain -> held-out chat dataset (same forms as `prefixes`).
    """

    def __init__(self, prefixes: Mapping[str, PrefixSpec], weights: Union[None, str, Mapping[str, float]] = None,
                 seq_len: int = 2048, seed: int = 1234, rank: int = 0, world_size: int = 1, pack: bool = True,
                 pad_id: int = 0, valid_prefixes: Optional[Mapping[str, PrefixSpec]] = None):
        if not prefixes:
            raise ValueError("SFTMixture needs at least one domain")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.domains: List[str] = sorted(prefixes)
        unknown = sorted(set(valid_prefixes or {}) - set(self.domains))
        if unknown:
            raise ValueError(f"valid_prefixes names domains without training data: {unknown}")
        self.seq_len, self.seed, self.pack, self.pad_id = int(seq_len), int(seed), bool(pack), int(pad_id)
        self.rank, self.world_size = int(rank), int(world_size)
        self.train: Dict[str, ChatDataset] = {d: ChatDataset(*_spec(prefixes[d])) for d in self.domains}
        self.valid: Dict[str, ChatDataset] = {d: ChatDataset(*_spec(p)) for d, p in (valid_prefixes or {}).items()}
        self._streams = {d: _Stream(d, self.train[d], self.seed) for d in self.domains}
        self._weights = resolve_weights(weights, self.domains)
        self.initial_weights = dict(self._weights)
        self.weight_history: List[Tuple[int, Dict[str, float]]] = [(0, dict(self._weights))]
        self.step = 0
        self.counters = {d: {"rows": 0, "conversations": 0, "tokens": 0, "truncated": 0}
                         for d in self.domains}
        self.last_batch: Dict[str, float] = {}
        self._warned: set = set()

    @classmethod
    def from_manifest(cls, manifest_path: str, weights=None, domains: Optional[Sequence[str]] = None,
                      use_valid_files: bool = True, **kwargs) -> "SFTMixture":
        """From the `manifest.json` of `megamoe-preprocess --per-domain DIR --format chat`; `pad_id` defaults
        to the tokenizer's pad id (else its EOS)."""
        with open(manifest_path) as f:
            man = json.load(f)
        if man.get("data_format") != "chat":
            raise ValueError(f"{manifest_path}: not a chat manifest (data_format "
                             f"{man.get('data_format', 'text')!r}); preprocess chat data with "
                             f"megamoe-preprocess --format chat")
        root = os.path.dirname(os.path.abspath(manifest_path))
        avail = man.get("domains", {})
        names = list(domains) if domains is not None else sorted(avail)
        missing = [d for d in names if d not in avail]
        if missing:
            raise ValueError(f"{manifest_path}: no domain(s) {missing} (has {sorted(avail)})")

        def pair(e, split):
            return os.path.join(root, e[split]), os.path.join(root, e[f"{split}_loss_mask"])

        prefixes = {d: pair(avail[d], "train") for d in names}
        valid = {d: pair(avail[d], "valid") for d in names if use_valid_files and "valid" in avail[d]}
        tok = man.get("tokenizer", {})
        pad = tok.get("pad") if tok.get("pad") is not None else tok.get("eod")
        if pad is not None:
            kwargs.setdefault("pad_id", int(pad))
        return cls(prefixes, weights=weights, valid_prefixes=valid or None, **kwargs)

    # -- weights ------------------------------------------------------------------------------------------------
    @property
    def weights(self) -> Dict[str, float]:
        return dict(self._weights)

    def set_weights(self, weights: Union[str, Mapping[str, float]]) -> None:
        """Replace the weights from the next batch on (recorded in the history and the state)."""
        self._weights = resolve_weights(weights, self.domains)
        self.weight_history.append((self.step, dict(self._weights)))

    def log_record(self, prefix: str = "data") -> Dict[str, float]:
        """Weights in force, rows per domain and fill/trained fractions of the last batch, truncations so far."""
        rec = {f"{prefix}/weight/{d}": w for d, w in self._weights.items()}
        rec.update({f"{prefix}/{k}": v for k, v in self.last_batch.items()})
        rec.update({f"{prefix}/truncated/{d}": float(c["truncated"]) for d, c in self.counters.items()})
        return rec

    # -- sampling -----------------------------------------------------------------------------------------------
    def _draw_domains(self, step: int, n: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, step, 0x736674]).random(n)
        cdf = np.cumsum([self._weights[d] for d in self.domains])
        cdf /= cdf[-1]
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(self.domains) - 1)

    def _plan(self, d: str) -> List[Tuple[int, int]]:
        st = self._streams[d]
        ds = st.ds
        row, back, truncated = _plan_row(st.take, st.doc_at, lambda doc: int(ds.sizes[doc]), self.seq_len + 1,
                                         self.pack)
        st.pending = back
        c = self.counters[d]
        c["rows"] += 1
        c["conversations"] += len(row)
        c["tokens"] += sum(n for _, n in row)
        if truncated:
            c["truncated"] += truncated
            if d not in self._warned:
                self._warned.add(d)
                doc = row[0][0]
                logger.warning("sft data: domain %r: conversation %d has %d tokens, more than seq_len + 1 = %d; "
                               "kept its first %d (counted in data/truncated/%s; warned once per domain)",
                               d, doc, int(ds.sizes[doc]), self.seq_len + 1, self.seq_len + 1, d)
        return row

    def next_batch(self, batch_size: int, rank: Optional[int] = None,
                   world_size: Optional[int] = None) -> SFTBatch:
        """This rank's next batch of `batch_size` rows (the global batch is `batch_size * world_size` rows)."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        dom = self._draw_domains(self.step, batch_size * world_size)
        plans = [(self.domains[j], self._plan(self.domains[j])) for j in dom]
        lo = rank * batch_size
        mine = plans[lo:lo + batch_size]
        tokens, loss, pos, seg = _build_rows([(self.train[d], row) for d, row in mine], self.seq_len, self.pad_id)
        counts = np.bincount(dom, minlength=len(self.domains))
        placed = sum(n for _, row in plans for _, n in row)
        self.last_batch = {**{f"rows/{d}": float(counts[i]) for i, d in enumerate(self.domains)},
                           "fill": placed / float(len(plans) * (self.seq_len + 1)),
                           "trained_fraction": float(loss.mean()) if loss.size else 0.0}
        self.step += 1
        return _batch(tokens, loss, pos, seg, dom[lo:lo + batch_size])

    def epochs(self) -> Dict[str, float]:
        """Passes over each domain's training conversations so far."""
        return {d: (s.cursor - (s.pending is not None)) / s.n for d, s in self._streams.items()}

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per domain, over the global batches so far: rows, conversations and tokens placed, truncated
        conversations."""
        return {d: dict(c) for d, c in self.counters.items()}

    def num_samples(self, split: str = "train") -> Dict[str, int]:
        """Conversations per domain in a split ("train" or "valid")."""
        table = self.train if split == "train" else self.valid
        return {d: len(table[d]) if d in table else 0 for d in self.domains}

    # -- validation ---------------------------------------------------------------------------------------------
    def validation_batches(self, domain: str, batch_size: int,
                           max_batches: Optional[int] = None) -> Iterator[SFTBatch]:
        """The domain's held-out conversations in file order, packed (or padded) like training rows, in batches of
        `batch_size` rows (the last may be smaller); the same batches on every call and every rank."""
        if domain not in self.domains:
            raise KeyError(f"unknown domain {domain!r}; domains: {self.domains}")
        if domain not in self.valid:
            raise ValueError(f"domain {domain!r} has no held-out chat data (valid_prefixes / the manifest's 'valid')")
        ds = self.valid[domain]
        di = self.domains.index(domain)
        nxt = iter(range(len(ds)))
        state = {"pending": None}

        def next_pos():
            if state["pending"] is not None:
                p, state["pending"] = state["pending"], None
                return p
            return next(nxt, None)

        done = 0
        while max_batches is None or done < max_batches:
            rows = []
            while len(rows) < batch_size:
                row, back, _ = _plan_row(next_pos, int, lambda doc: int(ds.sizes[doc]), self.seq_len + 1, self.pack)
                state["pending"] = back
                if not row:
                    break
                rows.append((ds, row))
            if not rows:
                return
            tokens, loss, pos, seg = _build_rows(rows, self.seq_len, self.pad_id)
            yield _batch(tokens, loss, pos, seg, np.full(len(rows), di))
            done += 1

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the exact batch order (json-serialisable)."""
        return {"version": _STATE_VERSION, "kind": "sft", "seed": self.seed, "seq_len": self.seq_len,
                "pack": self.pack, "domains": list(self.domains), "step": self.step,
                "cursors": {d: s.cursor for d, s in self._streams.items()},
                "pending": {d: s.pending for d, s in self._streams.items()},
                "weights": dict(self._weights), "weight_history": [[s, dict(w)] for s, w in self.weight_history],
                "conversations": {d: s.n for d, s in self._streams.items()},
                "counters": {d: dict(c) for d, c in self.counters.items()}}

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore a `state_dict()`; refuses one from a different mixture (domains, seed, seq_len, pack, data)."""
        if sd.get("version") != _STATE_VERSION or sd.get("kind") != "sft":
            raise ValueError(f"not an SFT data state of version {_STATE_VERSION} (kind {sd.get('kind')!r}, "
                             f"version {sd.get('version')!r})")
        for key, mine in (("domains", list(self.domains)), ("seed", self.seed), ("seq_len", self.seq_len),
                          ("pack", self.pack), ("conversations", {d: s.n for d, s in self._streams.items()})):
            if sd.get(key) != mine:
                raise ValueError(f"data state does not match this mixture: {key} is {sd.get(key)!r} in the "
                                 f"checkpoint, {mine!r} here")
        self.step = int(sd["step"])
        for d, s in self._streams.items():
            s.cursor = int(sd["cursors"][d])
            p = sd["pending"][d]
            s.pending = None if p is None else int(p)
        self._weights = {d: float(sd["weights"][d]) for d in self.domains}
        self.weight_history = [(int(s), {d: float(v) for d, v in w.items()}) for s, w in sd["weight_history"]]
        self.counters = {d: {k: int(v) for k, v in sd["counters"][d].items()} for d in self.domains}
