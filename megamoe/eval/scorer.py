"""Log-likelihoods of token continuations with our model: the engine of the lm-evaluation-harness backend (and of
anything else that scores text), with no lm_eval import.

    sc = Scorer(load_model(path), batch_size=8)
    sc.score([(context_ids, continuation_ids), ...])     # -> [(sum log p(continuation | context), is_greedy)]
    sc.rolling(token_ids)                                 # -> sum log p over the whole sequence (rolling windows)
    sc.encode_pair("Question: ...\\nAnswer:", " Paris")    # -> (context_ids, continuation_ids), lm_eval's split

What a request means (lm_eval's `hf` backend computes the same, which the tests check):

    input   = (context + continuation)[-(max_length + 1):][:-1]       (truncated from the left)
    logp    = log_softmax(logits(input)) in fp32, over the full vocabulary (vocab shards gathered under TP)
    score   = sum_{j} logp[len(input) - len(cont) + j, cont[j]]
    greedy  = argmax logp[len(input) - len(cont) + j] == cont[j] for every j

Requests are sorted longest first and batched with right padding (causal attention: a padded position never changes
an earlier one; for a router with a capacity, padding tokens take part in the capacity like any token: use
batch_size=1 to score each request alone). Rolling log-likelihood (perplexity of a whole document) splits the tokens
into windows of max_length predictions: window k predicts tokens[p:p+w] with the context tokens[p+w-max_length-1:p]
(one token for a full window; the first window is conditioned on the prefix token, BOS or else EOS), which is
lm_eval's `get_rolling_token_windows(..., context_len=1)` + `make_disjoint_window`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

__all__ = ["Scorer", "full_logits", "gather_vocab", "rolling_windows"]


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] vocabulary shard -> [..., V] on every tensor-parallel rank."""
    if ps.get_tensor_model_parallel_world_size() > 1:
        return gather_from_tensor_model_parallel_region(logits.contiguous())
    return logits


@torch.no_grad()
def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids -> [B, S, V] fp32 logits over the full vocabulary (the TP shards gathered)."""
    return gather_vocab(model(ids).logits).float()


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together predict every token of `tokens` once (module docstring)."""
    out = []
    for p in range(0, len(tokens), max_length):
        w = min(max_length, len(tokens) - p)
        ctx = [prefix_token] if p == 0 else tokens[max(0, p + w - max_length - 1):p]
        out.append((ctx, tokens[p:p + w]))
    return out


class Scorer:
    """Scores requests with a LoadedModel (megamoe.eval.load). `max_length` defaults to the model's
    max_position_embeddings (as lm_eval's hf backend)."""

    def __init__(self, lm, batch_size: int = 1, max_length: int | None = None):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or lm.cfg.max_position_embeddings)
        self.vocab_size = lm.cfg.vocab_size

    # ---- tokens ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """The tokenizer's ids of `text`, with its own default for special tokens (add_special_tokens=None), and no
        second BOS when the text already starts with it."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and text.startswith(bos):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(text, **kw)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Trailing spaces of the context move to the continuation; the whole string is encoded and split after
        len(encode(context)) tokens. An empty context becomes the prefix token."""
        if not context:
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- scoring ----
    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, V] fp32 log-probabilities of the next token."""
        return F.log_softmax(full_logits(self.model, ids.to(self.lm.device)), dim=-1)

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """[(context ids, continuation ids)] -> [(log-likelihood, is_greedy)] in the order given."""
        L = self.max_length
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation (lm_eval hands the prefix token for an "
                                 "empty context)")
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0] + requests[i][1]),
                                                            tuple(requests[i][0] + requests[i][1])))
        out: list = [None] * len(requests)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            inps = [(requests[i][0] + requests[i][1])[-(L + 1):][:-1] for i in idx]
            width = max(len(x) for x in inps)
            batch = torch.zeros(len(inps), width, dtype=torch.long)
            for r, x in enumerate(inps):
                batch[r, :len(x)] = torch.tensor(x)
            logp = self.logprobs(batch).cpu()
            for r, i in enumerate(idx):
                cont = torch.tensor(requests[i][1])
                n = len(inps[r])
                lp = logp[r, n - len(cont):n]
                out[i] = (float(lp.gather(1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
        return out

    def rolling(self, tokens: list[int]) -> float:
        """Sum of log p over every token of `tokens` (module docstring)."""
        if not tokens:
            return 0.0
        return sum(s for s, _ in self.score(rolling_windows(tokens, self.prefix_token_id, self.max_length)))
