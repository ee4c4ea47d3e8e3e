"""What every checked conversion shares: resolving and checking a source directory, copying the tokenizer, the
summary a command returns, and the logits of a written shard directory (the guard's "result" side).

    src = resolve_source("smollm2")             # a path, or the embedded SmolLM2-135M materialised once
    kind = source_kind(HFDir(src))              # "llama" | "llama-moe-v1" | "llama-moe-v2" | "mixtral"
    key_of = check_tensors(hf, cfg, to_ours)    # {our name: HF name}, every tensor present with the right shape
    logits = shard_logits(ShardedCheckpoint(d), ids)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time

import torch
from tqdm import tqdm

from megamoe.config import ModelConfig
from megamoe.errors import CheckpointError, ConfigError
from megamoe.formats import llama_moe_v2 as v2
from megamoe.formats import mixtral as mx
from megamoe.formats.embedded import materialize_smollm2
from megamoe.formats.hf_dir import HFDir, read_json
from megamoe.formats.layout import expected_names, expected_shape
from megamoe.formats.shards import MANIFEST, ShardedCheckpoint
from megamoe.interchange.forward import Forward, SplitWeight, reference_logits, threads, usable_cores
from megamoe.interchange.guard import GuardReport

EMBEDDED_NAMES = ("smollm2", "embedded")
TRANSFORMERS_CHECK_MAX_BYTES = 2 << 30


def resolve_source(src: str) -> str:
    """A checkpoint path, or "smollm2"/"embedded" for the embedded SmolLM2-135M (materialised once, cached)."""
    if src in EMBEDDED_NAMES and not os.path.exists(src):
        try:
            return materialize_smollm2()
        except (RuntimeError, FileExistsError) as e:
            raise CheckpointError(f"--src {src}: the embedded model is unavailable: {e}") from None
    return src


def torch_dtype_code(name: str | None):
    if name is None:
        return None
    table = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16"}
    if name not in table:
        raise ConfigError(f"dtype: {name!r} is not one of {sorted(table)}")
    return table[name]


def summary(kind, out, cfg: ModelConfig, par, nbytes, t0, report: GuardReport, extra=None) -> dict:
    counts = cfg.param_counts()
    s = {"command": kind, "output": os.path.abspath(out), "layers": cfg.num_layers,
         "params_total": counts["total"], "params_active": counts["active"], "bytes_written": nbytes,
         "seconds": round(time.time() - t0, 3), "guard": report.lines()}
    if cfg.moe is not None:
        sizes = sorted({x for i in range(cfg.num_layers) if cfg.moe_index(i) is not None for x in cfg.expert_sizes(i)})
        s.update({"experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "expert_sizes": sizes,
                  "moe_layers": cfg.num_moe_layers,
                  "residual_size": cfg.moe.residual_size, "router": cfg.moe.router,
                  "gate_network": cfg.moe.gate_network, "score_scale": cfg.moe.score_scale})
    if cfg.attn_moe is not None:
        a = cfg.attn_moe
        s.update({"attn_experts": a.num_experts, "attn_top_k": a.top_k, "attn_score_scale": a.score_scale,
                  "attn_mode": a.mode, "attn_split": a.split(cfg.kv_heads),
                  "attn_layers": cfg.num_attn_moe_layers})
    if par is not None:
        s["parallel"] = {"tp": par.tp, "ep": par.ep, "etp": par.etp}
    s.update(extra or {})
    return s


def layer_names(names, i):
    p = f"layers.{i}."
    return [n for n in names if n.startswith(p)]


def update_manifest(d: str, **fields):
    p = os.path.join(d, MANIFEST)
    m = read_json(p)
    m.update(fields)
    with open(p, "w") as f:
        json.dump(m, f, indent=1)


def source_kind(hf: HFDir) -> str:
    mt = hf.config.get("model_type")
    if mt == "llama":
        return "llama"
    if mt == "llama_moe":
        return "llama-moe-v1"
    if v2.is_llama_moe_v2(hf.config):   # Mixtral-typed with v2's fields: its own importer (before stock Mixtral)
        return "llama-moe-v2"
    if mt == "mixtral":
        return "mixtral"
    where = os.path.join(hf.path, "config.json")
    raise ConfigError(f"{where}: model_type is {mt!r}; expected a dense LLaMA ('llama'), a llama-moe v1 "
                      "('llama_moe') or a Mixtral ('mixtral') checkpoint")


def check_vocab(hf: HFDir, cfg: ModelConfig, embed_key: str):
    where = os.path.join(hf.path, "config.json")
    rows = hf.shape(embed_key)[0] if embed_key in hf else None
    if rows is not None and rows != cfg.vocab_size:
        raise CheckpointError(f"vocabulary mismatch: {embed_key} has {rows} rows but {where} says "
                              f"vocab_size {cfg.vocab_size}")
    tok = os.path.join(hf.path, "tokenizer.json")
    if os.path.isfile(tok):
        try:
            t = read_json(tok)
            n = len((t.get("model") or {}).get("vocab") or {})
            ids = [a.get("id", -1) for a in t.get("added_tokens") or []]
            n = max([n] + [i + 1 for i in ids])
        except (CheckpointError, AttributeError, TypeError):
            n = 0
        if n > cfg.vocab_size:
            raise CheckpointError(f"vocabulary mismatch: {tok} defines {n} tokens but {where} says vocab_size "
                                  f"{cfg.vocab_size}; token ids past the embedding would be out of range")


def check_tensors(hf: HFDir, cfg: ModelConfig, to_ours, optional=()) -> dict:
    """{our name: HF name} for every tensor `cfg` needs; errors name the file and tensor. Unknown keys are errors
    too: silently skipping a tensor is how a converter leaves experts at random init."""
    ours_of = {}
    for k in hf.keys():
        try:
            o = to_ours(k)
        except KeyError:
            raise CheckpointError(f"{hf.path}: unexpected tensor {k!r} for a {cfg.moe and 'MoE' or 'LLaMA'} "
                                  "checkpoint of this config") from None
        if o is not None:
            ours_of[o] = k
    need = expected_names(cfg)
    if cfg.tie_word_embeddings:
        ours_of.pop("lm_head.weight", None)
    out = {}
    for n in need:
        if n not in ours_of:
            if n in optional:
                continue
            raise CheckpointError(f"{hf.path}: missing tensor for {n!r} (config says {cfg.num_layers} layers"
                                  f"{', %d experts' % cfg.moe.num_experts if cfg.moe else ''})")
        k = ours_of[n]
        if hf.shape(k) != expected_shape(cfg, n):
            raise CheckpointError(f"{hf.path}: tensor {k!r} has shape {hf.shape(k)}, config.json implies "
                                  f"{expected_shape(cfg, n)}")
        out[n] = k
    extra = sorted(set(ours_of) - set(need))
    if extra:
        raise CheckpointError(f"{hf.path}: tensors {extra[:3]} do not belong to the model config.json describes")
    return out


@contextlib.contextmanager
def no_gc():
    """No cyclic garbage collection while streaming: the writes create many short-lived buffer views, which would
    trigger collections that walk every object torch created (several % of the conversion); nothing here makes
    cycles that must be freed before the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch intra-op threads for the guard's small matmuls. One: the guard splits each matrix between its own
    threads (forward.threads: one per usable core, less the writer while it runs), and OpenMP workers that
    spin-wait for a busy core cost up to 4x the CPU time on a shared machine (measured: 31 s instead of 8.6 s user
    for the 8-layer bench)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def shard_logits(ck: ShardedCheckpoint, ids, progress, both=False):
    """Logits from the written shards: real routing (and, with both=True, first the all-experts identity). Every
    tensor is used straight from the memory-mapped shard files, part by part (the forward converts blocks of rows
    to fp32 in a small buffer: no full-size fp32 copy); the two variants run as two rows of one batch. Each matrix
    is split by rows between every usable core (forward.threads)."""
    cfg = ck.config
    n = ids.shape[0]
    f = Forward(cfg, ids.repeat(2, 1), row_modes=["identity"] * n + ["routed"] * n) if both else Forward(cfg, ids)

    def get(name):
        pieces, dim = ck.map_parts(name)
        return pieces[0] if len(pieces) == 1 else SplitWeight(pieces, dim)

    with torch_threads(1), threads(usable_cores()):  # nothing else runs now: every core, our row split
        f.embed(get)
        for i in tqdm(range(cfg.num_layers), desc="verify", disable=not progress, unit="layer"):
            f.layer(i, get)
        logits = f.head(get)
    return [logits[:n], logits[n:]] if both else logits


def mixtral_logits(path, config, get, ids, nbytes):
    """Logits of an HF Mixtral directory: transformers' MixtralForCausalLM when it fits comfortably in memory,
    else our streaming forward over the Mixtral keys (config re-read from the file)."""
    if nbytes <= TRANSFORMERS_CHECK_MAX_BYTES:
        try:
            from transformers import MixtralForCausalLM
        except ImportError:
            MixtralForCausalLM = None
        if MixtralForCausalLM is not None:
            m = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = m(ids).logits.float()
            del m
            return logits, "transformers MixtralForCausalLM"
    cfg = mx.config_from_hf(config, os.path.join(path, "config.json"))
    back = {}
    for hf_name, ours, _ in mx.export_plan(cfg):
        back[ours] = hf_name
    return reference_logits(cfg, lambda n: get(back[n]), ids), "streaming forward over the Mixtral keys"


def dtype_word(dt: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dt, "float32")

def source_info(hf: HFDir, kind: str, hasher) -> dict:
    """The manifest's `source`: path, format, bytes and `checksum` {"algorithm", "files": {file: hexdigest}}
    (sha256 digests also under the `sha256` key that earlier manifests used; see checksum.manifest_checksums)."""
    d = {"path": os.path.abspath(hf.path), "format": kind, "bytes": hf.nbytes()}
    if hasher is not None:
        d["checksum"] = hasher.info()
        if d["checksum"]["algorithm"] == "sha256":
            d["sha256"] = d["checksum"]["files"]
    return d
