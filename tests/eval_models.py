"""Tiny models for the evaluation tests: a random LLaMA with the embedded SmolLM2 tokenizer (real text in, real
tokens out), its LLaMA-MoE conversion (our shards, TP1 and TP2xEP2) and the Mixtral export of the same model.

Weights are drawn wider than usual (std 0.3, norms in [0.5, 1.5]) so that the next-token distributions are far from
uniform: choices of a multiple-choice task then differ by much more than float rounding, and accuracies compare
exactly across implementations."""

from __future__ import annotations

import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megamoe import interchange as convert
from megamoe import parallel
from megamoe.eval.sampling import Sampler
from megamoe.eval.scorer import Scorer
from megamoe.eval.textgen import TextGenerator
from megamoe.formats.embedded import materialize_smollm2

VOCAB = 49152  # SmolLM2's tokenizer


def tiny_dense(path: str, seed: int = 0, **kw) -> str:
    tok_dir = materialize_smollm2()
    torch.manual_seed(seed)
    c = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)
    c.update(kw)
    m = LlamaForCausalLM(LlamaConfig(**c)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    m.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if os.path.isfile(os.path.join(tok_dir, f)):
            shutil.copyfile(os.path.join(tok_dir, f), os.path.join(path, f))
    return path


def tiny_models(root: str) -> dict:
    """{"dense": HF LLaMA dir, "shards": our shards (TP1), "shards_tp2ep2": the same model at TP2xEP2,
    "mixtral": the Mixtral export}: 4 experts, top-2, softmax-top-k router, score scale 2 (folded into the export)."""
    out = {"dense": tiny_dense(os.path.join(root, "dense"))}
    out["shards"] = os.path.join(root, "shards")
    convert.hf_to_moe(out["dense"], out["shards"], num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                      score_scale=2.0, method="random", seed=3, progress=False)
    out["shards_tp2ep2"] = os.path.join(root, "shards_tp2ep2")
    convert.reshard_checked(out["shards"], out["shards_tp2ep2"], tp=2, ep=2, progress=False)
    out["mixtral"] = os.path.join(root, "mixtral")
    convert.moe_to_hf(out["shards"], out["mixtral"], fmt="mixtral", progress=False)
    return out


def ensure_world():
    """The parallel layout in force, else a world of one (module-scoped fixtures run before the `world` fixture)."""
    return parallel.current() or parallel.initialize()


def cached_tiny_models(tmp_path_factory) -> dict:
    """tiny_models() built once per pytest session (under its base temp directory), shared by the eval tests."""
    ensure_world()
    root = tmp_path_factory.getbasetemp() / "eval_tiny_models"
    done = root / "done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        tiny_models(str(root))
        done.write_text("ok")
    return {k: str(root / k) for k in ("dense", "shards", "shards_tp2ep2", "mixtral")}


ENGINE_PAIRS = [("The capital of France is", " Paris"), ("def add(a, b):\n    return", " a + b"),
                ("", "An empty context.")]


def engine_requests(lm):
    """The lm-eval engine on a few requests: (Scorer.score of ENGINE_PAIRS, 8 greedy tokens after a prompt)."""
    sc = Scorer(lm, batch_size=2)
    scores = sc.score([sc.encode_pair(c, x) for c, x in ENGINE_PAIRS])
    gen = TextGenerator(lm, Sampler()).generate_ids(lm.tokenizer.encode("Once upon a time"), 8)
    return scores, gen
