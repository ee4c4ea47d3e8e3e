"""Text generation from a LlamaMoEModel: greedy or sampled, batched prompts of different lengths, KV cache.

    from megamoe.model.generate import generate
    out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, eos_token_id=2)    # ragged: left-padded here
    out = generate(model, ids [B, P], 32, attention_mask=mask [B, P], do_sample=True, temperature=0.7,
                   top_k=50, top_p=0.9, seed=0)
    out.sequences    int64 [B, P + n]   prompt (with its padding) + generated tokens; after EOS: pad_token_id
    out.new_tokens   list of B lists    each row's generated tokens, up to and including its EOS

Prompts: a [B, P] tensor with an optional `attention_mask` (1 = real token, 0 = padding; left padding, right
padding or holes all work) or a list of token-id lists. Each row's real tokens get position ids 0, 1, ... and
segment 1, padding gets segment 0, so no real token attends to padding (megamoe/layers/attention.py) and RoPE sees
the same positions as for the unpadded prompt; every new token takes the next position of its row.

Decoding: a prefill forward over the prompts, then one forward of one token per row per step, each attending over
the `KVCache` (megamoe/layers/kv_cache.py). `use_cache=False` recomputes the full sequence at every step instead
(the reference the cache is tested against). Next token: argmax of the last logits (greedy), or a sample from
softmax(logits / temperature) restricted to the top_k tokens and then to the smallest set whose probability
reaches top_p (HF's warpers, in that order), drawn by a torch.Generator seeded with `seed`. Rows stop at an
EOS token (`eos_token_id`: an int or a list); generation ends when every row has stopped or after
`max_new_tokens`.

Parallelism: under tensor parallelism every rank calls generate with the same prompts; logits are gathered over
the vocabulary shards, so every rank picks the same token (the sampling generator is seeded identically). Sequence
parallelism is refused by the model's forward (a cache needs whole sequences). The model is switched to eval mode
(no router noise) for the call and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tpar

from megamoe.layers.kv_cache import KVCache

__all__ = ["generate", "Generation", "pad_prompts", "next_token_logits_filter"]


@dataclass
class Generation:
    sequences: torch.Tensor                  # [B, P + n] int64
    new_tokens: list[list[int]] = field(default_factory=list)
    prompt_length: int = 0                   # P (columns of prompt, padding included)


def pad_prompts(prompts, pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token-id lists -> (ids [B, P] left-padded with pad_token_id, attention_mask [B, P])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def next_token_logits_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] with the tokens outside the top_k, then outside the top_p nucleus, set to -inf (the highest
    one always kept)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs           # probability of the strictly better tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _full_logits(local: torch.Tensor) -> torch.Tensor:
    """[B, V/tp] vocabulary shard -> [B, V] on every tensor-parallel rank."""
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        return tpar.gather_from_tensor_model_parallel_region(local.contiguous())
    return local


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
             use_cache: bool = True) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt (see the module docstring)."""
    m = _unwrap(model)
    dev = next(m.parameters()).device
    eos = [] if eos_token_id is None else ([int(eos_token_id)] if isinstance(eos_token_id, int)
                                           else [int(e) for e in eos_token_id])
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("generate: attention_mask goes with a [B, P] tensor of prompts, not a list")
        input_ids, attention_mask = pad_prompts(input_ids, pad, dev)
    input_ids = input_ids.to(dev).long()
    B, P = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev).long()
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("generate: a prompt without any real token (attention_mask all 0)")
    if max_new_tokens < 0 or (do_sample and temperature <= 0):
        raise ValueError("generate: max_new_tokens must be >= 0 and temperature > 0 when sampling")
    positions = (mask.cumsum(1) - 1).clamp(min=0) * mask           # real tokens 0, 1, ...; padding 0
    segments = mask.int()
    next_pos = mask.sum(1)                                          # [B]: the position of each row's next token
    gen = None
    if do_sample:
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed) if seed is not None else torch.initial_seed())

    was_training = m.training
    m.eval()
    cache = KVCache(len(m.layers)) if use_cache else None
    seqs, pos_all, seg_all = input_ids, positions, segments
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    try:
        step_ids, step_pos, step_seg = input_ids, positions, segments
        # the prompt's next-token logits sit at each row's last real token: the last column unless some row
        # ends in padding (right padding), then that row's own last real column
        last_real = P - 1 - torch.flip(mask, [1]).argmax(1)                 # [B]
        ragged_end = bool((last_real != P - 1).any())
        for t in range(max_new_tokens):
            which = "last" if t > 0 or not ragged_end else True
            if use_cache:
                out = m(step_ids, position_ids=step_pos, segment_ids=step_seg, cache=cache, return_logits=which)
            else:
                out = m(seqs, position_ids=pos_all, segment_ids=seg_all, return_logits=which)
            local = out.logits[:, -1] if which == "last" else out.logits[torch.arange(B, device=dev), last_real]
            logits = _full_logits(local).float()                            # [B, V]
            if do_sample:
                logits = next_token_logits_filter(logits / temperature, top_k, top_p)
                tok = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
            else:
                tok = logits.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            for b in range(B):
                if not done[b]:
                    new_tokens[b].append(int(tok[b]))
            if eos:
                done = done | torch.isin(tok, torch.tensor(eos, device=dev))
            step_ids, step_pos = tok[:, None], next_pos[:, None]
            step_seg = torch.ones(B, 1, dtype=torch.int32, device=dev)
            seqs = torch.cat([seqs, step_ids], dim=1)
            pos_all = torch.cat([pos_all, step_pos], dim=1)
            seg_all = torch.cat([seg_all, step_seg], dim=1)
            next_pos = next_pos + 1
            if bool(done.all()):
                break
    finally:
        m.train(was_training)
    return Generation(sequences=seqs, new_tokens=new_tokens, prompt_length=P)
