"""Write a Hugging Face checkpoint directory tensor by tensor: `model.safetensors`, or
`model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json` when larger than `max_shard_bytes`
(the layout `from_pretrained` reads). The plan (names, dtypes, shapes, in write order) is known up front, so each
shard's header is written first and only one tensor is in memory at a time.
"""

from __future__ import annotations

import json
import os

import torch

from megamoe.formats.safetensors_io import StreamingWriter, dtype_size, numel


class HFWriter:
    def __init__(self, out_dir: str, plan, max_shard_bytes: int = 5 << 30):
        self.out_dir = out_dir
        self.plan = [(n, dt, list(s)) for n, dt, s in plan]
        groups, cur, size = [], [], 0
        for item in self.plan:
            b = numel(item[2]) * dtype_size(item[1])
            if cur and size + b > max_shard_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(item)
            size += b
        groups.append(cur)
        n = len(groups)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.where = {}
        for f, g in zip(self.files, groups):
            for item in g:
                self.where[item[0]] = f
        self.total = sum(numel(s) * dtype_size(dt) for _, dt, s in self.plan)
        self._groups = dict(zip(self.files, groups))
        self._writers = {}
        self._open = None

    def write(self, name: str, tensor: torch.Tensor):
        f = self.where[name]
        if self._open != f:
            if self._open is not None:
                self._writers[self._open].close()
            self._writers[f] = StreamingWriter(os.path.join(self.out_dir, f), self._groups[f], {"format": "pt"})
            self._open = f
        self._writers[f].write(name, tensor)

    def close(self):
        if self._open is not None:
            self._writers[self._open].close()
        missing = [f for f in self.files if f not in self._writers]
        if missing:
            raise RuntimeError(f"HFWriter: {missing} never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.where.items()))}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as fh:
                json.dump(index, fh, indent=2)

    def abort(self):
        for w in self._writers.values():
            w.abort()


def write_json(path: str, d: dict):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
