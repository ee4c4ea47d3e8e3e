"""megamoe.data: pre-tokenized indexed datasets, per-domain blending, dynamic domain weights.

| module          | job                                                                                     |
|-----------------|-----------------------------------------------------------------------------------------|
| `tokenizers.py` | HF directory / sentencepiece adapter (`vocab_size`, `eod`, `unique_identifiers`)         |
| `indexed.py`    | crash-safe writer of megatron `.bin/.idx` (temporary names, renamed when complete)       |
| `preprocess.py` | streaming, multi-process JSONL -> `.bin/.idx` with per-line error reporting              |
| `corpus.py`     | a real multi-domain corpus from files every Python installation has                      |
| `blend.py`      | `DomainMixture`: per-domain megatron GPTDatasets, weighted draws, exact resume           |
| `dynamic.py`    | presets (llama, sheared_llama, uniform) and Sheared-LLaMA dynamic weight updates         |

User guide: docs/data.md. Nothing here imports megatron-core until a dataset is built or read.
"""

from .blend import DomainMixture, build_megatron_blend
from .dynamic import PRESETS, REFERENCE_LOSSES, resolve_weights, update_domain_weights
from .preprocess import PreprocessConfig, PreprocessError, preprocess_domains  # the function `preprocess`: from .preprocess
from .tokenizers import load_tokenizer, token_dtype

__all__ = ["DomainMixture", "build_megatron_blend", "PRESETS", "REFERENCE_LOSSES", "resolve_weights",
           "update_domain_weights", "PreprocessConfig", "PreprocessError", "preprocess_domains",
           "load_tokenizer", "token_dtype", "build_local_corpus"]


def __getattr__(name):
    if name == "build_local_corpus":
        from .corpus import build_local_corpus

        return build_local_corpus
    raise AttributeError(name)
