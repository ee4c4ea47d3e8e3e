"""moe-to-hf: our shards -> a Hugging Face directory (Mixtral, or the llama-moe v1 layout), checked by the guard
against the code that loads that layout (transformers' MixtralForCausalLM; the independent llama-moe v1 forward)."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from megamoe.errors import ConfigError
from megamoe.formats import llama_moe_v1 as v1
from megamoe.formats import mixtral as mx
from megamoe.formats.hf_dir import HFDir, read_json
from megamoe.formats.hf_writer import HFWriter, write_json
from megamoe.formats.layout import expected_shape
from megamoe.formats.safetensors_io import DTYPES
from megamoe.formats.shards import ShardedCheckpoint, check_output, staged_output, write_tensors
from megamoe.formats.tokenizer_files import copy_tokenizer, special_token_ids
from megamoe.interchange.common import dtype_word, mixtral_logits, shard_logits, summary
from megamoe.interchange.guard import DEFAULT_TOLERANCE, GuardReport, check, guard_ids
from megamoe.interchange.reference_v1 import v1_logits


def moe_to_hf(src: str, out: str, fmt: str = "auto", *, max_shard_bytes: int = 5 << 30,
              tolerance: float = DEFAULT_TOLERANCE, guard_tokens: int = 16, progress: bool = True) -> dict:
    """Our shards -> an HF directory: `mixtral` (transformers, no remote code; the model must fit, see
    mixtral.why_not_mixtral), `llama-moe-v1` (always, for every model its remote code can express), or `auto`."""
    t0 = time.time()
    check_output(os.path.abspath(out))
    ck = ShardedCheckpoint(src)
    try:
        cfg = ck.config
        if fmt == "auto":
            fmt = "mixtral" if mx.why_not_mixtral(cfg) is None else "llama-moe-v1"
        if fmt == "mixtral":
            reason = mx.why_not_mixtral(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the Mixtral layout: {reason}. Export --format llama-moe-v1")
            plan = mx.export_plan(cfg)
        elif fmt == "llama-moe-v1":
            reason = v1.why_not_v1(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the llama-moe v1 layout: {reason}")
            plan = [(h, o, None) for h, o in v1.export_plan(cfg)]
        else:
            raise ConfigError(f"format: {fmt!r} is not one of mixtral, llama-moe-v1, auto")
        ref_dt = ck.dtype("embed.weight")
        hplan = [(h, ck.dtype(o) if o else ref_dt, ck.shape(o) if o else expected_shape(cfg, o_noise(h)))
                 for h, o, _ in plan]
        ids = guard_ids(cfg.vocab_size, guard_tokens)
        report = GuardReport()
        with staged_output(out) as tmp:
            w = HFWriter(tmp, hplan, max_shard_bytes)
            write_tensors(w, ((h, mx.apply_scale(ck.get(o) if o else torch.zeros(shape, dtype=DTYPES[dt]), scale))
                              for (h, o, scale), (_, dt, shape) in zip(plan, hplan)),
                          w.total, f"moe-to-{fmt}", progress)
            # the source's special token ids (checkpoints converted before they were carried: the tokenizer files)
            special = {k: v for k, v in special_token_ids(src).items() if getattr(cfg, k) is None}
            config = (mx.config_to_hf if fmt == "mixtral" else v1.config_to_hf)(replace(cfg, **special),
                                                                                 dtype_word(ref_dt))
            write_json(os.path.join(tmp, "config.json"), config)
            copy_tokenizer(src, tmp)
            if fmt == "llama-moe-v1":
                _write_v1_readme(tmp)
            ours = shard_logits(ck, ids, progress)
            res = HFDir(tmp)
            try:
                if fmt == "mixtral":
                    theirs, how = mixtral_logits(tmp, config, res.get, ids, w.total)
                    report.add(check(f"our forward over the shards vs the export in {how}", ours, theirs, tolerance))
                else:
                    theirs = v1_logits(read_json(os.path.join(tmp, "config.json")), res.get, ids)
                    report.add(check("our forward over the shards vs the export in the independent llama-moe v1 "
                                     "reference forward", ours, theirs, tolerance))
            finally:
                res.close()
            report.raise_if_failed(f"moe-to-hf {src} -> {out}")
            nbytes = w.total
        return summary("moe-to-hf", out, cfg, None, nbytes, t0, report, {"format": fmt, "files": w.files})
    finally:
        ck.close()


def o_noise(hf_name: str) -> str:
    """Our noise-weight name for a llama-moe v1 weight_noise key (written as zeros for a router without one)."""
    i = hf_name.split(".")[2]
    return f"layers.{i}.mlp.router.noise.weight"


def _write_v1_readme(d: str):
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write(V1_README)


V1_README = """# llama-moe v1 checkpoint (exported by megamoe)

This directory uses the layout of the released LLaMA-MoE v1 models (`model_type: llama_moe`, per-expert
`mlp.calculator.experts.weight_{gate,up,down}.{j}` tensors, MLP gate `mlp.gate.gate_network.{0,2}.weight`).
It loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` once you copy the two remote-code
files named in `config.json`'s `auto_map` (`configuration_llama_moe.py`, `modeling_llama_moe_hf.py`) from a released
LLaMA-MoE v1 Hub repository (the base models' code, repo commit d7d0989). megamoe does not redistribute that code.

What that code computes: RoPE with base 10000 whatever config.json says (megamoe refuses to export a model with
another `rope_theta` or with llama3 RoPE scaling to this layout: use the Mixtral layout), head_dim =
hidden_size / num_attention_heads, softmax over the k selected gate scores times `score_scale_factor`.

transformers versions, as executed with this code (forward, and generate with the cache):

| transformers | works? |
|---|---|
| <= 4.44.2 | yes (use this) |
| 4.45.0 - 4.47.1 | the default load works but reports `weight_gate.*` missing; with `low_cpu_mem_usage=True` or a `device_map`, the experts' `weight_gate.*` are silently left uninitialised (keys containing `weight_g` are renamed; llama-moe issue #74) |
| 4.48.x | the default load also leaves `weight_gate.*` uninitialised: do not use |
| 4.49 - 4.53 | yes |
| 4.54 - 4.57 | forward yes; `generate` crashes inside their modeling code |
| 5.x | cannot build the model (`KeyError: 'type'` in their RoPE set-up) |

The tokenizer files are written so that transformers 4.x reads them (merges as strings, PreTrainedTokenizerFast).
"""
