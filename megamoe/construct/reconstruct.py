"""Layer-wise local reconstruction: make one MoE layer reproduce its dense FFN's output on calibration inputs.

Everything here works on one layer's cached MLP inputs x [N, H] and its dense target y = FFN(x) [N, H], so a
converter can stream the model layer by layer (calibrate.py). Two optional steps, each with a recorded error
history that never rises (tests/test_construct_calibrate.py):

`reconstruct_router(...)`: the router W [E, H] (and the layer's score scale) trained on the layer error
    sum_t ||s * sum_j softmax(x_t W^T)_j y_t,idx_tj - y_t||^2 (top-k of x_t W^T; gradients reach W through the
    softmax weights of the selected experts, the choice itself is re-made at every step). Computed from the
    per-token quadratic form (ffn.PartitionedFFN.pair_stats), so a step costs O(N E^2), not an FFN pass.
    Full-batch Adam with backtracking: a step that raises the error is undone and the learning rate halved, so the
    error history is non-increasing.

`reconstruct_down(...)`: the experts' down projections, jointly, for the routing now fixed. With m [N, F] the
    per-neuron combine weights (neuron j gets its expert's weight) and z = h * m, the layer output is z down^T, so
    the best down is a ridge regression pulled towards the dense down_0:
        down^T = (z^T z + lam I)^-1 (z^T y + lam down_0^T),   lam = ridge * mean diag(z^T z)
    Its error is never above down_0's (down_0 is a feasible point of the same objective). Accumulated in float64
    over chunks of tokens: memory F^2 + F H (a LLaMA-2-7B layer: 1.3 GB), independent of N. The residual block's
    neurons (weight 1) are part of z and refitted too.
"""

from __future__ import annotations

import torch

from megamoe.construct.ffn import PartitionedFFN, combine_mask
from megamoe.construct.router_fit import topk_softmax

__all__ = ["reconstruct_router", "reconstruct_down", "layer_error"]


def layer_error(f: PartitionedFFN, x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                down: torch.Tensor | None = None, chunk: int = 2048) -> float:
    """sum_t ||moe(x_t) - target_t||^2 / sum_t ||target_t||^2 for routing (idx, w) [N, k]."""
    num = den = 0.0
    for s in range(0, x.shape[0], chunk):
        y = f.moe(x[s:s + chunk], idx[s:s + chunk], w[s:s + chunk], down=down)
        t = target[s:s + chunk].float()
        num += float(((y - t) ** 2).sum())
        den += float((t * t).sum())
    return num / max(den, 1e-300)


def _pair_loss(x, w_router, k, scale, a, b, c):
    logits = x @ w_router.T
    idx, p = topk_softmax(logits, k)
    u = torch.zeros(b.shape, dtype=a.dtype).scatter(1, idx, (p * scale).to(a.dtype))
    quad = torch.einsum("te,tef,tf->", u, a, u)
    return (quad - 2 * (u * b).sum() + c.sum()) / c.sum()


def reconstruct_router(x: torch.Tensor, w_router: torch.Tensor, scale: float, k: int, a: torch.Tensor,
                       b: torch.Tensor, c: torch.Tensor, steps: int = 50, lr: float = 0.05,
                       train_scale: bool = True) -> tuple:
    """(W [E, H], scale, history): `steps` full-batch Adam steps with backtracking on the layer error (module
    docstring). a, b, c from PartitionedFFN.pair_stats on the same tokens x. history[0] is the starting error.
    Adam is written out here (a dozen lines): torch.optim's first use imports torch._dynamo, seconds of start-up."""
    x = x.float()
    a, b, c = a.float(), b.float(), c.float()
    params = [w_router.detach().float().clone(), torch.tensor(float(max(scale, 1e-6))).log()]
    train = [True, train_scale]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8

    def loss_and_grads(ps):
        ps = [p.detach().requires_grad_(t) for p, t in zip(ps, train)]
        loss = _pair_loss(x, ps[0], k, ps[1].exp(), a, b, c)
        grads = torch.autograd.grad(loss, [p for p, t in zip(ps, train) if t])
        it = iter(grads)
        return float(loss), [next(it) if t else None for t in train]

    best, grads = loss_and_grads(params)
    history = [best]
    t = 0
    for _ in range(steps):
        t += 1
        cand = []
        for j, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                cand.append(p)
                continue
            m1[j] = b1 * m1[j] + (1 - b1) * g
            m2[j] = b2 * m2[j] + (1 - b2) * g * g
            step = lr * (m1[j] / (1 - b1 ** t)) / ((m2[j] / (1 - b2 ** t)).sqrt() + eps)
            cand.append(p - step)
        new, new_grads = loss_and_grads(cand)
        if new <= best:
            params, best, grads = cand, new, new_grads
        else:                                           # rejected: stay, smaller steps from here on
            lr *= 0.5
        history.append(best)
    return params[0], float(params[1].exp()), history


def reconstruct_down(f: PartitionedFFN, x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                     ridge: float = 1e-2, chunk: int = 2048) -> torch.Tensor:
    """The refitted down projection [H, F] (float32) for routing (idx, w) [N, k] (module docstring)."""
    F_, H = f.ffn_width, f.hidden_size
    zz = torch.zeros(F_, F_, dtype=torch.float64)
    zy = torch.zeros(F_, H, dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        m = f.neuron_weights(combine_mask(idx[s:s + chunk], w[s:s + chunk].float(), f.E))
        z = f.hidden(xs) * m                                            # fp32 products, fp64 running sums
        zz += (z.T @ z).double()
        zy += (z.T @ target[s:s + chunk].float()).double()
    d0 = f.down.double().T                                              # [F, H]
    lam = ridge * float(torch.diagonal(zz).mean())
    used = torch.diagonal(zz) > 0                                       # never-active neurons keep down_0
    zz.diagonal().add_(lam)
    sol = torch.linalg.solve(zz, zy + lam * d0)
    sol[~used] = d0[~used]
    return sol.T.float().contiguous()
