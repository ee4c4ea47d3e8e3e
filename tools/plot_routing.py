#!/usr/bin/env python3
"""Routing and loss plots of a megamoe training run (PNG, matplotlib Agg):

    python tools/plot_routing.py runs/quickstart/train            # reads <run>/metrics.jsonl, writes <run>/plots/
    python tools/plot_routing.py runs/x/metrics.jsonl --out figs/ --layers 0 15 29

- expert_load.png        layer x expert heat-map of the share of routed (token, slot) assignments, averaged over the
                         training log steps (the paper's Figure 8: is the load balanced, which experts starve?)
- routing_by_domain.png  domain x expert heat-maps of the validation routing at the last evaluation, for a few
                         layers (Figure 9: do experts specialise by domain?)
- loss.png               training loss and per-domain validation loss
The trainer writes the same plots at every evaluation (eval.plots: true).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (holding metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", help="output directory (default: <run>/plots)")
    p.add_argument("--layers", type=int, nargs="+", help="MoE layers for the per-domain routing figure")
    a = p.parse_args(argv)
    from megamoe.training import plots
    path = a.run if a.run.endswith(".jsonl") else os.path.join(a.run, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"plot_routing: {path}: no such metrics file", file=sys.stderr)
        return 2
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(path)), "plots")
    written = plots.plot_run(path, out)
    if a.layers:
        recs = [r for r in plots.read_metrics(path) if r.get("kind") == "eval" and r.get("routing_by_domain")]
        if recs:
            written.append(plots.plot_routing_by_domain(recs[-1]["routing_by_domain"],
                                                        os.path.join(out, "routing_by_domain.png"), layers=a.layers,
                                                        title=f"validation routing by domain, step {recs[-1]['step']}"))
    if not written:
        print(f"plot_routing: {path} has no records to plot", file=sys.stderr)
        return 1
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
