"""Writer for megatron's indexed dataset format (`<prefix>.bin` + `<prefix>.idx`), crash-safe.

Format (megatron-core `indexed_dataset.py`, also read by Megatron-LM and fairseq's MMapIndexedDataset):

    .bin   the token ids of every document, back to back, in the index's dtype (uint16 or int32 here)
    .idx   b"MMIDIDX\\x00\\x00"  |  <Q version=1  |  <B dtype code  |  <Q sequence count N  |  <Q document count D
           |  int32 sizes[N]  |  int64 byte pointers[N]  |  int64 document_indices[D]

One sequence per document here, so `document_indices = [0, 1, ..., N]` (D = N + 1). The dtype codes are megatron's
`DType` enum (uint16 = 8, int32 = 4, ...).

`IndexedWriter` writes both files under temporary names owned by the process (`<prefix>.bin.<random>.<pid>@<host>.tmp`,
megamoe.fileio: the next writer of that prefix removes those of a killed run) and `publish()` renames them
into place only when everything is written, `.idx` last: a dataset "looks whole" to a reader only when its `.idx`
exists, and an interrupted run leaves at most `*.tmp` files. When an older dataset of the same prefix exists and
`overwrite=True`, its `.idx` is removed *before* the new `.bin` replaces the old one, so no moment pairs an old index
with new tokens. Partial files written by worker processes are appended with `append_bin_file` (a file copy).

`IndexedReader(prefix)` reads such a dataset back without megatron (documents as numpy views of a memory map),
after checking that the `.idx` is whole (header, counts, array lengths, byte pointers consistent with the sizes) and
that the `.bin` holds exactly the bytes the index describes: a truncated or mismatched file is a `ValueError` naming
it, never a short read.
"""

from __future__ import annotations

import os
import shutil
import struct
from typing import Iterable, List, Optional

import numpy as np

from megamoe.errors import DataError, InputError
from megamoe.fileio import remove_stale_temps, temp_path

__all__ = ["IndexedWriter", "IndexedReader", "DTYPE_CODES", "dataset_exists", "read_sizes", "read_index",
           "INDEX_HEADER"]

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def dataset_exists(prefix: str) -> bool:
    """True when both `<prefix>.bin` and `<prefix>.idx` exist (what megatron's reader needs)."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def read_sizes(prefix: str) -> tuple:
    """(dtype, sizes int32[N]) from `<prefix>.idx`, with clear errors; cheap (no megatron import)."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
        if len(head) < 34 or head[:9] != INDEX_HEADER:
            raise DataError(f"{path}: not a megatron indexed-dataset index (bad header)")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise DataError(f"{path}: unsupported index version {version} (expected 1)")
        code = head[17]
        if code not in _CODE_DTYPES:
            raise DataError(f"{path}: unknown dtype code {code}")
        n, _ = struct.unpack("<QQ", head[18:34])
        sizes = np.fromfile(f, dtype=np.int32, count=n)
    if len(sizes) != n:
        raise DataError(f"{path}: truncated index ({len(sizes)} of {n} sizes)")
    return _CODE_DTYPES[code], sizes


def read_index(prefix: str) -> tuple:
    """(dtype, sizes int32[N], pointers int64[N]) from `<prefix>.idx`, every length checked.

    Checks: the header and version, the dtype code, the file length (exactly header + 4N + 8N + 8D bytes), and the
    byte pointers (`pointers[i] == sum(sizes[:i]) * itemsize`, i.e. documents back to back as our writer and
    megatron's builder lay them out). Raises ValueError naming the file."""
    path = prefix + ".idx"
    dtype, sizes = read_sizes(prefix)
    n = len(sizes)
    with open(path, "rb") as f:
        f.seek(26)
        (d,) = struct.unpack("<Q", f.read(8))
        f.seek(34 + 4 * n)
        pointers = np.fromfile(f, dtype=np.int64, count=n)
        doc_idx = np.fromfile(f, dtype=np.int64, count=d)
        rest = f.read(1)
    if len(pointers) != n or len(doc_idx) != d:
        raise DataError(f"{path}: truncated index ({len(pointers)} of {n} pointers, {len(doc_idx)} of {d} "
                         f"document indices)")
    if rest:
        raise DataError(f"{path}: trailing bytes after the index arrays (not written by a megatron-style writer)")
    if (sizes < 0).any():
        raise DataError(f"{path}: negative document sizes")
    expect = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=expect[1:])
    if not np.array_equal(pointers, expect):
        raise DataError(f"{path}: byte pointers do not follow the sizes (documents not back to back)")
    return dtype, sizes, pointers


class IndexedReader:
    """A megatron `.bin/.idx` dataset read back with numpy: `len(r)`, `r[i]` (a read-only view of document i),
    `r.sizes`, `r.dtype`, `r.num_tokens`. The `.bin` is memory-mapped; its length must equal what the index
    describes (a truncated `.bin` is an error, not a short document)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"{prefix}{ext}: not found (a dataset needs both .bin and .idx)")
        self.dtype, self.sizes, self.pointers = read_index(prefix)
        self.num_tokens = int(self.sizes.astype(np.int64).sum())
        got = os.path.getsize(prefix + ".bin")
        want = self.num_tokens * self.dtype.itemsize
        if got != want:
            raise DataError(f"{prefix}.bin: {got} bytes, but its index ({prefix}.idx) describes {len(self.sizes)} "
                             f"documents of {self.num_tokens} {self.dtype.name} tokens = {want} bytes "
                             f"({'truncated' if got < want else 'too long'}; rewrite the dataset)")
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        self._bin = (np.memmap(prefix + ".bin", dtype=self.dtype, mode="r") if want
                     else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents ({self.prefix})")
        i %= len(self)
        return self._bin[self.offsets[i]:self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"IndexedReader({self.prefix!r}, documents={len(self)}, tokens={self.num_tokens}, {self.dtype.name})"


class IndexedWriter:
    """Stream documents into `<prefix>.bin/.idx` under temporary names; `publish()` makes them visible.

    Use as a context manager: leaving the block with an exception removes the temporary files; leaving it normally
    without `publish()` also removes them (nothing half-written survives).

        with IndexedWriter(prefix, np.uint16) as w:
            w.add_document(ids)          # or w.append_bin_file(part_bin, part_sizes)
            w.publish()
    """

    def __init__(self, prefix: str, dtype, overwrite: bool = False):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise InputError(f"unsupported token dtype {self.dtype} (expected one of megatron's DType codes)")
        if not overwrite and (os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx")):
            raise FileExistsError(f"{prefix}.bin/.idx already exist; pass overwrite=True (--overwrite) to replace them")
        self.overwrite = overwrite
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        name = os.path.basename(prefix)
        remove_stale_temps(d, name + ".")  # what a killed run writing this dataset left
        self.tmp_bin = temp_path(prefix + ".bin")
        self.tmp_idx = temp_path(prefix + ".idx")
        self._bin = open(self.tmp_bin, "wb")
        self._sizes: List[np.ndarray] = []
        self._pending: List[int] = []
        self.num_tokens = 0
        self.published = False

    # -- writing ----------------------------------------------------------------------------------------------
    def add_document(self, ids: Iterable[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._pending.append(arr.size)
        self.num_tokens += arr.size
        if len(self._pending) >= 65536:
            self._flush_pending()

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Many documents at once: `tokens` is their concatenation, `sizes` their lengths."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        sizes = np.asarray(sizes, dtype=np.int32)
        if int(sizes.sum()) != tokens.size:
            raise DataError(f"sizes sum to {int(sizes.sum())} but {tokens.size} tokens were given")
        self._flush_pending()
        self._bin.write(tokens.tobytes(order="C"))
        self._sizes.append(sizes)
        self.num_tokens += tokens.size

    def append_bin_file(self, path: str, sizes: np.ndarray) -> None:
        """Append a raw token file (same dtype) holding documents of lengths `sizes`, e.g. a worker's part."""
        sizes = np.asarray(sizes, dtype=np.int32)
        expect = int(sizes.sum()) * self.dtype.itemsize
        got = os.path.getsize(path)
        if got != expect:
            raise DataError(f"{path}: {got} bytes, but its {len(sizes)} documents need {expect}")
        self._flush_pending()
        with open(path, "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)
        self._sizes.append(sizes)
        self.num_tokens += int(sizes.sum())

    def _flush_pending(self) -> None:
        if self._pending:
            self._sizes.append(np.asarray(self._pending, dtype=np.int32))
            self._pending = []

    @property
    def num_documents(self) -> int:
        return sum(len(s) for s in self._sizes) + len(self._pending)

    # -- finishing --------------------------------------------------------------------------------------------
    def publish(self) -> None:
        """Write the index, fsync both files and rename them into place (`.bin`, then `.idx`)."""
        self._flush_pending()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self.tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        if self.overwrite and os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")  # the old dataset stops looking whole before its .bin changes
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")
        self.published = True

    def abort(self) -> None:
        """Close and delete the temporary files (idempotent)."""
        try:
            self._bin.close()
        except Exception:  # noqa: BLE001
            pass
        for p in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> Optional[bool]:
        if not self.published:
            self.abort()
        return None
