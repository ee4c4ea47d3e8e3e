"""inspect: what a directory holds: our shards (manifest, layout, partition, guard record) or an HF checkpoint."""

from __future__ import annotations

import os

from megamoe.config import ModelConfig
from megamoe.formats import llama_moe_v1 as v1
from megamoe.formats import llama_moe_v2 as v2
from megamoe.formats import mixtral as mx
from megamoe.formats.hf_dir import HFDir
from megamoe.formats.hf_llama import config_from_hf
from megamoe.formats.shards import ShardedCheckpoint, is_shard_dir
from megamoe.interchange.common import source_kind


def inspect(path: str, verify: bool = True) -> dict:
    """What a directory holds: our shards (manifest) or an HF checkpoint (config + tensors). Shards are checked
    against their checksums (`verify`; reads every byte once): "checksums" says "ok (<n> parts, <algorithm>)" or
    that the manifest has none; a mismatch raises CheckpointError naming the file and the tensor."""
    if is_shard_dir(path):
        ck = ShardedCheckpoint(path)
        try:
            m = ck.manifest
            cfg = ck.config
            if not verify:
                status = "not checked"
            else:
                v = ck.verify()
                status = (f"ok ({v['parts']} tensor parts, {v['algorithm']})" if v["status"] == "ok" else
                          "none: written without checksums (an older megamoe), tensors unverified")
            d = {"kind": "megamoe shards", "path": path, "format_version": m["version"], "parallel": m["parallel"],
                 "files": {f: os.path.getsize(os.path.join(path, f)) for f in m["files"]},
                 "tensors": len(ck.names), "dtypes": sorted({ck.dtype(n) for n in ck.names}),
                 "bytes": ck.nbytes(), "partition": m.get("partition"), "source": m.get("source"),
                 "guard": m.get("guard"), "checksums": status, "params": cfg.param_counts(),
                 "model": _cfg_line(cfg)}
        finally:
            ck.close()
        return d
    hf = HFDir(path)
    try:
        kind = source_kind(hf)
        if kind == "llama":
            cfg = config_from_hf(hf.config, os.path.join(path, "config.json"))
        else:
            fmt = {"llama-moe-v1": v1, "llama-moe-v2": v2}.get(kind, mx)
            cfg = fmt.config_from_hf(hf.config, os.path.join(path, "config.json"))
        return {"kind": f"Hugging Face {kind}", "path": path, "files": [os.path.basename(f) for f in hf.files],
                "tensors": len(hf.keys()), "dtypes": sorted({hf.dtype(k) for k in hf.keys()}), "bytes": hf.nbytes(),
                "params": cfg.param_counts(), "model": _cfg_line(cfg)}
    finally:
        hf.close()


def _cfg_line(cfg: ModelConfig) -> str:
    s = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, {cfg.num_heads} heads / "
         f"{cfg.kv_heads} kv, vocab {cfg.vocab_size}{', tied embeddings' if cfg.tie_word_embeddings else ''}")
    if cfg.moe is not None:
        m = cfg.moe
        sizes = sorted({x for i in range(cfg.num_layers) if cfg.moe_index(i) is not None for x in cfg.expert_sizes(i)})
        s += (f"; MoE: {m.num_experts} experts (sizes {sizes}), top-{m.top_k}, router {m.router}, gate "
              f"{m.gate_network}, score scale {m.score_scale}, residual {m.residual_size}")
    if cfg.attn_moe is not None:
        a = cfg.attn_moe
        layers = "every layer" if a.layers is None else f"layers {a.layers}"
        s += (f"; attention experts: {a.num_experts} ({cfg.num_heads // a.num_experts} query heads + 1 KV head each, "
              f"split {a.split(cfg.kv_heads)}) in {layers}, top-{a.top_k}, {a.score_order}, score scale "
              f"{a.score_scale}, {a.mode}")
    return s
