"""Tokenizer adapter: one small interface over a Hugging Face tokenizer directory or a sentencepiece model.

`load_tokenizer(path)` returns a `TextTokenizer` with exactly what the data path needs:

- `encode(text) -> list[int]` and `encode_batch(texts, threads=1) -> list[list[int]]`, *without* special tokens
  (the preprocessor appends EOS, and BOS when asked, itself, so both tokenizer kinds behave the same);
  `threads > 1` runs the batch on the tokenizer library's own native thread pool (Rust rayon for HF fast
  tokenizers, C++ threads for sentencepiece), which shares one vocabulary and one merge cache between threads;
- `vocab_size` (including added tokens), `eod` (the end-of-document id, i.e. EOS), `bos`, `pad`;
- `unique_identifiers` (a dict), which megatron-core's `GPTDatasetConfig` hashes into its index-cache names;
- for chat data (HF tokenizers only): `hf_tokenizer` (the `transformers` tokenizer, for `apply_chat_template`) and
  `encode_batch_offsets(texts, threads)` -> `(ids, character offsets)` per text, special tokens in the text
  recognised (what `apply_chat_template(tokenize=True)` does) and none added.

The object is the duck-typed tokenizer megatron-core's GPT datasets accept (`vocab_size`, `eod`,
`unique_identifiers`), so the same object configures preprocessing and blending.

`token_dtype(vocab_size)` picks the on-disk dtype the way megatron does: uint16 below 65500 ids, else int32.
"""

from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import numpy as np

__all__ = ["TextTokenizer", "load_tokenizer", "token_dtype", "native_threads"]

# The size the Rust (rayon) pool of the HF `tokenizers` library was started with by `native_threads`, in this
# process: rayon reads RAYON_NUM_THREADS once, when its global pool starts, and the pool cannot be resized later.
_RAYON_POOL: Optional[int] = None


@contextlib.contextmanager
def native_threads(n: int):
    """Let HF fast tokenizers' batch calls inside the block run on `n` native threads (n == 1: sequential).

    Sets TOKENIZERS_PARALLELISM (and RAYON_NUM_THREADS before the pool's first start) for the block and restores
    both. Yields the thread count in force: after a first start the pool keeps its size, which is returned."""
    global _RAYON_POOL
    keys = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    try:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"
        if n > 1:
            if _RAYON_POOL is None:
                os.environ["RAYON_NUM_THREADS"] = str(n)
                _RAYON_POOL = n
            yield _RAYON_POOL
        else:
            yield 1
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def token_dtype(vocab_size: int) -> type:
    """The numpy dtype megatron uses for token ids of a vocabulary this size (`DType.optimal_dtype`)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class TextTokenizer:
    """Base class; see the module docstring. Subclasses fill `_encode`/`_encode_batch` and the ids."""

    kind = "base"

    def __init__(self, path: str, vocab_size: int, eod: int, bos: Optional[int], pad: Optional[int]):
        self.path = os.path.abspath(path)
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.bos = None if bos is None or bos < 0 else int(bos)
        self.pad = None if pad is None or pad < 0 else int(pad)
        self.unique_identifiers = {"class": type(self).__name__, "kind": self.kind, "path": self.path,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    # megatron-core's tokenizers expose `eos` too; some code paths read it.
    @property
    def eos(self) -> int:
        return self.eod

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: List[str], threads: int = 1) -> List[List[int]]:  # pragma: no cover - abstract
        """Token ids of each text, without special tokens; `threads` native threads (see the module docstring;
        the caller sets the HF thread pool up with `native_threads`)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A json-serialisable description, stored in dataset manifests."""
        return {"kind": self.kind, "path": self.path, "vocab_size": self.vocab_size, "eod": self.eod,
                "bos": self.bos, "pad": self.pad, "dtype": np.dtype(token_dtype(self.vocab_size)).name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer directory (anything `AutoTokenizer.from_pretrained` loads).

    With a fast tokenizer, encoding goes straight to the Rust `tokenizers.Tokenizer` (`encode_batch_fast`, which
    skips the character offsets, where the installed version has it), several times cheaper per document than
    calling the Python wrapper once per text. Its batch runs on rayon threads when TOKENIZERS_PARALLELISM is on
    (`native_threads`)."""

    kind = "hf"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 - re-raised with the path named
            raise ValueError(f"{path}: not a loadable Hugging Face tokenizer directory ({err})") from err
        eos = tok.eos_token_id
        if eos is None:
            raise ValueError(f"{path}: the tokenizer defines no eos_token; preprocessing needs one as the "
                             f"end-of-document token")
        self._tok = tok
        self.hf_tokenizer = tok
        self._backend = getattr(tok, "backend_tokenizer", None)
        self._batch = None
        if self._backend is not None:
            self._batch = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        super().__init__(path, len(tok), eos, tok.bos_token_id, tok.pad_token_id)

    def encode_batch(self, texts: List[str], threads: int = 1) -> List[List[int]]:
        if self._batch is not None:
            if threads > 1:
                with native_threads(threads):
                    return [e.ids for e in self._batch(texts, add_special_tokens=False)]
            return [e.ids for e in self._batch(texts, add_special_tokens=False)]
        return [self._tok.encode(t, add_special_tokens=False) for t in texts]

    def encode_batch_offsets(self, texts: List[str], threads: int = 1) -> List[tuple]:
        """`[(ids, offsets)]` per text: ids without added special tokens (special tokens written in the text are
        recognised), offsets `[(start, end)]` character spans in the text. Needs a fast tokenizer."""
        if self._backend is None:
            raise ValueError(f"{self.path}: chat data needs a fast (Rust) Hugging Face tokenizer for character "
                             f"offsets; this one is a slow Python tokenizer (add a tokenizer.json)")
        if threads > 1:
            with native_threads(threads):
                enc = self._backend.encode_batch(texts, add_special_tokens=False)
        else:
            enc = self._backend.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, e.offsets) for e in enc]


class SentencePieceTokenizer(TextTokenizer):
    """A sentencepiece `.model` file (the LLaMA-1/2 tokenizer format)."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{path}: not a loadable sentencepiece model ({err})") from err
        if sp.eos_id() < 0:
            raise ValueError(f"{path}: the sentencepiece model has no eos piece (eos_id = -1)")
        self._sp = sp
        super().__init__(path, sp.GetPieceSize(), sp.eos_id(), sp.bos_id(), sp.pad_id())

    def encode_batch(self, texts: List[str], threads: int = 1) -> List[List[int]]:
        # explicit: sentencepiece's default (-1) is every core of the machine, in every worker process
        return self._sp.Encode(list(texts), num_threads=max(1, threads))


def load_tokenizer(path: str) -> TextTokenizer:
    """Load a tokenizer from an HF directory (or hub-style directory with tokenizer files) or a sentencepiece model.

    Dispatch: a directory -> Hugging Face; a file ending in `.model` -> sentencepiece; a directory holding only
    `tokenizer.model` and no HF config is still loaded through Hugging Face (which wraps sentencepiece)."""
    if path is None:
        raise ValueError("no tokenizer given: pass an HF tokenizer directory or a sentencepiece .model file")
    if os.path.isdir(path):
        return HFTokenizer(path)
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        if path.endswith(".json"):  # a tokenizer.json: use its directory
            return HFTokenizer(os.path.dirname(os.path.abspath(path)))
        raise ValueError(f"{path}: expected an HF tokenizer directory or a sentencepiece '.model' file")
    raise FileNotFoundError(f"{path}: tokenizer not found (expected an HF tokenizer directory or a "
                            f"sentencepiece '.model' file)")


def tokenizer_from_description(desc: dict) -> TextTokenizer:
    """Reload the tokenizer a manifest describes (see `TextTokenizer.describe`)."""
    return load_tokenizer(desc["path"])
