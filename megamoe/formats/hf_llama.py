"""Hugging Face LLaMA <-> megamoe: the config and the (dense) parameter renaming.

    cfg = config_from_hf(json.load(open("config.json")))        # LLaMA-2/3, SmolLM2, ... (GQA, RoPE scaling)
    ours = hf_to_ours(hf_state, cfg)                             # names of docs/architecture.md
    hf = ours_to_hf(ours, cfg)                                   # back (dense keys; MoE keys are left out)
    cfg, state = load_hf_llama("path/to/hf_dir")                 # both, from a directory of safetensors
"""

from __future__ import annotations

import json
import os
import re

import torch

from megamoe.config import ModelConfig
from megamoe.formats.layout import config_from_hf_llama

_PAIRS = [  # (HF name, our name); {i} = layer index, {p} = projection
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.{i}.attn.{p}_proj.weight"),
    ("model.layers.{i}.mlp.{p}_proj.weight", "layers.{i}.mlp.{p}_proj.weight"),
]


def _regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)"))


_HF_TO_OURS = [(_regex(h), o) for h, o in _PAIRS]
_OURS_TO_HF = [(_regex(o), h) for h, o in _PAIRS]


def rename(name: str, hf_to_ours: bool = True) -> str | None:
    """One tensor name across the two conventions, or None if it has no counterpart."""
    for pat, tmpl in (_HF_TO_OURS if hf_to_ours else _OURS_TO_HF):
        m = pat.fullmatch(name)
        if m:
            return tmpl.format(**m.groupdict())
    return None


_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A dense ModelConfig from an HF LLaMA config dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
    `rope_parameters`). Raises ConfigError naming the file and field for anything we cannot represent. The field
    mapping lives in megamoe.formats.layout, shared with the Mixtral and llama-moe v1 readers."""
    return config_from_hf_llama(hf, where)


def hf_to_ours(hf_state: dict, cfg: ModelConfig, where: str = "checkpoint") -> dict:
    """Rename HF LLaMA tensors to ours. Unknown keys are an error (a silent skip is how experts go missing)."""
    out = {}
    for k, v in hf_state.items():
        if _IGNORED.match(k):
            continue
        name = rename(k)
        if name is None:
            raise KeyError(f"{where}: unexpected tensor {k!r} for a LLaMA checkpoint")
        out[name] = v
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def ours_to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Our dense names back to HF LLaMA names (keys that have no dense HF counterpart are skipped)."""
    out = {}
    for k, v in state.items():
        name = rename(k, hf_to_ours=False)
        if name is not None:
            out[name] = v
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_hf_llama(path: str, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict]:
    """Config and our-named state dict from an HF LLaMA directory (single or sharded safetensors)."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json; expected a Hugging Face model directory")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not loaded)")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    ours = hf_to_ours(state, cfg, path)
    if dtype is not None:
        ours = {k: v.to(dtype) for k, v in ours.items()}
    return cfg, ours
