"""JSONL -> megatron `.bin/.idx`: streaming, parallel tokenization with per-line error reporting.

How it works
------------
1. `plan_chunks` cuts every input file into byte ranges of about `chunk_bytes`, each ending just after a newline
   (a seek plus a short read per cut: no pass over the data). Compressed files (`.gz`; `.zst` when the optional
   `zstandard` package is installed) are one chunk each, decompressed in memory by their worker.
2. Parallelism (`workers` = how many cores tokenize). Up to `max_threads` workers (default 4) run as native
   tokenizer threads in this one process (`encode_batch(..., threads=workers)`: the Rust rayon pool of HF fast
   tokenizers, sentencepiece's C++ threads), which share one merge cache and cost no fork, no pickling and no
   duplicated warm-up: on 2 cores that is about 2.3x one thread, against about 1.8x for two processes. More workers
   run as processes (`workers - 1` forked ones plus this one, which takes every `workers`-th chunk), one
   tokenizer thread each, the way Megatron-LM's preprocess_data does, since the Python side of each process
   (reading, JSON, id lists) would starve a big thread pool. `PreprocessConfig.max_threads` moves the boundary
   (1 = always processes).
   Each chunk is one task. Its worker reads only its range,
   decodes, parses and tokenizes its lines in batches, and writes the ids to a part file of its own. It returns
   the document lengths, its line count and the bad lines it met (local line numbers).
3. The main process takes the results *in input order* (a bounded window of futures on a
   `ProcessPoolExecutor`, so a worker killed by the OS, e.g. out of memory, is an error naming the file and byte
   range instead of a hang), turns local line numbers into `file:line`,
   appends each part to the output with a file copy and updates the progress bar (bytes, ETA, documents/s,
   tokens/s). Merging is a file copy, so N workers (N processes in all) give close to N times one worker's speed.
4. Output goes to temporary names and is renamed into place when complete (`indexed.IndexedWriter`): an
   interrupted or failed run never leaves a dataset that looks whole. Part files live in a
   `<prefix>.parts.<random>.<pid>@<host>.tmp` directory that is removed in every case but a kill -9; the next run
   writing into the same directory removes the temporaries whose owner process is gone (megamoe.fileio), and the
   input scans (`expand_inputs`, the `--per-domain` domain list) never read hidden or temporary names.

Memory is bounded by (workers + prefetched tasks) x `chunk_bytes`, whatever the input size.

Bad lines (`BAD_INPUT_REASONS`): invalid UTF-8, a blank line, malformed JSON, a value that is not a JSON object, a
missing key, a non-string value, an empty (whitespace-only) document. With `on_error="fail"` the first one, in input
order, raises `PreprocessError("<file>:<line>: <reason>")` and nothing is written; with `"skip"` they are counted per
reason, the first few of each are listed in the summary, and the run goes on.

Every document gets EOS (`tokenizer.eod`) appended, and BOS prepended when `prepend_bos=True`.

Chat data (`format="chat"`)
---------------------------
Lines are chat records (`{"messages": [...]}` or `{"instruction", "input"?, "output"}`, `megamoe.data.chat`),
rendered with the tokenizer's chat template (or `chat_template`, the Jinja text of `--chat-template FILE`) and
tokenized as the template writes them (no EOS/BOS added: the template's own tokens delimit turns). Each worker part
then has a twin holding the per-token loss mask (uint8 0/1: 1 = assistant token), and the output is two datasets with
identical document sizes: `<prefix>.bin/.idx` (tokens) and `<prefix>_loss_mask.bin/.idx` (`chat.mask_prefix`). The
mask dataset is published first and the tokens last, so the token `.idx` still marks a whole dataset; readers
(`megamoe.data.sft.ChatDataset`) refuse a pair whose sizes differ. Bad records are reported as `file:line: reason`
like text lines (`chat.CHAT_BAD_INPUT_REASONS`); a conversation without an assistant turn (or whose assistant turns
hold no token) is skipped and counted, never fatal.
"""

from __future__ import annotations

import gc
import gzip
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megamoe.data.chat import ALWAYS_SKIPPED, ChatEncoder, ChatInputError, mask_prefix, parse_chat_line
from megamoe.data.indexed import IndexedWriter
from megamoe.data.jsonl import parse_json_object
from megamoe.data.tokenizers import TextTokenizer, load_tokenizer, token_dtype
from megamoe.errors import DataError
from megamoe.fileio import atomic_write_text, is_temp_name, remove_stale_temps, temp_path

__all__ = ["PreprocessConfig", "PreprocessSummary", "PreprocessError", "preprocess", "preprocess_domains",
           "expand_inputs", "plan_chunks", "BAD_INPUT_REASONS", "is_validation_file", "FORMATS",
           "dataset_name"]

BAD_INPUT_REASONS = ("invalid UTF-8", "blank line", "malformed JSON", "not a JSON object", "missing key",
                     "not a string", "empty document")
_INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_COMPRESSED = (".gz", ".zst")
FORMATS = ("text", "chat")
_VALID_RE = re.compile(r"(^|[_\-.])(valid|validation|val|dev|heldout|held_out)([_\-.]|$)", re.IGNORECASE)


class PreprocessError(DataError):
    """Bad input under `on_error='fail'`, or an input problem that makes the whole run impossible."""


@dataclass
class PreprocessConfig:
    json_key: str = "text"
    append_eos: bool = True
    prepend_bos: bool = False
    workers: int = 1
    on_error: str = "skip"  # "skip" | "fail"
    chunk_bytes: int = 8 << 20
    batch_docs: int = 512
    max_threads: int = 4  # workers <= this: one process, `workers` native tokenizer threads; else processes
    overwrite: bool = False
    progress: bool = True
    max_examples: int = 5  # bad-line examples kept per reason
    format: str = "text"  # "text" (json_key holds a document) | "chat" (chat records, see megamoe.data.chat)
    chat_template: Optional[str] = None  # chat: Jinja source replacing the tokenizer's own chat template
    chat_template_source: Optional[str] = None  # chat: how errors name it (the --chat-template file)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {self.max_threads}")

    def layout(self, tokenizer=None) -> Tuple[int, int]:
        """(processes, tokenizer threads per process) for `workers`; see the module docstring. A tokenizer whose
        `encode_batch` takes no `threads` argument (a user's own duck-typed one) always gets processes."""
        if self.workers <= self.max_threads and (tokenizer is None or _takes_threads(tokenizer)):
            return 1, self.workers
        return self.workers, 1


def _takes_threads(tokenizer) -> bool:
    import inspect

    try:
        return "threads" in inspect.signature(tokenizer.encode_batch).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class PreprocessSummary:
    output_prefix: str
    documents: int = 0
    tokens: int = 0
    lines: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)
    dtype: str = ""
    layout: str = ""
    data_format: str = "text"
    trained_tokens: int = 0  # chat: assistant tokens (mask 1)
    notes: Counter = field(default_factory=Counter)  # chat: assistant turns, boundary merges

    @property
    def mask_prefix(self) -> Optional[str]:
        return mask_prefix(self.output_prefix) if self.data_format == "chat" else None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def format(self) -> str:
        s = max(self.seconds, 1e-9)
        out = [f"{self.output_prefix}: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}) from "
               f"{len(self.files)} file(s), {self.lines:,} lines, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
               f"({self.documents / s:,.0f} docs/s, {self.tokens / s:,.0f} tokens/s; {self.layout})"]
        if self.data_format == "chat":
            share = self.trained_tokens / max(self.tokens, 1)
            out.append(f"  chat: {self.documents:,} conversations, {self.notes.get('assistant turns', 0):,} assistant "
                       f"turns, {self.trained_tokens:,} assistant tokens trained ({share:.1%}); loss mask in "
                       f"{self.mask_prefix}.bin/.idx")
            if self.notes.get("boundary merges"):
                out.append(f"  note: {self.notes['boundary merges']:,} assistant span boundaries fall inside a token "
                           f"(the tokenizer merged header and reply text); those tokens are masked")
        if self.skipped:
            out.append(f"  skipped {self.skipped_total:,} line(s):")
            for reason, n in sorted(self.skipped.items()):
                out.append(f"    {reason}: {n:,}")
                for ex in self.examples.get(reason, []):
                    out.append(f"      {ex}")
        else:
            out.append("  skipped 0 lines")
        return "\n".join(out)

    def to_dict(self) -> dict:
        d = {"output_prefix": self.output_prefix, "documents": self.documents, "tokens": self.tokens,
             "lines": self.lines, "bytes": self.bytes, "seconds": round(self.seconds, 3),
             "skipped": dict(self.skipped), "dtype": self.dtype, "layout": self.layout, "files": self.files,
             "data_format": self.data_format}
        if self.data_format == "chat":
            d.update(mask_prefix=self.mask_prefix, trained_tokens=self.trained_tokens, notes=dict(self.notes))
        return d


# ----------------------------------------------------------------------------------------------------------------
# input discovery and chunking
# ----------------------------------------------------------------------------------------------------------------
def is_validation_file(name: str) -> bool:
    """Whether a file name marks held-out data (`valid.jsonl`, `val_00.jsonl`, `c4-validation.jsonl`, ...)."""
    base = os.path.basename(name)
    for suf in _INPUT_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return bool(_VALID_RE.search(base))


def _is_data_name(name: str) -> bool:
    """False for hidden and temporary names (a killed run's leftovers, megamoe.fileio.is_temp_name): never data."""
    return not name.startswith(".") and not is_temp_name(name)


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files as given; directories expanded (recursively, sorted) to their `.jsonl/.json(.gz)` files, skipping
    hidden and temporary files and directories."""
    files: List[str] = []
    for p in inputs:
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if _is_data_name(d))
                found += [os.path.join(root, n) for n in sorted(names)
                          if n.endswith(_INPUT_SUFFIXES) and _is_data_name(n)]
            if not found:
                raise PreprocessError(f"{p}: directory holds no {'/'.join(_INPUT_SUFFIXES)} files")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise PreprocessError(f"{p}: no such file or directory")
    return files


def plan_chunks(files: Sequence[str], chunk_bytes: int) -> List[Tuple[int, str, int, int]]:
    """(file index, path, start, end) byte ranges; each ends after a newline (or at EOF). end=-1: whole gz file."""
    chunks = []
    for fi, path in enumerate(files):
        if path.endswith(_COMPRESSED):
            chunks.append((fi, path, 0, -1))
            continue
        size = os.path.getsize(path)
        start = 0
        with open(path, "rb") as f:
            while start < size:
                cut = start + chunk_bytes
                if cut >= size:
                    end = size
                else:
                    f.seek(cut)
                    f.readline()  # move past the line the cut fell into
                    end = min(f.tell(), size)
                chunks.append((fi, path, start, end))
                start = end
    return chunks


# ----------------------------------------------------------------------------------------------------------------
# the per-chunk work (runs in workers)
# ----------------------------------------------------------------------------------------------------------------
_W: dict = {}  # worker state: tokenizer, config, parts dir


def _worker_init(tokenizer: Optional[TextTokenizer], tokenizer_path: str, cfg: PreprocessConfig,
                 in_pool: bool = True, threads: int = 1):
    _W["threads"] = threads
    if in_pool:  # one core per worker: no nested rayon thread pool in the HF tokenizer
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # the objects inherited from the parent (torch, megatron, ... when called from a trainer or a notebook) go
        # to the permanent generation: the worker's garbage collections then never walk them, which would copy
        # every page they live on (copy-on-write) for nothing
        gc.freeze()
    _W["tok"] = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path)
    _W["cfg"] = cfg
    _W["dtype"] = np.dtype(token_dtype(_W["tok"].vocab_size))
    if cfg.format == "chat":
        _W["chat"] = ChatEncoder(_W["tok"], cfg.chat_template, cfg.chat_template_source)


def _read_chunk(path: str, start: int, end: int) -> bytes:
    if end < 0 and path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise PreprocessError(f"{path}: reading .zst needs the 'zstandard' package (pip install zstandard), "
                                  f"or decompress first with `zstd -d`") from err
        try:
            with open(path, "rb") as f:
                return zstandard.ZstdDecompressor().stream_reader(f).read()
        except zstandard.ZstdError as e:
            raise PreprocessError(f"{path}: not a complete zstd stream ({e}); the file is truncated or corrupt: "
                                  "recompress it or leave it out") from None
    if end < 0:
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad magic or CRC
            raise PreprocessError(f"{path}: not a complete gzip stream ({e}); the file is truncated or corrupt: "
                                  "recompress it or leave it out") from None
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _parse_line(raw: bytes, key: str):
    """-> (text, None) or (None, (reason, detail))."""
    obj, err = parse_json_object(raw)
    if err is not None:
        return None, err
    if key not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8])
        return None, ("missing key", f"no key {key!r}; keys present: {keys or 'none'}")
    text = obj[key]
    if not isinstance(text, str):
        return None, ("not a string", f"key {key!r} holds {type(text).__name__}, expected a string")
    if not text.strip():
        return None, ("empty document", f"key {key!r} is empty or whitespace only")
    return text, None


def _chunk_lines(path: str, start: int, end: int) -> List[bytes]:
    data = _read_chunk(path, start, end)
    if start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark before the first line
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the chunk's last line
    return lines


def _process_chunk(task: Tuple[int, int, str, int, int, str]) -> dict:
    ci, fi, path, start, end, parts_dir = task
    tok: TextTokenizer = _W["tok"]
    cfg: PreprocessConfig = _W["cfg"]
    dtype = _W["dtype"]
    if cfg.format == "chat":
        return _process_chat_chunk(task)
    lines = _chunk_lines(path, start, end)
    errors: List[Tuple[int, str, str]] = []
    sizes: List[int] = []
    n_tokens = 0
    part = os.path.join(parts_dir, f"part{ci:08d}.bin")
    prefix = [tok.bos] if cfg.prepend_bos and tok.bos is not None else []
    suffix = [tok.eod] if cfg.append_eos else []
    with open(part, "wb") as out:
        batch: List[str] = []

        def flush():
            nonlocal n_tokens
            if not batch:
                return
            threads = _W.get("threads", 1)
            for ids in (tok.encode_batch(batch, threads=threads) if threads > 1 else tok.encode_batch(batch)):
                arr = np.asarray(prefix + ids + suffix, dtype=dtype)
                out.write(arr.tobytes())
                sizes.append(arr.size)
                n_tokens += arr.size
            batch.clear()

        for li, raw in enumerate(lines):
            text, err = _parse_line(raw, cfg.json_key)
            if err is not None:
                errors.append((li, err[0], err[1]))
                if cfg.on_error == "fail":
                    break
                continue
            batch.append(text)
            if len(batch) >= cfg.batch_docs:
                flush()
        if not (errors and cfg.on_error == "fail"):
            flush()
    return {"chunk": ci, "file": fi, "part": part, "sizes": np.asarray(sizes, dtype=np.int32),
            "lines": len(lines), "errors": errors, "tokens": n_tokens,
            "bytes": (end - start) if end >= 0 else os.path.getsize(path)}


def _process_chat_chunk(task: Tuple[int, int, str, int, int, str]) -> dict:
    """`_process_chunk` for chat records: a token part and a mask part (uint8) with the same document sizes."""
    ci, fi, path, start, end, parts_dir = task
    cfg: PreprocessConfig = _W["cfg"]
    dtype = _W["dtype"]
    enc: ChatEncoder = _W["chat"]
    enc.stats = Counter()
    lines = _chunk_lines(path, start, end)
    errors: List[Tuple[int, str, str]] = []
    sizes: List[int] = []
    n_tokens = 0
    part = os.path.join(parts_dir, f"part{ci:08d}.bin")
    mpart = os.path.join(parts_dir, f"part{ci:08d}.mask.bin")
    fatal = False
    with open(part, "wb") as out, open(mpart, "wb") as mout:
        batch: List[Tuple[int, tuple]] = []

        def flush():
            nonlocal n_tokens
            if not batch:
                return
            for (li, _), (ids, mask) in zip(batch, enc.encode_rendered([r for _, r in batch],
                                                                        threads=_W.get("threads", 1))):
                if not mask.any():
                    errors.append((li, "no trained tokens", "every assistant span is empty after rendering"))
                    continue
                out.write(ids.astype(dtype).tobytes())
                mout.write(mask.tobytes())
                sizes.append(ids.size)
                n_tokens += ids.size
            batch.clear()

        for li, raw in enumerate(lines):
            msgs, err = parse_chat_line(raw)
            if err is None:
                try:
                    batch.append((li, enc.render(msgs)))
                except ChatInputError as e:
                    err = (e.reason, e.detail)
            if err is not None:
                errors.append((li, err[0], err[1]))
                if cfg.on_error == "fail" and err[0] not in ALWAYS_SKIPPED:
                    fatal = True
                    break
                continue
            if len(batch) >= cfg.batch_docs:
                flush()
        if not fatal:
            flush()
    errors.sort(key=lambda e: e[0])
    return {"chunk": ci, "file": fi, "part": part, "mask_part": mpart, "sizes": np.asarray(sizes, dtype=np.int32),
            "lines": len(lines), "errors": errors, "tokens": n_tokens, "chat": dict(enc.stats),
            "bytes": (end - start) if end >= 0 else os.path.getsize(path)}


# ----------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar over input bytes with documents/s and tokens/s; silent when disabled."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool):
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        if self.bar is None:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{docs / dt:,.0f} docs/s, {tokens / dt:,.0f} tok/s", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _make_executor(tok: TextTokenizer, cfg: PreprocessConfig) -> Optional[ProcessPoolExecutor]:
    """`workers - 1` forked processes (this process is the remaining worker), or None when one process does all
    the work (`workers == 1`, or native tokenizer threads: `cfg.layout`)."""
    if cfg.layout(tok)[0] <= 1:
        return None
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ProcessPoolExecutor(cfg.workers - 1, mp_context=ctx, initializer=_worker_init,
                               initargs=(tok, tok.path, cfg))


def _kill_executor(ex: ProcessPoolExecutor) -> None:
    """Stop now: cancel queued work and terminate the workers (after an error or an interrupt)."""
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


def _ordered_results(ex: Optional[ProcessPoolExecutor], tasks, workers: int):
    """Results of `_process_chunk` over `tasks`, in order. Every `workers`-th task runs in this process when its
    turn comes (so `workers` processes tokenize, not `workers + 1` competing for the cores); the others run on the
    executor, at most `3 * workers` tasks ahead."""
    it = iter(tasks)
    pending: deque = deque()
    window = 3 * workers

    def fill():
        while len(pending) < window:
            t = next(it, None)
            if t is None:
                return
            inline = ex is None or t[0] % workers == 0
            pending.append((t, None if inline else ex.submit(_process_chunk, t)))

    cur = None
    try:
        fill()
        while pending:
            cur, fut = pending.popleft()
            fill()  # keep the other processes fed before working here
            r = _process_chunk(cur) if fut is None else fut.result()
            yield r
    except BrokenProcessPool as err:  # from result() or from a submit() after the pool broke
        where = f"{cur[2]}, near bytes {cur[3]}-{cur[4]}" if cur is not None else "the first chunks"
        raise PreprocessError(f"a worker process died while tokenizing {where} (killed by a signal, or out of "
                              f"memory?); nothing was written") from err
    finally:
        for _, fut in pending:
            if fut is not None:
                fut.cancel()


def _tokenizer_of(tokenizer) -> TextTokenizer:
    return tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer, cfg: Optional[PreprocessConfig] = None,
               executor: Optional[ProcessPoolExecutor] = None) -> PreprocessSummary:
    """Tokenize JSONL `inputs` (files and/or directories) into `<output_prefix>.bin/.idx`.

    `tokenizer` is a `TextTokenizer` or a path for `load_tokenizer`. Returns a `PreprocessSummary`; raises
    `PreprocessError` for bad input under `on_error='fail'` (naming file and line) and when no document survives.
    With `cfg.format == "chat"` also writes `<output_prefix>_loss_mask.bin/.idx` (see the module docstring); a
    tokenizer without a chat template (and no `cfg.chat_template`) raises `chat.ChatTemplateError` first.
    """
    cfg = cfg or PreprocessConfig()
    tok = _tokenizer_of(tokenizer)
    chat = cfg.format == "chat"
    if chat:
        ChatEncoder(tok, cfg.chat_template, cfg.chat_template_source)  # no template: fail before any work
    files = expand_inputs(inputs)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    total = sum(os.path.getsize(f) for f in files)
    procs, threads = cfg.layout(tok)
    # about 16 chunks per process for small inputs (load balance at the tail), never above cfg.chunk_bytes
    chunk_bytes = max(1, min(cfg.chunk_bytes, max(64 << 10, total // (procs * 16) + 1)))
    chunks = plan_chunks(files, chunk_bytes)
    remove_stale_temps(os.path.dirname(os.path.abspath(output_prefix)))  # what killed runs left here
    parts_dir = temp_path(output_prefix + ".parts")
    tasks = [(ci, fi, path, s, e, parts_dir) for ci, (fi, path, s, e) in enumerate(chunks)]
    summary = PreprocessSummary(output_prefix=output_prefix, files=list(files), dtype=dtype.name,
                                data_format=cfg.format, layout=(f"{procs} processes" if procs > 1 else
                                        f"1 process, {threads} tokenizer thread{'s' if threads > 1 else ''}"))
    t0 = time.perf_counter()

    writer = IndexedWriter(output_prefix, dtype, overwrite=cfg.overwrite)
    mwriter = None
    if chat:
        try:
            mwriter = IndexedWriter(mask_prefix(output_prefix), np.uint8, overwrite=cfg.overwrite)
        except BaseException:
            writer.abort()
            raise
    os.makedirs(parts_dir, exist_ok=True)
    progress = _Progress(total, os.path.basename(output_prefix), cfg.progress)
    own_ex = None
    old_par = os.environ.get("TOKENIZERS_PARALLELISM")
    results = None
    froze = False
    try:
        # this process tokenizes too: sequentially, or on `threads` native threads inside each batch call
        # (tokenizers.native_threads); forked workers inherit the "false" (restored below)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _worker_init(tok, tok.path, cfg, in_pool=False, threads=threads)
        if executor is None and procs > 1:
            own_ex = executor = _make_executor(tok, cfg)
        if executor is not None:
            froze = True
            gc.freeze()  # neither this process's nor the workers' collections walk (and copy) the shared heap
        results = _ordered_results(executor if procs > 1 else None, tasks, procs)
        lines_before = Counter()  # per file: lines in the chunks already merged
        with writer:
            for r in results:
                path = files[r["file"]]
                for li, reason, detail in r["errors"]:
                    where = f"{path}:{lines_before[r['file']] + li + 1}"
                    msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
                    if cfg.on_error == "fail" and reason not in ALWAYS_SKIPPED:
                        raise PreprocessError(msg + "  [--on-error fail: nothing was written]")
                    summary.skipped[reason] += 1
                    ex = summary.examples.setdefault(reason, [])
                    if len(ex) < cfg.max_examples:
                        ex.append(msg)
                lines_before[r["file"]] += r["lines"]
                writer.append_bin_file(r["part"], r["sizes"])
                os.remove(r["part"])
                if mwriter is not None:
                    mwriter.append_bin_file(r["mask_part"], r["sizes"])
                    os.remove(r["mask_part"])
                    summary.notes.update(r["chat"])
                    summary.trained_tokens = summary.notes["trained tokens"]
                summary.documents += len(r["sizes"])
                summary.tokens += r["tokens"]
                summary.lines += r["lines"]
                summary.bytes += r["bytes"]
                progress.update(r["bytes"], summary.documents, summary.tokens)
            if summary.documents == 0:
                raise PreprocessError(f"{output_prefix}: no documents to write: {summary.lines} line(s) read from "
                                      f"{len(files)} file(s), {summary.skipped_total} skipped "
                                      f"({dict(summary.skipped)})")
            if mwriter is not None:
                if cfg.overwrite and os.path.exists(output_prefix + ".idx"):
                    os.remove(output_prefix + ".idx")  # the old token dataset stops looking whole first
                mwriter.publish()
            writer.publish()
    except BaseException:
        if own_ex is not None:
            _kill_executor(own_ex)
            own_ex = None
        raise
    finally:
        if froze:
            gc.unfreeze()
        if hasattr(results, "close"):
            results.close()  # cancels this dataset's queued work on a shared executor
        if old_par is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old_par
        progress.close()
        if not writer.published:
            writer.abort()
        if mwriter is not None and not mwriter.published:
            mwriter.abort()
        if own_ex is not None:
            own_ex.shutdown(wait=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def dataset_name(stem: str, cfg: PreprocessConfig) -> str:
    """Megatron's naming: `<stem>_<json-key>_document` for text, `<stem>_chat_document` for chat data."""
    return f"{stem}_chat_document" if cfg.format == "chat" else f"{stem}_{cfg.json_key}_document"


def preprocess_domains(root: str, output_dir: str, tokenizer, cfg: Optional[PreprocessConfig] = None,
                       domains: Optional[Sequence[str]] = None) -> dict:
    """One dataset per domain directory of `root` (SlimPajama-style `root/<domain>/*.jsonl`).

    Files whose names mark held-out data (`is_validation_file`) go to `<output_dir>/<domain>/valid_text_document`,
    the others to `<output_dir>/<domain>/train_text_document`. Writes `<output_dir>/manifest.json` (domains, prefixes
    relative to it, document/token counts, tokenizer) for `DomainMixture.from_manifest`. Returns the manifest.

    Chat data (`cfg.format == "chat"`): `<split>_chat_document` plus its `_loss_mask` dataset per split; the manifest
    also has `"data_format": "chat"`, the template (`chat_template`, `chat_template_sha256`) and per domain
    `<split>_loss_mask` prefixes and `<split>_trained_tokens`, for `SFTMixture.from_manifest`."""
    cfg = cfg or PreprocessConfig()
    tok = _tokenizer_of(tokenizer)
    chat_desc = {}
    if cfg.format == "chat":  # no chat template: fail before any work
        chat_desc = ChatEncoder(tok, cfg.chat_template, cfg.chat_template_source).describe()
    if not os.path.isdir(root):
        raise PreprocessError(f"{root}: not a directory (expected one subdirectory per domain)")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and _is_data_name(d))
    if domains is not None:
        missing = [d for d in domains if d not in names]
        if missing:
            raise PreprocessError(f"{root}: no domain directory for {missing} (found {names})")
        names = list(domains)
    if not names:
        raise PreprocessError(f"{root}: no domain subdirectories")
    plan = {}
    for d in names:
        files = expand_inputs([os.path.join(root, d)])
        plan[d] = {"train": [f for f in files if not is_validation_file(f)],
                   "valid": [f for f in files if is_validation_file(f)]}
        if not plan[d]["train"]:
            raise PreprocessError(f"{os.path.join(root, d)}: only validation files, no training data")
    manifest = {"format": "megamoe-domains-v1", "tokenizer": tok.describe(), "json_key": cfg.json_key,
                "append_eos": cfg.append_eos, "prepend_bos": cfg.prepend_bos, "domains": {}}
    if chat_desc:
        manifest.update(data_format="chat", append_eos=False, prepend_bos=False, **chat_desc)
        manifest.pop("json_key")
    ex = _make_executor(tok, cfg)
    try:
        for d in names:
            entry = {}
            for split in ("train", "valid"):
                if not plan[d][split]:
                    continue
                prefix = os.path.join(output_dir, d, dataset_name(split, cfg))
                s = preprocess(plan[d][split], prefix, tok, cfg, executor=ex)
                if cfg.progress:
                    print(s.format(), file=sys.stderr)
                entry[split] = os.path.relpath(prefix, output_dir)
                entry[f"{split}_documents"] = s.documents
                entry[f"{split}_tokens"] = s.tokens
                entry[f"{split}_skipped"] = dict(s.skipped)
                if s.data_format == "chat":
                    entry[f"{split}_loss_mask"] = os.path.relpath(s.mask_prefix, output_dir)
                    entry[f"{split}_trained_tokens"] = s.trained_tokens
            manifest["domains"][d] = entry
    except BaseException:
        if ex is not None:
            _kill_executor(ex)
            ex = None
        raise
    finally:
        if ex is not None:
            ex.shutdown(wait=True)
    atomic_write_text(os.path.join(output_dir, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
