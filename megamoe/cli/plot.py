"""`megamoe-plot`: the routing, loss and token-loss plots of a megamoe training run (PNG, matplotlib Agg).

    megamoe-plot runs/quickstart/train              # reads <run>/metrics.jsonl, writes <run>/plots/
    megamoe-plot runs/x/metrics.jsonl --out figs/ --layers 0 15 29

- expert_load.png        layer x expert heat-map of the share of routed (token, slot) assignments, averaged over the
                         training log steps (the paper's Figure 8 view: is the load balanced, which experts starve?)
- routing_by_domain.png  domain x expert heat-maps of the validation routing at the last evaluation, for a few
                         layers (do experts specialise by domain?)
- routing_js.png         Figure 9: the domain x domain Jensen-Shannon distance of that routing per layer
- load_train_vs_eval.png training-time load (router noise on) beside the evaluation routing (no noise)
- token_loss.png         loss by position of the held-out batches, and the logged sample's per-token loss
- loss.png               training loss and per-domain validation loss
The trainer writes the same plots at every evaluation (eval.plots: true). Needs matplotlib (megamoe[plot]).

Exit status: 0 plots written, 1 the metrics file holds nothing to plot, 2 no such metrics file.
"""

from __future__ import annotations

import argparse
import os
import sys

from megamoe.cli.args import nonnegative_int
from megamoe.cli.exit import run_command
from megamoe.console import add_log_level, setup_logging
from megamoe.errors import InputError
from megamoe.training import plots

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (holding metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", help="output directory (default: <run>/plots)")
    p.add_argument("--layers", type=nonnegative_int, nargs="+",
                   help="MoE layers of the per-layer figures (default: first, middle, last)")
    add_log_level(p)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging(a.log_level)
    path = a.run if a.run.endswith(".jsonl") else os.path.join(a.run, "metrics.jsonl")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(path)), "plots")

    def go():
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such metrics file (a training run's out_dir holds metrics.jsonl)")
        try:
            written = plots.plot_run(path, out, layers=a.layers)
        except ValueError as e:  # a --layers index the run does not have
            raise InputError(f"--{e}") from None
        if not written:
            print(f"megamoe-plot: {path} has no records to plot", file=sys.stderr)
            return 1
        for w in written:
            print(w)
        return 0
    return run_command("megamoe-plot", go, outputs=[out])


if __name__ == "__main__":
    sys.exit(main())
