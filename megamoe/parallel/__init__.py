"""Parallelism: who holds what, and how ranks talk.

| module | job |
|---|---|
| `groups.py` | process-group setup for a `ParallelConfig` (torch.distributed + megatron-core's parallel_state); entry points call `initialize`, models only read the layout in force |
| `collectives.py` | autograd-aware collectives of the MoE layer (token split/gather over TP, uneven all-gather, count exchange) and the router-statistics reducer |
| `pipeline.py` | pipeline stages: which layers a rank holds (megatron's virtual-stage order), activations and statistics between stages outside megatron's schedules |
| `context.py` | context parallelism: the load-balanced sequence split and ring attention over the CP group |

    from megamoe import parallel
    parallel.initialize(ParallelConfig(tp=2, ep=2), model_cfg)   # under torchrun --nproc_per_node=4
"""

from megamoe.parallel.groups import (as_distributed_error, collective_errors, current, destroy, init_distributed,
                                     initialize, megatron_config, require, timeout_seconds)

__all__ = ["initialize", "destroy", "current", "require", "init_distributed", "megatron_config", "timeout_seconds",
           "collective_errors", "as_distributed_error"]
