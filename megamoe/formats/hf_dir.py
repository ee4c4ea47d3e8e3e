"""Read a Hugging Face checkpoint directory lazily: `config.json` plus safetensors (single or sharded).

    src = HFDir("path/to/llama")          # validates: config.json present and parseable, every shard readable
    src.config                            # the config.json dict
    src.keys(); src.shape(k); src.get(k)  # tensors by their HF names, read one at a time
    src.files                             # the weight files (for the source checksum)

Weights come only from safetensors. A directory with only `pytorch_model*.bin` pickles is refused unless
`allow_pickle=True`, which loads them with `torch.load(weights_only=True)` (no arbitrary code runs, but the whole
shard is loaded into memory). Released llama-moe v1 Hub repositories also carry safetensors: prefer those.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch

from megamoe.formats.safetensors_io import NAMES, CheckpointError, SafetensorsReader

log = logging.getLogger(__name__)


def read_json(path: str, what: str = "file") -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


class HFDir:
    def __init__(self, path: str, allow_pickle: bool = False):
        self.path = path
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such directory")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
        self.config = read_json(os.path.join(path, "config.json"), "config.json (not a Hugging Face checkpoint?)")
        self._readers: dict[str, SafetensorsReader] = {}
        self._where: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(wm.values()))
            for f in files:
                self._open(f)
            for k, f in wm.items():
                if k not in self._readers[f]:
                    raise CheckpointError(f"{index}: lists {k!r} in {f}, which does not hold it")
                self._where[k] = f
            self.files = [os.path.join(path, f) for f in files]
        elif os.path.isfile(single):
            r = self._open("model.safetensors")
            self._where = {k: "model.safetensors" for k in r.keys()}
            self.files = [single]
        else:
            sts = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
            if sts:
                for p in sts:
                    r = self._open(os.path.basename(p))
                    for k in r.keys():
                        self._where[k] = os.path.basename(p)
                self.files = sts
            elif bins and allow_pickle:
                log.warning("%s: no safetensors; loading %d pickle file(s) with torch.load(weights_only=True)",
                            path, len(bins))
                self._pickled = {}
                for p in bins:
                    sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                    self._pickled.update(sd)
                self.files = bins
            elif bins:
                raise CheckpointError(f"{path}: holds only pytorch_model*.bin pickles; megamoe reads weights from "
                                      "safetensors (never unpickles by default). Pass --allow-pickle to load them "
                                      "with torch.load(weights_only=True), or use the repository's safetensors files")
            else:
                raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors")

    def _open(self, fname: str) -> SafetensorsReader:
        p = os.path.join(self.path, fname)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: missing (listed by the checkpoint index)")
        r = self._readers[fname] = SafetensorsReader(p)
        return r

    def keys(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._where)

    def __contains__(self, k) -> bool:
        return k in (self._pickled if self._pickled is not None else self._where)

    def shape(self, k) -> list[int]:
        if self._pickled is not None:
            return list(self._pickled[k].shape)
        return self._readers[self._where[k]].shape(k)

    def dtype(self, k) -> str:
        if self._pickled is not None:
            return NAMES[self._pickled[k].dtype]
        return self._readers[self._where[k]].dtype(k)

    def get(self, k, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `k` (read into `out` when given: see SafetensorsReader.get)."""
        if self._pickled is not None:
            t = self._pickled[k]
            return out.view(t.shape).copy_(t) if out is not None else t.clone()
        if k not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {k!r}")
        return self._readers[self._where[k]].get(k, out)

    def map(self, k) -> torch.Tensor:
        """Tensor `k` memory-mapped (copy-on-write; see SafetensorsReader.map), or a copy for pickled sources."""
        if self._pickled is not None:
            return self._pickled[k]
        if k not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {k!r}")
        return self._readers[self._where[k]].map(k)

    def file_source(self, k):
        """(reader, byte offset) of tensor `k`'s data in its safetensors file, for in-kernel copies of a tensor
        that `map(k)` returned unmodified; None for pickled sources."""
        if self._pickled is not None or k not in self._where:
            return None
        r = self._readers[self._where[k]]
        return r, r.file_range(k)[0]

    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def close(self):
        for r in self._readers.values():
            r.close()
