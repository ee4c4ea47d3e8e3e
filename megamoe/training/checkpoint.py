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
    step_00000120.tmp/          a save in progress (or one killed midway): never read. Its OWNER file names the
                                saving process (`pid@host`); the next save removes it once that process is gone,
                                and leaves it alone while it lives (another run saving into the same directory)

Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 writes COMPLETE, renames the directory to
`step_N` (a single rename) and only then rewrites `latest`. A crash at any point leaves the previous checkpoint
and `latest` untouched.

Resume (`find_latest`): the checkpoint `latest` names, then the other complete ones newest first; the first that
passes `validate_checkpoint` (train_state.json, every rank's state, megatron's metadata and common state, every
.distcp file as long as the tensor index says) is used. A bad one is named in a warning with the file and what is
wrong with it; when none passes, a CheckpointError lists them all.

Resharding: model tensors are saved as ShardedTensors with their GLOBAL shapes (TP-split parameters carry their
partition axis; experts their global names), optimizer state in megatron's fully reshardable format
(megamoe/training/resharding.py), so a checkpoint loads into another TP/EP/DP layout.

Trust: dist_checkpointing writes its tensor index (`.metadata`) and its "common" state with pickle. They are read
back through megamoe.training.safe_load (an allowlist unpickler, torch.load(weights_only=True)), so a crafted
checkpoint cannot run code: it is refused with the file and the forbidden global named. Everything of ours is JSON
or safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from megamoe.compat.cpu import cuda_to_cpu
from megamoe.errors import CheckpointError
from megamoe.fileio import atomic_write_text, owner_alive, owner_tag, parse_owner
from megamoe.formats.safetensors_io import SafetensorsReader
from megamoe.training import safe_load
from megamoe.training.optim import unwrap
from megamoe.training.resharding import load_optimizer_state, optimizer_sharded_state_dict

log = logging.getLogger("megamoe.train")

__all__ = ["CheckpointManager", "model_sharded_state_dict", "capture_rng", "restore_rng", "validate_checkpoint"]

STEP_RE = re.compile(r"^step_(\d{8})$")
RANK_RE = re.compile(r"^rank_(\d{5})\.json$")
OWNER = "OWNER"          # in a step_N.tmp directory: `pid@host` of the process saving into it
STALE_UNOWNED_S = 60     # a .tmp directory without OWNER older than this is a leftover (OWNER is written at once)

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _job_attempt() -> tuple[str | None, int | None]:
    """(torchrun's run id, restart count) of this process; (None, None) outside torchrun."""
    job, attempt = os.environ.get("TORCHELASTIC_RUN_ID"), os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if job is None:
        return None, None
    return job, int(attempt) if attempt and attempt.isdigit() else 0


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
            dt = getattr(torch, str(x["dtype"]), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"{x['dtype']!r} is not a torch dtype")
            return torch.tensor(x["__tensor__"], dtype=dt)
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
    """ShardedTensors for every tensor of `model` (our LlamaMoEModel, possibly DDP-wrapped, or the list of a
    pipeline rank's model chunks), keyed by name (GLOBAL layer indices on every pipeline stage).

    - megatron TP layers tag their weights (`tensor_model_parallel`, `partition_dim`): sharded over TP on that axis;
    - experts (`allreduce = False`) are stored under global names; under expert-TP, gate/up split on dim 0 and
      down on dim 1; replicas over the expert-data-parallel group;
    - everything else (norms, routers) is replicated; rank (tp 0, dp 0, cp 0) writes it;
    - the last pipeline stage's copy of a tied embedding (`shared`) is a replica of the first stage's `embed.weight`.
    If the model defines its own `sharded_state_dict`, that is used instead."""
    if isinstance(model, (list, tuple)):
        out = {}
        for chunk in model:
            out.update(model_sharded_state_dict(chunk))
        return out
    module = unwrap(model)
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    edp_rank = ps.get_expert_data_parallel_rank()
    out = {}
    for prefix, sub in module.named_modules():     # stacked experts (moe/experts.py): per-expert keys via factories
        if hasattr(sub, "sharded_factories"):
            out.update(sub.sharded_factories(prefix + "." if prefix else ""))
    for name, t in module.state_dict(keep_vars=True).items():
        if not torch.is_tensor(t) or getattr(t, "stacked_expert_view", False):
            continue
        shared = 1 if getattr(t, "shared", False) else 0    # the last stage's tied-embedding copy: never written
        if getattr(t, "allreduce", True) is False:                       # expert weight
            if etp > 1:
                axis = 1 if "down_proj" in name else 0
                out[name] = ShardedTensor.from_rank_offsets(name, t, (axis, etp_rank, etp), replica_id=edp_rank)
            else:
                out[name] = ShardedTensor.from_rank_offsets(name, t, replica_id=(etp_rank, edp_rank))
        elif getattr(t, "tensor_model_parallel", False) and tp > 1:
            out[name] = ShardedTensor.from_rank_offsets(name, t, (t.partition_dim, tp_rank, tp),
                                                        replica_id=(shared, dp_rank) if shared else dp_rank)
        else:
            out[name] = ShardedTensor.from_rank_offsets(
                name, t, replica_id=(shared, tp_rank, dp_rank) if shared else (tp_rank, dp_rank))
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
# validation (before a resume trusts a checkpoint)

def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def validate_checkpoint(path: str) -> dict:
    """Check that checkpoint directory `path` is whole before a resume loads it: COMPLETE; train_state.json (its
    step matching the directory's name); every saved rank's rank_NNNNN.json and _rng.safetensors; megatron's
    metadata.json (torch_dist), `.metadata` (through the restricted unpickler) and common.pt (weights only); every
    .distcp file at least as long as the tensor index says. Returns the train state; raises CheckpointError naming
    the first bad file and what is wrong with it. Reads only metadata and small files, never the tensors."""
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker)")
    ts_path = os.path.join(path, "train_state.json")
    ts = _read_json(ts_path)
    m = STEP_RE.match(os.path.basename(path.rstrip("/")))
    if not isinstance(ts, dict) or not isinstance(ts.get("step"), int) or not isinstance(ts.get("tokens"), int):
        raise CheckpointError(f"{ts_path}: lacks the integer fields step and tokens")
    if m and int(m.group(1)) != ts["step"]:
        raise CheckpointError(f"{ts_path}: says step {ts['step']}, the directory is {os.path.basename(path)}")
    names = os.listdir(path)
    ranks = sorted(int(r.group(1)) for r in map(RANK_RE.match, names) if r)
    world = ts.get("world_size")
    if not isinstance(world, int) or world < 1:  # written before world_size was recorded: the rank files found
        world = (ranks[-1] + 1) if ranks else 0
    for r in range(world):
        rj = os.path.join(path, f"rank_{r:05d}.json")
        st = _read_json(rj)
        if not isinstance(st, dict) or "rng" not in st:
            raise CheckpointError(f"{rj}: lacks the rank's RNG state")
        SafetensorsReader(os.path.join(path, f"rank_{r:05d}_rng.safetensors")).close()
    cfg = _read_json(os.path.join(path, "metadata.json"))
    if not isinstance(cfg, dict) or cfg.get("sharded_backend") != "torch_dist" or cfg.get("common_backend") != "torch":
        raise CheckpointError(f"{os.path.join(path, 'metadata.json')}: backend {cfg!r}; megamoe writes and reads "
                              "torch_dist checkpoints only")
    md = safe_load.read_metadata(os.path.join(path, ".metadata"))
    need = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel:
            raise CheckpointError(f"{os.path.join(path, '.metadata')}: names a data file {rel!r} outside the "
                                  "checkpoint directory")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing (the tensor index of {path} lists it)")
        size = os.path.getsize(f)
        if size < end:
            raise CheckpointError(f"{f}: truncated: {size} bytes, the tensor index needs {end}")
    safe_load.load_common(path)
    return ts


# ---------------------------------------------------------------------------------------------------------------

DISK_FULL_BYTES = 64 << 20   # a failed save with less free space than this is reported as a full disk


def _disk_full(root: str, exc: BaseException) -> str | None:
    """How full the disk is, when `exc` (a failed save) is a full disk: ENOSPC anywhere in its chain or message (torch's
    zip writer says only "unexpected pos 704 vs 598"; megatron wraps its writer's errors), or less than
    DISK_FULL_BYTES free now. None otherwise."""
    import errno
    seen, e, text = set(), exc, []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            text.append("ENOSPC")
        text.append(str(e))
        e = e.__cause__ or e.__context__
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    said = any("ENOSPC" == t or "No space left on device" in t for t in text)
    if not said and (free is None or free >= DISK_FULL_BYTES):
        return None
    return f"{free / 2**20:.1f} MiB free" if free is not None else "no space left on device"


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
        """The checkpoint to resume from: the one `latest` names, else the newest complete one, skipping any that
        fails `validate_checkpoint` (each named in a warning). None when there is no checkpoint at all;
        CheckpointError listing every bad one when none is whole."""
        order = []
        p = os.path.join(self.root, "latest")
        if os.path.isfile(p):
            name = open(p).read().strip()
            cand = os.path.join(self.root, name)
            if STEP_RE.match(name) and os.path.isfile(os.path.join(cand, "COMPLETE")):
                order.append(cand)
            elif _rank() == 0:
                log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", p, name)
        order += [c for c in reversed(self.complete_checkpoints()) if c not in order]
        bad = []
        for cand in order:
            try:
                validate_checkpoint(cand)
            except CheckpointError as e:
                bad.append(str(e))
                if _rank() == 0:
                    log.warning("--resume: skipping %s: %s", os.path.basename(cand), e)
                continue
            if bad and _rank() == 0:
                log.warning("--resume: falling back to %s (%d newer checkpoint%s unusable, named above)",
                            os.path.basename(cand), len(bad), "s" if len(bad) > 1 else "")
            return cand
        if bad:
            raise CheckpointError(f"{self.root}: no checkpoint can be resumed from: " + "; ".join(bad))
        return None

    # ---- save ----
    def save(self, step: int, model, optimizer, train_state: dict, rank_state: dict | None = None) -> str:
        """Collective: every rank calls it. Returns the final directory."""
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        rank = _rank()
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            self._remove_stale_tmp()
            try:
                os.makedirs(tmp)
            except FileExistsError:
                raise CheckpointError(
                    f"{tmp}: another run is saving step {step} into {self.root} ({self._tmp_owner(tmp)}): two runs "
                    "must not share checkpoint.dir. If no other run uses it (a process on another host cannot be "
                    "checked from here), remove that directory and resume") from None
            job, attempt = _job_attempt()
            with open(os.path.join(tmp, OWNER), "w") as f:
                f.write(owner_tag() + "\n" + (f"job={job} attempt={attempt}\n" if job is not None else ""))
        _barrier()
        try:
            self._write(tmp, step, rank, model, optimizer, train_state, rank_state)
        except (Exception, CheckpointException) as e:
            full = _disk_full(self.root, e)
            if full is None:
                raise
            raise CheckpointError(
                f"{tmp}: step {step} could not be saved: the disk holding {self.root} is full ({full}). The last "
                f"complete checkpoint is untouched ({self.find_latest() or 'none yet'}); free some space, then "
                "resume with --resume (the half-written directory is removed by the next save)") from None
        _barrier()
        if rank == 0:
            self._finalize(tmp, final, name)
        _barrier()
        return final

    def _write(self, tmp, step, rank, model, optimizer, train_state, rank_state):
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
            world = dist.get_world_size() if dist.is_initialized() else 1
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump(to_jsonable({"step": step, **train_state, "world_size": world}), f, indent=1)

    @staticmethod
    def _tmp_owner(tmp: str) -> str:
        try:
            with open(os.path.join(tmp, OWNER)) as f:
                return "saved by " + " ".join(f.read().split())
        except OSError:
            return "owner unknown"

    @staticmethod
    def _read_owner(d: str):
        """(pid, host, job, attempt) from d/OWNER (job and attempt None outside torchrun), or None."""
        try:
            with open(os.path.join(d, OWNER)) as f:
                lines = f.read().split("\n")
        except OSError:
            return None
        owner = parse_owner(lines[0])
        if owner is None:
            return None
        kv = dict(x.split("=", 1) for x in " ".join(lines[1:]).split() if "=" in x)
        attempt = kv.get("attempt")
        return (*owner, kv.get("job"), int(attempt) if attempt and attempt.isdigit() else None)

    def _remove_stale_tmp(self):
        """Remove the step_N.tmp directories of saves whose process is gone (a killed run): its OWNER process no
        longer exists on this host, or it was an earlier attempt of this torchrun job (torchrun stops every worker
        before a restart, whichever host rank 0 now runs on). Leave those whose process is alive (another run saving
        here) or on another host and not of this job, and unowned ones younger than STALE_UNOWNED_S (a save that has
        not written its OWNER file yet)."""
        job, attempt = _job_attempt()
        for n in os.listdir(self.root):
            d = os.path.join(self.root, n)
            if not (n.endswith(".tmp") and STEP_RE.match(n[:-4]) and os.path.isdir(d)):
                continue
            owner = self._read_owner(d)
            if owner is not None:
                pid, host, their_job, their_attempt = owner
                earlier = (job is not None and their_job == job and their_attempt is not None
                           and attempt is not None and their_attempt < attempt)
                if not earlier and owner_alive(pid, host):
                    log.warning("%s: left alone, its save may still be running (pid %d on %s)", d, pid, host)
                    continue
            else:
                try:
                    if time.time() - os.path.getmtime(d) < STALE_UNOWNED_S:
                        continue
                except OSError:
                    continue
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s, a save killed midway", d)

    def _finalize(self, tmp: str, final: str, name: str):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(tmp, OWNER))
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
        """Load model and optimizer in place; restore this rank's RNG. Returns (train_state, rank_state).
        Nothing in the directory is executed (safe_load); CheckpointError names a bad file."""
        validate_checkpoint(path)
        rank = _rank()
        model_sd = model_sharded_state_dict(model)
        with cuda_to_cpu():
            sd = {"model": model_sd}
            if optimizer is not None:
                _init_empty_optimizer_state(optimizer)
                sd["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
            try:
                loaded = safe_load.load(sd, path)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - megatron/torch about the files' content
                raise CheckpointError(f"{path}: the model/optimizer state does not load ({type(e).__name__}: "
                                      f"{str(e)[:300]})") from e
            with torch.no_grad():
                for chunk in model if isinstance(model, (list, tuple)) else [model]:   # pipeline: every chunk
                    unwrap(chunk).load_state_dict(loaded["model"], strict=False)
                if optimizer is not None:
                    load_optimizer_state(optimizer, loaded["optimizer"])  # one `step` per parameter
        ts_path = os.path.join(path, "train_state.json")
        try:
            train_state = from_jsonable(_read_json(ts_path))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{ts_path}: {e}") from None
        rank_json = os.path.join(path, f"rank_{rank:05d}.json")
        rank_state = {}
        if os.path.isfile(rank_json):          # same world size: restore this rank's RNG and data state
            try:
                rank_state = from_jsonable(_read_json(rank_json))
                restore_rng(load_file(os.path.join(path, f"rank_{rank:05d}_rng.safetensors")), rank_state.pop("rng"))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged rank state
                raise CheckpointError(f"{rank_json}: this rank's state does not restore ({type(e).__name__}: "
                                      f"{e})") from None
        else:
            log.warning("%s has no state for rank %d (another world size): RNG and data order start fresh", path, rank)
        return train_state, rank_state
