"""Import a released LLaMA-MoE v1 or Mixtral HF checkpoint into our shards (renaming only), checked by the guard
against the source under its own format's semantics (llama-moe v1: the independent `reference_v1` forward;
Mixtral: transformers' MixtralForCausalLM, or a streaming forward for large models)."""

from __future__ import annotations

import os

import torch

from megamoe.formats import llama_moe_v1 as v1
from megamoe.formats import mixtral as mx
from megamoe.formats.hf_dir import HFDir
from megamoe.formats.layout import expected_names, expected_shape
from megamoe.formats.safetensors_io import DTYPES
from megamoe.formats.shards import ShardedCheckpoint, ShardWriter, staged_output, write_tensors
from megamoe.formats.tokenizer_files import copy_tokenizer
from megamoe.interchange.common import (check_tensors, check_vocab, mixtral_logits, shard_logits, source_info, summary,
                                        update_manifest)
from megamoe.interchange.guard import GuardReport, check, guard_ids
from megamoe.interchange.reference_v1 import v1_logits


def import_moe(hf: HFDir, kind, out, t0, hasher, *, par, dtype, tolerance, guard_tokens, progress):
    """llama-moe v1 or Mixtral HF checkpoint -> our shards (renaming only; the score scale stays a config field)."""
    where = os.path.join(hf.path, "config.json")
    fmt = v1 if kind == "llama-moe-v1" else mx
    cfg = fmt.config_from_hf(hf.config, where)
    par.validate(cfg)
    optional = [n for n in expected_names(cfg) if n.endswith("router.noise.weight")]
    check_vocab(hf, cfg, "model.embed_tokens.weight")
    key_of = check_tensors(hf, cfg, fmt.hf_to_ours_name, optional=optional)
    emb_dt = hf.dtype(key_of["embed.weight"])
    dtypes = {n: dtype or (hf.dtype(key_of[n]) if n in key_of else emb_dt) for n in expected_names(cfg)}
    ids = guard_ids(cfg.vocab_size, guard_tokens)
    report = GuardReport()
    with staged_output(out) as tmp:
        w = ShardWriter(tmp, cfg, par, dtypes, {"partition": {"method": f"imported from {kind}"}})
        write_tensors(w, ((n, (hf.get(key_of[n]) if n in key_of else torch.zeros(expected_shape(cfg, n)))
                           .to(DTYPES[dtypes[n]])) for n in w.names), w.nbytes, f"{kind}-to-moe", progress)
        copy_tokenizer(hf.path, tmp)
        ck = ShardedCheckpoint(tmp)
        try:
            ours = shard_logits(ck, ids, progress)
        finally:
            ck.close()
        if kind == "llama-moe-v1":
            ref = v1_logits(hf.config, hf.get, ids)
            report.add(check("llama-moe v1 source (independent v1 reference forward) vs written shards", ref, ours,
                             tolerance))
        else:
            ref = mixtral_logits(hf.path, hf.config, hf.get, ids, hf.nbytes())
            report.add(check(f"Mixtral source ({ref[1]}) vs written shards", ref[0], ours, tolerance))
        report.raise_if_failed(f"hf-to-moe {hf.path} -> {out}")
        update_manifest(tmp, source=source_info(hf, kind, hasher), guard=[c.to_dict() for c in report.checks])
        nbytes = w.nbytes
    return summary("hf-to-moe", out, cfg, par, nbytes, t0, report, {"method": f"import {kind}", "source": hf.path})
