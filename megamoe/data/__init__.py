"""megamoe.data: pre-tokenized indexed datasets, per-domain blending, dynamic domain weights.

| module          | job                                                                                     |
|-----------------|-----------------------------------------------------------------------------------------|
| `tokenizers.py` | HF directory / sentencepiece adapter (`vocab_size`, `eod`, `unique_identifiers`)         |
| `indexed.py`    | crash-safe writer of megatron `.bin/.idx` (temporary names, renamed when complete)       |
| `jsonl.py`      | one JSONL line -> a JSON object or the reason it is not one                              |
| `preprocess.py` | streaming, multi-process JSONL -> `.bin/.idx` with per-line error reporting (text, chat) |
| `chat.py`       | chat records -> template rendering -> token ids + assistant-token loss mask              |
| `chat_corpus.py`| an embedded chat corpus (general: stdlib docstrings, man pages; math: synthetic)         |
| `sft.py`        | `SFTMixture`: packed/padded SFT batches, response-only label mask, exact resume          |
| `corpus.py`     | a real multi-domain corpus from files every Python installation has                      |
| `blend.py`      | `DomainMixture`: per-domain megatron GPTDatasets, weighted draws, exact resume           |
| `dynamic.py`    | presets (llama, sheared_llama, uniform) and Sheared-LLaMA dynamic weight updates         |

User guide: docs/data.md. Nothing here imports megatron-core until a dataset is built or read.
"""

from megamoe.data.blend import DomainMixture, build_megatron_blend
from megamoe.data.chat import ChatEncoder, ChatInputError, ChatTemplateError, mask_prefix
from megamoe.data.dynamic import PRESETS, REFERENCE_LOSSES, resolve_weights, update_domain_weights
from megamoe.data.preprocess import (PreprocessConfig, PreprocessError,  # function `preprocess`: .preprocess
                                     preprocess_domains)
from megamoe.data.sft import ChatDataset, SFTBatch, SFTMixture
from megamoe.data.tokenizers import load_tokenizer, token_dtype

__all__ = ["DomainMixture", "build_megatron_blend", "PRESETS", "REFERENCE_LOSSES", "resolve_weights",
           "update_domain_weights", "PreprocessConfig", "PreprocessError", "preprocess_domains",
           "load_tokenizer", "token_dtype", "build_local_corpus", "build_chat_corpus", "ChatEncoder",
           "ChatInputError", "ChatTemplateError", "mask_prefix", "ChatDataset", "SFTBatch", "SFTMixture"]


def __getattr__(name):
    if name == "build_local_corpus":
        from megamoe.data.corpus import build_local_corpus

        return build_local_corpus
    if name == "build_chat_corpus":
        from megamoe.data.chat_corpus import build_chat_corpus

        return build_chat_corpus
    raise AttributeError(name)
