"""Load a training checkpoint without executing code from it.

megatron-core's `dist_checkpointing.load` (torch_dist backend) unpickles three kinds of file from the checkpoint
directory, and a plain unpickler runs whatever callable a crafted pickle names (`os.system`, `builtins.exec`, ...):

| file | who reads it | here |
|---|---|---|
| `.metadata` | torch's `FileSystemReader.read_metadata`: `pickle.load` | `RestrictedUnpickler`: an allowlist of the checkpoint metadata classes (`METADATA_GLOBALS`) |
| `common.pt` | megatron's `TorchCommonLoadStrategy`: `torch.load` with the default `weights_only` (an environment variable, `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`, turns it off) | `torch.load(weights_only=True)`, explicitly |
| byte objects inside `*.distcp` (entries the metadata marks `BytesStorageMetadata`) | torch's `DefaultLoadPlanner.load_bytes`: `torch.load(weights_only=False)` | checked with `torch.load(weights_only=True)` first |

Tensors inside `*.distcp` are read by torch with `weights_only=True` already; `metadata.json` is JSON; the pickles
torch and megatron exchange between ranks during a load (plans, the metadata broadcast from rank 0, integrity
checks) are made in-process by the job itself, not read from the directory. Anything
outside the allowlist is refused with a CheckpointError naming the file and the forbidden global, before it is
called. `load(sharded_state_dict, path)` is `dist_checkpointing.load` with these readers; `read_metadata(path)` and
`load_common(path)` serve the checks of `checkpoint.validate_checkpoint`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megamoe.errors import CheckpointError

__all__ = ["RestrictedUnpickler", "METADATA_GLOBALS", "read_metadata", "load_common", "load", "our_errors"]

# the classes and functions a torch_dist `.metadata` pickle may name (torch 2.4-2.13, megatron-core 0.16)
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "TensorWriteData", "WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},  # a table lookup: layout name -> torch.layout
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray"},
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)  # torch.float32, torch.strided, ... (not callables)


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals of `METADATA_GLOBALS` (and torch's dtype / layout / memory
    format values); any other global raises CheckpointError naming `path` and the global, before anything is
    called."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise CheckpointError(f"{self.path}: refers to {module}.{name}, which a checkpoint's metadata never holds; "
                              "refusing to load it (a crafted or foreign file: megamoe does not execute code from "
                              "checkpoints)")


def read_metadata(path: str) -> Metadata:
    """The torch_dist `.metadata` file `path`, unpickled with RestrictedUnpickler. CheckpointError (naming the
    file) for a forbidden global, a truncated or corrupt file, or anything that is not a torch Metadata."""
    try:
        with open(path, "rb") as f:
            md = RestrictedUnpickler(f, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint's tensor index)") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure of a damaged file
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e}); the file is truncated or "
                              "corrupt") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not torch.distributed.checkpoint Metadata")
    return md


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(path, source: str | None = None):
    """`torch.load(path, weights_only=True)` on the CPU; CheckpointError naming the file (`source` when `path` is a
    buffer) and, for a refused pickle, the global it names."""
    where = source or str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing") from None
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        what = f"refers to {m.group(1)}, which is not allowed in a checkpoint" if m else f"refused ({e})"
        raise CheckpointError(f"{where}: {what}; refusing to load it (megamoe does not execute code from "
                              "checkpoints)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file
        raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: {str(e)[:200]}); the file is truncated or "
                              "corrupt") from None


def load_common(checkpoint_dir: str):
    """megatron's `common.pt` of a checkpoint, loaded with weights_only=True."""
    return safe_torch_load(os.path.join(checkpoint_dir, "common.pt"))


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    def load_common(self, checkpoint_dir):
        return load_common(str(checkpoint_dir))

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):  # pragma: no cover - torch_dist
        raise CheckpointError(f"{checkpoint_dir}: holds sharded objects as separate .pt files, which megamoe never "
                              "writes; refusing to unpickle them")


class _SafeBytesPlanner:
    """Wraps a load planner: a byte object read from a .distcp file must pass torch.load(weights_only=True) before
    the planner's own load_bytes (which unpickles without restrictions) sees it."""

    def __init__(self, planner, path: str):
        self._planner, self._path = planner, path

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value):
        data = value.read()
        safe_torch_load(io.BytesIO(data), f"{self._path} (byte object {read_item.dest_index.fqn!r})")
        self._planner.load_bytes(read_item, io.BytesIO(data))


class _SafeFileSystemReader(CachedMetadataFileSystemReader):
    """megatron's cached-metadata reader with the restricted `.metadata` unpickler and checked byte objects."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached_metadata is None:
            md = read_metadata(str(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._cached_metadata = md
        return self._cached_metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _SafeBytesPlanner(planner, str(self.path)))


@contextlib.contextmanager
def our_errors():
    """torch's checkpoint code gathers each rank's exception into a CheckpointException (a BaseException): re-raise
    the CheckpointError inside one, so the message names the file instead of a stack of torch frames."""
    try:
        yield
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise exc from None
        raise


@contextlib.contextmanager
def _restricted_readers():
    """megatron's torch_dist strategy builds its reader with a module-level helper: point it at ours while a load
    runs (the only place it is swapped; restored afterwards)."""
    old = mcore_torch_strategy._get_filesystem_reader
    mcore_torch_strategy._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: \
        _SafeFileSystemReader(checkpoint_dir)
    try:
        yield
    finally:
        mcore_torch_strategy._get_filesystem_reader = old


def load(sharded_state_dict: dict, checkpoint_dir: str) -> dict:
    """`megatron.core.dist_checkpointing.load(sharded_state_dict, checkpoint_dir)` for a torch_dist checkpoint,
    with every pickle it reads restricted (module docstring)."""
    with our_errors(), _restricted_readers():
        return dist_checkpointing.load(sharded_state_dict, checkpoint_dir,
                                       sharded_strategy=TorchDistLoadShardedStrategy(),
                                       common_strategy=_SafeCommonLoadStrategy())
