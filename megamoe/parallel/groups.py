"""Process-group setup for a ParallelConfig, from megatron-core's parallel_state. Entry points call it; models
never do (a model is built under the layout in force and refuses to be built without one).

Under `torchrun` the world comes from the environment (NCCL on GPUs, gloo on CPUs). Outside it -- a notebook, a test,
`megamoe-convert` -- `initialize()` makes a world of one, so the same model code runs everywhere.

Timeout: every process group -- the world and each of megatron's groups (tensor, data, expert, ..., and their gloo
twins) -- gets `MEGAMOE_DIST_TIMEOUT` seconds (default 600): a collective that a peer never joins (a rank stopped,
deadlocked or stuck in I/O) raises on the waiting ranks after that long. `collective_errors()` turns that, and a
peer's dropped connection, into a DistributedError (exit 4) that says so.

    from megamoe import parallel
    parallel.initialize(ParallelConfig(tp=2, ep=2), model_cfg)   # under torchrun --nproc_per_node=4
    model = LlamaMoEModel(model_cfg)                              # built for that layout
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from megamoe.compat import cpu
from megamoe.config import DTYPES, BatchShape, ModelConfig, ParallelConfig
from megamoe.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)
_config: ParallelConfig | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "MEGAMOE_DIST_TIMEOUT", 600.0


def timeout_seconds() -> float:
    """The collective timeout: `MEGAMOE_DIST_TIMEOUT` (seconds, > 0), default 600."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}: {raw!r} is not a positive number of seconds")
    return t


def init_distributed(timeout_s: float | None = None) -> None:
    """Initialise torch.distributed: from torchrun's environment, or a single-process world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s or timeout_seconds())
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        try:
            from torch.distributed.rendezvous import _create_c10d_store
        except ImportError:  # pragma: no cover - a torch without this helper: torchrun's own rendezvous
            restart = None
        if restart is not None and "MASTER_ADDR" in os.environ:
            # torchrun --max-restarts: the agent's store outlives a failed attempt, and its keys (gloo/NCCL peer
            # addresses of dead workers) would be read by the next one; give every attempt its own key space
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
            store = dist.PrefixStore(f"megamoe/attempt_{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    else:
        store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def initialize(pcfg: ParallelConfig | None = None, model: ModelConfig | None = None, seed: int = 1234,
               batch: BatchShape | None = None) -> ParallelConfig:
    """Set up torch.distributed and megatron-core's model-parallel groups. Idempotent for the same layout.
    `model` and `batch` (sequence length, micro-batch size, tokens per step) are validated against the layout with
    the real world size before any group exists."""
    global _config
    pcfg = pcfg or ParallelConfig()
    cpu.apply()
    init_distributed()
    pcfg.validate(model, dist.get_world_size(), batch)
    if ps.model_parallel_is_initialized():
        if _config is not None and _layout(_config) != _layout(pcfg):
            raise RuntimeError(f"parallel state already initialised as {_config}; call megamoe.parallel.destroy() first")
        _config = pcfg
        return pcfg
    # megatron's groups get the same timeout as the world (its default is 30 minutes); it passes it to every
    # new_group, the gloo twins included
    ps.initialize_model_parallel(tensor_model_parallel_size=pcfg.tp, expert_model_parallel_size=pcfg.ep,
                                 expert_tensor_parallel_size=pcfg.etp, pipeline_model_parallel_size=pcfg.pp,
                                 virtual_pipeline_model_parallel_size=pcfg.vpp if pcfg.vpp > 1 else None,
                                 context_parallel_size=pcfg.cp,
                                 distributed_timeout_minutes=timeout_seconds() / 60)
    _timeout_on_every_group(datetime.timedelta(seconds=timeout_seconds()))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _config = pcfg
    if dist.get_rank() == 0:
        log.info("parallel layout: world %d = tp %d x cp %d x dp %d x pp %d%s; experts: ep %d x etp %d x edp %d; "
                 "sequence parallel %s", dist.get_world_size(), pcfg.tp, pcfg.cp, ps.get_data_parallel_world_size(),
                 pcfg.pp, f" (vpp {pcfg.vpp})" if pcfg.vpp > 1 else "", pcfg.ep, pcfg.etp,
                 ps.get_expert_data_parallel_world_size(), pcfg.sequence_parallel)
    return pcfg


def _layout(p: ParallelConfig) -> tuple:
    return p.tp, p.ep, p.etp, p.pp, p.vpp, p.cp


_TIMEOUT_RE = re.compile(r"timed out|timeout", re.I)
_PEER_RE = re.compile(r"connection (closed|reset) by peer|broken pipe|connectfullmesh|ProcessGroupNCCL|NCCL error|"
                      r"third_party/gloo", re.I)


def as_distributed_error(exc: BaseException) -> DistributedError | None:
    """A DistributedError for an exception raised by a collective whose peer hung past the timeout or went away
    (gloo / NCCL / c10d store errors); None for anything else."""
    if isinstance(exc, DistributedError):
        return exc
    msg = str(exc)
    is_dist = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and (_PEER_RE.search(msg) or "[c10d]" in msg))
    if not is_dist:
        return None
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    if _TIMEOUT_RE.search(msg):
        return DistributedError(
            f"rank {rank}: a collective got no answer from a peer rank within {TIMEOUT_ENV}={timeout_seconds():g} s: "
            f"a rank hung (stopped, deadlocked or stuck in I/O); stopping the job ({first})")
    return DistributedError(f"rank {rank}: a peer rank died or dropped its connection during a collective; "
                            f"stopping the job ({first})")


@contextlib.contextmanager
def collective_errors():
    """Re-raise a hung or lost peer (see as_distributed_error) as a DistributedError (exit 4); other exceptions
    pass unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only distributed failures are converted
        d = as_distributed_error(e)
        if d is None or d is e:
            raise
        raise d from e


def _timeout_on_every_group(timeout: datetime.timedelta) -> None:
    """Give every process group of this rank `timeout`: megatron-core 0.16.1 creates one group (the expert
    data-parallel gloo group) without passing its timeout, so it would keep gloo's 30-minute default."""
    c10d = dist.distributed_c10d
    if not hasattr(c10d, "_set_pg_timeout"):  # pragma: no cover - older torch: megatron's own timeouts only
        return
    for pg in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timeout, pg)
        except (ValueError, RuntimeError, AssertionError) as e:  # pragma: no cover - a backend without timeouts
            log.warning("could not set the collective timeout on process group %s: %s", pg, e)


def current() -> ParallelConfig | None:
    """The layout in force (None before `initialize`)."""
    return _config if ps.model_parallel_is_initialized() else None


def require() -> ParallelConfig:
    """The layout in force; a clear error when no entry point has set one up."""
    pcfg = current()
    if pcfg is None:
        raise RuntimeError("no parallel layout is set up: call megamoe.parallel.initialize(ParallelConfig(...)) before "
                           "building a model (a world of one: initialize() with no arguments)")
    return pcfg


def destroy(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and torch.distributed (tests, or re-initialising with another layout).
    `keep_process_group=True` keeps the world (torchrun's), so `initialize` can set up another layout in it."""
    global _config
    ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
    _config = None


def megatron_config(cfg: ModelConfig) -> ModelParallelConfig:
    """The megatron-core ModelParallelConfig our parallel layers are built with: the layout in force (`require`)
    and the model's parameter dtype."""
    pcfg = require()
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=pcfg.ep, expert_tensor_parallel_size=pcfg.etp,
        sequence_parallel=pcfg.sequence_parallel, params_dtype=DTYPES[cfg.params_dtype],
        use_cpu_initialization=True,  # same initial weights at every TP size
        perform_initialization=True, gradient_accumulation_fusion=False,
    )
