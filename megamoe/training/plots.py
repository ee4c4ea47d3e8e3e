"""Plots of a run (matplotlib, Agg backend, PNG): what tools/plot_routing.py and the trainer's evaluations draw.

- expert_load.png        layer x expert heat-map of the share of (token, slot) assignments each expert received,
                         summed over the training log steps so far (the paper's Figure 8 view of balance)
- routing_by_domain.png  for a few layers, domain x expert heat-maps of the validation routing (Figure 9):
                         specialised experts show up as bright cells in one row
- loss.png               training loss per step and validation loss per domain at each evaluation
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["read_metrics", "plot_expert_load", "plot_routing_by_domain", "plot_losses", "plot_run"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
    return out


def plot_expert_load(load, path: str, title: str = "expert load (share of routed tokens)", layer_ids=None):
    plt = _plt()
    a = np.asarray(load, dtype=float)
    L, E = a.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * E + 2), max(3, 0.25 * L + 1.5)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0, vmax=max(a.max(), 2.0 / E))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_yticklabels(layer_ids if layer_ids is not None else range(L), fontsize=6 if L > 16 else 8)
    ax.set_title(title + f" (uniform = {1 / E:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing_by_domain(routing: dict, path: str, layers=None, title: str = "routing by domain"):
    """routing: domain -> per MoE layer -> expert fractions."""
    plt = _plt()
    doms = [d for d, v in routing.items() if v]
    if not doms:
        return None
    L = len(routing[doms[0]])
    if layers is None:
        layers = sorted({0, L // 2, L - 1}) if L > 2 else list(range(L))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 0.45 * len(doms) + 1.6), squeeze=False)
    for ax, li in zip(axes[0], layers):
        a = np.asarray([routing[d][li] for d in doms], dtype=float)
        im = ax.imshow(a, aspect="auto", cmap="magma", vmin=0)
        ax.set_title(f"MoE layer {li}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(len(doms)))
        ax.set_yticklabels(doms if ax is axes[0][0] else [""] * len(doms), fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(records: list[dict], path: str):
    plt = _plt()
    train = [(r["step"], r["loss"]) for r in records if r.get("kind", "train") == "train"
             and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="0.4", lw=1)
    doms = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("eval/") and k.endswith("/loss")})
    for d in doms:
        pts = [(r["step"], r[f"eval/{d}/loss"]) for r in evals if f"eval/{d}/loss" in r]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"valid {d}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(metrics_path: str, out_dir: str) -> list[str]:
    """All plots of a run from its metrics.jsonl; returns the files written."""
    recs = read_metrics(metrics_path)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    loads = [np.asarray(r["expert_load"]) for r in recs if r.get("kind", "train") == "train" and r.get("expert_load")]
    if loads:
        written.append(plot_expert_load(np.mean(loads, axis=0), os.path.join(out_dir, "expert_load.png"),
                                        title=f"expert load, mean of {len(loads)} log steps"))
    evals = [r for r in recs if r.get("kind") == "eval" and r.get("routing_by_domain")]
    if evals:
        p = plot_routing_by_domain(evals[-1]["routing_by_domain"], os.path.join(out_dir, "routing_by_domain.png"),
                                   title=f"validation routing by domain, step {evals[-1]['step']}")
        if p:
            written.append(p)
    if recs:
        written.append(plot_losses(recs, os.path.join(out_dir, "loss.png")))
    return written
