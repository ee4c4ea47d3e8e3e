"""Import a released LLaMA-MoE v1 / v2 or Mixtral HF checkpoint into our shards (renaming, and for v2 the attention
experts' pieces stacked), checked by the guard against the source under its own format's semantics (llama-moe v1 and
v2: the independent `reference_v1` / `reference_v2` forwards; Mixtral: transformers' MixtralForCausalLM, or a
streaming forward for large models)."""

from __future__ import annotations

import os

import torch

from megamoe.errors import CheckpointError
from megamoe.formats import llama_moe_v1 as v1
from megamoe.formats import llama_moe_v2 as v2
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
from megamoe.interchange.reference_v2 import v2_logits


def check_v2_tensors(hf: HFDir, cfg) -> dict:
    """{our name: loader of the full tensor} for a llama-moe v2 directory: every key `cfg` needs present with the
    right shape, no key left over (a silently skipped tensor is how experts stay at random init)."""
    want = {}
    for key, ours, piece in v2.hf_plan(cfg):
        want[key] = v2.piece_shape(expected_shape(cfg, ours), piece)
    have = {k for k in hf.keys() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        have.discard("lm_head.weight")   # their code ties the head to the embedding and ignores this tensor
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing:
        raise CheckpointError(f"{hf.path}: missing tensors {missing[:3]} ({len(missing)} in all) for the llama-moe v2 "
                              "model its config.json describes")
    if extra:
        raise CheckpointError(f"{hf.path}: tensors {extra[:3]} do not belong to the llama-moe v2 model its config.json "
                              "describes")
    for k, shape in want.items():
        if hf.shape(k) != shape:
            raise CheckpointError(f"{hf.path}: tensor {k!r} has shape {hf.shape(k)}, config.json implies {shape}")
    return v2.read_tensors(hf.get, cfg)


def import_moe(hf: HFDir, kind, out, t0, hasher, *, par, dtype, tolerance, guard_tokens, progress):
    """llama-moe v1 / v2 or Mixtral HF checkpoint -> our shards (the score scales stay config fields)."""
    where = os.path.join(hf.path, "config.json")
    if kind == "llama-moe-v2":
        return _import_v2(hf, out, t0, hasher, par=par, dtype=dtype, tolerance=tolerance, guard_tokens=guard_tokens,
                          progress=progress)
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


def _import_v2(hf: HFDir, out, t0, hasher, *, par, dtype, tolerance, guard_tokens, progress):
    where = os.path.join(hf.path, "config.json")
    cfg = v2.config_from_hf(hf.config, where)
    par.validate(cfg)
    check_vocab(hf, cfg, "model.embed_tokens.weight")
    load = check_v2_tensors(hf, cfg)
    emb_dt = hf.dtype("model.embed_tokens.weight")
    dtypes = {n: dtype or emb_dt for n in expected_names(cfg)}
    for key, ours, _ in v2.hf_plan(cfg):
        if not dtype:
            dtypes[ours] = hf.dtype(key)
    ids = guard_ids(cfg.vocab_size, guard_tokens)
    report = GuardReport()
    with staged_output(out) as tmp:
        w = ShardWriter(tmp, cfg, par, dtypes, {"partition": {"method": "imported from llama-moe-v2"}})
        write_tensors(w, ((n, load[n]().to(DTYPES[dtypes[n]])) for n in w.names), w.nbytes, "llama-moe-v2-to-moe",
                      progress)
        copy_tokenizer(hf.path, tmp)
        ck = ShardedCheckpoint(tmp)
        try:
            ours = shard_logits(ck, ids, progress)
        finally:
            ck.close()
        ref = v2_logits(hf.config, hf.get, ids, honour_attn_mode=True)
        report.add(check("llama-moe v2 source (independent v2 reference forward) vs written shards", ref, ours,
                         tolerance))
        report.raise_if_failed(f"hf-to-moe {hf.path} -> {out}")
        update_manifest(tmp, source=source_info(hf, "llama-moe-v2", hasher), guard=[c.to_dict() for c in report.checks])
        nbytes = w.nbytes
    return summary("hf-to-moe", out, cfg, par, nbytes, t0, report, {"method": "import llama-moe-v2",
                                                                    "source": hf.path})
