"""The trained model in our shard format (TP1/EP1), for `megamoe-convert moe-to-hf` and `megamoe-eval`.

Written from a world of one only: after a model-parallel run, `--resume` its last checkpoint in a world of one (the
checkpoint reshards) to write it. Written through formats.shards.save_shards into `out_dir.new`, then swapped in: a
failure leaves the previous export intact.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megamoe.config import ModelConfig, ParallelConfig
from megamoe.formats.shards import save_shards
from megamoe.formats.tokenizer_files import copy_tokenizer
from megamoe.training.optim import unwrap

log = logging.getLogger("megamoe.train")

__all__ = ["export_final_model"]


def export_final_model(ddp, model_cfg: ModelConfig, out_dir: str, training: dict | None = None) -> str | None:
    """Write `ddp`'s model to `out_dir`; None (and a log line saying how to export) under model parallelism, and on
    ranks other than 0. `training` (tokens, steps, the initial checkpoint, the data) goes into the manifest as
    "training": the model card of a later HF export (megamoe.formats.model_card) reads it."""
    if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_expert_model_parallel_world_size() > 1 \
            or ps.get_expert_tensor_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1 \
            or isinstance(ddp, (list, tuple)):
        if dist.get_rank() == 0:
            log.info("final model not exported from a model-parallel run; write it from the last checkpoint in a "
                     "world of one (the checkpoint reshards):  megamoe-train --config %s --resume "
                     "--set parallel.tp=1 --set parallel.ep=1 --set parallel.etp=1 --set parallel.pp=1 "
                     "--set parallel.vpp=1 --set parallel.cp=1 --set parallel.sequence_parallel=false",
                     os.path.join(os.path.dirname(out_dir), "config.yaml"))
        return None
    if dist.get_rank() != 0:
        return None
    fresh = out_dir + ".new"              # the previous export (if any) stays until the new one is complete
    shutil.rmtree(fresh, ignore_errors=True)
    save_shards(fresh, model_cfg, unwrap(ddp).state_dict(), ParallelConfig(tp=1, ep=1, etp=1),
                info={"source": "megamoe.train", **({"training": training} if training else {})})
    init = (training or {}).get("init")
    if init and os.path.isdir(init):      # the tokenizer beside the weights, as every converted directory has it
        copy_tokenizer(init, fresh)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(fresh, out_dir)
    log.info("final model written to %s (our shard format)", out_dir)
    return os.path.abspath(out_dir)
