"""Everything megatron-core needs to run on a CPU-only torch with gloo. The only other place that changes megatron's
behaviour is megamoe/compat/megatron.py (fixes applied to megatron objects on every device).

megatron-core assumes CUDA in a few places (`torch.cuda.current_device()` as a device, CUDA streams and events, the
CUDA RNG tracker, `device="cuda"` literals in its optimizer). `apply()` patches exactly those, and only when no GPU is
present: with CUDA available it returns False and changes nothing. Measured facts behind each patch:
../shared/reference/cpu-feasibility.md (megatron-core 0.16.1). Each patch is guarded so that a newer megatron-core
which no longer has the patched symbol is left alone.

    from megamoe.compat import cpu
    cpu.apply()                 # once, before building models (megamoe.parallel.initialize calls it)
    with cpu.cuda_to_cpu():     # around megatron's optimizer / DDP code, which hard-codes device="cuda"
        optimizer.step()
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_applied = False


class _Event:
    def synchronize(self): pass
    def wait(self, *a): pass
    def record(self, *a): pass
    def query(self): return True
    def elapsed_time(self, other): return 0.0


class _Stream:
    def __init__(self, *a, **k): pass
    def wait_stream(self, *a): pass
    def wait_event(self, *a): pass
    def record_event(self, ev=None): return ev or _Event()
    def synchronize(self): pass
    def __eq__(self, o): return isinstance(o, _Stream)
    def __hash__(self): return 0


def _is_cuda(d) -> bool:
    return d is not None and not isinstance(d, (torch.dtype, torch.Tensor, bool)) and (
        isinstance(d, int) or str(d).startswith("cuda"))


class CudaToCpuMode(TorchFunctionMode):
    """Redirects `device="cuda"`/int devices to the CPU, makes `.cuda()` and `.to("cuda")` no-ops, and reports CPU
    tensors' `type()` as `torch.cuda.*` (megatron's optimizer compares type strings). Thread-local; costs ~30% on
    tiny ops, so it is entered only around megatron's optimizer and DDP code (`cuda_to_cpu()`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # fast path first: most calls (the optimizer's tensor math) have no device and are none of the three methods
        if kwargs:
            if _is_cuda(kwargs.get("device")):
                kwargs = dict(kwargs, device="cpu")
        else:
            kwargs = {}
        if func in _SPECIAL:
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
                args = (args[0], "cpu") + tuple(args[2:])
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                t = func(*args)
                return t if ".cuda." in t else t.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_SPECIAL = frozenset((torch.Tensor.cuda, torch.Tensor.to, torch.Tensor.type))


def needed() -> bool:
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _applied


@contextlib.contextmanager
def cuda_to_cpu():
    """Context for megatron optimizer / DDP calls: a no-op with a GPU, CudaToCpuMode without one."""
    if not _applied:
        yield
        return
    with CudaToCpuMode():
        yield


@contextlib.contextmanager
def without_cuda_to_cpu():
    """Inside `cuda_to_cpu()`: run a block (model compute called back from megatron code that needs the mode, e.g.
    the pipeline schedules) without CudaToCpuMode's per-op overhead. A no-op when the mode is not the current one."""
    if _applied and isinstance(torch.overrides._get_current_function_mode(), CudaToCpuMode):
        with torch.overrides._pop_mode_temporarily():
            yield
        return
    yield


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's local_multi_tensor_l2_norm (one torch.norm per tensor, then a norm of the list), as one foreach
    norm: same value up to rounding order."""
    tensors = [t for tl in tensor_lists for t in tl]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's local_multi_tensor_scale (dst.copy_(src * scale) per tensor) with foreach kernels."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    for d, r in zip(dst, torch._foreach_mul(src, scale)):
        d.copy_(r)


def _patch_multi_tensor_fallbacks():
    """Without apex / transformer-engine megatron's grad norm and clipping use per-tensor Python loops
    (megatron.core.utils.local_multi_tensor_*); swap in the foreach equivalents where those fallbacks are in use."""
    try:
        from megatron.core import utils as mu
        from megatron.core.optimizer import clip_grads as cg
    except ImportError:  # pragma: no cover - layout of other releases
        return
    if getattr(cg, "l2_norm_impl", None) is getattr(mu, "local_multi_tensor_l2_norm", object()):
        cg.l2_norm_impl = _foreach_l2_norm
    if getattr(cg, "multi_tensor_scale_impl", None) is getattr(mu, "local_multi_tensor_scale", object()):
        cg.multi_tensor_scale_impl = _foreach_scale


def apply() -> bool:
    """Patch megatron-core for CPU + gloo. Idempotent. Returns True if patches are in force."""
    global _applied
    if _applied:
        return True
    if not needed():
        return False
    c, cur = torch.cuda, _Stream()
    c.current_device = lambda: "cpu"                       # used as device= all over megatron-core
    c.Stream, c.Event = _Stream, (lambda *a, **k: _Event())  # all-to-all dispatcher, DDP overlap
    c.current_stream = c.default_stream = lambda *a, **k: cur
    c.stream = lambda s=None: contextlib.nullcontext()
    c.synchronize = lambda *a, **k: None
    # the "CUDA" RNG is the CPU default generator (tracker fork/restore, activation recompute)
    c.get_rng_state = lambda device="cuda": torch.get_rng_state()
    c.set_rng_state = lambda s, device="cuda": torch.set_rng_state(s)
    c.manual_seed = lambda s: torch.default_generator.manual_seed(int(s))  # not torch.manual_seed: it recurses
    c.manual_seed_all = c.manual_seed

    from megatron.core.tensor_parallel import mappings as mp
    from megatron.core.tensor_parallel import random as rnd
    rnd._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda s, device=-1, graph_safe=False: torch.set_rng_state(s)  # orig: silent no-op
    logging.getLogger(rnd.__name__).setLevel(logging.ERROR)  # "CPU RNG state changed within GPU RNG context"

    _patch_multi_tensor_fallbacks()

    try:
        from megatron.core.transformer.moe import moe_utils
        from megatron.core.transformer.moe import token_dispatcher as td
    except ImportError:  # pragma: no cover - layout of other releases
        moe_utils = td = None
    if moe_utils is not None:
        if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 bug without TE (GPU too): NameError in the router
            moe_utils.te_general_gemm = None
        if hasattr(td, "maybe_move_tensor_to_cpu"):     # all-to-all split sizes must be numpy, not CPU tensors
            mv = moe_utils.maybe_move_tensor_to_cpu
            td.maybe_move_tensor_to_cpu = lambda t, as_numpy=False, record_stream=False: (
                t.numpy() if as_numpy and torch.is_tensor(t) and not t.is_cuda else mv(t, as_numpy, record_stream))

    # gloo has no uneven all_gather / reduce_scatter (used when EP>1 and expert-TP>1)
    if not (hasattr(mp, "_gather_along_first_dim") and hasattr(mp, "_reduce_scatter_along_first_dim")):
        _applied = True  # a release without these internals: nothing more to patch
        log.info("megamoe.compat.cpu: no GPU; megatron-core patched for CPU + gloo (no uneven-collective patch)")
        return True
    ag, rs = mp._gather_along_first_dim, mp._reduce_scatter_along_first_dim

    def ag_uneven(x, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return ag(x, group, output_split_sizes, use_global_buffer)
        m, n = max(output_split_sizes), group.size()
        pad = x.new_zeros((m,) + x.shape[1:])
        pad[: x.shape[0]] = x
        out = x.new_empty((m * n,) + x.shape[1:])
        dist.all_gather_into_tensor(out, pad, group=group)
        return torch.cat([ch[:k] for ch, k in zip(out.chunk(n), output_split_sizes)])

    def rs_uneven(x, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return rs(x, group, input_split_sizes, use_global_buffer)
        full = x.contiguous().clone()
        dist.all_reduce(full, group=group)
        return full.split(input_split_sizes)[group.rank()].contiguous()

    mp._gather_along_first_dim, mp._reduce_scatter_along_first_dim = ag_uneven, rs_uneven
    _applied = True
    log.info("megamoe.compat.cpu: no GPU; megatron-core patched for CPU + gloo")
    return True
