"""Routers: score each token, pick its experts, and compute the balance losses.

Three routers (MoEConfig.router), each on a gate network (MoEConfig.gate_network):
  gate networks   "linear": Linear(H, E);  "mlp": Linear(H, E), Tanh, Linear(E, E)  (llama-moe v1; no biases)

  topk_noisy  llama-moe v1 TopKBalancedNoisyGate.
              training: l = g + N(0,1) * sigma, sigma = softplus(W_noise x) + epsilon; eval: l = g.
              top-k of l, softmax over the k selected (fp32).
              importance_e = sum_t p_te;  load_e = sum_t Phi((g_te - thr_t)/sigma_te) in training (Shazeer's smooth
              estimate, thr = the k-th or (k+1)-th largest noisy logit), else the integer counts.
              balance_loss = w * (cv^2(importance) + cv^2(load)),  cv^2(x) = var(x) / (mean(x)^2 + 1e-10), unbiased var.
  mixtral     p = softmax(g) over all E (fp32), top-k, renormalise over the k (or not: moe.score_order
              softmax_topk, the "pre-softmax" ordering).
              aux = w * E * sum_e f_e * P_e, f_e = (token, slot) count / T, P_e = mean_t p_te   (as HF Mixtral)
  switch      p = softmax(g), top-1 with the raw probability as weight, capacity = ceil(cf * T / E) (cf = 1.25
              by default), Gumbel noise on the logits in training if moe.noise; aux as above (Switch Transformer).
Every router: optional z-loss w_z * mean_t(logsumexp(g_t)^2); combine weights multiplied by the score scale.

Under data/expert parallelism the statistics of one rank are partial: `stats_reducer` (set by the parallel setup)
sums them over the group that holds the rest of the global batch before the losses are computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.ops.gating import topk_gating
from megamoe.ops.precision import upcast

log = logging.getLogger(__name__)


_warned: set[str] = set()


def _warn_once(msg: str):
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


@dataclass
class RouterStats:
    """Per-layer statistics of one forward, handed to whoever trains the model (all on the router's device)."""
    tokens_per_expert: torch.Tensor   # [E] int64, (token, slot) pairs routed to each expert, before dropping
    importance: torch.Tensor          # [E] fp32, sum of gate probabilities per expert
    load: torch.Tensor                # [E] fp32, load estimate used by the loss (== counts outside noisy training)
    balance_loss: torch.Tensor        # scalar, weighted: cv^2 loss (topk_noisy) or switch aux loss (mixtral, switch)
    z_loss: torch.Tensor              # scalar, weighted
    num_dropped: torch.Tensor         # scalar int64, (token, slot) pairs dropped by the capacity
    num_tokens: int = 0


@dataclass
class Routing:
    indices: torch.Tensor             # [T, k] int64
    weights: torch.Tensor             # [T, k] fp32, multiplied by the score scale
    capacity: int | None
    dropped: torch.Tensor | None      # [T, k] bool, or None when dropless
    stats: RouterStats


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var/mean^2 (unbiased var, as llama-moe); 0 for a single expert."""
    x = upcast(x)
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def build_gate_network(kind: str, hidden: int, num_experts: int, dtype=torch.float32) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, num_experts, bias=False, dtype=dtype), nn.Tanh(),
                             nn.Linear(num_experts, num_experts, bias=False, dtype=dtype))
    raise ValueError(f"moe.gate_network: unknown gate type {kind!r}")


def _linear_fp32(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, upcast(lin.weight))


def gate_logits(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gate network's logits, computed in fp32 whatever the dtype of x and of the weights (the weights are stored
    in the model's dtype, as every other parameter; routing decisions are made on fp32 scores, as megatron's
    moe_router_dtype="fp32")."""
    x = upcast(x)
    if isinstance(gate, nn.Linear):
        return _linear_fp32(gate, x)
    return _linear_fp32(gate[2], torch.tanh(_linear_fp32(gate[0], x)))


class Router(nn.Module):
    def __init__(self, moe: MoEConfig, hidden: int, score_scale: float, sequence_parallel: bool = False,
                 dtype=torch.float32):
        super().__init__()
        self.moe, self.scale = moe, score_scale
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        order = moe.effective_score_order()
        self.order = "topk_softmax" if order == "topk_softmax" else "softmax_topk"   # the gating op's two orders
        self.renormalize = order == "softmax_topk_renorm"
        if not moe.router_gets_lm_gradient():
            _warn_once(f"moe: top_k=1 with score_order {order!r} weighs every token's expert by exactly 1.0, so the "
                       "router gets no gradient from the LM loss (only from the balance loss); moe.score_order: "
                       "softmax_topk (pre-softmax ordering) keeps the probability as the weight")
        self.gate = build_gate_network(moe.gate_network, hidden, moe.num_experts, dtype)
        self.noise = nn.Linear(hidden, moe.num_experts, bias=False, dtype=dtype) if moe.router == "topk_noisy" else None
        for p in self.parameters():
            nn.init.normal_(p, std=moe.gate_init_std)
            setattr(p, "sequence_parallel", sequence_parallel)  # sees only this rank's tokens under SP
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # sigma starts at softplus(0) + eps, as llama-moe
        self.stats_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        # training only: evaluation may run on one rank alone, and its statistics are reported per rank
        return t if self.stats_reducer is None or not self.training else self.stats_reducer(t)

    def capacity(self, num_tokens: int) -> int | None:
        cf = self.moe.effective_capacity_factor()
        if cf is None:
            return None
        return max(1, math.ceil(cf * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [T, H] -> Routing."""
        moe, E, k = self.moe, self.num_experts, self.top_k
        T = x.shape[0]
        x = upcast(x)
        logits = gate_logits(self.gate, x)
        capacity = self.capacity(T)
        noisy_training = self.training and moe.noise
        sigma = noise = None
        if moe.router == "topk_noisy":
            if noisy_training:
                sigma = F.softplus(_linear_fp32(self.noise, x)) + moe.noise_epsilon
                noise = torch.randn_like(logits) * sigma
            g = topk_gating(logits, k, order=self.order, renormalize=self.renormalize, scale=self.scale, noise=noise,
                            capacity=capacity, return_thresholds=noisy_training and k < E)
        else:
            if moe.router == "switch" and noisy_training:
                u = torch.rand_like(logits).clamp_(1e-9, 1 - 1e-9)
                noise = -torch.log(-torch.log(u))
            g = topk_gating(logits, k, order="softmax_topk", renormalize=self.renormalize,
                            scale=self.scale, noise=noise, capacity=capacity)

        counts = g.counts
        importance = self._reduce(g.importance)
        if moe.router == "topk_noisy":
            if noisy_training and k < E:
                load = self._shazeer_load(logits, logits + noise, sigma, g.thresholds, noise)
            else:
                load = counts.float()
            load = self._reduce(load)
            balance = moe.balance_loss_weight * (cv_squared(importance) + cv_squared(load))
        else:
            load = self._reduce(counts.float())
            n_tok = self._reduce(logits.new_tensor(float(T)))
            frac, mean_p = load / n_tok, self._reduce(g.prob_sum) / n_tok
            balance = moe.balance_loss_weight * E * (frac * mean_p).sum()
        z = logits.new_zeros(())
        if moe.z_loss_weight:
            lse2 = torch.logsumexp(logits, dim=-1).pow(2)
            if self.stats_reducer is None:
                z = moe.z_loss_weight * lse2.mean()
            else:  # mean over the global batch (each rank holds part of it)
                z = moe.z_loss_weight * self._reduce(lse2.sum()) / self._reduce(logits.new_tensor(float(T)))
        dropped = g.dropped
        n_drop = dropped.sum() if dropped is not None else torch.zeros((), dtype=torch.long, device=x.device)
        stats = RouterStats(counts, importance.detach(), load.detach(), balance, z, n_drop, T)
        return Routing(g.indices, g.weights, capacity, dropped, stats)

    def _shazeer_load(self, clean, noisy, sigma, thresholds, noise):
        """Smooth load: probability that each expert stays in the top-k under re-sampled noise (Shazeer et al.)."""
        thr_out, thr_in = thresholds[:, :1], thresholds[:, 1:]   # k-th and (k+1)-th largest noisy logits
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_if_in = normal.cdf((clean - thr_in) / sigma)
        prob_if_out = normal.cdf((clean - thr_out) / sigma)
        probe = noise if self.moe.load_estimate == "llama_moe" else noisy  # llama-moe compares the pure noise term
        return torch.where(probe > thr_in, prob_if_in, prob_if_out).sum(0)
