"""Calibration tokens for expert construction: fixed-length blocks from a JSONL file or a megatron dataset.

    data = tokens_from_jsonl("calib.jsonl", tokenizer="path/to/model", seq_len=2048, token_budget=262144,
                             domain_key="meta.redpajama_set_name")
    data = tokens_from_indexed({"arxiv": "data/arxiv_text_document", "web": "data/cc_text_document"},
                               seq_len=2048, token_budget=262144)
    data.ids       # LongTensor [num_sequences, seq_len]
    data.domains   # one domain name per sequence (None when the data has no domains)

Documents are concatenated (each followed by the end-of-document token, and preceded by BOS when the tokenizer
has one, as llama-moe v1's block packing does) and cut into blocks of `seq_len`; no padding, so every position is
a real token. With domains, each domain is packed separately, so a block never mixes domains and can be clustered
"by source domain". The budget is `num_sequences * seq_len <= token_budget`; for megatron datasets it is split
evenly across the domains. Reading stops as soon as the budget is met, so a huge file costs only what is used.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from megamoe.data.corpus import build_local_corpus
from megamoe.data.tokenizers import load_tokenizer
from megamoe.errors import DataError

__all__ = ["CalibrationData", "tokens_from_jsonl", "tokens_from_indexed", "tokens_from_local_corpus",
           "CalibrationDataError"]


class CalibrationDataError(DataError):
    """Bad calibration input; the message names the field or file."""


@dataclass
class CalibrationData:
    ids: torch.Tensor                 # [N, S] int64
    domains: list | None = None       # N domain names, or None

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def domain_ids(self) -> tuple:
        """(cluster id per sequence int64 [N], sorted domain names)."""
        if self.domains is None:
            raise CalibrationDataError("domains: the calibration data has no domains (give domain_key or a dict of "
                                       "dataset prefixes), or cluster by k-means instead")
        names = sorted(set(self.domains))
        lut = {n: i for i, n in enumerate(names)}
        return np.array([lut[d] for d in self.domains], np.int64), names


def _check_budget(seq_len, token_budget):
    if not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationDataError(f"seq_len: {seq_len!r} must be an integer >= 2")
    if not isinstance(token_budget, int) or token_budget < seq_len:
        raise CalibrationDataError(f"token_budget: {token_budget!r} must be an integer >= seq_len ({seq_len})")
    return token_budget // seq_len


def _lookup(obj, dotted):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


class _Packer:
    def __init__(self, seq_len):
        self.seq_len, self.buf, self.blocks = seq_len, [], []

    def add(self, toks):
        self.buf.extend(toks)
        while len(self.buf) >= self.seq_len:
            self.blocks.append(self.buf[:self.seq_len])
            del self.buf[:self.seq_len]


def tokens_from_jsonl(paths, tokenizer, seq_len: int = 2048, token_budget: int = 65536, text_key: str = "text",
                      domain_key: str | None = None, batch_lines: int = 256) -> CalibrationData:
    """Blocks of `seq_len` tokens from JSONL files (one JSON object per line, text under `text_key`, dotted keys
    allowed). `tokenizer`: an HF tokenizer directory / sentencepiece model path, or a
    `megamoe.data.tokenizers.TextTokenizer`.

    paths: a file, a list of files (read in order until the budget is met), or {domain: file or files}: each domain
    gets an equal share of the budget and its blocks are labelled with the domain. Alternatively `domain_key`
    names a field of each JSON object holding its domain."""
    n_blocks = _check_budget(seq_len, token_budget)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if isinstance(paths, dict):
        if domain_key is not None:
            raise CalibrationDataError("domain_key: give either {domain: path} or domain_key, not both")
        if not paths:
            raise CalibrationDataError("paths: no calibration files given")
        ids, domains = [], []
        share = [n_blocks // len(paths) + (1 if g < n_blocks % len(paths) else 0) for g in range(len(paths))]
        for (dom, pth), want in zip(paths.items(), share):
            if want == 0:
                raise CalibrationDataError(f"token_budget: {token_budget} tokens cannot give each of the "
                                           f"{len(paths)} domains a block of seq_len = {seq_len}")
            part = _jsonl(pth, tok, seq_len, want, text_key, None, batch_lines)
            ids.append(part.ids)
            domains += [str(dom)] * part.ids.shape[0]
        return CalibrationData(torch.cat(ids), domains)
    return _jsonl(paths, tok, seq_len, n_blocks, text_key, domain_key, batch_lines)


def _jsonl(paths, tok, seq_len, n_blocks, text_key, domain_key, batch_lines) -> CalibrationData:
    paths = [paths] if isinstance(paths, str) else list(paths)
    packers: dict = {}
    order: list = []          # (domain, block index) in completion order, to keep the first n_blocks
    total = 0

    def flush(texts, doms):
        nonlocal total
        for t, d, ids in zip(texts, doms, tok.encode_batch(texts)):
            p = packers.setdefault(d, _Packer(seq_len))
            before = len(p.blocks)
            p.add(([tok.bos] if tok.bos is not None else []) + list(ids) + [tok.eod])
            for b in range(before, len(p.blocks)):
                order.append((d, b))
            total = len(order)

    for path in paths:
        if not os.path.isfile(path):
            raise CalibrationDataError(f"{path}: no such calibration file")
        texts, doms = [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                text = _lookup(obj, text_key)
                if not isinstance(text, str):
                    raise CalibrationDataError(f"{path}:{lineno}: no string field {text_key!r} (text_key)")
                dom = None
                if domain_key is not None:
                    dom = _lookup(obj, domain_key)
                    if dom is None:
                        raise CalibrationDataError(f"{path}:{lineno}: no field {domain_key!r} (domain_key)")
                    dom = str(dom)
                texts.append(text)
                doms.append(dom)
                if len(texts) >= batch_lines:
                    flush(texts, doms)
                    texts, doms = [], []
                    if total >= n_blocks:
                        break
        if texts:
            flush(texts, doms)
        if total >= n_blocks:
            break
    if total == 0:
        raise CalibrationDataError(f"{', '.join(paths)}: fewer than seq_len = {seq_len} tokens in all; "
                                   "lower seq_len or add data")
    keep = order[:n_blocks]
    ids = torch.tensor([packers[d].blocks[b] for d, b in keep], dtype=torch.long)
    domains = None if domain_key is None else [d for d, _ in keep]
    return CalibrationData(ids, domains)


def tokens_from_indexed(prefixes, seq_len: int = 2048, token_budget: int = 65536) -> CalibrationData:
    """Blocks from megatron `.bin/.idx` datasets (`megatron.core.datasets.indexed_dataset.IndexedDataset`).

    prefixes: one prefix, a list (no domains), or {domain: prefix} (each domain gets an equal share of the budget).
    Documents are read in order; the end-of-document token is whatever the preprocessing appended.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # megatron's import costs seconds: only here
    n_blocks = _check_budget(seq_len, token_budget)
    if isinstance(prefixes, str):
        groups = [(None, [prefixes])]
    elif isinstance(prefixes, dict):
        groups = [(str(k), [v] if isinstance(v, str) else list(v)) for k, v in prefixes.items()]
    else:
        groups = [(None, list(prefixes))]
    share = [n_blocks // len(groups) + (1 if g < n_blocks % len(groups) else 0) for g in range(len(groups))]
    blocks, domains = [], []
    for (dom, pres), want in zip(groups, share):
        p = _Packer(seq_len)
        for pre in pres:
            if not (os.path.isfile(pre + ".bin") and os.path.isfile(pre + ".idx")):
                raise CalibrationDataError(f"{pre}: no megatron dataset ({pre}.bin and {pre}.idx needed)")
            ds = IndexedDataset(pre, mmap=True)
            for i in range(len(ds)):
                if len(p.blocks) >= want:
                    break
                p.add(np.asarray(ds.get(i)).astype(np.int64).tolist())
            if len(p.blocks) >= want:
                break
        got = p.blocks[:want]
        if not got:
            raise CalibrationDataError(f"{pres[0]}: fewer than seq_len = {seq_len} tokens"
                                       + (f" in domain {dom!r}" if dom else ""))
        blocks.extend(got)
        domains.extend([dom] * len(got))
    ids = torch.tensor(np.array(blocks, dtype=np.int64))
    return CalibrationData(ids, None if groups[0][0] is None else domains)


def tokens_from_local_corpus(tokenizer, seq_len: int = 256, token_budget: int = 16384, seed: int = 1227,
                             max_mb: float = 0.25) -> CalibrationData:
    """Calibration blocks from megamoe.data.build_local_corpus (text that ships with Python: code, docstrings,
    reference, and licences / man pages where the machine has them), one domain per source, the budget split
    evenly: the default calibration set when none is given. Built in a temporary directory (deterministic for a
    given Python installation and seed; about `max_mb` MB of training text per domain is read). Only the corpus's
    *training* documents are used; the validation documents depend on the seed alone (not on max_mb), so with the
    quickstart's seed (1227, the default) the quickstart's validation text is never calibrated on."""
    with tempfile.TemporaryDirectory(prefix="megamoe-calib-") as d:
        doms = sorted(build_local_corpus(d, max_mb=max_mb, seed=seed)["domains"])
        if not doms:
            raise CalibrationDataError(f"{d}: the local corpus has no domains")
        return tokens_from_jsonl({x: os.path.join(d, x, "train.jsonl") for x in doms}, tokenizer, seq_len=seq_len,
                                 token_budget=token_budget)
