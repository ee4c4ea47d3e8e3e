#!/usr/bin/env python3
"""Tokens/s of megamoe-eval (per-domain perplexity) and of generation, against transformers on the same model in the
same run: our LlamaMoEModel loaded from our shards vs transformers' MixtralForCausalLM loaded from the Mixtral
export of those shards.

  tools/bench_eval.py                          # SmolLM2-135M -> 8 experts top-2 (the quickstart's shape), fp32
  tools/bench_eval.py --source tiny            # a tiny random model: checks the script in seconds
  tools/bench_eval.py --shards ckpt/moe --hf hf/mixtral --dtype bfloat16 --json

Perplexity: the same [batch, seq_len+1] batches (text of Python's own documentation, tokenized with the model's
tokenizer) through megamoe.eval.perplexity.domain_perplexity (our loss path: the fused lm_head + cross entropy on a
CPU) and through transformers (logits, then cross entropy); the two losses are printed side by side (they agree up
to the tokens whose top-k expert choice flips at a near-tie of the router scores under float rounding). Generation:
greedy, `--new-tokens` after each prompt, our TextGenerator over the KV cache vs transformers'
generate(use_cache=True); the generated tokens must be the same. Each measurement is repeated `--repeats` times,
alternating the two implementations, and the best time is kept (a shared machine only ever slows a run down).
Figures are only meaningful on an otherwise idle machine: the output records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megamoe import interchange as convert
from megamoe import parallel
from megamoe.eval.load import load_model
from megamoe.eval.perplexity import domain_perplexity
from megamoe.eval.sampling import Sampler
from megamoe.eval.textgen import TextGenerator
from megamoe.formats.embedded import materialize_smollm2

PROMPTS = ["The standard library of Python", "def fibonacci(n):", "Once upon a time"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["smollm2", "tiny"], default="smollm2",
                   help="model to convert when --shards/--hf are not given")
    p.add_argument("--shards", help="our shard directory (with --hf: its Mixtral export)")
    p.add_argument("--hf", help="the Mixtral export of --shards")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _tiny(path: str) -> str:
    src = materialize_smollm2()
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                     bos_token_id=1, eos_token_id=2))
    m.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(os.path.join(src, f), os.path.join(path, f))
    return path


def _models(a, tmp: str) -> tuple[str, str]:
    if a.shards and a.hf:
        return a.shards, a.hf
    if a.shards or a.hf:
        sys.exit("bench_eval: --shards and --hf go together (the shards and their Mixtral export)")
    dense = materialize_smollm2() if a.source == "smollm2" else _tiny(os.path.join(tmp, "dense"))
    shards, hf = os.path.join(tmp, "moe"), os.path.join(tmp, "mixtral")
    convert.hf_to_moe(dense, shards, num_experts=a.experts, top_k=a.top_k, router="mixtral", gate_network="linear",
                      method="random", seed=0, progress=False)
    convert.moe_to_hf(shards, hf, fmt="mixtral", progress=False)
    return shards, hf


def _batches(tok, a) -> list:
    """[B, S+1] batches of Python's reference documentation (pydoc_data: every installation has it), tokenized with
    the model's tokenizer."""
    ids = tok("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]
    n, S = a.batches * a.batch_size, a.seq_len
    if len(ids) < n * S + 1:
        sys.exit(f"bench_eval: {len(ids)} tokens of text, {n * S + 1} needed: lower --batches/--seq-len")
    rows = torch.tensor([ids[i * S:i * S + S + 1] for i in range(n)])
    return list(rows.split(a.batch_size))


def _best(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    parallel.initialize()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        shards, hf_dir = _models(a, tmp)
        ours = load_model(shards, dtype=a.dtype)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dt).eval()
        batches = _batches(ours.tokenizer, a)
        ntok = sum(b[:, 1:].numel() for b in batches)

        def ppl_ours():
            return domain_perplexity(ours.model, {"text": iter(batches)})[0]["text"]["loss"]

        def ppl_hf():
            return domain_perplexity(hf, {"text": iter(batches)}, vocab_size=ours.cfg.vocab_size)[0]["text"]["loss"]

        ppl_ours()  # warm-up (kernels, allocator) for both, outside the timed repeats
        ppl_hf()
        t_ours, t_hf, loss_ours, loss_hf = float("inf"), float("inf"), None, None
        for _ in range(a.repeats):  # alternate: a burst of load on the machine hits both
            t, loss_ours = _best(ppl_ours, 1)
            t_ours = min(t_ours, t)
            t, loss_hf = _best(ppl_hf, 1)
            t_hf = min(t_hf, t)

        gen = TextGenerator(ours, Sampler(), use_cache=True)
        prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
        pad = ours.tokenizer.eos_token_id

        def gen_ours():
            return [gen.generate_ids(p, a.new_tokens) for p in prompts]

        @torch.no_grad()
        def gen_hf():
            out = []
            for p in prompts:
                g = hf.generate(torch.tensor([p]), max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=pad,
                                min_new_tokens=a.new_tokens)
                out.append(g[0, len(p):].tolist())
            return out

        g_ours, g_hf = gen_ours(), gen_hf()
        # generation: a fixed number of tokens on both sides (EOS ignored by transformers via min_new_tokens; ours
        # stops at EOS, so count what each actually produced)
        tg_ours, tg_hf = float("inf"), float("inf")
        for _ in range(a.repeats):
            t, g_ours = _best(gen_ours, 1)
            tg_ours = min(tg_ours, t)
            t, g_hf = _best(gen_hf, 1)
            tg_hf = min(tg_hf, t)
        n_ours, n_hf = sum(map(len, g_ours)), sum(map(len, g_hf))
        same = all(x == y[:len(x)] for x, y in zip(g_ours, g_hf))
    res = {"model": {"layers": ours.cfg.num_layers, "hidden": ours.cfg.hidden_size,
                     "experts": ours.cfg.moe.num_experts if ours.cfg.moe else 0,
                     "top_k": ours.cfg.moe.top_k if ours.cfg.moe else 0, "vocab": ours.cfg.vocab_size,
                     "source": a.shards or a.source},
           "dtype": a.dtype, "threads": torch.get_num_threads(), "repeats": a.repeats,
           "perplexity": {"tokens": ntok, "seq_len": a.seq_len, "batch_size": a.batch_size,
                          "megamoe_tokens_per_s": ntok / t_ours, "transformers_tokens_per_s": ntok / t_hf,
                          "speedup": t_hf / t_ours, "loss_megamoe": loss_ours, "loss_transformers": loss_hf},
           "generation": {"prompts": len(PROMPTS), "new_tokens": a.new_tokens,
                          "megamoe_tokens_per_s": n_ours / tg_ours, "transformers_tokens_per_s": n_hf / tg_hf,
                          "speedup": (n_ours / tg_ours) / (n_hf / tg_hf), "same_tokens": same},
           "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        p, g = res["perplexity"], res["generation"]
        print(f"model: {res['model']}, {a.dtype}, {res['threads']} threads")
        print(f"perplexity  megamoe {p['megamoe_tokens_per_s']:9.0f} tok/s   transformers "
              f"{p['transformers_tokens_per_s']:9.0f} tok/s   x{p['speedup']:.2f}   "
              f"loss {p['loss_megamoe']:.5f} / {p['loss_transformers']:.5f}")
        print(f"generation  megamoe {g['megamoe_tokens_per_s']:9.1f} tok/s   transformers "
              f"{g['transformers_tokens_per_s']:9.1f} tok/s   x{g['speedup']:.2f}   same tokens: {g['same_tokens']}")
        print(f"load average before {load0[0]:.1f}, after {res['loadavg_after'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
