"""Our checkpoint format: safetensors partitioned by tensor-, expert- and expert-tensor-parallel rank, plus a
JSON manifest. Loading re-shards to any other layout, lazily, tensor by tensor.

Directory layout (T = tp, EP = ep, R = etp):

    manifest.json                          format version, model config, parallel layout, partition method,
                                           source checksum, and for every tensor: full shape, dtype, rule, parts,
                                           and a checksum of each stored part (`checksums`, one per part file;
                                           the algorithm in `checksum.algorithm`: xxh3_128, or sha256)
    model-tp{t:02d}-of-{T:02d}.safetensors  non-expert tensors, TP slice t. Replicated tensors (norms, routers)
                                           are stored once, in the tp00 file.
    experts-ep{e:02d}-etp{r:02d}.safetensors  the experts owned by EP rank e (global expert names, experts
                                           e*E/EP ... (e+1)*E/EP - 1), ETP slice r (gate/up rows, down columns).

Every file holds tensors under their *global* names (docs/architecture.md) so a file can be read on its own.
The trainer loads its rank's slice, whatever layout the checkpoint was written with:

    from megamoe.formats.shards import load_shards, save_shards, ShardedCheckpoint
    save_shards(path, cfg, model.state_dict(), ParallelConfig(tp=2, ep=2))   # write (atomic, never overwrites)
    full = load_shards(path)                                    # TP1/EP1 state dict (full tensors)
    mine = load_shards(path, tp=(rank_tp, TP), ep=(rank_ep, EP), etp=(rank_etp, ETP))
    ckpt = ShardedCheckpoint(path); ckpt.config; ckpt.get("layers.0.attn.q_proj.weight")

Integrity: every read that yields a tensor (get, get_local, get_range, read_into, load_shards) first checks each
part it reads from against the manifest's checksum (once per part and instance); a mismatch raises
CheckpointError naming the file and the tensor. `verify()` checks every part (inspect). A manifest written before
checksums existed loads unverified, with one log line saying so. `map_parts` does not verify (the converters'
guard reads back the bytes they have just hashed while writing): call `verify()` first when that matters.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import shutil

import torch
from tqdm import tqdm

from megamoe.config import ConfigError, ModelConfig, ParallelConfig
from megamoe.fileio import remove_stale_temps, temp_path
from megamoe.formats import checksum as checksums
from megamoe.formats.buffers import Arena
from megamoe.formats.layout import expected_names, expected_shape, slicing
from megamoe.formats.safetensors_io import NAMES, CheckpointError, SafetensorsReader, StreamingWriter, tensor_digest

log = logging.getLogger("megamoe.formats")
FILE_SOURCE = "_megamoe_file_source"  # tensor attribute: (SafetensorsReader, byte offset) of its unmodified bytes
FORMAT = "megamoe-shards"
VERSION = 1
MANIFEST = "manifest.json"


def model_file(t: int, T: int) -> str:
    return f"model-tp{t:02d}-of-{T:02d}.safetensors"


def expert_file(e: int, r: int) -> str:
    return f"experts-ep{e:02d}-etp{r:02d}.safetensors"


def is_shard_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def _chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    size = n // parts
    return i * size, (i + 1) * size


def placement(cfg: ModelConfig, par: ParallelConfig, name: str, shape) -> dict:
    """Where tensor `name` goes under layout `par`: its rule, split dim and list of part files."""
    rule = slicing(name)
    if rule[0] == "replicated":
        return {"rule": "replicated", "dim": None, "parts": [model_file(0, par.tp)]}
    if rule[0] == "tp":
        dim = rule[1]
        if shape[dim] % par.tp:
            raise ConfigError(f"parallel.tp: {par.tp} does not divide dim {dim} of {name} {list(shape)}")
        return {"rule": "tp", "dim": dim, "parts": [model_file(t, par.tp) for t in range(par.tp)]}
    _, e, dim = rule
    per = cfg.moe.num_experts // par.ep
    if shape[dim] % par.etp:
        raise ConfigError(f"parallel.etp: {par.etp} does not divide dim {dim} of {name} {list(shape)}")
    return {"rule": "expert", "dim": dim, "expert": e,
            "parts": [expert_file(e // per, r) for r in range(par.etp)]}


class ShardWriter:
    """Write a full model, tensor by tensor in a fixed order, into partitioned files under `out_dir`.

        w = ShardWriter(out_dir, cfg, ParallelConfig(tp=2, ep=2), dtypes={name: "BF16", ...}, info={...})
        for name in w.names: w.write(name, full_tensor)     # in w.names order; one tensor in memory at a time
        w.close()                                           # writes manifest.json last

    `dtypes` maps every name of `expected_names(cfg)` to a safetensors dtype string (e.g. "BF16").
    `info` goes into the manifest verbatim (partition method, source checksum, ...).
    `checksum`: True (xxh3_128, or sha256 without the xxhash package), an algorithm name, or False (none). Each
    part's bytes are hashed by the job that writes them, as they go out (on the writer threads when `threads` > 0),
    and the manifest records the digests per tensor and part.

    Tensors may have any strides: a slice whose rows are contiguous (o_proj/down_proj column halves, an expert's
    column block) is written row by row with gathered writes, without a contiguous copy. With `threads` > 0 the
    bytes are written by that many background threads (file I/O releases the GIL): `write` returns at once and
    the caller must leave the tensor unchanged until `wait(w.mark())` returned past it (or `close`); `wait` bounds
    how much is in flight. Errors of a background write are raised by the next call.
    """

    def __init__(self, out_dir: str, cfg: ModelConfig, par: ParallelConfig, dtypes: dict, info: dict | None = None,
                 threads: int = 0, checksum: bool | str = True):
        par.validate(cfg)
        self.checksum = checksums.resolve(None if checksum is True else checksum) if checksum else None
        self._pool, self._jobs, self.writers = None, collections.deque(), {}
        self.out_dir, self.cfg, self.par, self.info = out_dir, cfg, par, info or {}
        self.names = expected_names(cfg)
        missing = [n for n in self.names if n not in dtypes]
        if missing:
            raise CheckpointError(f"no dtype for {missing[:3]} ({len(missing)} tensors)")
        self.entries, plans = {}, {}
        for t in range(par.tp):
            plans[model_file(t, par.tp)] = []
        if cfg.moe is not None:
            for e in range(par.ep):
                for r in range(par.etp):
                    plans[expert_file(e, r)] = []
        for n in self.names:
            shape = expected_shape(cfg, n)
            p = placement(cfg, par, n, shape)
            p.update(shape=shape, dtype=dtypes[n])
            self.entries[n] = p
            for f in p["parts"]:
                part_shape = list(shape)
                if p["dim"] is not None:
                    part_shape[p["dim"]] //= len(p["parts"])
                plans[f].append((n, dtypes[n], part_shape))
        self.writers = {}
        meta = {"format": "pt", "megamoe": FORMAT}
        try:
            for f, plan in plans.items():
                self.writers[f] = StreamingWriter(os.path.join(out_dir, f), plan, metadata=meta,
                                                  checksum=self.checksum)
        except BaseException:
            self.abort()
            raise
        self.nbytes = sum(w.total for w in self.writers.values())
        self._i = 0
        self._serial = 0  # self._jobs: (serial, future) of background writes
        if threads > 0:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="megamoe-shard-writer")

    # ---- background writes ----
    def mark(self) -> int:
        """A marker for 'everything submitted so far' (see wait)."""
        return self._serial

    def _reap(self, upto: int | None = None):
        while self._jobs and (self._jobs[0][1].done() or (upto is not None and self._jobs[0][0] < upto)):
            _, fut = self._jobs.popleft()
            fut.result()  # raises the job's error

    def wait(self, mark: int | None = None):
        """Block until every write submitted before `mark` (default: all) is on its way to disk (in the page
        cache); raise the first error of a background write."""
        self._reap(self._serial if mark is None else mark)

    def write(self, name: str, tensor: torch.Tensor):
        if self._i >= len(self.names) or name != self.names[self._i]:
            want = self.names[self._i] if self._i < len(self.names) else "nothing"
            raise RuntimeError(f"ShardWriter: expected {want!r} next, got {name!r}")
        e = self.entries[name]
        if list(tensor.shape) != e["shape"]:
            raise CheckpointError(f"{name}: shape {list(tensor.shape)}, the config implies {e['shape']}")
        parts = e["parts"]
        if self._jobs:
            self._reap()
        pieces = [tensor] if e["dim"] is None else tensor.chunk(len(parts), dim=e["dim"])
        submit = self._pool.submit if self._pool is not None else None
        src = getattr(tensor, FILE_SOURCE, None)  # (reader, offset): an unmodified map of a source file's bytes
        for f, piece in zip(parts, pieces):
            where = None
            if src is not None and piece.is_contiguous():
                where = (src[0], src[1] + piece.data_ptr() - tensor.data_ptr())
            fut = self.writers[f].write(name, piece, submit, where)
            if fut is not None:
                self._jobs.append((self._serial, fut))
        self._serial += 1
        self._i += 1

    def close(self) -> str:
        if self._i != len(self.names):
            raise RuntimeError(f"ShardWriter: closed after {self._i} of {len(self.names)} tensors")
        self.wait()
        self._shutdown()
        for w in self.writers.values():
            w.close()
        if self.checksum is not None:
            for name, e in self.entries.items():
                e["checksums"] = [self.writers[f].digests[name] for f in e["parts"]]
        manifest = {
            "format": FORMAT, "version": VERSION,
            "model": self.cfg.to_dict(),
            "parallel": {"tp": self.par.tp, "ep": self.par.ep, "etp": self.par.etp},
            **{k: v for k, v in self.info.items() if k != "checksum"},
            **({"checksum": {"algorithm": self.checksum, "of": "the stored bytes of each tensor part "
                                                              "(tensors.<name>.checksums, one per part file)"}}
               if self.checksum else {}),
            "files": sorted(self.writers),
            "tensors": self.entries,
        }
        path = os.path.join(self.out_dir, MANIFEST)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
        return path

    def _shutdown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def abort(self):
        self._shutdown()  # no background write may touch a file after it is closed
        self._jobs.clear()
        for w in self.writers.values():
            w.abort()


_UNVERIFIED_LOGGED: set = set()


class ShardedCheckpoint:
    """A checkpoint directory in our format, opened lazily (only headers are read until a tensor is asked for).
    `verify` (default): every tensor read is checked against the manifest's checksums (module docstring)."""

    def __init__(self, path: str, verify: bool = True):
        self.path = path
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such directory")
        if not os.path.isfile(mpath):
            raise CheckpointError(f"{mpath}: missing; {path} is not a megamoe sharded checkpoint")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{mpath}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if m.get("format") != FORMAT:
            raise CheckpointError(f"{mpath}: format is {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("version") != VERSION:
            raise CheckpointError(f"{mpath}: format version {m.get('version')!r}; this megamoe reads {VERSION}")
        self.manifest = m
        try:
            self.config = ModelConfig.from_dict(m["model"], "model").validate()
            self.parallel = ParallelConfig(**m["parallel"])
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{mpath}: {e}") from None
        self.tensors = m["tensors"]
        self._scratch = Arena()
        self.readers = {}
        for f in m["files"]:
            self.readers[f] = SafetensorsReader(os.path.join(path, f))
        for name, e in self.tensors.items():
            for i, f in enumerate(e["parts"]):
                r = self.readers.get(f)
                if r is None or name not in r:
                    raise CheckpointError(f"{os.path.join(path, f)}: lacks tensor {name!r} listed in the manifest")
                want = list(e["shape"])
                if e["dim"] is not None:
                    want[e["dim"]] //= len(e["parts"])
                if r.shape(name) != want or r.dtype(name) != e["dtype"]:
                    raise CheckpointError(f"{os.path.join(path, f)}: {name} is {r.dtype(name)} {r.shape(name)}, "
                                          f"the manifest says {e['dtype']} {want}")
        self._init_checksums(mpath, m, verify)

    # ---- integrity ----
    def _init_checksums(self, mpath: str, m: dict, verify: bool):
        c = m.get("checksum")
        self.algorithm = c.get("algorithm") if isinstance(c, dict) else None
        self._ok = set()  # (file, name) parts verified by this instance
        if self.algorithm is None:
            self.verify_reads = False
            if os.path.abspath(self.path) not in _UNVERIFIED_LOGGED:
                _UNVERIFIED_LOGGED.add(os.path.abspath(self.path))
                log.warning("%s: written without tensor checksums (an older megamoe): its tensors are read "
                            "unverified", self.path)
            return
        if self.algorithm not in checksums.ALGORITHMS:
            raise CheckpointError(f"{mpath}: checksum.algorithm {self.algorithm!r} is not one of "
                                  f"{', '.join(checksums.ALGORITHMS)}")
        if not checksums.available(self.algorithm):
            raise CheckpointError(f"{mpath}: its tensors carry {self.algorithm} checksums, which need the `xxhash` "
                                  "package to verify: pip install xxhash")
        for name, e in self.tensors.items():
            cs = e.get("checksums")
            if not isinstance(cs, list) or len(cs) != len(e["parts"]) or not all(isinstance(x, str) for x in cs):
                raise CheckpointError(f"{mpath}: tensor {name!r} has no valid checksums (expected one hex digest "
                                      f"per part, {len(e['parts'])}), got {cs!r}")
        self.verify_reads = bool(verify)

    def _check(self, f: str, name: str, data: torch.Tensor | None = None):
        """Compare part `f` of tensor `name` with its checksum: the bytes in `data` (the part as just read,
        contiguous) or, without it, the bytes in the file. Raises CheckpointError naming the file and tensor."""
        if not self.verify_reads or (f, name) in self._ok:
            return
        e = self.tensors[name]
        want = e["checksums"][e["parts"].index(f)]
        got = tensor_digest(data, self.algorithm) if data is not None else self.readers[f].digest(name, self.algorithm)
        if got != want:
            raise CheckpointError(f"{os.path.join(self.path, f)}: tensor {name!r} does not match its checksum "
                                  f"({self.algorithm} {got}; {MANIFEST} says {want}): the file is corrupt (a "
                                  "damaged disk or copy); copy or convert it again")
        self._ok.add((f, name))

    def verify(self, progress: bool = False) -> dict:
        """Check every stored part of every tensor against the manifest. Returns {"status": "ok" or "unverified",
        "algorithm", "parts"}; raises CheckpointError (file and tensor named) at the first mismatch."""
        if self.algorithm is None:
            return {"status": "unverified: written without checksums", "algorithm": None, "parts": 0}
        pairs = [(f, n) for n, e in self.tensors.items() for f in e["parts"]]
        saved, self.verify_reads = self.verify_reads, True
        try:
            for f, n in tqdm(pairs, desc="verify checksums", disable=not progress, unit="part"):
                self._check(f, n)
        finally:
            self.verify_reads = saved
        return {"status": "ok", "algorithm": self.algorithm, "parts": len(pairs)}

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name) -> list[int]:
        return list(self.tensors[name]["shape"])

    def dtype(self, name) -> str:
        return self.tensors[name]["dtype"]

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in self.readers)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor (assembled in `out` when given: contiguous, the tensor's shape and dtype)."""
        e = self.tensors.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if e["dim"] is None:
            f = e["parts"][0]
            t = self.readers[f].get(name, out)
            self._check(f, name, t)
            return t
        if out is None:
            parts = []
            for f in e["parts"]:
                parts.append(self.readers[f].get(name))
                self._check(f, name, parts[-1])
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=e["dim"])
        dim, n = e["dim"], len(e["parts"])
        size = e["shape"][dim] // n
        for i, f in enumerate(e["parts"]):
            dst = out.narrow(dim, i * size, size)
            if dst.is_contiguous():
                self._check(f, name, self.readers[f].get(name, dst))
            else:
                part = self.readers[f].get(name, self._scratch.empty(str(list(dst.shape)), dst.shape, dst.dtype))
                self._check(f, name, part)
                dst.copy_(part)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Assemble the full tensor into `out` (its shape; any dtype: converted on the fly) from memory-mapped parts,
        without an intermediate copy."""
        e = self.tensors[name]
        for f in e["parts"]:
            self._check(f, name)
        if e["dim"] is None:
            return out.copy_(self.readers[e["parts"][0]].map(name))
        dim, n = e["dim"], len(e["parts"])
        size = e["shape"][dim] // n
        for i, f in enumerate(e["parts"]):
            out.narrow(dim, i * size, size).copy_(self.readers[f].map(name))
        return out

    def map_parts(self, name: str):
        """The stored parts of `name`, memory-mapped (copy-on-write, no read copy: see SafetensorsReader.map), and
        the dim they split the full tensor along (None for a tensor stored whole). Not checked against the
        checksums (see the module docstring)."""
        e = self.tensors.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return [self.readers[f].map(name) for f in e["parts"]], e["dim"]

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) of the tensor along its split dim, reading only the parts that overlap."""
        e = self.tensors[name]
        dim, parts = e["dim"], e["parts"]
        n = e["shape"][dim]
        size = n // len(parts)
        pieces = []
        for i, f in enumerate(parts):
            a, b = i * size, (i + 1) * size
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            r = self.readers[f]
            if dim == 0:
                self._check(f, name)  # the whole part, streamed through a small buffer; then only the rows
                pieces.append(r.get_rows(name, lo - a, hi - a))
            else:
                whole = r.get(name)
                self._check(f, name, whole)
                pieces.append(whole.narrow(dim, lo - a, hi - lo).clone())
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def get_local(self, name: str, tp=(0, 1), etp=(0, 1)) -> torch.Tensor:
        """The slice of `name` held by tensor-parallel rank tp=(rank, size) (experts: expert-TP rank etp)."""
        e = self.tensors[name]
        if e["dim"] is None:
            return self.get(name)
        rank, size = etp if e["rule"] == "expert" else tp
        n = e["shape"][e["dim"]]
        if n % size:
            raise ConfigError(f"{'parallel.etp' if e['rule'] == 'expert' else 'parallel.tp'}: {size} does not "
                              f"divide dim {e['dim']} ({n}) of {name}")
        if size == 1 and len(e["parts"]) == 1:
            return self.get(name)
        return self.get_range(name, *_chunk(n, size, rank))

    def close(self):
        for r in self.readers.values():
            r.close()


def local_names(cfg: ModelConfig, names, ep=(0, 1)) -> list[str]:
    """The names a rank holds: all non-expert tensors, and the experts owned by EP rank ep=(rank, size)."""
    rank, size = ep
    if cfg.moe is not None and cfg.moe.num_experts % size:
        raise ConfigError(f"parallel.ep: {size} does not divide moe.num_experts ({cfg.moe.num_experts})")
    out = []
    for n in names:
        rule = slicing(n)
        if rule[0] == "expert":
            per = cfg.moe.num_experts // size
            if rule[1] // per != rank:
                continue
        out.append(n)
    return out


def load_shards(path: str, tp=(0, 1), ep=(0, 1), etp=(0, 1), dtype: torch.dtype | None = None,
                progress: bool = False) -> dict:
    """State dict for one rank (defaults: the full TP1/EP1 model), from a checkpoint written with any layout.

    tp/ep/etp are (rank, size) pairs. Expert tensors keep their global names (`layers.i.mlp.experts.{e}...`).
    `dtype` casts on the fly (e.g. torch.float32 for CPU checks)."""
    ck = ShardedCheckpoint(path)
    try:
        out = {}
        names = local_names(ck.config, ck.names, ep)
        for n in tqdm(names, desc="load shards", disable=not progress, unit="tensor"):
            t = ck.get_local(n, tp, etp)
            out[n] = t.to(dtype) if dtype is not None else t
        return out
    finally:
        ck.close()


def check_output(out: str):
    """Refuse an output that already holds anything (never overwrite a saved checkpoint)."""
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise CheckpointError(f"{out}: exists and is not a directory")
        content = sorted(os.listdir(out))
        if content:
            is_ckpt = any(f in (MANIFEST, "config.json") or f.endswith(".safetensors") for f in content)
            what = "a checkpoint" if is_ckpt else "files"
            raise CheckpointError(f"{out}: already holds {what} ({', '.join(content[:4])}"
                                  f"{', ...' if len(content) > 4 else ''}); not overwriting it (megamoe never overwrites): choose a "
                                  "new output directory or remove this one yourself")


_OLD_TEMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]{8}$")  # tempfile.mkdtemp names of megamoe before owned temporaries


@contextlib.contextmanager
def staged_output(out: str):
    """Yield a temporary directory next to `out` (`.<name>.<random>.<pid>@<host>.tmp`, see megamoe.fileio); on
    success rename it to `out`, on any error delete it. First removes the temporaries of runs that were killed
    (their owner process is gone) from `out`'s parent directory."""
    out = os.path.abspath(out)
    check_output(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent)
    old = sorted(n for n in os.listdir(parent) if _OLD_TEMP.match(n) and os.path.isdir(os.path.join(parent, n)))
    if old:
        log.warning("%s holds temporary directories of an older megamoe that a killed run left (%s): their owner is "
                    "unknown, so they are left; remove them yourself when no conversion is running", parent,
                    ", ".join(old[:4]) + (", ..." if len(old) > 4 else ""))
    tmp = temp_path(out, hidden=True)
    os.mkdir(tmp, 0o700)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        check_output(out)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked just above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tensors(writer, tensors, total: int, desc: str, progress: bool = True):
    """Write `(name, tensor)` pairs through a ShardWriter / HFWriter with a progress bar over `total` bytes, then close
    it. Any error (or interrupt) aborts the writer, which removes its partial files, and is re-raised."""
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)
    try:
        for name, t in tensors:
            writer.write(name, t)
            bar.update(t.numel() * t.element_size())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def save_shards(out_dir: str, cfg: ModelConfig, state: dict, par: ParallelConfig | None = None,
                info: dict | None = None) -> str:
    """Write a full (TP1/EP1, our names) state dict as shards with layout `par` into `out_dir`, which must not exist
    or be empty. Written to a temporary sibling directory and renamed into place, so a failure leaves nothing.
    Returns `out_dir`. (For the trainer's exports; conversions stream instead of holding a state dict.)"""
    par = par or ParallelConfig()
    missing = [n for n in expected_names(cfg) if n not in state]
    if missing:
        raise CheckpointError(f"state dict lacks {missing[:3]} ({len(missing)} tensors) for this config")
    with staged_output(out_dir) as tmp:
        w = ShardWriter(tmp, cfg, par, {n: NAMES[state[n].dtype] for n in expected_names(cfg)}, info)
        write_tensors(w, ((n, state[n].detach().cpu()) for n in w.names), w.nbytes, "save", progress=False)
    return out_dir


def reshard(src: str, out_dir: str, par: ParallelConfig, info_update: dict | None = None,
            progress: bool = True) -> dict:
    """Re-write checkpoint `src` into `out_dir` (must exist, empty) with layout `par`, streaming tensor by tensor.
    The tensors are bit-identical; only their partition changes. Returns the new manifest's path and sizes."""
    ck = ShardedCheckpoint(src)
    try:
        info = {k: v for k, v in ck.manifest.items()
                if k not in ("format", "version", "model", "parallel", "files", "tensors", "checksum")}
        info.update(info_update or {})
        dtypes = {n: ck.dtype(n) for n in ck.names}
        w = ShardWriter(out_dir, ck.config, par, dtypes, info)
        if list(w.names) != list(ck.names):
            w.abort()
            raise CheckpointError(f"{src}: the manifest's tensors do not match its model config")
        write_tensors(w, ((n, ck.get(n)) for n in w.names), w.nbytes, "reshard", progress)
        return {"bytes": w.nbytes, "tensors": len(w.names)}
    finally:
        ck.close()
