"""Source checksums for the shard manifest, computed on a background thread. Imports no torch, so the CLI can
start hashing the source while torch is still being imported.

    h = BackgroundHasher(weight_files(src_dir))          # xxh3_128 (or sha256) of every source weight file
    ...                                                  # the conversion runs; hashing releases the GIL
    h.info()  -> {"algorithm": "xxh3_128", "files": {"model-00001-of-00002.safetensors": "9f...", ...}}

Algorithms: `xxh3_128` (default; the `xxhash` package: about 10 GB/s on one core, so 3.8 GB cost ~0.4 s) and
`sha256` (hashlib: about 1.7 GB/s even with SHA-NI). The checksum identifies the source a checkpoint was made from;
it is not a security boundary (xxh3 is not cryptographic: ask for sha256 when you need that). Manifests written
before the algorithm was recorded hold `source.sha256: {file: hexdigest}`; `manifest_checksums` reads both forms.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import threading

ALGORITHMS = ("xxh3_128", "sha256")
DEFAULT_ALGORITHM = "xxh3_128"
CHUNK = 8 << 20


def available(algorithm: str) -> bool:
    if algorithm == "sha256":
        return True
    if algorithm == "xxh3_128":
        try:
            import xxhash  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def resolve(algorithm: str | None) -> str:
    """The algorithm to use: the one asked for (ValueError if unknown), or the default, falling back to sha256 when
    the xxhash package is missing."""
    if algorithm is None:
        return DEFAULT_ALGORITHM if available(DEFAULT_ALGORITHM) else "sha256"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"checksum: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if not available(algorithm):
        raise ValueError(f"checksum: {algorithm} needs the `xxhash` package (pip install xxhash)")
    return algorithm


def new_hasher(algorithm: str):
    """A fresh hash object of `algorithm` (update(bytes-like), hexdigest())."""
    if algorithm == "sha256":
        return hashlib.sha256()
    import xxhash
    return xxhash.xxh3_128()


def file_digest(path: str, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Hex digest of a whole file. Reads through a read-only memory map (no copy into a buffer); both hash
    implementations release the GIL on large updates."""
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                for off in range(0, size, CHUNK):
                    h.update(view[off:off + CHUNK])
            finally:
                view.release()
    return h.hexdigest()


def weight_files(path: str) -> list[str]:
    """The weight files of an HF checkpoint directory, as `hf_dir.HFDir.files` lists them (torch-free; [] when the
    directory has none or cannot be read: HFDir then reports the problem)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    try:
        if os.path.isfile(index):
            with open(index) as f:
                wm = json.load(f).get("weight_map")
            return [os.path.join(path, f) for f in sorted(set(wm.values()))]
        if os.path.isfile(single):
            return [single]
        sts = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        return sts or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    except (OSError, ValueError, AttributeError, TypeError):
        return []


class BackgroundHasher:
    """Digests of several files on a background thread, so the source checksum costs no wall time when a core is
    free. `result()` joins and returns {basename: hexdigest}; `info()` adds the algorithm's name."""

    def __init__(self, paths, algorithm: str | None = None):
        self.paths = list(paths)
        self.algorithm = resolve(algorithm)
        self._out, self._err = {}, None
        self._t = threading.Thread(target=self._run, daemon=True, name="megamoe-checksum")
        self._t.start()

    def _run(self):
        try:
            for p in self.paths:
                self._out[os.path.basename(p)] = file_digest(p, self.algorithm)
        except BaseException as e:  # reported by result()
            self._err = e

    def result(self) -> dict:
        self._t.join()
        if self._err is not None:
            raise self._err
        return dict(self._out)

    def info(self) -> dict:
        return {"algorithm": self.algorithm, "files": self.result()}


def manifest_checksums(source: dict | None) -> tuple[str | None, dict]:
    """(algorithm, {file: hexdigest}) from a manifest's `source` entry, old (`sha256`) or new (`checksum`) form."""
    source = source or {}
    c = source.get("checksum")
    if isinstance(c, dict):
        return c.get("algorithm"), dict(c.get("files") or {})
    if source.get("sha256"):
        return "sha256", dict(source["sha256"])
    return None, {}
