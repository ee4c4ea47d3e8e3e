#!/usr/bin/env python3
"""Build a real multi-domain JSONL corpus from text every Python installation has (no download).

    python tools/build_local_corpus.py --out corpus/ --max-mb 8
    -> corpus/<domain>/train.jsonl, corpus/<domain>/valid.jsonl, corpus/corpus.json

Domains: code (stdlib sources), docstrings, reference (help() topics) always; legal (license texts) and manpages
where the machine has them. Deterministic for a seed. Then tokenize it with

    python tools/preprocess_data.py --per-domain corpus/ --output-dir tokenized/ --tokenizer <tok>

The library code is `megamoe.data.corpus`.
"""

import argparse
import sys

from megamoe.data.corpus import DOMAIN_SOURCES, build_local_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=float, default=8.0, help="cap on each domain's training text (MB)")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--domains", nargs="+", choices=sorted(DOMAIN_SOURCES), help="only these domains")
    a = p.parse_args(argv)
    try:
        build_local_corpus(a.out, max_mb=a.max_mb, valid_fraction=a.valid_fraction, seed=a.seed, domains=a.domains)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
