"""Fixes and shortcuts applied to megatron-core objects on every device (CPU-only patches: compat/cpu.py).

Each one is small, local to the object it is given, and exists because of a measured problem in megatron-core 0.16.1:

- `distributed_optimizer_load_fix(optimizer)`: with torch's Adam (no TE / apex: every CPU, and GPUs without them)
  the DistributedOptimizer's loader skips the checkpoint's per-parameter `step` and then copies every key of the
  live state, `step` included -> KeyError. For the duration of the load, copy only the keys the checkpoint has.
- `empty_optimizer_fix(optimizer)`: a DistributedOptimizer whose rank holds none of its parameters (pipeline
  parallelism: a stage without MoE layers still gets an expert optimizer with an empty parameter group) fails
  its state_dict with torch's Adam (`assert len(steps) == 1` over an empty state); give it one that reports the step
  of its sibling optimizers, so checkpoints save and load on every stage.
- `single_rank_ddp(ddp)`: at one data-parallel rank the distributed optimizer's parameter all-gather and DDP's
  gradient reduce-scatter copy each buffer onto itself; skip them, keeping only the gradient scaling (1.0 there).
  Checkpoints keep the distributed-optimizer format, so they load into runs with more data-parallel ranks.
"""

from __future__ import annotations

import contextlib

from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

__all__ = ["distributed_optimizer_load_fix", "empty_optimizer_fix", "single_rank_ddp"]


@contextlib.contextmanager
def distributed_optimizer_load_fix(optimizer):
    """While loading a fully reshardable optimizer state: every DistributedOptimizer (of a chained optimizer too)
    on torch's Adam copies only the keys the checkpoint holds into its main parameters and their Adam state."""
    patched = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(o, DistributedOptimizer) and not o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            def setter(model_param, tensors, o=o):
                gi, go = o.model_param_group_index_map[model_param]
                main = o.optimizer.param_groups[gi]["params"][go]
                dst = {"param": main, **o.optimizer.state[main]}
                for k, v in tensors.items():
                    if k in dst:
                        dst[k].copy_(v)
            o._set_main_param_and_optimizer_states = setter
            patched.append(o)
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states


def empty_optimizer_fix(optimizer) -> None:
    """For every DistributedOptimizer (of a chained optimizer) on torch's Adam that holds no parameter on this rank:
    a state_dict without parameter state whose param groups carry the step of the other optimizers (0 before the
    first update), as megatron's own state_dict would report for a non-empty one."""
    if distrib_optimizer.HAVE_APEX_OR_TE:   # TE / apex Adam: megatron's state_dict handles empty groups itself
        return
    subs = getattr(optimizer, "chained_optimizers", [optimizer])

    def sibling_step():
        for o in subs:
            inner = getattr(o, "optimizer", None)
            for st in (inner.state.values() if inner is not None else ()):
                if "step" in st:
                    return float(st["step"])
        return 0.0

    for o in subs:
        if not isinstance(o, DistributedOptimizer) or getattr(o, "is_stub_optimizer", False) or \
                o.optimizer is None or any(g["params"] for g in o.optimizer.param_groups):
            continue
        if o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def state_dict(o=o):
            inner = o.optimizer.state_dict()
            sd = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
            for g in sd["optimizer"]["param_groups"]:
                del g["params"]
                g["step"] = sibling_step()
            if o.grad_scaler:
                sd["grad_scaler"] = o.grad_scaler.state_dict()
            return sd
        o.state_dict = state_dict


def single_rank_ddp(ddp, distributed_optimizer: bool):
    """For a megatron DDP whose data-parallel and expert-data-parallel groups are single ranks: no self-copies."""
    if distributed_optimizer:
        ddp.start_param_sync = lambda *args, **kwargs: None
    ddp.finish_grad_sync = lambda *args, **kwargs: _local_grad_sync(ddp)


def _local_grad_sync(ddp):
    """DDP.finish_grad_sync for a single data-parallel rank (no overlap): scale the buckets, communicate nothing."""
    for bucket_group in list(ddp.bucket_groups) + list(getattr(ddp, "expert_parallel_bucket_groups", [])):
        bucket_group.param_gather_dispatched = False
        for bucket in bucket_group.buckets:
            if bucket.gradient_scaling_factor != 1.0:
                bucket.grad_data *= bucket.gradient_scaling_factor
