"""Distances between routing distributions: the Jensen-Shannon distance of LLaMA-MoE's Figure 9 (how differently two
data domains are routed at a layer), in one place for the trainer's plots, `megamoe-plot` and the construction
reports.

    js_distance(p, q)                       # two distributions over experts (any non-negative weights; normalised)
    names, D = js_distance_matrix({"code": p_code, "web": p_web, ...})        # [n, n], symmetric, zero diagonal
    routing_js_distances(routing_by_domain) # {"domains": [...], "layers": [[n x n] per MoE layer]}

Definitions (p, q normalised to sum 1; 0 log 0 = 0; logarithms base 2 so that the values lie in [0, 1]):

    M       = (p + q) / 2
    JSD     = KL(p || M) / 2 + KL(q || M) / 2,     KL(p || M) = sum_i p_i log2(p_i / M_i)
    JS dist = sqrt(JSD)                            (a metric; 0 for equal routing, 1 for disjoint experts)

`scipy.spatial.distance.jensenshannon(p, q, base=2)` computes the same distance (the tests compare). Plain numpy,
no megamoe imports: every layer may use it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["js_divergence", "js_distance", "js_distance_matrix", "routing_js_distances"]


def _normalise(p, what: str) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{what}: expected non-negative finite weights, got {a.tolist()}")
    s = a.sum()
    if s <= 0:
        raise ValueError(f"{what}: the weights sum to 0 (no tokens routed)")
    return a / s


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    nz = p > 0                  # 0 log 0 = 0; m > 0 wherever p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / m[nz])))


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two distributions of the same length."""
    a, b = _normalise(p, "p"), _normalise(q, "q")
    if a.shape != b.shape:
        raise ValueError(f"distributions over {a.size} and {b.size} experts")
    m = (a + b) / 2
    return max(0.0, min(1.0, _kl(a, m) / 2 + _kl(b, m) / 2))


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """sqrt(js_divergence(p, q)): the Jensen-Shannon distance, a metric in [0, 1]."""
    return math.sqrt(js_divergence(p, q))


def js_distance_matrix(dists: Mapping[str, Sequence[float]]) -> tuple[list[str], np.ndarray]:
    """(names, D) with D[i, j] = js_distance(dists[names[i]], dists[names[j]]) for every pair."""
    names = list(dists)
    n = len(names)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = js_distance(dists[names[i]], dists[names[j]])
    return names, d


def routing_js_distances(routing_by_domain: Mapping[str, Sequence[Sequence[float]]]) -> dict:
    """Per MoE layer, the domain x domain Jensen-Shannon distances of the routing (domain -> per layer -> the share
    of (token, slot) assignments each expert received, as the trainer's evaluation and megamoe-eval report it).
    Domains without routing (None, or no tokens) are left out."""
    doms = [d for d, v in routing_by_domain.items() if v]
    if not doms:
        return {"domains": [], "layers": []}
    n_layers = {len(routing_by_domain[d]) for d in doms}
    if len(n_layers) != 1:
        raise ValueError(f"routing of {sorted(n_layers)} layers across domains")
    layers = []
    for li in range(n_layers.pop()):
        _, d = js_distance_matrix({dom: routing_by_domain[dom][li] for dom in doms})
        layers.append(d.tolist())
    return {"domains": doms, "layers": layers}
