#!/usr/bin/env python3
"""Build the embedded chat corpus for SFT from text every machine has (no download), in seconds.

    python tools/build_chat_corpus.py --out chat/ --general 2000 --math 2000
    -> chat/general/{train,valid}.jsonl, chat/math/{train,valid}.jsonl, chat/corpus.json

general: questions about Python standard-library functions, classes and methods answered by their docstrings, and
about commands answered by their man pages' NAME lines (where the machine has man pages); math: synthetic
arithmetic and word problems with worked answers. Some conversations are multi-turn or open with a system message.
Held-out questions never appear in training. Deterministic for a seed. Then tokenize it with

    python tools/preprocess_data.py --per-domain chat/ --output-dir chat_tok/ --format chat --tokenizer <hf dir>

The library code is `megamoe.data.chat_corpus`.
"""

import argparse
import sys

from megamoe.data.chat_corpus import CHAT_DOMAINS, build_chat_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--general", type=int, default=2000, help="training conversations of the general domain")
    p.add_argument("--math", type=int, default=2000, help="training conversations of the math domain")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="held-out conversations per domain, as a fraction of the training ones (at least 8)")
    p.add_argument("--man-share", type=float, default=0.25, help="share of general items from man pages")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--domains", nargs="+", choices=CHAT_DOMAINS, help="only these domains")
    a = p.parse_args(argv)
    try:
        build_chat_corpus(a.out, sizes={"general": a.general, "math": a.math}, valid_fraction=a.valid_fraction,
                          seed=a.seed, man_share=a.man_share, domains=a.domains)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
