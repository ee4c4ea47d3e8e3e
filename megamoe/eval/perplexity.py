"""Per-domain perplexity: token-weighted next-token cross entropy, the routers' balance loss excluded.

    results, routing = domain_perplexity(model, {"code": batches, ...})
    results["code"] == {"loss": 2.31, "ppl": 10.1, "tokens": 8192}
    routing["code"] == per MoE layer, the fraction of (token, slot) assignments each expert received (None: dense)

    loss_d = sum over the domain's scored label positions of -log p(label | prefix)  /  number of those positions
    ppl_d  = exp(loss_d)

A batch is a LongTensor [B, S+1] (inputs [:, :-1], labels [:, 1:], every position scored), a pair
(tokens [B, S+1], loss_mask [B, S]) or an object with `.tokens` and `.loss_mask` (and, when the model's forward takes
them, `.position_ids` / `.segment_ids`: megamoe.data.sft.SFTBatch). Our LlamaMoEModel computes the loss itself (the
fused lm_head + cross entropy on a CPU, megatron's vocab-parallel cross entropy under TP); any other model (a
transformers model) is scored from its logits. Under TP/EP every rank evaluates the same batches and gets the same
numbers. The trainer's evaluation, the quickstart and `megamoe-eval` all come here.

Data sources for `megamoe-eval`:
- `manifest_batches`: the per-domain validation split of a `megamoe-preprocess --per-domain` output
  (megamoe.data.DomainMixture.from_manifest: held-out `valid` files, else megatron's 98/2 split), seq_len+1-token
  samples as in training;
- `jsonl_batches`: a JSONL file tokenized with the model's tokenizer; each line's text (key `text`) gets the EOS
  appended, as preprocessing does, the documents of a domain (key `domain`, else the file's name) are concatenated and
  cut into consecutive samples of seq_len+1 tokens that overlap by one (every token after the first is scored once;
  the last sample is padded and masked).

Token ids at or past the model's vocabulary (a dataset made with another tokenizer) are a DataError naming the dataset
and the largest id.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from megamoe.data.blend import DomainMixture
from megamoe.data.jsonl import parse_json_object
from megamoe.errors import DataError
from megamoe.model import LlamaMoEModel

__all__ = ["domain_perplexity", "manifest_batches", "jsonl_batches", "split_batch", "PPL_CAP"]

PPL_CAP = 50.0  # exp() of a larger loss overflows nothing useful: ppl is reported as exp(min(loss, 50))


def _unwrap(model):
    while hasattr(model, "module"):  # megatron DDP / torch DDP wrappers
        model = model.module
    return model


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(tokens [B, S+1], loss_mask [B, S] or None, extra forward kwargs) of any batch form (module docstring)."""
    if torch.is_tensor(batch):
        return batch, None, {}
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1], {}
    extra = {k: getattr(batch, k) for k in ("position_ids", "segment_ids") if getattr(batch, k, None) is not None}
    return batch.tokens, batch.loss_mask, extra


def _accepted(model, extra: dict) -> dict:
    if not extra:
        return extra
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in extra.items() if k in params}


def _score(model, ours: bool, tokens, mask, extra) -> tuple[float, int, list, list]:
    """(summed next-token NLL over the scored label positions, their number, the MLP and the attention routers'
    statistics)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    n = int(mask.sum()) if mask is not None else labels.numel()
    if n == 0:
        return 0.0, 0, [], []
    if ours:
        # loss_denominator=1: lm_loss is the sum of the scored positions' cross entropy, not their mean
        out = model(inputs, labels=labels, loss_mask=mask, return_logits=False, loss_denominator=1.0,
                    **_accepted(model, extra))
        return float(out.lm_loss), n, out.router_stats, out.attn_router_stats
    logits = model(input_ids=inputs).logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    if mask is not None:
        nll = nll * mask.reshape(-1).to(nll.dtype)
    return float(nll.sum()), n, [], []


def _check_vocab(tokens: torch.Tensor, vocab_size: int | None, where: str):
    if vocab_size is None:
        return
    top = int(tokens.max())
    if top >= vocab_size or int(tokens.min()) < 0:
        raise DataError(f"{where}: token id {top if top >= vocab_size else int(tokens.min())} is outside the model's "
                        f"vocabulary (0..{vocab_size - 1}): the dataset was tokenized with another tokenizer")


def _expert_load(tpe_sum: list | None):
    if tpe_sum is None:
        return None
    return [(t / t.sum().clamp_min(1e-12)).tolist() for t in tpe_sum]


@torch.no_grad()
def domain_perplexity(model, batches: Mapping[str, Iterable], device=None, vocab_size: int | None = None,
                      where: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """Loss, perplexity and token count per domain, and the routing of each domain (module docstring).

    batches: domain -> iterable of batches (consumed once). vocab_size: check every id against it (default: our
    model's). where: domain -> the dataset's name for error messages."""
    m = _unwrap(model)
    was_training = m.training
    m.eval()
    ours = isinstance(m, LlamaMoEModel)
    if vocab_size is None and ours:
        vocab_size = m.cfg.vocab_size
    device = device or next(m.parameters()).device
    results, routing = {}, {}
    try:
        for d, it in batches.items():
            tot, ntok, tpe, attn_tpe = 0.0, 0, None, None
            for b in it:
                tokens, mask, extra = split_batch(b)
                _check_vocab(tokens, vocab_size, (where or {}).get(d, f"domain {d!r}"))
                tokens = tokens.to(device)
                mask = mask.to(device) if mask is not None else None
                extra = {k: v.to(device) for k, v in extra.items()}
                s, n, stats, attn_stats = _score(m, ours, tokens, mask, extra)
                if stats:
                    t = [st.tokens_per_expert.detach().float().cpu() for st in stats]
                    tpe = t if tpe is None else [x + y for x, y in zip(tpe, t)]
                if attn_stats:   # attention experts (LLaMA-MoE v2): their own routing, per attention-MoE layer
                    t = [st.tokens_per_expert.detach().float().cpu() for st in attn_stats]
                    attn_tpe = t if attn_tpe is None else [x + y for x, y in zip(attn_tpe, t)]
                tot += s
                ntok += n
            loss = tot / max(1, ntok)
            results[d] = {"loss": loss, "ppl": math.exp(min(loss, PPL_CAP)), "tokens": ntok}
            if attn_tpe is not None:
                results[d]["attn_expert_load"] = _expert_load(attn_tpe)
            routing[d] = _expert_load(tpe)
    finally:
        m.train(was_training)
    return results, routing


# ---- data sources -------------------------------------------------------------------------------------------------

def manifest_batches(manifest: str, seq_len: int, batch_size: int, max_batches: int | None = None,
                     domains=None, cache_dir: str | None = None, seed: int = 1234) -> tuple[dict, dict]:
    """({domain: batches of the validation split}, {domain: dataset prefix}) from a preprocessing manifest."""
    if not os.path.isfile(manifest):
        raise DataError(f"{manifest}: no such file (expected a preprocessing manifest.json or a .jsonl file)")
    try:
        mix = DomainMixture.from_manifest(manifest, domains=domains, seq_len=seq_len, seed=seed, cache_dir=cache_dir)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise DataError(f"{manifest}: {e}") from None
    where = {d: mix.valid_prefixes.get(d, mix.prefixes[d]) for d in mix.domains}
    return {d: mix.validation_batches(d, batch_size, max_batches) for d in mix.domains}, where


def _read_jsonl(path: str, text_key: str, domain_key: str) -> dict:
    docs: dict[str, list[str]] = {}
    default = os.path.splitext(os.path.basename(path))[0]
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            obj, err = parse_json_object(raw)
            if err:
                raise DataError(f"{path}:{i}: {err[0]}" + (f" ({err[1]})" if err[1] else ""))
            text = obj.get(text_key)
            if not isinstance(text, str):
                raise DataError(f"{path}:{i}: no string field {text_key!r} (keys: {sorted(obj)[:6]})")
            d = obj.get(domain_key, default)
            docs.setdefault(str(d), []).append(text)
    if not docs:
        raise DataError(f"{path}: no documents")
    return docs


def _samples(stream: np.ndarray, seq_len: int):
    """Consecutive (tokens [S+1], mask [S]) samples of a token stream, overlapping by one token."""
    n = len(stream)
    for lo in range(0, max(1, n - 1), seq_len):
        chunk = stream[lo:lo + seq_len + 1]
        if len(chunk) < 2:
            break
        toks = np.zeros(seq_len + 1, dtype=np.int64)
        toks[:len(chunk)] = chunk
        mask = np.zeros(seq_len, dtype=np.float32)
        mask[:len(chunk) - 1] = 1
        yield toks, mask


def _batched(samples, batch_size: int, max_batches: int | None):
    rows, done = [], 0
    for s in samples:
        rows.append(s)
        if len(rows) == batch_size:
            yield torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))
            rows, done = [], done + 1
            if max_batches is not None and done >= max_batches:
                return
    if rows:
        yield torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def jsonl_batches(path: str, tokenizer, seq_len: int, batch_size: int, max_batches: int | None = None,
                  text_key: str = "text", domain_key: str = "domain") -> tuple[dict, dict]:
    """({domain: batches (tokens, loss_mask)}, {domain: "path (domain d)"}) from a JSONL file (module docstring)."""
    if tokenizer is None:
        raise DataError(f"{path}: a JSONL file needs the model's tokenizer, and the model directory has none "
                        "(pass --tokenizer DIR)")
    docs = _read_jsonl(path, text_key, domain_key)
    eos = tokenizer.eos_token_id
    out, where = {}, {}
    for d in sorted(docs):
        ids = tokenizer(docs[d], add_special_tokens=False)["input_ids"]
        stream = np.fromiter((t for doc in ids for t in (doc + ([eos] if eos is not None else []))), dtype=np.int64)
        out[d] = _batched(_samples(stream, seq_len), batch_size, max_batches)
        where[d] = path if len(docs) == 1 else f"{path} (domain {d!r})"
    return out, where
