"""Router calibration: fit each MoE layer's router on calibration tokens to pick the experts that matter.

The target is the oracle router: for token t, the k experts whose outputs y_te (expert e of the dense FFN's
partition, see ffn.PartitionedFFN) have the largest norm ||y_te||. The oracle needs the experts' outputs, so it
cannot route; it is the upper bound a router can reach at this partition and k.

    W = fit_router(x [N, H], norms [N, E], k)         # [E, H] linear router rows, logits x W^T
    q = routing_quality(x, norms, W, k)               # recall of the oracle's top-k, norm captured, ...

`fit_router(method=...)`:
  "regression"  MoEfication-style: least squares of the per-token standardised log expert norms on x (a closed-form
                ridge solve, [H, H] system); the top-k of the prediction is the routing.
  "rank"        the regression, then a ranking loss: softmax cross entropy of the logits against the oracle's top-k
                set (uniform target over the k experts), full-batch L-BFGS (scipy) from the regression solution.
  "centroids"   / "random": not fitted here (build.router_state draws or copies them); routing_quality evaluates any W.

Logits of the fitted router are x W^T. For an MLP gate (Linear, Tanh, Linear: llama-moe v1) the first matrix gets
W scaled by `temperature` and the second the identity: tanh is monotone, so the top-k choice is the same.

`calibrate_weights(...)` then picks the softmax temperature (a factor on W, which leaves the top-k unchanged) and the
layer's score scale that minimise the layer's output error on calibration tokens, from the per-token quadratic form
of ffn.PartitionedFFN.pair_stats (instead of the fixed E/k of llama-moe v1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import minimize

__all__ = ["oracle_topk", "fit_router", "routing_quality", "calibrate_weights", "RoutingQuality", "FIT_METHODS",
           "topk_softmax", "quality_at_scale"]

FIT_METHODS = ("regression", "rank")


def oracle_topk(norms: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] of the k experts with the largest output norm per token (the oracle router)."""
    return norms.topk(k, dim=-1).indices


def _standardise(norms: torch.Tensor) -> torch.Tensor:
    """Per-token standardised log norms: top-k depends only on the order within a token, so the fit ignores each
    token's overall FFN magnitude."""
    z = torch.log(norms.double() + 1e-6 * norms.double().mean(-1, keepdim=True) + 1e-30)
    z = z - z.mean(-1, keepdim=True)
    return z / z.std(-1, keepdim=True).clamp_min(1e-12)


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||x W^T - y||^2 + ridge * tr(x^T x)/H * ||W||^2 (fp32 products, float64 solve). W [E, H]."""
    g = (x.float().T @ x.float()).double()
    lam = ridge * float(torch.diagonal(g).mean())
    g.diagonal().add_(lam)
    return torch.linalg.solve(g, (x.float().T @ y.float()).double()).T


def fit_router(x: torch.Tensor, norms: torch.Tensor, k: int, method: str = "regression", ridge: float = 1e-3,
               rank_iters: int = 40, rank_temperature: float = 1.0, rank_tokens: int = 4096) -> torch.Tensor:
    """Linear router rows W [E, H] (float32) fitted on MLP inputs x [N, H] and expert output norms [N, E].
    The ranking refinement uses `rank_tokens` evenly spaced tokens of x (its cost is per token and iteration)."""
    if method not in FIT_METHODS:
        raise ValueError(f"method: {method!r} is not one of {FIT_METHODS}")
    if x.shape[0] != norms.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but norms has {norms.shape[0]}")
    w = _ridge(x, _standardise(norms), ridge)
    if method == "rank":
        sub = torch.linspace(0, x.shape[0] - 1, min(x.shape[0], max(1, rank_tokens))).round().long()
        w = _rank_refine(x[sub], norms[sub], k, w, ridge, rank_iters, rank_temperature)
    return w.float()


def _rank_refine(x, norms, k, w0, ridge, iters, temperature):
    """Full-batch L-BFGS (scipy) on the listwise loss -mean_t sum_{e in oracle_t} (1/k) log softmax(x_t W^T / T)_e
    (+ the same ridge penalty), started from the regression solution at its best logit scale."""
    xd = x.double()
    top = oracle_topk(norms, k)
    target = torch.zeros(norms.shape, dtype=torch.float64).scatter_(1, top, 1.0 / k)
    lam = ridge * float((xd * xd).sum(0).mean()) / xd.shape[0]
    z0 = xd @ w0.T
    scale = min((0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
                key=lambda s: float(-(target * torch.log_softmax(z0 * s / temperature, -1)).sum(-1).mean()))
    shape = w0.shape

    def fg(flat):
        w = torch.from_numpy(flat).view(shape).requires_grad_(True)
        z = xd @ w.T / temperature
        loss = -(target * torch.log_softmax(z, -1)).sum(-1).mean() + lam * (w * w).sum()
        (g,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), g.numpy().ravel().copy()

    res = minimize(fg, (w0 * scale).numpy().ravel().copy(), jac=True, method="L-BFGS-B",
                   options={"maxiter": iters, "maxcor": 10})
    return torch.from_numpy(res.x).view(shape)


def topk_softmax(logits: torch.Tensor, k: int):
    """(indices [T, k], weights [T, k]): top-k of the logits, softmax over the k (llama-moe v1's gate at eval;
    Mixtral's renormalised top-k of the full softmax gives the same weights)."""
    top, idx = logits.topk(k, dim=-1)
    return idx, torch.softmax(top.float(), -1)


@dataclass
class RoutingQuality:
    recall: float            # mean |router top-k  and  oracle top-k| / k
    norm_captured: float     # sum of the chosen experts' norms / the oracle's, averaged over tokens
    tokens: int

    def to_dict(self):
        return {"recall": round(self.recall, 4), "norm_captured": round(self.norm_captured, 4), "tokens": self.tokens}


def routing_quality(logits: torch.Tensor, norms: torch.Tensor, k: int) -> RoutingQuality:
    """How close a router (its logits [T, E]) comes to the oracle on tokens with expert norms [T, E]."""
    e = norms.shape[1]
    sel = torch.zeros(norms.shape, dtype=torch.bool).scatter_(1, logits.topk(k, -1).indices, True)
    orc = torch.zeros(norms.shape, dtype=torch.bool).scatter_(1, oracle_topk(norms, k), True)
    recall = float((sel & orc).sum(-1).float().mean()) / k
    got = (norms * sel).sum(-1)
    best = (norms * orc).sum(-1).clamp_min(1e-30)
    return RoutingQuality(recall, float((got / best).mean()), int(norms.shape[0])) if e else None


def calibrate_weights(logits: torch.Tensor, k: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                      temperatures=None) -> dict:
    """Softmax temperature factor and score scale minimising sum_t ||sum_j w_tj y_t,idx_tj - target_t||^2 with
    w = scale * softmax(factor * top-k logits), from pair_stats (a [T, E, E], b [T, E], c [T]).

    For each factor the best scale is closed-form: s* = sum_t u_t.b_t / sum_t u_t^T A_t u_t (u the softmax weights
    scattered to [T, E]). Returns {"factor", "scale", "rel_error", "rel_error_uniform_k", "table"}: rel_error is the
    error / sum_t c_t; factor 0 (uniform weights 1/k) is always a candidate."""
    temperatures = [0.0, 0.03, 0.1, 0.3, 1.0, 3.0] if temperatures is None else list(temperatures)
    top, idx = logits.topk(k, dim=-1)
    a, b, c = a.double(), b.double(), c.double()
    cs = float(c.sum())
    table = []
    for f in temperatures:
        u = torch.zeros(b.shape, dtype=torch.float64).scatter_(1, idx, torch.softmax(top.double() * f, -1))
        num = float((u * b).sum())
        den = float(torch.einsum("te,tef,tf->", u, a, u))
        s = num / den if den > 0 else 1.0
        err = s * s * den - 2 * s * num + cs
        table.append({"factor": f, "scale": s, "rel_error": err / cs})
    best = min(table, key=lambda r: r["rel_error"])
    uni = next((r["rel_error"] for r in table if r["factor"] == 0.0), None)
    return {"factor": best["factor"], "scale": best["scale"], "rel_error": best["rel_error"],
            "rel_error_uniform_k": uni, "table": table}


def quality_at_scale(a, b, c, idx, w) -> float:
    """Relative layer error of routing (idx, w [T, k]) from pair stats: sum_t ||.||^2 / sum_t c_t."""
    u = torch.zeros(b.shape, dtype=torch.float64).scatter_add_(1, idx, w.double())
    err = float(torch.einsum("te,tef,tf->", u, a.double(), u)) - 2 * float((u * b.double()).sum()) + float(c.sum())
    return err / max(float(c.sum()), 1e-300)

