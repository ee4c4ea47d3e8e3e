"""Plots of a run (matplotlib, Agg backend, PNG): what megamoe-plot and the trainer's evaluations draw.

- expert_load.png        layer x expert heat-map of the share of (token, slot) assignments each expert received,
                         summed over the training log steps so far (the paper's Figure 8 view of balance)
- routing_by_domain.png  for a few layers, domain x expert heat-maps of the validation routing (Figure 9):
                         specialised experts show up as bright cells in one row
- routing_js.png         the paper's Figure 9: for a few layers, the domain x domain Jensen-Shannon distance of the
                         validation routing (megamoe.divergence; 0 = routed alike, 1 = disjoint experts)
- load_train_vs_eval.png training-time load (router noise on: looks uniform) next to the evaluation-time routing
                         of the last evaluation (no noise; mean over domains): where they differ, the noise hides skew
- token_loss.png         token-level loss: loss by position of each domain's held-out batch at the last evaluation
                         (and the first), and the per-token loss of the logged sample at the first and last rows
- attn_expert_load.png, attn_routing_by_domain.png   the same two views for the attention experts' routers
                         (LLaMA-MoE v2), when the model has attention experts
- loss.png               training loss per step and validation loss per domain at each evaluation
"""

from __future__ import annotations

import json
import os

import numpy as np

from megamoe.divergence import routing_js_distances

__all__ = ["read_metrics", "plot_expert_load", "plot_routing_by_domain", "plot_routing_js", "plot_train_vs_eval_load",
           "plot_token_loss", "plot_losses", "plot_run"]


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


def plot_expert_load(load, path: str, title: str = "expert load (share of routed tokens)", layer_ids=None,
                     layer_label: str = "layer"):
    plt = _plt()
    a = np.asarray(load, dtype=float)
    L, E = a.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * E + 2), max(3, 0.25 * L + 1.5)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0, vmax=max(a.max(), 2.0 / E))
    ax.set_xlabel("expert")
    ax.set_ylabel(layer_label)
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_yticklabels(layer_ids if layer_ids is not None else range(L), fontsize=6 if L > 16 else 8)
    ax.set_title(title + f" (uniform = {1 / E:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing_by_domain(routing: dict, path: str, layers=None, title: str = "routing by domain",
                           layer_label: str = "MoE layer"):
    """routing: domain -> per MoE layer -> expert fractions."""
    plt = _plt()
    doms = [d for d, v in routing.items() if v]
    if not doms:
        return None
    L = len(routing[doms[0]])
    layers = _pick_layers(L, layers)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 0.45 * len(doms) + 1.6), squeeze=False)
    for ax, li in zip(axes[0], layers):
        a = np.asarray([routing[d][li] for d in doms], dtype=float)
        im = ax.imshow(a, aspect="auto", cmap="magma", vmin=0)
        ax.set_title(f"{layer_label} {li}", fontsize=9)
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


def _pick_layers(L: int, layers=None) -> list[int]:
    if layers is not None:
        bad = [li for li in layers if not 0 <= li < L]
        if bad:
            raise ValueError(f"layers: MoE layer {bad[0]} does not exist (the run has {L} MoE layers: 0..{L - 1})")
        return list(layers)
    return sorted({0, L // 2, L - 1}) if L > 2 else list(range(L))


def plot_routing_js(routing: dict, path: str, layers=None, title: str = "routing distance between domains"):
    """Figure 9: per layer, the domain x domain Jensen-Shannon distance of the routing (routing: domain -> per MoE
    layer -> expert fractions). None with fewer than two domains."""
    js = routing_js_distances(routing)
    doms = js["domains"]
    if len(doms) < 2:
        return None
    plt = _plt()
    layers = _pick_layers(len(js["layers"]), layers)
    n = len(doms)
    fig, axes = plt.subplots(1, len(layers), figsize=(0.5 * n * len(layers) + 2.5 * len(layers), 0.5 * n + 2),
                             squeeze=False)
    vmax = max(max(max(row) for row in js["layers"][li]) for li in layers) or 1.0
    for ax, li in zip(axes[0], layers):
        a = np.asarray(js["layers"][li])
        im = ax.imshow(a, cmap="viridis_r", vmin=0, vmax=vmax)
        ax.set_title(f"MoE layer {li}", fontsize=9)
        ax.set_xticks(range(n))
        ax.set_xticklabels(doms, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n))
        ax.set_yticklabels(doms if ax is axes[0][0] else [""] * n, fontsize=7)
        if n <= 8:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if a[i, j] > 0.6 * vmax else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title + " (Jensen-Shannon distance, base 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train_vs_eval_load(train_load, eval_routing: dict, path: str, title: str = ""):
    """Training-time load [L][E] (mean over log steps) beside the evaluation routing (mean over domains), same
    colour scale: router noise spreads training load, evaluation shows the routing a user gets."""
    doms = [d for d, v in eval_routing.items() if v]
    if train_load is None or not doms:
        return None
    plt = _plt()
    tr = np.asarray(train_load, dtype=float)
    ev = np.mean([np.asarray(eval_routing[d], dtype=float) for d in doms], axis=0)
    if tr.shape != ev.shape:
        return None
    L, E = tr.shape
    vmax = max(tr.max(), ev.max(), 2.0 / E)
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4, 0.5 * E + 2), max(3, 0.25 * L + 1.5)), squeeze=False)
    for ax, a, name in ((axes[0][0], tr, "training (with the router's training noise)"),
                        (axes[0][1], ev, f"evaluation (mean of {len(doms)} domains)")):
        im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        spread = float(a.max(1).mean() * E)
        ax.set_title(f"{name}\nmean max share x E = {spread:.2f} (uniform 1)", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        fig.colorbar(im, ax=ax)
    fig.suptitle(title or "expert load: training vs evaluation routing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_token_loss(records: list[dict], path: str):
    """Token-level loss rows (kind "token_loss"): left, the loss by position of each domain's held-out batch at the
    first and the last step that has rows for it; right, the per-token loss of the logged sample (the first
    domain's first row) at its first and last row."""
    rows = [r for r in records if r.get("kind") == "token_loss" and r.get("loss_by_position")]
    if not rows:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    doms = list(dict.fromkeys(r.get("domain", "batch") for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(doms):
        mine = [r for r in rows if r.get("domain", "batch") == d]
        for r, style in ((mine[0], ":"), (mine[-1], "-")) if len(mine) > 1 else ((mine[-1], "-"),):
            y = np.array([np.nan if v is None else v for v in r["loss_by_position"]], dtype=float)
            a1.plot(np.arange(len(y)), y, style, color=colors[i % len(colors)], lw=1,
                    label=f"{d}, step {r['step']}")
    a1.set_xlabel("position in the sequence")
    a1.set_ylabel("mean next-token loss")
    a1.set_title("loss by position (held-out batch)", fontsize=9)
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    first = [r for r in rows if r.get("domain", "batch") == doms[0] and r.get("sample_loss")]
    for r, style in ((first[0], ":"), (first[-1], "-")) if len(first) > 1 else ((first[-1], "-"),):
        y = np.array([np.nan if v is None else v for v in r["sample_loss"]], dtype=float)
        a2.plot(np.arange(len(y)), y, style, lw=0.8, label=f"step {r['step']} (mean {np.nanmean(y):.3f})")
    a2.set_xlabel("token of the logged sample")
    a2.set_ylabel("loss")
    a2.set_title(f"per-token loss of the logged sample ({doms[0]})", fontsize=9)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
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


def plot_run(metrics_path: str, out_dir: str, layers=None) -> list[str]:
    """All plots of a run from its metrics.jsonl (`layers`: the MoE layers of the per-layer figures; default first,
    middle, last); returns the files written."""
    recs = read_metrics(metrics_path)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    loads = [np.asarray(r["expert_load"]) for r in recs if r.get("kind", "train") == "train" and r.get("expert_load")]
    if loads:
        written.append(plot_expert_load(np.mean(loads, axis=0), os.path.join(out_dir, "expert_load.png"),
                                        title=f"expert load, mean of {len(loads)} log steps"))
    evals = [r for r in recs if r.get("kind") == "eval" and r.get("routing_by_domain")]
    if evals:
        last = evals[-1]
        for p in (plot_routing_by_domain(last["routing_by_domain"], os.path.join(out_dir, "routing_by_domain.png"),
                                         layers=layers, title=f"validation routing by domain, step {last['step']}"),
                  plot_routing_js(last["routing_by_domain"], os.path.join(out_dir, "routing_js.png"), layers=layers,
                                  title=f"routing distance between domains, step {last['step']}"),
                  plot_train_vs_eval_load(np.mean(loads, axis=0) if loads else None, last["routing_by_domain"],
                                          os.path.join(out_dir, "load_train_vs_eval.png"),
                                          title=f"expert load: training (mean of {len(loads)} log steps) vs "
                                                f"evaluation at step {last['step']}")):
            if p:
                written.append(p)
    # attention experts (LLaMA-MoE v2): their routers' load and per-domain routing, in figures of their own
    attn = [np.asarray(r["attn_expert_load"]) for r in recs if r.get("kind", "train") == "train"
            and r.get("attn_expert_load")]
    if attn:
        written.append(plot_expert_load(np.mean(attn, axis=0), os.path.join(out_dir, "attn_expert_load.png"),
                                        title=f"attention experts: load of the attention routers, mean of {len(attn)} "
                                              "log steps", layer_label="attention-MoE layer"))
    attn_ev = [r for r in recs if r.get("kind") == "eval" and r.get("attn_routing_by_domain")]
    if attn_ev:
        p = plot_routing_by_domain(attn_ev[-1]["attn_routing_by_domain"],
                                   os.path.join(out_dir, "attn_routing_by_domain.png"),
                                   title=f"attention routers: validation routing by domain, step {attn_ev[-1]['step']}",
                                   layer_label="attention-MoE layer")
        if p:
            written.append(p)
    p = plot_token_loss(recs, os.path.join(out_dir, "token_loss.png"))
    if p:
        written.append(p)
    if recs:
        written.append(plot_losses(recs, os.path.join(out_dir, "loss.png")))
    return written
