"""Validation: loss and perplexity per domain, and how each domain is routed (for the paper's Figure 9).

    results, routing = evaluate(model, data, batch_size=4, batches=8)
    results["code"] == {"loss": 2.31, "ppl": 10.1, "tokens": 8192}
    routing["code"] == per MoE layer, the fraction of (token, slot) assignments each expert received

Perplexity = exp(mean next-token cross entropy over all validation tokens of the domain), the balance loss excluded.
Every rank evaluates the same batches (the numbers are identical across ranks).
"""

from __future__ import annotations

import math

import torch

from megamoe.training.metrics import RouterStatsAccumulator
from megamoe.training.optim import unwrap

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, data, batch_size: int, batches: int, device=None, domains=None):
    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = device or next(m.parameters()).device
    results, routing = {}, {}
    try:
        for d in domains or data.domains:
            tot, ntok = 0.0, 0
            acc = RouterStatsAccumulator()
            for b in data.validation_batches(d, batch_size, batches):
                b = b.to(device)
                out = m(b[:, :-1], labels=b[:, 1:], return_logits=False)
                n = b[:, 1:].numel()
                tot += float(out.lm_loss) * n
                ntok += n
                acc.add(out.router_stats)
            loss = tot / max(1, ntok)
            results[d] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": ntok}
            s = acc.summary()
            routing[d] = s["expert_load"] if s else None
    finally:
        m.train(was_training)
    return results, routing
