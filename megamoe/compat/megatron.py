"""Fixes and shortcuts applied to megatron-core objects on every device (CPU-only patches: compat/cpu.py).

Each one is small, local to the object it is given, and exists because of a measured problem in megatron-core 0.16.1:

- `distributed_optimizer_load_fix(optimizer)`: with torch's Adam (no TE / apex: every CPU, and GPUs without them)
  the DistributedOptimizer's loader skips the checkpoint's per-parameter `step` and then copies every key of the
  live state, `step` included -> KeyError. For the duration of the load, copy only the keys the checkpoint has.
- `single_rank_ddp(ddp)`: at one data-parallel rank the distributed optimizer's parameter all-gather and DDP's
  gradient reduce-scatter copy each buffer onto itself; skip them, keeping only the gradient scaling (1.0 there).
  Checkpoints keep the distributed-optimizer format, so they load into runs with more data-parallel ranks.
"""

from __future__ import annotations

import contextlib

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

__all__ = ["distributed_optimizer_load_fix", "single_rank_ddp"]


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
