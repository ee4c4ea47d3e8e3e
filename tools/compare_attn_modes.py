#!/usr/bin/env python3
"""token_sparse against full_kv attention experts on a converted dense model: per-domain perplexity before and after
the same short continual pre-training (issue 15: which mode is the default; docs/attention_moe.md has the figures).

    python tools/compare_attn_modes.py --out runs/attn_modes                       # SmolLM2-135M, A=9 top-6
    python tools/compare_attn_modes.py --out runs/x --attn-experts 3 --attn-top-k 2 --steps 40

Steps: the embedded SmolLM2-135M-Instruct (or --hf-dir); the local multi-domain corpus (megamoe.data.
build_local_corpus) tokenized per domain; per-domain perplexity of the dense model; then for each mode the same
attention-expert model (dense MLPs, so only the attention differs; q/o the dense heads, KV heads copied into the
sibling experts, the same random router of std --router-std for both modes) is evaluated, trained --steps steps with
megamoe-train's run() on configs/quickstart.yaml's recipe (same data order, same seed), and evaluated again on the
same validation batches. Results: <out>/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("token_sparse", "full_kv")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hf-dir", help="a dense GQA LLaMA directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--attn-experts", type=int, default=9)
    p.add_argument("--attn-top-k", type=int, default=6)
    p.add_argument("--attn-scale", type=float, default=None,
                   help="default k: each chosen expert at its dense weight under a uniform router")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches of --batch sequences per domain")
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=1227)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    import torch

    from megamoe import parallel
    from megamoe.config import AttnMoEConfig
    from megamoe.data import DomainMixture, build_local_corpus
    from megamoe.data.preprocess import PreprocessConfig, preprocess_domains
    from megamoe.formats.embedded import materialize_smollm2
    from megamoe.formats.hf_llama import load_hf_llama
    from megamoe.formats.layout import expand_kv_heads
    from megamoe.formats.shards import save_shards
    from megamoe.model import LlamaMoEModel
    from megamoe.training.config import load_train_config, resolve_config_path
    from megamoe.training.evaluate import evaluate
    from megamoe.training.trainer import run

    os.makedirs(a.out, exist_ok=True)
    hf_dir = os.path.abspath(a.hf_dir) if a.hf_dir else materialize_smollm2()
    corpus_dir, tok_dir = os.path.join(a.out, "corpus"), os.path.join(a.out, "tokenized")
    if not os.path.isfile(os.path.join(corpus_dir, "corpus.json")):
        build_local_corpus(corpus_dir, max_mb=a.corpus_mb, seed=a.seed)
    manifest = os.path.join(tok_dir, "manifest.json")
    if not os.path.isfile(manifest):
        preprocess_domains(corpus_dir, tok_dir, hf_dir, PreprocessConfig(workers=1, progress=False))
    mix = DomainMixture.from_manifest(manifest, weights="uniform", seq_len=a.seq_len, seed=a.seed)
    parallel.initialize()
    dense_cfg, dense_sd = load_hf_llama(hf_dir, dtype=torch.float32)

    def ppl(model):
        res, _ = evaluate(model, mix, a.batch, a.eval_batches, torch.device("cpu"))
        return {d: round(r["ppl"], 4) for d, r in res.items()}

    results = {"model": hf_dir, "attn_experts": a.attn_experts, "attn_top_k": a.attn_top_k, "steps": a.steps,
               "tokens_per_step": a.batch * a.seq_len, "lr": a.lr, "router_std": a.router_std,
               "load_average_start": os.getloadavg()}
    t0 = time.time()
    dense = LlamaMoEModel(dense_cfg)
    dense.load_state_dict(dense_sd, strict=True)
    results["dense"] = ppl(dense)
    del dense
    print(f"dense: {results['dense']} ({time.time() - t0:.0f} s)", flush=True)
    split = a.attn_experts // dense_cfg.kv_heads
    gen = torch.Generator().manual_seed(a.seed)
    routers = {i: torch.randn(a.attn_experts, dense_cfg.hidden_size, generator=gen) * a.router_std
               for i in range(dense_cfg.num_layers)}
    for mode in a.modes.split(","):
        t0 = time.time()
        cfg = dataclasses.replace(dense_cfg, attn_moe=AttnMoEConfig(
            num_experts=a.attn_experts, top_k=a.attn_top_k, mode=mode,
            score_scale=a.attn_scale if a.attn_scale is not None else float(a.attn_top_k))).validate()
        state = dict(dense_sd)
        for i in range(cfg.num_layers):
            for x in ("k_proj", "v_proj"):
                n = f"layers.{i}.attn.{x}.weight"
                state[n] = expand_kv_heads(dense_sd[n], dense_cfg.kv_heads, split).contiguous()
            state[f"layers.{i}.attn.router.gate.weight"] = routers[i].clone()
        shards = os.path.join(a.out, f"init_{mode}")
        if a.steps and not os.path.isdir(shards):
            save_shards(shards, cfg, state)
        model = LlamaMoEModel(cfg)
        model.load_state_dict(state, strict=True)
        before = ppl(model)
        del model
        print(f"{mode} before: {before} ({time.time() - t0:.0f} s)", flush=True)
        if a.steps == 0:
            results[mode] = {"before": before}
            continue
        overrides = [f"out_dir={os.path.join(a.out, 'train_' + mode)}", f"init.path={shards}",
                     f"data.manifest={manifest}", f"data.seq_len={a.seq_len}", f"data.seed={a.seed}",
                     f"train.steps={a.steps}", f"train.global_batch_tokens={a.batch * a.seq_len}",
                     f"train.micro_batch_size={a.batch}", f"train.seed={a.seed}", "train.precision=fp32",
                     f"optim.lr={a.lr}", f"optim.warmup_steps={max(2, a.steps // 10)}", "eval.interval=0",
                     "eval.at_end=false", "eval.plots=false", "checkpoint.interval=0",
                     f"log.interval={max(1, a.steps // 10)}", "log.tensorboard=false"]
        summary = run(load_train_config(resolve_config_path("quickstart.yaml"), overrides))
        from megamoe.formats.shards import ShardedCheckpoint, load_shards
        final = os.path.join(a.out, "train_" + mode, "final_model")
        model = LlamaMoEModel(ShardedCheckpoint(final).config)
        model.load_state_dict(load_shards(final), strict=True)
        after = ppl(model)
        del model
        results[mode] = {"before": before, "after": after,
                         "train_loss_last": summary["losses"][max(summary["losses"])],
                         "seconds": round(time.time() - t0, 1)}
        print(f"{mode} after {a.steps} steps: {after} ({time.time() - t0:.0f} s)", flush=True)
    results["load_average_end"] = os.getloadavg()
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    doms = list(results["dense"])
    print("\n| model | " + " | ".join(doms) + " |\n|---|" + "---|" * len(doms))
    print("| dense | " + " | ".join(f"{results['dense'][d]:.2f}" for d in doms) + " |")
    for mode in a.modes.split(","):
        for when in ("before", "after")[:1 if a.steps == 0 else 2]:
            print(f"| {mode} {when} | " + " | ".join(f"{results[mode][when][d]:.2f}" for d in doms) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
