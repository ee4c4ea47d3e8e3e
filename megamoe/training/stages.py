"""Stage bookkeeping for the trainer: which stage a step belongs to, frozen routers, re-wrapping between stages.

    i = stage_index(plan, step)                 # plan = cfg.stage_plan(); step = 0-based optimizer step
    n = set_router_freeze(model, True)          # routers' requires_grad off before megatron DDP is built
    fresh_parameters(model)                     # before wrapping the same module in a new DDP (see below)

Freezing with megatron-core: `requires_grad = False` only means "no update" if it is set *before* the model is
wrapped: megatron's DDP allocates gradient buffers (and, with the distributed optimizer, parameter buffers) for the
parameters that require gradients at construction, and the optimizer's parameter groups are built from those. A
stage that changes which parameters train therefore gets a new DDP and a new optimizer (`reset_optimizer` is then
implied). The old DDP registered gradient hooks on each parameter's AccumulateGrad node, which cannot be removed;
`fresh_parameters` gives every parameter a new `nn.Parameter` object over the same storage (keeping megatron's
attributes: tensor_model_parallel, partition_dim, allreduce, sequence_parallel, ...), so the old hooks stay on the
old objects and die with the old DDP, its buffers and its optimizer state.
"""

from __future__ import annotations

import bisect

from torch import nn

__all__ = ["stage_index", "is_router_param", "set_router_freeze", "fresh_parameters"]

_DDP_ATTRS = ("main_grad", "grad_added_to_main_grad", "main_param", "main_param_sharded")


def stage_index(plan, step: int) -> int:
    """The stage whose steps [start, end) hold 0-based `step` (the last stage for steps past the end)."""
    return min(bisect.bisect_right([s.start for s in plan], step) - 1, len(plan) - 1)


def is_router_param(name: str) -> bool:
    """Every router's parameters (MLP routers `layers.{i}.mlp.router.*`, and any other module named `router`)."""
    return ".router." in f".{name}"


def set_router_freeze(model: nn.Module, frozen: bool) -> int:
    """requires_grad = not frozen for every router parameter; the others train. Returns how many are frozen."""
    n = 0
    for name, p in model.named_parameters():
        router = is_router_param(name)
        p.requires_grad_(not (frozen and router))
        n += int(frozen and router)
    return n


def fresh_parameters(model: nn.Module) -> None:
    """Replace every parameter by a new nn.Parameter over the same data (same requires_grad, same megatron
    attributes, without DDP's main_grad), so that a new megatron DDP can wrap `model` (module docstring)."""
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            q = memo.get(id(p))
            if q is None:
                q = nn.Parameter(p.data, requires_grad=p.requires_grad)
                for k, v in vars(p).items():
                    if k not in _DDP_ATTRS:
                        setattr(q, k, v)
                memo[id(p)] = q
            module._parameters[name] = q
