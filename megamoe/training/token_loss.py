"""Token-level loss: the next-token cross entropy of every position of a batch, the loss by position, and the per-token
loss of one logged sample -- the "token-level loss tracking" of LLaMA-MoE's monitoring, in metrics.jsonl.

    r = token_losses(model, batch)          # batch: [B, S+1] token ids, (tokens, loss_mask), or an SFTBatch
    r["loss"]               the batch loss: sum_{b,t} CE[b,t] m[b,t] / sum_{b,t} m[b,t]   (m = loss mask, 1 for text)
    r["loss_by_position"]   [S]: sum_b CE[b,t] m[b,t] / sum_b m[b,t]   (None where no row is scored at t)
    r["tokens_by_position"] [S]: sum_b m[b,t]
    r["sample_loss"]        [S]: CE[0,t] of the first row (None where m[0,t] = 0)
    r["sample_ids"]         [S]: the first row's target token ids (decode them to read which tokens are hard)
    r["model_loss"]         the model's own lm_loss of the same forward (its cross-entropy path)

so sum_t loss_by_position[t] * tokens_by_position[t] / sum_t tokens_by_position[t] = loss = model_loss.

CE[b,t] = -log softmax(logits[b,t])[labels[b,t]], computed with megatron's vocab-parallel cross entropy on the
logits of one forward (the local vocabulary shard under TP: every rank gets the full values), in eval mode (no
router noise, no dropout; nothing drawn from the RNG, so training continues exactly as without it). The trainer
writes rows `{"kind": "token_loss", "step", "domain", ...}` every `log.token_loss_interval` steps for a fixed
held-out batch (the first validation batch of the first domain) and, at every evaluation, for each domain's first
validation batch (docs/training.md, Telemetry); megamoe.training.plots.plot_token_loss draws them.
"""

from __future__ import annotations

import logging

import torch
from megatron.core import tensor_parallel as tpar

from megamoe.eval.perplexity import split_batch
from megamoe.training.evaluate import _eval_domains
from megamoe.training.optim import unwrap

log = logging.getLogger("megamoe.train")

__all__ = ["token_losses", "TokenLossProbe", "ROUND"]

ROUND = 5  # decimals kept in metrics.jsonl (a float32 loss has about 7 significant digits)


def _r(x: float) -> float:
    return round(float(x), ROUND)


@torch.no_grad()
def token_losses(model, batch, device=None) -> dict:
    """Per-token cross entropy of `batch` under `model` (a LlamaMoEModel, or megatron DDP around one); see the module
    docstring for the fields. Call it on every rank of a model-parallel group (the forward has collectives)."""
    m = unwrap(model)
    tokens, mask, extra = split_batch(batch)
    device = device or next(m.parameters()).device
    tokens = tokens.to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = (torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.to(device).float())
    extra = {k: v.to(device) for k, v in extra.items()}
    was_training = m.training
    m.eval()
    try:
        out = m(inputs, labels=labels, loss_mask=mask, return_logits=True, **extra)
    finally:
        m.train(was_training)
    # megatron's cross entropy works in place on its input: a copy of the [S, B, V/tp] logits
    ce = tpar.vocab_parallel_cross_entropy(out.logits.transpose(0, 1).float().clone(),
                                           labels.transpose(0, 1).contiguous()).transpose(0, 1)  # [B, S]
    scored = ce * mask
    n_pos = mask.sum(0)
    by_pos = scored.sum(0) / n_pos.clamp_min(1)
    total = mask.sum()
    return {"loss": _r(scored.sum() / total.clamp_min(1)), "model_loss": _r(out.lm_loss),
            "tokens": int(total), "rows": int(tokens.shape[0]),
            "loss_by_position": [_r(v) if n > 0 else None for v, n in zip(by_pos.tolist(), n_pos.tolist())],
            "tokens_by_position": [int(n) for n in n_pos.tolist()],
            "sample_loss": [_r(v) if k > 0 else None for v, k in zip(ce[0].tolist(), mask[0].tolist())],
            "sample_ids": labels[0].tolist()}


class TokenLossProbe:
    """The trainer's held-out batches for token-loss rows: the first validation batch (`batch_size` rows) of each
    evaluated domain, read once and kept (the same tokens every time, so rows of different steps compare)."""

    def __init__(self, data, batch_size: int, device=None):
        self.data, self.batch_size, self.device = data, batch_size, device
        self._batches: dict = {}
        self._missing: set = set()

    def _batch(self, domain: str):
        if domain not in self._batches and domain not in self._missing:
            try:
                self._batches[domain] = next(iter(self.data.validation_batches(domain, self.batch_size, 1)))
            except (StopIteration, KeyError, ValueError) as e:  # no held-out data for this domain
                log.info("token-level loss: no validation batch for domain %r (%s)", domain, e)
                self._missing.add(domain)
        return self._batches.get(domain)

    def rows(self, model, first_only: bool = False) -> list[dict]:
        """[{"domain", **token_losses(...)}] for the first domain with validation data (`first_only`) or every one."""
        out = []
        for d in _eval_domains(self.data, None):
            b = self._batch(d)
            if b is None:
                continue
            out.append({"domain": d, **token_losses(model, b, self.device)})
            if first_only:
                break
        return out
