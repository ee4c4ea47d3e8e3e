"""The tokenizer files beside a checkpoint, written so that every loader users pair with our exports reads them.

`copy_tokenizer(src, dst)` copies the tokenizer files and normalises two things that newer libraries write and older
ones cannot read (each checked by running the loader: docs/interchange.md, "Who loads what"):

- tokenizer_config.json: `tokenizer_class` "TokenizersBackend" (transformers 5's name) becomes
  "PreTrainedTokenizerFast" (the class every 4.x and 5.x resolves); the chat template is also written inline as
  `chat_template` (transformers < 4.43 and llama.cpp's converter read it there, not from chat_template.jinja).
- tokenizer.json: byte-level BPE merges as "a b" strings instead of ["a", "b"] pairs (tokenizers < 0.20, i.e. the
  transformers 4.42-4.44 that the released LLaMA-MoE v1/v2 code needs, refuse the pair form; newer read both).

`special_token_ids(dir)` reads the bos/eos/pad ids a directory declares (generation_config.json, config.json, or the
token strings of tokenizer_config.json looked up in tokenizer.json), for exports of checkpoints whose config did
not carry them.
"""

from __future__ import annotations

import json
import os
import shutil

from megamoe.fileio import atomic_write_text

__all__ = ["TOKENIZER_FILES", "copy_tokenizer", "normalize_tokenizer_files", "special_token_ids"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
_V5_ONLY_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files of `src_dir` that exist into `dst_dir`, then normalise them. Returns their names."""
    copied = []
    for f in TOKENIZER_FILES:
        p = os.path.join(src_dir, f)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst_dir, f))
            copied.append(f)
    normalize_tokenizer_files(dst_dir)
    return copied


def normalize_tokenizer_files(d: str) -> list[str]:
    """Rewrite the tokenizer files of `d` in place for every loader (module docstring). Returns what changed."""
    changed = []
    tc_path = os.path.join(d, "tokenizer_config.json")
    tc = _read_json(tc_path)
    if isinstance(tc, dict):
        new = dict(tc)
        if new.get("tokenizer_class") in _V5_ONLY_CLASSES:
            new["tokenizer_class"] = _V5_ONLY_CLASSES[new["tokenizer_class"]]
        jinja = os.path.join(d, "chat_template.jinja")
        if "chat_template" not in new and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                new["chat_template"] = f.read()
        if new != tc:
            atomic_write_text(tc_path, json.dumps(new, indent=2, ensure_ascii=False) + "\n")
            changed.append("tokenizer_config.json")
    tj_path = os.path.join(d, "tokenizer.json")
    tj = _read_json(tj_path)
    model = tj.get("model") if isinstance(tj, dict) else None
    merges = model.get("merges") if isinstance(model, dict) else None
    if (isinstance(merges, list) and merges and all(isinstance(m, list) and len(m) == 2 for m in merges)
            and not any(" " in a or " " in b for a, b in merges)):
        model["merges"] = [f"{a} {b}" for a, b in merges]
        atomic_write_text(tj_path, json.dumps(tj, ensure_ascii=False))
        changed.append("tokenizer.json")
    return changed


def special_token_ids(d: str) -> dict:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} that `d` declares (absent keys: unknown)."""
    out = {}
    for name in ("generation_config.json", "config.json"):
        j = _read_json(os.path.join(d, name))
        if isinstance(j, dict):
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if k not in out and j.get(k) is not None:
                    out[k] = j[k]
    tc, tj = _read_json(os.path.join(d, "tokenizer_config.json")), _read_json(os.path.join(d, "tokenizer.json"))
    if isinstance(tc, dict) and isinstance(tj, dict):
        ids = {a.get("content"): a.get("id") for a in tj.get("added_tokens") or [] if isinstance(a, dict)}
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids = {**vocab, **ids}
        for k, tok_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("pad_token_id", "pad_token")):
            tok = tc.get(tok_key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if k not in out and isinstance(tok, str) and isinstance(ids.get(tok), int):
                out[k] = ids[tok]
    return out
