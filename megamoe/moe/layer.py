"""MoELayer = router + token dispatcher + experts (+ an always-on residual expert).

    y = sum_{e in topk(x)} w_e * scale * expert_e(x)  [+ shared(x)]

forward(x [S, B, H]) -> (y [S, B, H], RouterStats). A (token, expert) slot dropped by the capacity contributes 0
(drop_policy "zero") or w * scale * x ("input": the expert acts as the identity for it).

`probs_in_experts` (None: MEGAMOE_MOE_PROBS_IN_EXPERTS=0|1, else on for CUDA tensors): the router weights are
applied in the experts' activation, y_e = down(silu(g) * u * w), and the combine sums unweighted, so the expert
output [N, H] is not kept for the backward (megatron's "memory-efficient permutation"). Same values and gradients
(router's included) to rounding; tests/test_grouped_experts.py.

With every expert on this rank (EP = expert-TP = 1) the experts may run densely instead (Experts backend "dense",
the CPU default for fine-grained experts): every expert on every token, weighted by `combine_weights(routing)`
[T, E] (0 for the experts a token is not routed to), no dispatch; the same y to rounding.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from megatron.core import parallel_state as ps
from torch import nn

from megamoe.config import DTYPES, ModelConfig
from megamoe.layers.mlp import MLP
from megamoe.moe.dispatcher import AllToAllDispatcher, LocalDispatcher
from megamoe.moe.experts import Experts
from megamoe.moe.router import Router
from megamoe.ops.precision import upcast
from megamoe.parallel.collectives import gather_tokens, make_stats_reducer, split_tokens, token_split_sizes


def combine_weights(routing, num_experts: int) -> torch.Tensor:
    """[T, E]: each token's router weight for each expert (the score scale included), 0 where it is not routed there
    or its slot was dropped by the capacity (the dense experts backend; what the dispatcher's combine applies)."""
    w = routing.weights if routing.dropped is None else routing.weights.masked_fill(routing.dropped, 0.0)
    return w.new_zeros(w.shape[0], num_experts).scatter(1, routing.indices, w)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_cfg, layer_idx: int):
        super().__init__()
        moe = cfg.moe
        self.layer_idx, self.moe = layer_idx, moe
        mi = cfg.moe_index(layer_idx)
        self.router = Router(moe, cfg.hidden_size, moe.layer_scale(mi), mp_cfg.sequence_parallel,
                             DTYPES[cfg.params_dtype])
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        per_rank = moe.num_experts // ep
        local = list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
        etp = ps.get_expert_tensor_parallel_world_size()
        self.experts = Experts(cfg.hidden_size, cfg.expert_sizes(layer_idx), local, etp, cfg.init_std,
                               cfg.num_layers, DTYPES[cfg.params_dtype])
        self.shared = MLP(cfg, mp_cfg, moe.residual_size) if moe.residual_size else None
        self.dispatcher = self._build_dispatcher(ep, etp, local)
        # parallel correctness (megamoe/parallel/collectives.py): balance statistics summed over the ranks holding
        # the rest of the global batch; without SP, TP ranks hold the same tokens: each runs the experts on its share
        self.router.stats_reducer = make_stats_reducer(mp_cfg.sequence_parallel)
        tp = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if tp > 1 and not mp_cfg.sequence_parallel else None
        self.probs_in_experts: bool | None = None
        # the dense experts backend runs on the tokens themselves: every expert must be here (no dispatch)
        self._dense_top_k = moe.top_k if ep == 1 and etp == 1 else None

    def _probs_in_experts(self, device: torch.device) -> bool:
        if self.probs_in_experts is not None:
            return self.probs_in_experts
        env = os.environ.get("MEGAMOE_MOE_PROBS_IN_EXPERTS", "").strip()
        return env == "1" if env in ("0", "1") else device.type == "cuda"

    def _experts(self, x: torch.Tensor, routing) -> torch.Tensor:
        if isinstance(self.experts, Experts) and self.experts.select_backend(x, self._dense_top_k) == "dense":
            return self.experts.forward_dense(x, combine_weights(routing, self.moe.num_experts))
        expert_in, tokens_per_expert, handle = self.dispatcher.dispatch(x, routing, self._probs_in_experts(x.device))
        return self.dispatcher.combine(self.experts(expert_in, tokens_per_expert, probs=handle.row_probs), handle)

    def _build_dispatcher(self, ep: int, etp: int, local: list[int]):
        if ep == 1 and etp == 1:
            return LocalDispatcher(self.moe.num_experts)
        return AllToAllDispatcher(self.moe.num_experts, local)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.router(flat)
        y = self._routed(flat, routing)
        if routing.dropped is not None and self.moe.drop_policy == "input":
            w = (routing.weights * routing.dropped).sum(-1, keepdim=True)
            y = y + (w * upcast(flat)).to(y.dtype)
        if self.shared is not None:
            y = y + self.shared(x).reshape(flat.shape)
        return y.view(shape), routing.stats

    def _routed(self, flat: torch.Tensor, routing) -> torch.Tensor:
        if self.tp_group is None:
            return self._experts(flat, routing)
        # TP without SP: tokens (and their routing) are replicated over TP; each TP rank takes its share, the
        # outputs are all-gathered back (backward: the matching split / all-gather)
        g = self.tp_group
        sizes = token_split_sizes(flat.shape[0], g.size())
        part = replace(routing, indices=split_tokens(routing.indices, g, sizes),
                       weights=split_tokens(routing.weights, g, sizes),
                       dropped=None if routing.dropped is None else split_tokens(routing.dropped, g, sizes))
        y = self._experts(split_tokens(flat, g, sizes), part)
        return gather_tokens(y, g, sizes)
