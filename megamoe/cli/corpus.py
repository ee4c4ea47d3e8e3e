"""`megamoe-corpus`: build a real multi-domain corpus from text every machine has (no download), in seconds.

    megamoe-corpus local --out corpus/ --max-mb 8
    -> corpus/<domain>/train.jsonl, corpus/<domain>/valid.jsonl, corpus/corpus.json

      Pre-training text. Domains: code (stdlib sources), docstrings, reference (help() topics) always; legal (license
      texts) and manpages where the machine has them (megamoe.data.corpus).

    megamoe-corpus chat --out chat/ --general 2000 --math 2000
    -> chat/general/{train,valid}.jsonl, chat/math/{train,valid}.jsonl, chat/corpus.json

      SFT conversations. general: questions about Python standard-library functions, classes and methods answered by
      their docstrings, and about commands answered by their man pages' NAME lines; math: synthetic arithmetic and
      word problems with worked answers. Some are multi-turn or open with a system message; held-out questions never
      appear in training (megamoe.data.chat_corpus).

Both are deterministic for a seed. Then tokenize:

    megamoe-preprocess --per-domain corpus/ --output-dir tokenized/ --tokenizer <tokenizer>
    megamoe-preprocess --per-domain chat/ --output-dir chat_tok/ --format chat --tokenizer <hf dir>

Exit status: 0 success, 2 bad input (an unknown domain, a fraction outside (0, 1), too little text on this machine
for a domain), 3 the output cannot be written. tools/build_local_corpus.py and tools/build_chat_corpus.py are the
same two commands.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.cli.args import nonnegative_int, positive_float, positive_int
from megamoe.cli.exit import run_command
from megamoe.console import add_log_level, setup_logging
from megamoe.data.chat_corpus import CHAT_DOMAINS, build_chat_corpus
from megamoe.data.corpus import DOMAIN_SOURCES, build_local_corpus
from megamoe.errors import DataError

__all__ = ["main", "build_parser", "local_main", "chat_main"]


def _fraction(text: str) -> float:
    v = positive_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {v:g}")
    return v


def _add_local(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=positive_float, default=8.0, help="cap on each domain's training text (MB)")
    p.add_argument("--valid-fraction", type=_fraction, default=0.05, help="share of documents held out")
    p.add_argument("--seed", type=nonnegative_int, default=1234)
    p.add_argument("--domains", nargs="+", choices=sorted(DOMAIN_SOURCES), help="only these domains")
    add_log_level(p)


def _add_chat(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--general", type=positive_int, default=2000, help="training conversations of the general domain")
    p.add_argument("--math", type=positive_int, default=2000, help="training conversations of the math domain")
    p.add_argument("--valid-fraction", type=_fraction, default=0.1,
                   help="held-out conversations per domain, as a fraction of the training ones (at least 8)")
    p.add_argument("--man-share", type=_fraction, default=0.25, help="share of general items from man pages")
    p.add_argument("--seed", type=nonnegative_int, default=1234)
    p.add_argument("--domains", nargs="+", choices=CHAT_DOMAINS, help="only these domains")
    add_log_level(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe-corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{local,chat}")
    _add_local(sub.add_parser("local", help="pre-training text: one JSONL domain per source of this machine",
                              description=build_local_corpus.__doc__))
    _add_chat(sub.add_parser("chat", help="SFT conversations: general (docstrings, man pages) and math",
                             description=build_chat_corpus.__doc__))
    return p


def _run(a) -> int:
    setup_logging(a.log_level)

    def go():
        try:
            if a.cmd == "local":
                build_local_corpus(a.out, max_mb=a.max_mb, valid_fraction=a.valid_fraction, seed=a.seed,
                                   domains=a.domains)
            else:
                build_chat_corpus(a.out, sizes={"general": a.general, "math": a.math},
                                  valid_fraction=a.valid_fraction, seed=a.seed, man_share=a.man_share,
                                  domains=a.domains)
        except RuntimeError as e:  # too little source text on this machine for a domain
            raise DataError(str(e)) from None
        print(a.out)
    return run_command(f"megamoe-corpus {a.cmd}", go, outputs=[a.out])


def main(argv=None) -> int:
    return _run(build_parser().parse_args(argv))


def local_main(argv=None) -> int:
    """tools/build_local_corpus.py: `megamoe-corpus local` with the same flags."""
    return main(["local", *(sys.argv[1:] if argv is None else argv)])


def chat_main(argv=None) -> int:
    """tools/build_chat_corpus.py: `megamoe-corpus chat` with the same flags."""
    return main(["chat", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
