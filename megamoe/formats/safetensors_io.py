"""Streaming safetensors: a validating reader and a writer that never holds a whole file in memory.

The safetensors format is simple: 8 bytes (little-endian u64) header length N, N bytes of JSON
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
little-endian tensor bytes; offsets are relative to the end of the header.

Why our own instead of `safetensors.torch`:
- `save_file` needs every tensor of a file in memory at once; `StreamingWriter` writes the header first (the layout
  is planned ahead) and then appends tensor by tensor, so converting a 7B model needs one layer in RAM.
- `safe_open` memory-maps the file, and every page it touches counts in the process's RSS until the file is closed;
  `SafetensorsReader` reads one tensor with `os.pread` into a private buffer instead.
- A truncated or corrupt file gets an error naming the file and what is wrong, before any tensor is used.

Files written here load with `safetensors.safe_open` / `transformers` (tests check this).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading

import torch

from megamoe.errors import CheckpointError
from megamoe.formats.checksum import new_hasher

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference library's limit


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class SafetensorsReader:
    """Read tensors from one safetensors file without memory-mapping it.

        r = SafetensorsReader("model.safetensors")     # validates the header and the file size
        r.keys(); r.shape("x"); r.dtype("x")            # metadata only
        t = r.get("x")                                  # one tensor, in a private buffer
        t = r.get_rows("x", 0, 128)                     # rows [0, 128) of dim 0, reading only those bytes
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
        try:
            self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self):
        """Read and validate the header as strictly as the reference library (`safetensors`' Rust
        `Metadata::validate` and `read_metadata`), so no file we accept is refused there and vice versa:

        - 8-byte little-endian length N <= 100,000,000, and 8 + N <= file size;
        - the N header bytes are UTF-8 JSON holding one object (trailing spaces allowed, nothing else after it);
        - `__metadata__`, when present, maps strings to strings (or is null);
        - every other key is a tensor `{"dtype": <known dtype>, "shape": [non-negative ints],
          "data_offsets": [begin, end]}` (non-negative ints, begin <= end);
        - sorted by offsets, the tensors tile the data section exactly: the first begins at 0, each begins where the
          previous ended (no gap, no overlap, no two tensors sharing bytes), end - begin equals numel x dtype size;
        - the last end is the end of the file (no trailing bytes, no truncation).
        Stricter than the reference: a tensor name given twice in the header is refused (the reference keeps one of
        them silently), and dtypes torch cannot hold (F4, F6_*, F8_E8M0, U16/U32/U64 on older torch) are refused."""
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise CheckpointError(f"{self.path}: {size} bytes, too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > MAX_HEADER:
            raise CheckpointError(f"{self.path}: header length {n} is over the limit of {MAX_HEADER} bytes "
                                  "(not a safetensors file, or a corrupt one)")
        if 8 + n > size:
            raise CheckpointError(f"{self.path}: header length {n} does not fit a {size}-byte file "
                                  "(truncated, or not a safetensors file)")
        raw = os.pread(self._fd, n, 8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: the safetensors header is not UTF-8 ({e.reason} at byte "
                                  f"{8 + e.start})") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and (not isinstance(meta, dict)
                                 or not all(isinstance(v, str) for v in meta.values())):
            raise CheckpointError(f"{self.path}: the header's __metadata__ must map strings to strings, got "
                                  f"{str(meta)[:120]}")
        self.metadata = meta or {}
        self.data_start = 8 + n
        spans = []
        for name, info in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise CheckpointError(f"{where} has a malformed header entry {str(info)[:120]} (expected dtype, "
                                      "shape, data_offsets)")
            dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
            if dt not in DTYPES:
                raise CheckpointError(f"{where} has unsupported dtype {dt!r}")
            if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
                raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            if not isinstance(offs, list) or len(offs) != 2 or not all(_is_index(o) for o in offs):
                raise CheckpointError(f"{where}: data_offsets {offs!r} are not two non-negative integers")
            spans.append((offs[0], offs[1], name, dt, shape))
        spans.sort(key=lambda x: (x[0], x[1]))
        pos = 0
        for b, e, name, dt, shape in spans:
            where = f"{self.path}: tensor {name!r}"
            if b != pos or e < b:
                what = ("ends before it begins" if e < b else "starts after the previous tensor's end (a gap)"
                        if b > pos else "overlaps the bytes of another tensor")
                raise CheckpointError(f"{where}: data_offsets [{b}, {e}) {what}; the tensors must tile the data "
                                      f"section from 0 without gaps or overlaps (expected it to begin at {pos})")
            if e - b != numel(shape) * dtype_size(dt):
                raise CheckpointError(f"{where}: data_offsets [{b}, {e}) hold {e - b} bytes, {dt} {shape} needs "
                                      f"{numel(shape) * dtype_size(dt)}")
            pos = e
        if self.data_start + pos != size:
            how = "truncated" if self.data_start + pos > size else "has trailing bytes not covered by any tensor"
            raise CheckpointError(f"{self.path}: {how}: the header describes {self.data_start + pos} bytes, the "
                                  f"file has {size}")
        self.header = header

    # ---- metadata ----
    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name) -> bool:
        return name in self.header

    def shape(self, name) -> list[int]:
        return list(self.header[name]["shape"])

    def dtype(self, name) -> str:
        return self.header[name]["dtype"]

    def nbytes(self, name) -> int:
        b, e = self.header[name]["data_offsets"]
        return e - b

    # ---- data ----
    def _read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if k <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file at byte {offset + got}")
            got += k
        return buf

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`; read straight into `out` (contiguous, same dtype and element count) when given."""
        info = self.header.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        b, e = info["data_offsets"]
        if out is None:
            return _from_bytes(self._read(self.data_start + b, e - b), info["dtype"], info["shape"])
        if out.dtype != DTYPES[info["dtype"]] or out.numel() != numel(info["shape"]) or not out.is_contiguous():
            raise ValueError(f"{self.path}: {name}: out buffer {out.dtype} {list(out.shape)} does not fit "
                             f"{info['dtype']} {info['shape']}")
        self._read_into(self.data_start + b, out)
        return out.view(list(info["shape"]))

    def _read_into(self, offset: int, out: torch.Tensor):
        if out.numel() == 0:
            return
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        length, got = len(view), 0
        while got < length:
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if k <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file at byte {offset + got}")
            got += k

    def map(self, name: str) -> torch.Tensor:
        """Tensor `name` as a private, copy-on-write memory map of the file (no read copy: the page cache is used in
        place). The mapping lives as long as the returned tensor; its pages count in RSS only while it is alive, so
        a streaming converter maps one layer at a time. Writing to the tensor never changes the file."""
        info = self.header.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        b, e = info["data_offsets"]
        if e == b:
            return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        start = self.data_start + b
        base = start - start % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self._fd, e - b + (start - base), access=mmap.ACCESS_COPY, offset=base)
        t = torch.frombuffer(m, dtype=torch.uint8, offset=start - base, count=e - b)
        return t.view(DTYPES[info["dtype"]]).view(list(info["shape"]))

    def file_range(self, name: str) -> tuple[int, int]:
        """(byte offset in the file, byte length) of tensor `name`'s data."""
        b, e = self.header[name]["data_offsets"]
        return self.data_start + b, e - b

    def fileno(self) -> int | None:
        return self._fd

    def digest(self, name: str, algorithm: str) -> str:
        """Hex digest (checksum.ALGORITHMS) of tensor `name`'s bytes as stored, read in chunks into one small buffer
        (no full-size copy, no memory map)."""
        h = new_hasher(algorithm)
        hash_file_range(self._fd, *self.file_range(name), h, self.path)
        return h.hexdigest()

    def get_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0, reading only those bytes (into `out` when given)."""
        info = self.header[name]
        shape = list(info["shape"])
        row = numel(shape[1:]) * dtype_size(info["dtype"])
        b, _ = info["data_offsets"]
        if out is not None:
            self._read_into(self.data_start + b + start * row, out)
            return out
        data = self._read(self.data_start + b + start * row, (stop - start) * row)
        return _from_bytes(data, info["dtype"], [stop - start] + shape[1:])

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key {dup[0]!r} appears more than once")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _from_bytes(buf, dtype: str, shape) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(buf, dtype=DTYPES[dtype]).view(list(shape))


class StreamingWriter:
    """Write one safetensors file tensor by tensor, in a planned order.

        w = StreamingWriter(path, [(name, "BF16", shape), ...], metadata={"format": "pt"})
        for name, ... in plan: w.write(name, tensor)      # must follow the plan's order
        w.close()                                          # checks that every planned tensor was written

    The header (with every offset) is written first, so the file grows sequentially and only the tensor being
    written is in memory. Writing out of order, a wrong shape or dtype, or closing early raise errors.

    With `checksum` (an algorithm of megamoe.formats.checksum) every tensor's stored bytes are hashed by the job
    that writes them, chunk by chunk as they go out (so on the writer thread when `submit` is given):
    `digests[name]` is the hex digest once that write is done.
    """

    def __init__(self, path: str, plan, metadata: dict | None = None, align: int = 8, checksum: str | None = None):
        self.path = path
        self.checksum, self.digests = checksum, {}
        header, off = {}, 0
        self.order = []
        for name, dt, shape in plan:
            n = numel(shape) * dtype_size(dt)
            header[name] = {"dtype": dt, "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            self.order.append((name, dt, [int(s) for s in shape]))
            off += n
        self.total = off
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % align)  # pad so tensor data starts aligned (the reference writer does too)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            head = struct.pack("<Q", len(raw)) + raw
            _pwrite_all(self._fd, memoryview(head), 0, path)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self.data_start = len(head)
        self._offsets = {name: self.data_start + h["data_offsets"][0] for name, h in header.items()
                         if name != "__metadata__"}
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor, submit=None, source=None):
        """Write `tensor` (any strides) as planned tensor `name`. With `submit` (e.g. an executor's `submit`) the
        bytes are written by `submit(fn, ...)` and its result (a future) is returned: the caller must keep `tensor`
        unchanged until it is done. Each tensor goes to its own planned offset, so jobs may finish in any order.
        `source` = (reader, byte offset): `tensor` holds exactly those bytes of that reader's file (an unmodified
        memory map of it), so they are copied file to file inside the kernel (copy_file_range), never touching
        the mapping."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: {name!r} written after close")
        if self._next >= len(self.order):
            raise RuntimeError(f"{self.path}: {name!r} written but every planned tensor is already written")
        want, dt, shape = self.order[self._next]
        if name != want:
            raise RuntimeError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if list(tensor.shape) != shape or NAMES.get(tensor.dtype) != dt:
            raise RuntimeError(f"{self.path}: tensor {name!r} is {NAMES.get(tensor.dtype)} {list(tensor.shape)}, "
                               f"planned {dt} {shape}")
        self._next += 1
        offset = self._offsets[name]
        fn, args = write_tensor_at, (self._fd, offset, tensor, self.path)
        if source is not None and tensor.is_contiguous():
            fn, args = copy_range_at, (self._fd, offset, source[0], source[1], tensor, self.path)
        if self.checksum is not None:
            fn, args = _hashed_write, (self.digests, name, self.checksum, fn, args)
        if submit is None:
            fn(*args)
            return None
        return submit(fn, *args)

    def close(self):
        """Check that every planned tensor was written and close the file (pending `submit` jobs must be done)."""
        if self._fd is None:
            return
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self.order)} planned tensors "
                                   f"(next: {self.order[self._next][0]!r})")
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


WRITE_CHUNK = 1 << 20  # bytes per write call: large enough to amortise the call, small enough to stay in cache
IOV_MAX = 1024
HASH_CHUNK = 4 << 20  # bytes per pread when hashing a file range


def _hashed_write(digests: dict, name: str, algorithm: str, fn, args) -> int:
    """Run the write job `fn(*args)` with a hasher fed the bytes it writes, in order; record the hex digest."""
    h = new_hasher(algorithm)
    n = fn(*args, hasher=h)
    digests[name] = h.hexdigest()
    return n


_hash_buf = threading.local()


def hash_file_range(fd: int, offset: int, length: int, hasher, path: str = "") -> None:
    """Feed bytes [offset, offset + length) of the open file `fd` to `hasher`, through a per-thread HASH_CHUNK
    buffer (pread: no memory map, no page faults on a user mapping, constant memory)."""
    buf = getattr(_hash_buf, "buf", None)
    if buf is None:
        buf = _hash_buf.buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    done = 0
    while done < length:
        k = os.preadv(fd, [view[:min(HASH_CHUNK, length - done)]], offset + done)
        if k <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
        hasher.update(view[:k])
        done += k


def _pwrite_all(fd: int, view: memoryview, offset: int, path: str = "", hasher=None) -> int:
    """Write all of `view` at `offset` in WRITE_CHUNK pieces (a partial write is continued); each piece is fed to
    `hasher` right after it went out (still in cache)."""
    n, done = len(view), 0
    while done < n:
        k = os.pwrite(fd, view[done:done + WRITE_CHUNK], offset + done)
        if k <= 0:
            raise OSError(f"{path}: short write at byte {offset + done}")
        if hasher is not None:
            hasher.update(view[done:done + k])
        done += k
    return n


def _pwritev_all(fd: int, views: list, offset: int, path: str = "", hasher=None) -> int:
    """Write the buffers `views` back to back at `offset`, up to IOV_MAX per call (partial writes continued); every
    buffer is fed to `hasher` in order once it went out."""
    total = 0
    i = 0
    while i < len(views):
        batch = views[i:i + IOV_MAX]
        want = sum(len(v) for v in batch)
        k = os.pwritev(fd, batch, offset + total)
        if k == want:
            total += k
            i += len(batch)
            if hasher is not None:
                for v in batch:
                    hasher.update(v)
            continue
        if k <= 0:
            raise OSError(f"{path}: short write at byte {offset + total}")
        # partial: finish this batch buffer by buffer
        for v in batch:
            if k >= len(v):
                k -= len(v)
                total += len(v)
                if hasher is not None:
                    hasher.update(v)
                continue
            if hasher is not None and k:
                hasher.update(v[:k])
            total += k
            total += _pwrite_all(fd, v[k:], offset + total, path, hasher)
            k = 0
        i += len(batch)
    return total


def _byte_rows(t: torch.Tensor):
    """For a 2-D tensor whose rows are each contiguous (stride(1) == 1; e.g. a column block of a row-major matrix):
    (flat uint8 memoryview spanning it, row stride in bytes, row length in bytes), else None."""
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[0] == 0 or t.shape[1] == 0:
        return None
    es = t.element_size()
    rows, row_bytes, stride = t.shape[0], t.shape[1] * es, t.stride(0) * es
    span = stride * (rows - 1) + row_bytes
    flat = torch.as_strided(t, (span // es,), (1,))  # same storage, from the first element
    return memoryview(flat.view(torch.uint8).numpy()), stride, row_bytes, rows


def write_tensor_at(fd: int, offset: int, tensor: torch.Tensor, path: str = "", hasher=None) -> int:
    """Write the raw (little-endian, C-order) bytes of `tensor` at byte `offset` of the open file `fd` (and feed
    them, in file order, to `hasher` when given).

    Contiguous tensors (including memory-mapped source tensors: the kernel copies straight from the page cache)
    go out in large writes; a 2-D tensor whose rows are contiguous (a column slice) goes out row by row in one
    gathered `pwritev` per IOV_MAX rows, without a contiguous copy; anything else is copied first."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return 0
    if not t.is_contiguous():
        rows = _byte_rows(t)
        if rows is not None:
            flat, stride, row_bytes, n = rows
            return _pwritev_all(fd, [flat[r * stride:r * stride + row_bytes] for r in range(n)], offset, path, hasher)
        t = t.contiguous()
    # a uint8 view of the storage: no copy, works for bf16/fp8 that numpy lacks
    return _pwrite_all(fd, memoryview(t.view(-1).view(torch.uint8).numpy()), offset, path, hasher)


def copy_range_at(fd: int, offset: int, reader, src_offset: int, tensor: torch.Tensor, path: str = "",
                  hasher=None) -> int:
    """Copy `tensor`'s bytes, which are bytes [src_offset, +nbytes) of `reader`'s open file, to `offset` of `fd`
    with copy_file_range (an in-kernel copy: no page faults on a user mapping, no user-space copy). Falls back to
    writing the tensor's memory when the kernel refuses (another file system, an old kernel). With `hasher`, the
    copied bytes are hashed from the source file afterwards (pread through a small buffer, see hash_file_range)."""
    n = tensor.numel() * tensor.element_size()
    src = reader.fileno()
    if src is None or not hasattr(os, "copy_file_range"):
        return write_tensor_at(fd, offset, tensor, path, hasher)
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(src, fd, n - done, src_offset + done, offset + done)
            if k <= 0:
                raise OSError(f"{path}: copy_file_range returned {k} at byte {offset + done}")
            done += k
    except OSError:
        if done:  # finish from memory: the same bytes
            if hasher is not None:
                hash_file_range(src, src_offset, done, hasher, path)
            flat = tensor.detach().reshape(-1).view(torch.uint8)[done:]
            return done + _pwrite_all(fd, memoryview(flat.numpy()), offset + done, path, hasher)
        return write_tensor_at(fd, offset, tensor, path, hasher)
    if hasher is not None:
        hash_file_range(src, src_offset, n, hasher, path)
    return n


def tensor_digest(t: torch.Tensor, algorithm: str) -> str:
    """Hex digest of a CPU tensor's raw bytes in C order (what a safetensors file stores for it)."""
    h = new_hasher(algorithm)
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
