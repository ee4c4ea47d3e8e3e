"""`megamoe-train`: the training command. `torchrun --nproc_per_node=N -m megamoe.train --config run.yaml`.

It reads the config (YAML + overrides) and hands it to megamoe.training.trainer.run, which sets up the process
groups and runs the loop (setup -> step -> log -> evaluate -> save; see that module).

Command line:
    megamoe-train --config configs/quickstart.yaml [--resume] [--set optim.lr=1e-4 --set train.steps=50]
                  [--train.steps 50 --optim.lr=1e-4]          (any dotted field, as --set does)

Writes under `out_dir`: config.yaml, metrics.jsonl, tensorboard/, plots/, checkpoints/, final_model/ (our shard
format, for `megamoe-convert moe-to-hf`), summary.json. SIGTERM saves a checkpoint at the next step boundary and
exits 0; `--resume` continues from checkpoints/latest and reproduces the uninterrupted run's losses.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.cli.exit import run_command
from megamoe.console import add_log_level, setup_logging
from megamoe.parallel import collective_errors
from megamoe.training.config import load_train_config
from megamoe.training.trainer import run

__all__ = ["main", "parse_args"]


# ---------------------------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="megamoe-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML training config: a file, or the name of a bundled one (quickstart.yaml, "
                                    "tiny.yaml, llama2_7b_2of8_cpt.yaml, ...: configs/ of megamoe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint.dir>/latest")
    add_log_level(p)
    args, rest = p.parse_known_args(argv)
    overrides = list(args.set)
    i = 0
    while i < len(rest):  # --a.b value / --a.b=value
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok:
            p.error(f"unrecognized argument {tok!r} (config fields are written --section.field VALUE)")
        key = tok[2:]
        if "=" in key:
            overrides.append(key)
            i += 1
        else:
            if i + 1 >= len(rest):
                p.error(f"{tok} needs a value")
            overrides.append(f"{key}={rest[i + 1]}")
            i += 2
    args.overrides = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)

    def go():
        cfg = load_train_config(args.config, args.overrides)
        if args.resume:
            cfg.checkpoint.resume = True
        with collective_errors():  # a peer hung past MEGAMOE_DIST_TIMEOUT or died: DistributedError, exit 4
            run(cfg)
    # bad config or data: one line naming the field / file, exit 2 (megamoe/errors.py); a bug keeps its traceback
    return run_command("megamoe-train", go)


if __name__ == "__main__":
    sys.exit(main())
