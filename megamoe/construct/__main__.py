"""Compute expert partitions for a dense HF LLaMA and write them to a directory.

    megamoe-construct --src DIR --out PARTS --method gradient --experts 8 \\
        --calib-jsonl web=web.jsonl code=code.jsonl --seq-len 2048 --token-budget 131072 \\
        --clusters domain --gate-init centroids

writes PARTS/partition/layers.{i}.mlp.json (+ construction.json, centroids.safetensors); convert with
`megamoe-convert hf-to-moe --partitions PARTS ...`. Calibration tokens come from `--calib-jsonl [DOMAIN=]FILE`
(tokenized with the model's tokenizer unless `--tokenizer`) or `--calib-prefix [DOMAIN=]PREFIX` (megatron .bin/.idx).
The flags are spelled as in `megamoe-convert hf-to-moe`; the former `--model`, `--num-experts`, `--layers 0 2`,
`--jsonl`, `--data-prefix` still work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megamoe.console import add_log_level, setup_logging
from megamoe.construct.calib_data import tokens_from_indexed, tokens_from_jsonl
from megamoe.construct.partition import METHODS, PartitionError
from megamoe.construct.pipeline import ConstructionSpec, construct, write_construction


def _pairs(items):
    named = [i.split("=", 1) for i in items]
    if all(len(p) == 2 for p in named):
        return {k: v for k, v in named}
    if any(len(p) == 2 for p in named):
        raise PartitionError("--calib-jsonl/--calib-prefix: name every source DOMAIN=PATH or none")
    return list(items)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,2,5, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megamoe.construct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # flag names as megamoe-convert hf-to-moe spells them; the former spellings stay as hidden aliases
    ap.add_argument("--src", dest="model", help="dense HF LLaMA directory (safetensors) (required)")
    ap.add_argument("--model", dest="model", help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True, help="directory to write partition/ into")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--experts", dest="num_experts", type=int, metavar="E", help="experts per layer (required)")
    ap.add_argument("--num-experts", dest="num_experts", type=int, help=argparse.SUPPRESS)  # the former spelling
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moe-layers", dest="layers", type=_int_list, default=None,
                    help="comma-separated MoE layer indices (default: all)")
    ap.add_argument("--layers", dest="layers", type=int, nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--gate-init", default="random", choices=("random", "centroids"))
    ap.add_argument("--proj", default="up_proj", choices=("up_proj", "gate_proj"))
    ap.add_argument("--metric", default="l2", choices=("l2", "cos"))
    ap.add_argument("--activation", default="swiglu", choices=("swiglu", "gate"))
    ap.add_argument("--kernel", default="abs", choices=("abs", "square", "binary"))
    ap.add_argument("--clusters", default="kmeans", choices=("kmeans", "domain", "centroids"))
    ap.add_argument("--expert-size", type=int, default=None)
    ap.add_argument("--residual-size", type=int, default=0)
    ap.add_argument("--routed-rule", default="greedy", choices=("greedy", "share"))
    ap.add_argument("--calib-jsonl", dest="jsonl", action="extend", nargs="+", default=[], metavar="[DOMAIN=]FILE",
                    help="JSONL calibration text; DOMAIN=FILE pairs give per-domain token clusters")
    ap.add_argument("--jsonl", dest="jsonl", action="extend", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--calib-prefix", dest="data_prefix", action="extend", nargs="+", default=[],
                    metavar="[DOMAIN=]PREFIX", help="megatron .bin/.idx dataset prefix(es)")
    ap.add_argument("--data-prefix", dest="data_prefix", action="extend", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", default=None, help="tokenizer for --calib-jsonl (default: the model directory)")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--domain-key", default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--token-budget", type=int, default=65536)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--offload-dir", default=None, help="gradient methods: keep stored hidden states on disk here")
    ap.add_argument("--store-dtype", default=None, choices=("float32", "bfloat16"),
                    help="gradient methods: dtype of the stored hidden states")
    add_log_level(ap)
    args = ap.parse_args(argv)
    missing = [f for f, v in (("--src", args.model), ("--experts", args.num_experts)) if v is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    setup_logging(args.log_level, fmt="%(asctime)s %(message)s")

    try:
        spec = ConstructionSpec(method=args.method, num_experts=args.num_experts, seed=args.seed, layers=args.layers,
                                gate_init=args.gate_init, proj=args.proj, metric=args.metric,
                                activation=args.activation, kernel=args.kernel, clusters=args.clusters,
                                expert_size=args.expert_size, residual_size=args.residual_size,
                                routed_rule=args.routed_rule, micro_batch=args.micro_batch, dtype=args.dtype,
                                offload_dir=args.offload_dir, store_dtype=args.store_dtype).validate()
        data = None
        if args.jsonl and args.data_prefix:
            raise PartitionError("--calib-jsonl/--calib-prefix: give one kind of calibration source")
        if args.jsonl:
            data = tokens_from_jsonl(_pairs(args.jsonl), args.tokenizer or args.model, seq_len=args.seq_len,
                                     token_budget=args.token_budget, text_key=args.text_key,
                                     domain_key=args.domain_key)
        elif args.data_prefix:
            src = _pairs(args.data_prefix)
            data = tokens_from_indexed(src, seq_len=args.seq_len, token_budget=args.token_budget)
        if data is not None:
            logging.info("calibration: %d sequences x %d tokens%s", data.ids.shape[0], data.ids.shape[1],
                         f", domains {sorted(set(data.domains))}" if data.domains else "")
        result = construct(args.model, spec, data)
        paths = write_construction(os.path.abspath(args.out), result, spec)
    except (ValueError, FileNotFoundError) as e:     # PartitionError, ConfigError, CalibrationDataError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    dup = sum(result.report["duplicated"].values())
    print(f"{args.method}: {len(result.partitions)} layers in {result.report['seconds']}s; duplicated neurons "
          f"{dup}; wrote {os.path.dirname(paths[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
