"""Validation: loss and perplexity per domain, how each domain is routed (for the paper's Figure 9), and chat samples.

    results, routing = evaluate(model, data, batch_size=4, batches=8)
    results["code"] == {"loss": 2.31, "ppl": 10.1, "tokens": 8192}
    routing["code"] == per MoE layer, the fraction of (token, slot) assignments each expert received
    samples = chat_samples(model, data, tokenizer_path, max_new_tokens=48)     # chat data, greedy

Text data: perplexity = exp(mean next-token cross entropy over all validation tokens of the domain). Chat data
(SFTBatch, megamoe.data.SFTMixture): the loss on responses only, sum(CE * loss_mask) / sum(loss_mask) over the
domain's held-out conversations, packed (or padded) like training rows with their position and segment ids;
"tokens" counts the trained (assistant) tokens. The balance loss is excluded. Every rank evaluates the same batches
(the numbers are identical across ranks). The computation is megamoe.eval.perplexity.domain_perplexity, shared with
megamoe-eval and the quickstart.

`chat_samples`: for the first held-out conversation(s) of each domain, the prompt is its tokens up to the first
assistant token (the rendered system/user turns and the assistant header, exactly as the chat template wrote them),
the reference the first assistant reply; the model's greedy reply (megamoe.model.generate, KV cache) stops at the
reply's end-of-turn token or the tokenizer's EOS.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from megamoe.data.tokenizers import load_tokenizer
from megamoe.eval.perplexity import domain_perplexity
from megamoe.model.generate import generate
from megamoe.training.optim import unwrap

log = logging.getLogger("megamoe.train")

__all__ = ["evaluate", "chat_samples"]


def _eval_domains(data, domains):
    if domains is not None:
        return list(domains)
    valid = getattr(data, "valid", None)
    if isinstance(valid, dict):          # SFTMixture: only domains with held-out chat data
        return [d for d in data.domains if d in valid]
    return list(data.domains)


def evaluate(model, data, batch_size: int, batches: int, device=None, domains=None):
    """Per-domain loss/perplexity and routing: megamoe.eval.perplexity.domain_perplexity on the validation batches."""
    batches_of = {d: data.validation_batches(d, batch_size, batches) for d in _eval_domains(data, domains)}
    return domain_perplexity(model, batches_of, device=device)


def _first_run(mask: np.ndarray) -> tuple[int, int] | None:
    """[start, end) of the first run of 1s."""
    on = np.flatnonzero(mask)
    if on.size == 0:
        return None
    start = int(on[0])
    off = np.flatnonzero(mask[start:] == 0)
    return start, start + (int(off[0]) if off.size else len(mask) - start)


def chat_samples(model, data, tokenizer_path: str | None, max_new_tokens: int = 48, per_domain: int = 1,
                 device=None) -> list[dict]:
    """Greedy replies to the first `per_domain` held-out prompts of every domain of an SFTMixture (see the module
    docstring): [{"domain", "prompt", "reference", "completion", "prompt_tokens", "completion_tokens"}]. Text is
    decoded with the tokenizer at `tokenizer_path` (the manifest's); token ids are kept when it cannot be loaded."""
    tok = None
    if tokenizer_path:
        try:
            tok = load_tokenizer(tokenizer_path).hf_tokenizer
        except Exception as e:  # noqa: BLE001 - samples are a report: ids instead of text
            log.warning("chat samples: tokenizer %s not loadable (%s); logging token ids", tokenizer_path, e)

    def text(ids):
        return tok.decode(ids, skip_special_tokens=False) if tok is not None else " ".join(map(str, ids))

    m = unwrap(model)
    device = device or next(m.parameters()).device
    out = []
    for d in _eval_domains(data, None):
        ds = data.valid[d]
        for i in range(min(per_domain, len(ds))):
            ids, mask = ds[i]
            run = _first_run(np.asarray(mask))
            if run is None or run[0] == 0:
                continue
            prompt, ref = ids[:run[0]].tolist(), ids[run[0]:run[1]].tolist()
            eos = sorted({int(ref[-1])} | ({int(tok.eos_token_id)} if tok is not None and
                                           tok.eos_token_id is not None else set()))
            g = generate(m, torch.tensor([prompt], device=device), max_new_tokens, eos_token_id=eos)
            new = g.new_tokens[0]
            out.append({"domain": d, "prompt": text(prompt), "reference": text(ref), "completion": text(new),
                        "prompt_tokens": len(prompt), "completion_tokens": len(new)})
    return out
