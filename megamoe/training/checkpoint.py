"""Training checkpoints: model + optimizer (megatron-core dist_checkpointing, reshardable) + everything else a
resume needs (step, schedule, data-loader state, RNG states, counters), saved atomically, last K kept.

Layout of `<root>` (checkpoint.dir):

    latest                      text file naming the newest complete checkpoint ("step_00000120"), replaced
                                atomically (temp file + os.replace) only after that checkpoint is complete
    step_00000120/              one checkpoint
        (dist_checkpointing)    model and optimizer tensors (torch_dist format) + its metadata
        train_state.json        step, tokens, counters, the config in force (rank 0)
        rank_00000.json         per-rank state: data-loader state, python/numpy RNG
        rank_00000_rng.safetensors   per-rank torch CPU/CUDA RNG and megatron's RNG-tracker states
        COMPLETE                written last
    step_00000120.tmp/          a save in progress (or one killed midway): never read, removed by the next save

Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 writes COMPLETE, renames the directory to
`step_N` (a single rename) and only then rewrites `latest`. A crash at any point leaves the previous checkpoint
and `latest` untouched. `find_latest` also skips a `latest` that names a missing/incomplete directory and falls back
to the newest complete one.

Resharding: model tensors are saved as ShardedTensors with their GLOBAL shapes (TP-split parameters carry their
partition axis; experts their global names), optimizer state in megatron's fully reshardable format
(megamoe/training/resharding.py), so a checkpoint loads into another TP/EP/DP layout. Trust: dist_checkpointing writes its metadata (and its "common" state) with pickle, so load
only checkpoints your own runs wrote. Everything of ours is JSON or safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from safetensors.torch import load_file, save_file

from megamoe.compat.cpu import cuda_to_cpu
from megamoe.errors import CheckpointError
from megamoe.fileio import atomic_write_text
from megamoe.training.optim import unwrap
from megamoe.training.resharding import load_optimizer_state, optimizer_sharded_state_dict

log = logging.getLogger("megamoe.train")

__all__ = ["CheckpointManager", "model_sharded_state_dict", "capture_rng", "restore_rng"]

STEP_RE = re.compile(r"^step_(\d{8})$")
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# JSON helpers for state that holds numpy arrays / tensors (data-loader state)

def to_jsonable(x):
    if isinstance(x, torch.Tensor):
        return {"__tensor__": x.detach().cpu().tolist(), "dtype": str(x.dtype).replace("torch.", "")}
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return {"__tuple__": [to_jsonable(v) for v in x]}
    if isinstance(x, list):
        return [to_jsonable(v) for v in x]
    return x


def from_jsonable(x):
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        if "__tensor__" in x:
            return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"]))
        if "__tuple__" in x:
            return tuple(from_jsonable(v) for v in x["__tuple__"])
        return {k: from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------------------------
# RNG

def capture_rng() -> tuple[dict, dict]:
    """(tensors for safetensors, json-able) RNG state of this rank."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    try:
        for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            tensors[f"tracker.{name}"] = st.detach().cpu() if torch.is_tensor(st) else torch.as_tensor(st)
    except Exception:  # noqa: BLE001 - no tracker initialised
        pass
    ver, state, gauss = random.getstate()
    npst = np.random.get_state()
    js = {"python": [ver, list(state), gauss],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, js


def restore_rng(tensors: dict, js: dict):
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker = {k[len("tracker."):]: v for k, v in tensors.items() if k.startswith("tracker.")}
    if tracker:
        try:
            tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
        except Exception as e:  # noqa: BLE001
            log.warning("could not restore megatron RNG tracker: %s", e)
    ver, state, gauss = js["python"]
    random.setstate((ver, tuple(state), gauss))
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# ---------------------------------------------------------------------------------------------------------------
# sharded state dict of our model

def model_sharded_state_dict(model) -> dict:
    """ShardedTensors for every tensor of `model` (our LlamaMoEModel, possibly DDP-wrapped), keyed by name.

    - megatron TP layers tag their weights (`tensor_model_parallel`, `partition_dim`): sharded over TP on that axis;
    - experts (`allreduce = False`) are stored under global names; under expert-TP, gate/up split on dim 0 and
      down on dim 1; replicas over the expert-data-parallel group;
    - everything else (norms, routers) is replicated; rank (tp 0, dp 0) writes it.
    If the model defines its own `sharded_state_dict`, that is used instead."""
    module = unwrap(model)
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    edp_rank = ps.get_expert_data_parallel_rank()
    out = {}
    for prefix, sub in module.named_modules():     # stacked experts (moe/experts.py): per-expert keys via factories
        if hasattr(sub, "sharded_factories"):
            out.update(sub.sharded_factories(prefix + "." if prefix else ""))
    for name, t in module.state_dict(keep_vars=True).items():
        if not torch.is_tensor(t) or getattr(t, "stacked_expert_view", False):
            continue
        if getattr(t, "allreduce", True) is False:                       # expert weight
            if etp > 1:
                axis = 1 if "down_proj" in name else 0
                out[name] = ShardedTensor.from_rank_offsets(name, t, (axis, etp_rank, etp), replica_id=edp_rank)
            else:
                out[name] = ShardedTensor.from_rank_offsets(name, t, replica_id=(etp_rank, edp_rank))
        elif getattr(t, "tensor_model_parallel", False) and tp > 1:
            out[name] = ShardedTensor.from_rank_offsets(name, t, (t.partition_dim, tp_rank, tp),
                                                        replica_id=dp_rank)
        else:
            out[name] = ShardedTensor.from_rank_offsets(name, t, replica_id=(tp_rank, dp_rank))
    return out


def _init_empty_optimizer_state(opt):
    """A fresh megatron optimizer (torch-AdamW fallback) has no state, and its sharded_state_dict(is_loading=True)
    then fails (it reads one shared `step`): give every parameter zero Adam state first; the load overwrites it."""
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for g in inner.param_groups:
            for p in g["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))


# ---------------------------------------------------------------------------------------------------------------

class CheckpointManager:
    def __init__(self, root: str, keep_last: int = 3):
        self.root = os.path.abspath(root)
        self.keep_last = int(keep_last)

    # ---- discovery ----
    def complete_checkpoints(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if STEP_RE.match(n)
                       and os.path.isfile(os.path.join(self.root, n, "COMPLETE")))
        return [os.path.join(self.root, n) for n in names]

    def find_latest(self) -> str | None:
        p = os.path.join(self.root, "latest")
        if os.path.isfile(p):
            name = open(p).read().strip()
            cand = os.path.join(self.root, name)
            if STEP_RE.match(name) and os.path.isfile(os.path.join(cand, "COMPLETE")):
                return cand
            log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", p, name)
        done = self.complete_checkpoints()
        return done[-1] if done else None

    # ---- save ----
    def save(self, step: int, model, optimizer, train_state: dict, rank_state: dict | None = None) -> str:
        """Collective: every rank calls it. Returns the final directory."""
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        rank = _rank()
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for n in os.listdir(self.root):           # leftovers of a save that was killed
                if n.endswith(".tmp") and os.path.isdir(os.path.join(self.root, n)):
                    shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        model_sd = model_sharded_state_dict(model)
        with cuda_to_cpu():
            sd = {"model": model_sd,
                  "optimizer": optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)}
            dist_checkpointing.save(sd, tmp)
        rng_t, rng_j = capture_rng()
        save_file({k: v.contiguous() for k, v in rng_t.items()}, os.path.join(tmp, f"rank_{rank:05d}_rng.safetensors"))
        with open(os.path.join(tmp, f"rank_{rank:05d}.json"), "w") as f:
            json.dump({"rng": rng_j, **to_jsonable(rank_state or {})}, f)
        if rank == 0:
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump(to_jsonable({"step": step, **train_state}), f, indent=1)
        _barrier()
        if rank == 0:
            self._finalize(tmp, final, name)
        _barrier()
        return final

    def _finalize(self, tmp: str, final: str, name: str):
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(name + "\n")
        old = None
        if os.path.exists(final):                     # re-saving a step (e.g. after a resume): keep it until done
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        atomic_write_text(os.path.join(self.root, "latest"), name + "\n")
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self._prune()

    def _prune(self):
        done = self.complete_checkpoints()
        for p in done[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(p, ignore_errors=True)

    # ---- load ----
    def load(self, path: str, model, optimizer) -> tuple[dict, dict]:
        """Load model and optimizer in place; restore this rank's RNG. Returns (train_state, rank_state)."""
        if not os.path.isfile(os.path.join(path, "COMPLETE")):
            raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker)")
        rank = _rank()
        model_sd = model_sharded_state_dict(model)
        with cuda_to_cpu():
            sd = {"model": model_sd}
            if optimizer is not None:
                _init_empty_optimizer_state(optimizer)
                sd["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
            loaded = dist_checkpointing.load(sd, path)
            with torch.no_grad():
                unwrap(model).load_state_dict(loaded["model"], strict=False)
                if optimizer is not None:
                    load_optimizer_state(optimizer, loaded["optimizer"])  # one `step` per parameter
        with open(os.path.join(path, "train_state.json")) as f:
            train_state = from_jsonable(json.load(f))
        rank_json = os.path.join(path, f"rank_{rank:05d}.json")
        rank_state = {}
        if os.path.isfile(rank_json):          # same world size: restore this rank's RNG and data state
            with open(rank_json) as f:
                rank_state = from_jsonable(json.load(f))
            restore_rng(load_file(os.path.join(path, f"rank_{rank:05d}_rng.safetensors")), rank_state.pop("rng"))
        else:
            log.warning("%s has no state for rank %d (another world size): RNG and data order start fresh", path, rank)
        return train_state, rank_state
