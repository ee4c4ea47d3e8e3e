"""Pipeline parallelism: which decoder layers a rank holds, and the point-to-point and gather helpers that move
activations and statistics between pipeline stages outside megatron's training schedules.

Stages (megatron's convention). With pp pipeline ranks and vpp virtual stages per rank, the model is cut into
pp * vpp virtual stages executed in the order s = v * pp + r (r the pipeline rank, v the virtual stage on it); each
holds a contiguous block of decoder layers (`ParallelConfig.stage_layers`: even, `pp_layers`, or megatron's first /
last stage counts). Stage 0 also holds the embedding ("pre_process"), the last stage the final norm, the output head
and the loss ("post_process"). With tied embeddings the last stage keeps a copy of the embedding weight, kept equal
to the first stage's by megatron's embedding-group all-reduce of its gradient (finalize_model_grads).

Parameter names stay GLOBAL: layer i of the model is `layers.{i}.` on whichever stage holds it (the model's
`StageLayers` container names its entries by global index), so checkpoints, shard files and full state dicts need no
renaming between layouts.

    stage = local_stage(num_layers, vp_stage=0)     # Stage(first_layer=4, num_layers=4, pre_process=False, ...)
    x = recv_activation(shape, dtype, from_stage)   # evaluation only: training uses megatron's schedules
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megamoe.config import ParallelConfig

__all__ = ["Stage", "stage_of", "local_stages", "stage_rank", "send_activation", "recv_activation",
           "broadcast_from_last_stage", "gather_over_pipeline", "pipeline_size"]


@dataclass(frozen=True)
class Stage:
    """One virtual pipeline stage: layers [first_layer, first_layer + num_layers) of the model."""
    index: int                # virtual stage index in execution order, 0 .. pp*vpp - 1
    pp_rank: int
    vp_stage: int
    first_layer: int
    num_layers: int
    pre_process: bool         # holds the embedding
    post_process: bool        # holds the final norm, the output head and the loss

    @property
    def layer_ids(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


def stage_of(pcfg: ParallelConfig, num_layers: int, pp_rank: int, vp_stage: int = 0) -> Stage:
    """The virtual stage (pp_rank, vp_stage) of a model with `num_layers` layers under `pcfg`."""
    counts = pcfg.stage_layers(num_layers)
    s = vp_stage * pcfg.pp + pp_rank
    return Stage(index=s, pp_rank=pp_rank, vp_stage=vp_stage, first_layer=sum(counts[:s]), num_layers=counts[s],
                 pre_process=s == 0, post_process=s == len(counts) - 1)


def pipeline_size() -> int:
    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def local_stages(pcfg: ParallelConfig, num_layers: int) -> list[Stage]:
    """This rank's virtual stages (one per model chunk), in chunk order."""
    r = ps.get_pipeline_model_parallel_rank() if pipeline_size() > 1 else 0
    return [stage_of(pcfg, num_layers, r, v) for v in range(pcfg.vpp if pcfg.pp > 1 else 1)]


def stage_rank(pcfg: ParallelConfig, index: int) -> int:
    """Global rank of the pipeline rank holding virtual stage `index` (same TP/CP/DP coordinates as this rank)."""
    group = ps.get_pipeline_model_parallel_group()
    return dist.get_global_rank(group, index % pcfg.pp)


# ---------------------------------------------------------------------------------------------------------------
# activations between stages (evaluation's forward-only pass; megatron's P2PCommunicator runs training)

def send_activation(x: torch.Tensor, dst: int) -> None:
    dist.send(x.detach().contiguous(), dst=dst)


def recv_activation(shape, dtype, device, src: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src=src)
    return out


def broadcast_from_last_stage(values: list[float], device) -> list[float]:
    """The last pipeline stage's `values` (e.g. its loss terms) on every stage of the pipeline group."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if pipeline_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t.tolist()


def gather_over_pipeline(obj):
    """[obj of pipeline rank 0, obj of rank 1, ...] on every stage (small python objects: router statistics)."""
    if pipeline_size() == 1:
        return [obj]
    out = [None] * pipeline_size()
    dist.all_gather_object(out, obj, group=ps.get_pipeline_model_parallel_group())
    return out
