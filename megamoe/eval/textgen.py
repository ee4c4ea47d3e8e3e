"""Prompts in, text out: tokenization (with the chat template for instruct models), the token loop, stop strings.

    gen = TextGenerator(load_model(path), Sampler())                  # greedy
    gen.generate(["The capital of France is"], max_new_tokens=32)     # -> ["Paris. ..."]
    gen.generate(["Hi"], chat=True)                                   # the tokenizer's chat template, generation prompt
    gen.generate_ids(prompt_ids, max_new_tokens=8, stop=["\\n"])       # -> new token ids

The token loop (`generate_ids`) runs prompt + generated tokens through the model; it stops at any end-of-sequence id
(the tokenizer's EOS and generation_config.json's eos_token_id), at `max_new_tokens`, or as soon as the decoded new
text contains a stop string (the text returned is cut before it, as lm_eval's backends do). With `use_cache` the
model keeps the keys and values of earlier positions in a KVCache (megamoe.layers.kv_cache, as
megamoe.model.generate does: a prefill forward, then one position per step); without, every step is a full forward
of the whole sequence (the reference the cache is tested against). This loop exists beside
megamoe.model.generate.generate for the stop strings (lm_eval's `until`), which need the decoded text after every
token. Every rank runs the same steps and draws the same tokens (the sampler's generator is seeded), as TP / EP
need.
"""

from __future__ import annotations

import torch

from megamoe.eval.sampling import Sampler
from megamoe.eval.scorer import full_logits, gather_vocab
from megamoe.layers.kv_cache import KVCache
from megamoe.model.generate import pad_prompts

__all__ = ["TextGenerator", "is_instruct", "INSTRUCT_MARKERS"]

INSTRUCT_MARKERS = ("instruct", "chat", "sft", "-it")


def is_instruct(lm) -> bool:
    """A chat template in the tokenizer, and an instruct-tuned model by name: the directory (or, for our shards, the
    source it was converted from) names one of INSTRUCT_MARKERS."""
    tok = lm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        return False
    names = [lm.path]
    src = getattr(lm, "source_path", None)
    if src:
        names.append(src)
    return any(m in n.lower() for n in names for m in INSTRUCT_MARKERS)


class TextGenerator:
    def __init__(self, lm, sampler: Sampler | None = None, use_cache: bool = True):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.sampler = sampler or Sampler()
        self.use_cache = use_cache
        self.eos_ids = set(lm.eos_ids)

    def prompt_ids(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if not chat:
            return self.tokenizer.encode(prompt)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _hit_stop(self, new: list[int], stop) -> bool:
        if not stop:
            return False
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        return any(s and s in text for s in stop)

    @torch.no_grad()
    def generate_ids(self, prompt: list[int], max_new_tokens: int, stop=None) -> list[int]:
        """New token ids after `prompt` (module docstring); the stopping EOS id is not included."""
        device = self.lm.device
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        new: list[int] = []
        step = _CachedSteps(self.model, ids) if self.use_cache else None
        for _ in range(max_new_tokens):
            logits = step.next_logits() if step is not None else full_logits(self.model, ids)[:, -1]
            tok = int(self.sampler(logits)[0])
            if tok in self.eos_ids:
                break
            new.append(tok)
            if self._hit_stop(new, stop):
                break
            if step is not None:
                step.append(tok)
            else:
                ids = torch.cat([ids, ids.new_tensor([[tok]])], dim=1)
        return new

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop=None) -> list[list[int]]:
        """`generate_ids` for several prompts in one batch over the KV cache: the prompts are left-padded, each row's
        real tokens get positions 0, 1, ... and segment 1, padding segment 0 (no real token attends to it: the
        batch of megamoe.model.generate), so each row decodes as it would alone. A row stops at EOS or a stop
        string; the batch ends when every row has stopped. Without the cache, the rows run one by one."""
        if not self.use_cache or len(prompts) == 1:
            return [self.generate_ids(p, max_new_tokens, stop) for p in prompts]
        dev = self.lm.device
        ids, mask = pad_prompts(prompts, min(self.eos_ids) if self.eos_ids else 0, dev)
        pos, seg = (mask.cumsum(1) - 1).clamp(min=0) * mask, mask.int()
        next_pos = mask.sum(1)
        cache = KVCache(len(self.model.layers))
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new_tokens):
            out = self.model(ids, position_ids=pos, segment_ids=seg, cache=cache, return_logits="last")
            toks = self.sampler(gather_vocab(out.logits[:, -1]).float())
            for b, tok in enumerate(toks.tolist()):
                if done[b]:
                    continue
                if tok in self.eos_ids:
                    done[b] = True
                    continue
                new[b].append(tok)
                done[b] = self._hit_stop(new[b], stop)
            if all(done):
                break
            ids, pos, seg = toks[:, None], next_pos[:, None], torch.ones_like(toks[:, None], dtype=torch.int32)
            next_pos = next_pos + 1
        return new

    def decode(self, new: list[int], stop=None) -> str:
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in stop or ():
            if s:
                text = text.split(s)[0]
        return text

    def generate(self, prompts: list[str], max_new_tokens: int = 128, stop=None, chat: bool = False,
                 system: str | None = None) -> list[str]:
        return [self.decode(self.generate_ids(self.prompt_ids(p, chat, system), max_new_tokens, stop), stop)
                for p in prompts]


class _CachedSteps:
    """Incremental decoding over the model's KV cache (megamoe.layers.kv_cache, the cache megamoe.model.generate
    uses): a prefill forward of the prompt, then one position per step; logits of the last position only."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.pending = model, ids
        self.cache = KVCache(len(model.layers))

    def next_logits(self) -> torch.Tensor:
        out = self.model(self.pending, cache=self.cache, return_logits="last")
        return gather_vocab(out.logits[:, -1]).float()

    def append(self, tok: int):
        self.pending = self.pending.new_tensor([[tok]])
