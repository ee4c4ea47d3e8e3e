"""Full (TP1/EP1) tensors <-> this rank's shards of a LlamaMoEModel under the layout in force.

Checkpoints of parallel runs are megatron-core dist_checkpointing (megamoe/training/checkpointing.py: every rank
writes its shards in parallel; any TP/EP/DP layout loads them). This module is the small piece beside it that maps
one full tensor to this rank's slice, the same rule dist_checkpointing's ShardedTensors encode:

  - megatron TP layers (`tensor_model_parallel`, `partition_dim`): chunk tp_rank of tp along partition_dim;
  - experts (`allreduce = False`, global names): the whole tensor, or under expert-TP chunk etp_rank of etp along
    dim 0 (gate/up) or dim 1 (down);
  - everything else (norms, routers): replicated.

    local = shard_full_state_dict(model, full_sd)     # e.g. a single-process state dict -> this rank's slices
    model.load_state_dict(local, strict=True)
"""

from __future__ import annotations

import torch

__all__ = ["local_slice", "shard_full_state_dict", "load_full_state_dict"]


def local_slice(name: str, local: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full tensor `full` for the local tensor `local` (a parameter of the model)."""
    from megatron.core import parallel_state as ps
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
    """{name: this rank's slice} for every tensor of `model` (DDP-wrapped or not) found in `full`."""
    from megamoe.training.optim import unwrap
    module = unwrap(model)
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if torch.is_tensor(t) and name in full:
            out[name] = local_slice(name, t, full[name]).to(t.dtype)
    return out


def load_full_state_dict(model, full: dict, strict: bool = True):
    """Load full (single-process) tensors into a model built under any TP/EP/ETP layout."""
    from megamoe.training.optim import unwrap
    module = unwrap(model)
    local = shard_full_state_dict(module, full)
    missing = sorted(n for n, t in module.state_dict().items() if torch.is_tensor(t) and n not in local)
    if strict and missing:
        raise KeyError(f"load_full_state_dict: no full tensor for {missing[:5]}")
    with torch.no_grad():
        module.load_state_dict(local, strict=False)
