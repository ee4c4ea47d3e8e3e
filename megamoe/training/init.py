"""Where a run's model comes from (`init:` in the config): its architecture, and its initial weights.

    model_cfg = resolve_model_config(cfg)          # from our shard manifest, an HF config.json, or cfg.model
    load_initial_weights(cfg, model)               # this rank's slice of the shards / the HF weights; nothing for random

init.source: random (cfg.model, seeded), megamoe (our shard directory, any TP/EP layout: each rank reads its slice),
hf (a dense HF LLaMA directory; TP 1 only -- convert to shards first for TP > 1).
"""

from __future__ import annotations

import json
import logging
import os

import torch
from megatron.core import parallel_state as ps

from megamoe.config import ModelConfig
from megamoe.errors import ConfigError
from megamoe.formats.hf_llama import config_from_hf, load_hf_llama
from megamoe.formats.shards import ShardedCheckpoint, is_shard_dir, load_shards
from megamoe.training.config import TrainConfig

log = logging.getLogger("megamoe.train")

__all__ = ["resolve_model_config", "load_initial_weights", "calibrated_routers"]

# may differ from the source's: runtime choices, and the special token ids (not architecture)
RUNTIME_FIELDS = ("recompute", "attention_backend", "params_dtype", "init_std", "bos_token_id", "eos_token_id",
                  "pad_token_id")


def calibrated_routers(manifest: dict) -> bool:
    """Whether a shard directory's routers were fitted by hf-to-moe's calibration (its manifest.json holds the spec):
    their weights are ~1e-4, and training them re-routes every token at once (train.freeze_routers keeps them)."""
    return bool((manifest.get("calibration") or {}).get("spec"))


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig of the run: cfg.model for a random init, else the source's (cfg.model, if given, must agree on
    the architecture; its runtime fields win)."""
    src, path = cfg.init.source, cfg.init.path
    if src == "random":
        if cfg.model is None:
            raise ConfigError("model: no model section and no init.path to take the architecture from")
        return cfg.model
    if src == "megamoe":
        if not is_shard_dir(path):
            raise ConfigError(f"init.path: {path} has no manifest.json (not a megamoe shard directory)")
        ck = ShardedCheckpoint(path)
        model_cfg = ck.config
        calibrated = calibrated_routers(ck.manifest)
        ck.close()
        if calibrated and not cfg.train.freeze_routers and not any(st.freeze_routers for st in cfg.stages or []):
            log.warning("init.path: %s was converted with calibrated routers (weights ~1e-4): with routers training, "
                        "the first AdamW steps re-route every token and the loss jumps; set train.freeze_routers=true "
                        "(or a stage's freeze_routers) to keep them as fitted (docs/training.md)", path)
    else:
        cj = os.path.join(path, "config.json")
        if not os.path.isfile(cj):
            raise ConfigError(f"init.path: {path} has no config.json (not a Hugging Face model directory)")
        with open(cj) as f:
            model_cfg = config_from_hf(json.load(f), cj)
    if cfg.model is not None:
        mine, theirs = cfg.model.to_dict(), model_cfg.to_dict()
        for k in RUNTIME_FIELDS:
            mine.pop(k), theirs.pop(k)
        if mine.get("moe") and not theirs.get("moe"):
            raise ConfigError(f"model.moe: {path} is a dense model; convert it to LLaMA-MoE first "
                              "(megamoe-convert hf-to-moe) and train from init.source: megamoe")
        if mine != theirs:
            bad = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ConfigError(f"model.{bad[0]}: {mine[bad[0]]!r} disagrees with {path} ({theirs.get(bad[0])!r})")
        for k in ("recompute", "attention_backend", "params_dtype"):
            setattr(model_cfg, k, getattr(cfg.model, k))
    return model_cfg


def load_initial_weights(cfg: TrainConfig, model) -> None:
    """Load this rank's part of the initial weights into `model` (built under the layout in force), strictly."""
    src, path = cfg.init.source, cfg.init.path
    if src == "random":
        return
    if src == "megamoe":
        sd = load_shards(path, tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
                         ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
                         etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()))
    else:
        if ps.get_tensor_model_parallel_world_size() > 1:
            raise ConfigError("init.source: 'hf' loads full tensors; convert to our shards first for tp > 1 "
                              "(megamoe-convert hf-to-moe / reshard)")
        _, sd = load_hf_llama(path)
    if isinstance(model, (list, tuple)):   # pipeline stages: each loads its own (globally named) tensors
        dtype = next(model[0].parameters()).dtype
        for m in model:
            mine = {k for k, v in m.state_dict().items() if torch.is_tensor(v)}
            missing = sorted(mine - set(sd))
            if missing:
                raise ConfigError(f"init.path: {path} does not match the model: missing {missing[:3]}")
            m.load_state_dict({k: v.to(dtype) for k, v in sd.items() if k in mine}, strict=False)
        log.info("loaded initial weights from %s (%s) into this rank's pipeline stages", path, src)
        return
    dtype = next(model.parameters()).dtype
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ConfigError(f"init.path: {path} does not match the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    log.info("loaded initial weights from %s (%s)", path, src)
