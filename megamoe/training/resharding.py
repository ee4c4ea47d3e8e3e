"""What makes a training checkpoint load into another TP/EP/ETP/DP layout: full (TP1/EP1) tensors <-> this rank's
shards of a LlamaMoEModel, and the optimizer state in megatron's fully reshardable format.

Checkpoints of parallel runs are megatron-core dist_checkpointing (megamoe/training/checkpoint.py: every rank
writes its shards in parallel; any TP/EP/DP layout loads them). This module maps one full tensor to this rank's
slice, the same rule dist_checkpointing's ShardedTensors encode:

  - megatron TP layers (`tensor_model_parallel`, `partition_dim`): chunk tp_rank of tp along partition_dim;
  - experts (`allreduce = False`, global names): the whole tensor, or under expert-TP chunk etp_rank of etp along
    dim 0 (gate/up) or dim 1 (down);
  - everything else (norms, routers): replicated.

    local = shard_full_state_dict(model, full_sd)     # e.g. a single-process state dict -> this rank's slices
    model.load_state_dict(local, strict=True)
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from megamoe.compat.megatron import distributed_optimizer_load_fix
from megamoe.training.optim import unwrap

__all__ = ["local_slice", "shard_full_state_dict", "load_full_state_dict", "OPTIM_METADATA",
           "optimizer_sharded_state_dict", "load_optimizer_state", "fix_optimizer_steps"]


def local_slice(name: str, local: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full tensor `full` for the local tensor `local` (a parameter of the model)."""
    if getattr(local, "allreduce", True) is False:                # expert weight
        etp, r = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        if etp > 1:
            full = full.chunk(etp, dim=1 if "down_proj" in name else 0)[r]
    elif getattr(local, "tensor_model_parallel", False):
        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        if tp > 1:
            full = full.chunk(tp, dim=local.partition_dim)[r]
    if tuple(full.shape) != tuple(local.shape):
        raise ValueError(f"{name}: the slice of the full tensor has shape {tuple(full.shape)}, the model holds "
                         f"{tuple(local.shape)} under this layout")
    return full


def shard_full_state_dict(model, full: dict) -> dict:
    """{name: this rank's slice} for every tensor of `model` (DDP-wrapped or not; a list of pipeline chunks) found
    in `full`. Layer names are global on every pipeline stage, so a full state dict needs no renaming."""
    if isinstance(model, (list, tuple)):
        return {k: v for chunk in model for k, v in shard_full_state_dict(chunk, full).items()}
    module = unwrap(model)
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if torch.is_tensor(t) and name in full:
            out[name] = local_slice(name, t, full[name]).to(t.dtype)
    return out


def load_full_state_dict(model, full: dict, strict: bool = True):
    """Load full (single-process) tensors into a model built under any TP/EP/ETP/PP layout (a list of pipeline
    chunks: each its own layers)."""
    if isinstance(model, (list, tuple)):
        for chunk in model:
            load_full_state_dict(chunk, full, strict)
        return
    module = unwrap(model)
    local = shard_full_state_dict(module, full)
    missing = sorted(n for n, t in module.state_dict().items() if torch.is_tensor(t) and n not in local)
    if strict and missing:
        raise KeyError(f"load_full_state_dict: no full tensor for {missing[:5]}")
    with torch.no_grad():
        module.load_state_dict(local, strict=False)


# ---------------------------------------------------------------------------------------------------------------
# optimizer state that reshards across TP / EP / DP

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""megatron's DistributedOptimizer formats: "dp_reshardable" keeps its flat per-(TP, EP)-rank buffers and reshards
only along DP (loading into another TP/EP layout fails with a global-shape mismatch); "fully_reshardable" stores
each parameter's Adam moments in the parameter's own (global, TP/EP-sharded) layout, so any layout loads them."""


def _drop_main_params(sd):
    """In fp32 the model weights are the main parameters: megatron writes no "optimizer.state.param.*" copy but asks
    for one on load. Drop those entries on both sides."""
    if isinstance(sd, dict):
        for k in list(sd):
            v = sd[k]
            if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and ".state.param." in f".{v.key}":
                del sd[k]
            else:
                _drop_main_params(v)
    elif isinstance(sd, list):
        for v in sd:
            _drop_main_params(v)
    return sd


def optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool):
    """The optimizer's sharded state dict in the fully reshardable format (any TP/EP/DP layout loads it)."""
    sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(OPTIM_METADATA))
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if not any(o.config.bf16 or o.config.fp16 for o in subs):
        _drop_main_params(sd)
    return sd


def load_optimizer_state(optimizer, state: dict):
    """optimizer.load_state_dict for a state that dist_checkpointing loaded in the fully reshardable format, then one
    `step` tensor per parameter (fix_optimizer_steps). megatron-core 0.16.1's loader needs a fix on torch's Adam
    (compat/megatron.py: distributed_optimizer_load_fix)."""
    with distributed_optimizer_load_fix(optimizer), torch.no_grad():
        optimizer.load_state_dict(state)
    fix_optimizer_steps(optimizer)


def fix_optimizer_steps(optimizer):
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for g in inner.param_groups:
            for p in g["params"]:
                st = inner.state.get(p)
                if st and "step" in g and "step" in st:
                    st["step"] = torch.tensor(float(g["step"]))
                elif st and "step" in st and torch.is_tensor(st["step"]):
                    st["step"] = st["step"].clone()
