"""Any model -> our LlamaMoEModel in memory, for evaluation and generation, without converting first.

    parallel.initialize(ParallelConfig(tp=2, ep=2))     # the entry point sets up the layout (a world of one: no args)
    lm = load_model("ckpt/moe")                         # our shards, any TP/EP/ETP layout: this rank's slice
    lm = load_model("hf/mixtral", dtype="bfloat16")     # or an HF directory: dense LLaMA, Mixtral, llama-moe v1
    lm.model(ids).logits; lm.cfg; lm.layout; lm.tokenizer (transformers tokenizer or None)

Layouts (`detect_layout`):

| layout | how it is recognised | config and names |
|---|---|---|
| `megamoe` | `manifest.json` (our shards) | `megamoe.formats.shards` (each rank reads its slice) |
| `llama` | config.json `model_type: llama` | `megamoe.formats.hf_llama` |
| `mixtral` | `model_type: mixtral` | `megamoe.formats.mixtral` |
| `llama-moe-v1` | `model_type: llama_moe` | `megamoe.formats.llama_moe_v1` |
| `llama-moe-v2` | `model_type: mixtral` + v2 fields (`use_attn_moe`, `moe_type`, ...) | `megamoe.formats.llama_moe_v2` (attention experts' pieces stacked) |

An HF directory is read tensor by tensor (megamoe.formats.hf_dir, safetensors only) and each tensor is cut to this
rank's TP / EP / expert-TP slice by the same rules as our shards (megamoe.formats.layout.slicing). Anything else is an
InputError naming config.json's model_type; missing or malformed files are CheckpointErrors naming the file.

The llama-moe v2 layout is registered before Mixtral (a v2 directory is Mixtral-typed): its attention experts are
one key per expert, stacked into our tensors by `HFLayout.read` (megamoe.interchange.import_moe.check_v2_tensors);
what the released code computes and what megamoe refuses: megamoe/formats/llama_moe_v2.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from megatron.core import parallel_state as ps

from megamoe.config import DTYPES, ModelConfig
from megamoe.errors import CheckpointError, ConfigError, InputError
from megamoe.formats import hf_llama
from megamoe.formats import llama_moe_v1 as v1
from megamoe.formats import llama_moe_v2 as v2
from megamoe.formats import mixtral as mx
from megamoe.formats.hf_dir import HFDir, read_json
from megamoe.formats.layout import expected_names, hf_llama_to_ours_name, slicing
from megamoe.formats.shards import ShardedCheckpoint, is_shard_dir, load_shards, local_names
from megamoe.interchange.common import check_tensors
from megamoe.interchange.import_moe import check_v2_tensors
from megamoe.model import LlamaMoEModel

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "HFLayout", "HF_LAYOUTS", "register_hf_layout", "detect_layout", "load_model",
           "load_tokenizer", "rank_slices", "is_llama_moe_v2"]

SHARDS = "megamoe"
# config.json fields that only llama-moe v2's Mixtral-derived layout writes (megamoe.formats.llama_moe_v2)
V2_FIELDS = v2.V2_FIELDS
is_llama_moe_v2 = v2.is_llama_moe_v2


@dataclass(frozen=True)
class HFLayout:
    """How to read one HF directory layout: recognise its config.json, build our config, rename its tensors.
    `optional(cfg)`: our names that may be absent (filled with zeros), e.g. a router's training-only noise weight."""
    name: str
    detect: Callable[[dict], bool]
    config_from_hf: Callable[[dict, str], ModelConfig]
    hf_to_ours_name: Callable[[str], str | None]
    optional: Callable[[ModelConfig], list] = field(default=lambda cfg: [])
    # layouts whose tensors are not one key each: (HFDir, cfg) -> {our name: loader of the full tensor}
    read: Callable[[HFDir, ModelConfig], dict] | None = None


def _noise_names(cfg: ModelConfig) -> list:
    return [n for n in expected_names(cfg) if n.endswith("router.noise.weight")]


HF_LAYOUTS: dict[str, HFLayout] = {}


def register_hf_layout(layout: HFLayout) -> None:
    """Add (or replace) an HF layout. Layouts are tried in registration order; the v2 check comes before Mixtral."""
    HF_LAYOUTS[layout.name] = layout


register_hf_layout(HFLayout("llama-moe-v2", is_llama_moe_v2, v2.config_from_hf, v2.hf_to_ours_name,
                            read=check_v2_tensors))
register_hf_layout(HFLayout("llama", lambda c: c.get("model_type") == "llama", hf_llama.config_from_hf,
                            hf_llama_to_ours_name))
register_hf_layout(HFLayout("mixtral", lambda c: c.get("model_type") == "mixtral", mx.config_from_hf,
                            mx.hf_to_ours_name, _noise_names))
register_hf_layout(HFLayout("llama-moe-v1", lambda c: c.get("model_type") == "llama_moe", v1.config_from_hf,
                            v1.hf_to_ours_name, _noise_names))


@dataclass
class LoadedModel:
    model: LlamaMoEModel             # eval mode, built for the layout in force, this rank's slice loaded
    cfg: ModelConfig
    layout: str                      # "megamoe" or an HF layout name
    path: str
    tokenizer: object | None = None  # a transformers tokenizer (None when the directory has none)
    eos_ids: list = field(default_factory=list)  # ids that end a generation (tokenizer + generation_config.json)
    source_path: str | None = None   # our shards: the checkpoint they were converted from (manifest "source")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def detect_layout(path: str) -> str:
    """"megamoe" for our shard directory, else the name of the HF layout config.json matches."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise InputError(f"{path}: not a directory (expected a megamoe shard directory or a Hugging Face model "
                         "directory)")
    if is_shard_dir(path):
        return SHARDS
    cj = os.path.join(path, "config.json")
    if not os.path.isfile(cj):
        raise CheckpointError(f"{path}: neither manifest.json (megamoe shards) nor config.json (Hugging Face model)")
    hf = read_json(cj, "config.json")
    for layout in HF_LAYOUTS.values():
        if layout.detect(hf):
            return layout.name
    raise InputError(f"{cj}: model_type {hf.get('model_type')!r} is not a layout megamoe loads (expected 'llama': "
                     "dense LLaMA, 'mixtral', 'llama_moe': llama-moe v1; or a megamoe shard directory)")


def rank_slices() -> dict:
    """This process's (rank, size) pairs in the layout in force: tp, ep, etp."""
    return {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
            "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())}


def _local_slice(name: str, t: torch.Tensor, tp, etp) -> torch.Tensor:
    """Cut a full tensor to the slice of TP rank tp=(rank, size) (experts: expert-TP rank etp), as our shards do."""
    rule = slicing(name)
    if rule[0] == "replicated":
        return t
    dim = rule[1] if rule[0] == "tp" else rule[2]
    rank, size = tp if rule[0] == "tp" else etp
    n = t.shape[dim]
    if n % size:
        raise ConfigError(f"parallel.{'tp' if rule[0] == 'tp' else 'etp'}: {size} does not divide dim {dim} ({n}) "
                          f"of {name}")
    return t if size == 1 else t.narrow(dim, rank * (n // size), n // size).clone()


def _hf_state(path: str, layout: HFLayout, slices: dict, dtype: torch.dtype) -> tuple[ModelConfig, dict]:
    where = os.path.join(path, "config.json")
    cfg = layout.config_from_hf(read_json(where, "config.json"), where)  # the config first: its errors say more
    hf = HFDir(path)
    try:
        if layout.read is not None:
            load = layout.read(hf, cfg)
        else:
            key_of = check_tensors(hf, cfg, layout.hf_to_ours_name, optional=layout.optional(cfg))
            load = {n: (lambda k=k: hf.get(k)) for n, k in key_of.items()}
        state = {}
        for n in local_names(cfg, expected_names(cfg), slices["ep"]):
            if n not in load:  # an optional tensor the directory lacks (the noise weight: unused in eval)
                continue
            state[n] = _local_slice(n, load[n](), slices["tp"], slices["etp"]).to(dtype)
        return cfg, state
    finally:
        hf.close()


def load_tokenizer(path: str):
    """The transformers tokenizer saved in `path` (our shards carry a copy of their source's), or None."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                 "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer directory is bad input, said in one line
        raise CheckpointError(f"{path}: the tokenizer does not load ({type(e).__name__}: {e})") from None


def _eos_ids(path: str, tokenizer) -> list:
    ids = []
    gc = os.path.join(path, "generation_config.json")
    if os.path.isfile(gc):
        e = read_json(gc, "generation_config.json").get("eos_token_id")
        ids += e if isinstance(e, list) else ([e] if e is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def load_model(path: str, dtype: str | None = None, device: torch.device | str | None = None,
               tokenizer: str | None = None) -> LoadedModel:
    """Build our model for the parallel layout in force and load this rank's slice of `path` into it (eval mode).

    dtype: "float32" | "bfloat16" | "float16" (default float32: the model's stored dtype is cast on the fly).
    tokenizer: a directory to read the tokenizer from (default: `path` itself)."""
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    kind = detect_layout(path)
    slices = rank_slices()
    tdt = DTYPES[dtype]
    source = None
    if kind == SHARDS:
        ck = ShardedCheckpoint(path)
        cfg = ck.config
        src = ck.manifest.get("source")  # conversions: {"path", "format", ...}; the trainer's export: a string
        source = src.get("path") if isinstance(src, dict) else (src if isinstance(src, str) else None)
        ck.close()
        state = load_shards(path, tp=slices["tp"], ep=slices["ep"], etp=slices["etp"], dtype=tdt)
    else:
        cfg, state = _hf_state(path, HF_LAYOUTS[kind], slices, tdt)
    cfg.params_dtype = dtype
    cfg.recompute = False
    model = LlamaMoEModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("router.noise.weight")]  # absent in Mixtral: unused in eval
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model its config describes: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    del state
    if device is not None:
        model.to(device)
    model.eval()
    tok = load_tokenizer(tokenizer or path)
    if tokenizer and tok is None:
        raise CheckpointError(f"{tokenizer}: no tokenizer files (tokenizer.json / tokenizer.model)")
    return LoadedModel(model, cfg, kind, path, tok, _eos_ids(tokenizer or path, tok), source)
