"""Loading the compiled extensions and announcing which backend runs.

`megamoe._C` (csrc/*.cpp, every machine) and `megamoe._C_cuda` (csrc/*.cu, where torch has CUDA) register their
kernels under `torch.ops.megamoe` through TORCH_LIBRARY; such a .so has no Python module init, so it is loaded
with `torch.ops.load_library` from the file next to `megamoe/__init__.py` (built by `pip install
--no-build-isolation -e .` or `python3 setup.py build_ext --inplace`).

`log_backend_once` writes one INFO line per (op, backend) per process: the first call tells which path runs, later
calls stay silent.

Loading `_C` also registers fake (meta) implementations of the `torch.ops.megamoe` operators
(`torch.library.register_fake`): output shapes and dtypes from the inputs alone, so torch.compile (dynamo, AOTAutograd,
inductor) traces through them instead of breaking the graph. Every output shape is fixed by the inputs (the permuted
row count is an argument), so no data-dependent sizes arise inside the ops.
"""

from __future__ import annotations

import glob
import logging
import os
import threading

import torch

_lock = threading.RLock()
_loaded: dict[str, str | None] = {}   # name -> path loaded, or None if absent / failed
_errors: dict[str, str] = {}
_announced: set[tuple[str, str]] = set()


def _package_dir() -> str:
    import megamoe
    return os.path.dirname(os.path.abspath(megamoe.__file__))


def load_library(name: str) -> bool:
    """Load `megamoe.<name>` (e.g. "_C", "_C_cuda") once; return whether its ops are registered."""
    if name in _loaded:          # after the first call: no lock (torch.compile cannot trace one)
        return _loaded[name] is not None
    with _lock:
        if name in _loaded:
            return _loaded[name] is not None
        candidates = sorted(glob.glob(os.path.join(_package_dir(), name + ".so"))
                            + glob.glob(os.path.join(_package_dir(), name + ".*.so")))
        _loaded[name] = None
        if not candidates:
            _errors[name] = f"megamoe/{name}.so not found (build it: pip install --no-build-isolation -e .)"
            return False
        if name == "_C_cuda" and "_C" not in _loaded:
            load_library("_C")  # the CUDA library registers implementations for schemas defined in _C
        try:
            torch.ops.load_library(candidates[0])
            _loaded[name] = candidates[0]
        except (OSError, RuntimeError) as exc:  # e.g. built against another torch
            _errors[name] = f"loading {candidates[0]} failed: {exc}"
        if name == "_C" and _loaded[name] is not None and hasattr(torch.ops.megamoe, "row_map"):
            _register_fakes()
        return _loaded[name] is not None


def _register_fakes() -> None:
    """Fake implementations of the operators declared in csrc/permute.cpp (shapes as documented there)."""
    lib = torch.library

    @lib.register_fake("megamoe::row_map")
    def _row_map(indices, num_experts, capacity, pad_multiple):
        long = dict(dtype=torch.int64, device=indices.device)
        return (indices.new_empty(indices.shape, dtype=torch.int64), torch.empty(num_experts, **long),
                torch.empty(num_experts, **long), torch.empty(num_experts + 1, **long), torch.empty(3, **long))

    @lib.register_fake("megamoe::permute_rows")
    def _permute_rows(src, row_map, weights, num_rows, zero_fill):
        return src.new_empty((num_rows, src.shape[1]))

    @lib.register_fake("megamoe::combine_rows")
    def _combine_rows(rows, row_map, weights):
        return rows.new_empty((row_map.shape[0], rows.shape[1]))

    @lib.register_fake("megamoe::unpermute_backward")
    def _unpermute_backward(grad_out, permuted, row_map, weights):
        return permuted.new_empty(permuted.shape), weights.new_empty(weights.shape)


def load_error(name: str) -> str:
    return _errors.get(name, "")


def cpp_available() -> bool:
    return load_library("_C") and hasattr(torch.ops.megamoe, "row_map")


def cuda_available() -> bool:
    return torch.cuda.is_available() and cpp_available() and load_library("_C_cuda")


def log_backend_once(logger: logging.Logger, op: str, backend: str, detail: str) -> None:
    key = (op, backend)
    if key in _announced or torch.compiler.is_compiling():   # a traced graph logs nothing (a graph break)
        return
    _announced.add(key)
    logger.info("%s: %s backend (%s)", op, backend, detail)


def forced_backend(env_var: str, backends: tuple, logger: logging.Logger, op: str) -> str:
    """The backend `env_var` forces ("" when unset or "auto"); raises on an unknown name. A forced "torch" is
    announced here (the plain-torch reference needs no further check)."""
    forced = os.environ.get(env_var, "").strip().lower()
    if forced not in ("", "auto") + tuple(backends):
        raise ValueError(f"{env_var} must be one of {tuple(backends)} (or unset), got {forced!r}")
    if forced == "torch":
        log_backend_once(logger, op, "torch", f"plain-torch reference, forced by {env_var}")
    return "" if forced == "auto" else forced
