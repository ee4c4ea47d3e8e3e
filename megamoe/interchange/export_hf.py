"""moe-to-hf: our shards -> a Hugging Face directory (Mixtral, the llama-moe v1 or the llama-moe v2 layout), checked by
the guard against the code that loads that layout (transformers' MixtralForCausalLM; the independent llama-moe v1 and
v2 forwards, written from what the released code computes)."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace

import torch

from megamoe.errors import ConfigError
from megamoe.formats import llama_moe_v1 as v1
from megamoe.formats import llama_moe_v2 as v2
from megamoe.formats import mixtral as mx
from megamoe.formats.hf_dir import HFDir, read_json
from megamoe.formats.hf_writer import HFWriter, write_json
from megamoe.formats.layout import expected_shape
from megamoe.formats.model_card import card_facts, write_model_card
from megamoe.formats.safetensors_io import DTYPES
from megamoe.formats.shards import ShardedCheckpoint, check_output, staged_output, write_tensors
from megamoe.formats.tokenizer_files import copy_tokenizer, special_token_ids
from megamoe.interchange.common import dtype_word, mixtral_logits, shard_logits, summary
from megamoe.interchange.guard import DEFAULT_TOLERANCE, GuardReport, check, guard_ids
from megamoe.interchange.reference_v1 import v1_logits
from megamoe.interchange.reference_v2 import v2_logits


def moe_to_hf(src: str, out: str, fmt: str = "auto", *, max_shard_bytes: int = 5 << 30,
              tolerance: float = DEFAULT_TOLERANCE, guard_tokens: int = 16, progress: bool = True,
              card: dict | None = None) -> dict:
    """Our shards -> an HF directory: `mixtral` (transformers, no remote code; the model must fit, see
    mixtral.why_not_mixtral), `llama-moe-v1` (for every model its remote code can express), `llama-moe-v2` (attention
    experts, residual blocks, dense first/last layers: llama_moe_v2.why_not_v2), or `auto` (mixtral when it fits,
    else llama-moe-v2 for attention experts or a residual block, else llama-moe-v1).

    Every export gets a model card, README.md (megamoe.formats.model_card: Hub front matter, construction, experts,
    parameters, training, evaluation, and the layout's loading notes); `card`: its options (name, base_model,
    license, evaluation {domain: {loss, ppl}}, tags)."""
    t0 = time.time()
    check_output(os.path.abspath(out))
    ck = ShardedCheckpoint(src)
    try:
        cfg = ck.config
        if fmt == "auto":
            fmt = ("mixtral" if mx.why_not_mixtral(cfg) is None and cfg.attn_moe is None else
                   "llama-moe-v2" if (cfg.attn_moe is not None or (cfg.moe and cfg.moe.residual_size))
                   and v2.why_not_v2(cfg) is None else "llama-moe-v1")
        notes = []
        if fmt in ("mixtral", "llama-moe-v1") and cfg.attn_moe is not None:
            raise ConfigError(f"{src}: attn_moe: the {fmt} layout has no attention experts. Export --format "
                              "llama-moe-v2")
        if fmt == "mixtral":
            reason = mx.why_not_mixtral(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the Mixtral layout: {reason}. Export --format llama-moe-v2 "
                                  "or llama-moe-v1")
            plan = [(h, o, ("scale", s)) if s is not None else (h, o, None) for h, o, s in mx.export_plan(cfg)]
        elif fmt == "llama-moe-v1":
            reason = v1.why_not_v1(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the llama-moe v1 layout: {reason}")
            plan = [(h, o, None) for h, o in v1.export_plan(cfg)]
        elif fmt == "llama-moe-v2":
            reason = v2.why_not_v2(cfg)
            if reason:
                raise ConfigError(f"{src}: does not fit the llama-moe v2 layout: {reason}")
            plan = [(h, o, None if piece is None else ("piece", piece)) for h, o, piece in v2.hf_plan(cfg)]
            if cfg.attn_moe is not None and cfg.attn_moe.mode != "token_sparse":
                notes.append(f"attn_moe.mode {cfg.attn_moe.mode}: written with attn_mode \"{cfg.attn_moe.mode}\"; the "
                             "released v2 code ignores it and computes token_sparse attention (other logits): load "
                             "this export with megamoe (megamoe.eval.load.load_model, hf-to-moe --src)")
        else:
            raise ConfigError(f"format: {fmt!r} is not one of mixtral, llama-moe-v1, llama-moe-v2, auto")
        ref_dt = ck.dtype("embed.weight")
        upcast = False
        if fmt == "mixtral" and ref_dt in ("BF16", "F16") and any(op and not _power_of_two(op[1]) for _, _, op in plan):
            # scale * down rounded to 8 (bf16) or 11 (fp16) bits is not the model: with fine-grained routing the
            # difference flips near-tied experts layer after layer (SmolLM2 128 x top-32 in bf16: logits off by 1-4
            # of 28). Written in fp32, the export computes what the shards do; cast it down after loading if wanted.
            logging.getLogger(__name__).info(
                "%s: the score scales (%s) are folded into w2 and the shards are %s: writing the export in float32, "
                "so that it computes what the shards do (2x the bytes)", out,
                ", ".join(sorted({f"{op[1]:.4g}" for _, _, op in plan if op})[:4]) + ", ...", dtype_word(ref_dt))
            notes.append(f"written in float32 from {dtype_word(ref_dt)} shards: Mixtral has no score scale, so it is "
                         "folded into w2, and rounding that product to half precision changes the routing")
            ref_dt, upcast = "F32", True
        hplan = [(h, "F32" if upcast else ck.dtype(o) if o else ref_dt,
                  v2.piece_shape(ck.shape(o), op[1]) if op and op[0] == "piece"
                  else (ck.shape(o) if o else expected_shape(cfg, o_noise(h))))
                 for h, o, op in plan]
        ids = guard_ids(cfg.vocab_size, guard_tokens)
        report = GuardReport()
        with staged_output(out) as tmp:
            w = HFWriter(tmp, hplan, max_shard_bytes)
            write_tensors(w, _tensors(ck, plan, hplan), w.total, f"moe-to-{fmt}", progress)
            # the source's special token ids (checkpoints converted before they were carried: the tokenizer files)
            special = {k: v for k, v in special_token_ids(src).items() if getattr(cfg, k) is None}
            to_hf = {"mixtral": mx.config_to_hf, "llama-moe-v1": v1.config_to_hf, "llama-moe-v2": v2.config_to_hf}
            config = to_hf[fmt](replace(cfg, **special), dtype_word(ref_dt))
            write_json(os.path.join(tmp, "config.json"), config)
            copy_tokenizer(src, tmp)
            if fmt == "llama-moe-v2" and "attn_mode" in config:
                logging.getLogger(__name__).warning(
                    "%s: attention experts are full_kv: the released LLaMA-MoE v2 code loads this directory but "
                    "computes token-sparse attention (other logits); only megamoe computes it (README.md says so). "
                    "Train with attn_moe.mode: token_sparse for an export their code reproduces", out)
            llamacpp = fmt == "mixtral" and cfg.moe is not None and cfg.moe.top_k > LLAMACPP_MAX_TOP_K
            if llamacpp:
                logging.getLogger(__name__).warning(
                    "%s: %d experts per token: transformers runs this export, llama.cpp does not (its graph budget "
                    "aborts with GGML_ASSERT(obj_new) above %d; docs/interchange.md)", out, cfg.moe.top_k,
                    LLAMACPP_MAX_TOP_K)
            how_to_load = {"llama-moe-v1": V1_README,
                           "llama-moe-v2": V2_README + (V2_FULL_KV_NOTE if "attn_mode" in config else "")}
            if llamacpp:
                how_to_load["mixtral"] = MIXTRAL_LLAMACPP_NOTE.format(k=cfg.moe.top_k, max_k=LLAMACPP_MAX_TOP_K)
            loader = how_to_load.get(fmt)
            write_model_card(tmp, replace(cfg, **special), fmt=fmt, facts=card_facts(src),
                             loader_notes=_subsection(loader) if loader else None,
                             **{"name": os.path.basename(os.path.abspath(out)), **(card or {})})
            ours = shard_logits(ck, ids, progress)
            res = HFDir(tmp)
            try:
                if fmt == "mixtral":
                    theirs, how = mixtral_logits(tmp, config, res.get, ids, w.total)
                    report.add(check(f"our forward over the shards vs the export in {how}", ours, theirs, tolerance))
                elif fmt == "llama-moe-v1":
                    theirs = v1_logits(read_json(os.path.join(tmp, "config.json")), res.get, ids)
                    report.add(check("our forward over the shards vs the export in the independent llama-moe v1 "
                                     "reference forward", ours, theirs, tolerance))
                else:
                    written = read_json(os.path.join(tmp, "config.json"))
                    full_kv = "attn_mode" in written
                    theirs = v2_logits(written, res.get, ids, honour_attn_mode=full_kv)
                    report.add(check("our forward over the shards vs the export in the independent llama-moe v2 "
                                     "reference forward" + (" (attn_mode full_kv: megamoe's semantics, not the "
                                                            "released code's)" if full_kv else ""),
                                     ours, theirs, tolerance))
            finally:
                res.close()
            report.raise_if_failed(f"moe-to-hf {src} -> {out}")
            nbytes = w.total
        extra = {"format": fmt, "files": w.files}
        if notes:
            extra["notes"] = notes
        return summary("moe-to-hf", out, cfg, None, nbytes, t0, report, extra)
    finally:
        ck.close()


def _tensors(ck, plan, hplan):
    """The export's tensors in plan order: whole tensors of ours, scaled (Mixtral's folded score scale), pieces
    (llama-moe v2's attention experts: each stacked tensor read once, then sliced), or zeros (a v1 noise weight)."""
    last = (None, None)
    for (h, o, op), (_, dt, shape) in zip(plan, hplan):
        if o is None:
            yield h, torch.zeros(shape, dtype=DTYPES[dt])
            continue
        if op is not None and op[0] == "piece":
            if last[0] != o:
                last = (o, ck.get(o))
            dim, a, b = op[1]
            yield h, last[1].narrow(dim, a, b - a)
            continue
        yield h, mx.apply_scale(ck.get(o), op[1] if op else None, DTYPES[dt])   # in the export's dtype


def _power_of_two(x: float) -> bool:
    """x * w is exact in any binary float format (no rounding) when x is a power of two (v1's scale 4, for one)."""
    m, _ = math.frexp(float(x))
    return m == 0.5


def o_noise(hf_name: str) -> str:
    """Our noise-weight name for a llama-moe v1 weight_noise key (written as zeros for a router without one)."""
    i = hf_name.split(".")[2]
    return f"layers.{i}.mlp.router.noise.weight"


def _subsection(text: str) -> str:
    """A layout README's text as part of the model card's "How to load" section (headings two levels down)."""
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())


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


V2_README = """# LLaMA-MoE v2 checkpoint (exported by megamoe)

This directory uses the layout of the released LLaMA-MoE v2 models (OpenSparseLLMs/LLaMA-MoE-v2, repo commit
cfca9f7: `model_type: mixtral` with its own modeling code): attention experts `self_attn.gate.weight` and
`self_attn.{q,k,v,o}_proj.{e}.weight` (each expert: g/split query heads and one KV head), MLP experts
`block_sparse_moe.gate.weight` / `block_sparse_moe.experts.{j}.{w1,w3,w2}.weight`, the always-on residual block
`mlp_residual.{w1,w3,w2}.weight`, dense first/last layers `block_sparse_moe.{w1,w3,w2}.weight`; the score scales in
`scale_factor` (MLP) and `scale_factor_attn` (attention).

megamoe does not redistribute their code. To load it with transformers, copy `configuration_mixtral.py` and
`modeling_mixtral.py` from `smoe/models/mixtral/` of that repository into this directory (the names in
`config.json`'s `auto_map`), and:

- make the three imports of `modeling_mixtral.py` resolvable: `stk` (unused; an empty module will do), `flash_attn`
  (imported inside an `if`, but transformers' import check reads the file: install flash-attn or provide an empty
  module) and `smoe.utils.modeling_attn_mask_utils` (their repository's own package: put it on `sys.path`);
- force eager attention on the config object (the config class drops `attn_implementation="eager"` passed to
  `from_pretrained` and asks for flash_attention_2, whose attention-MoE path is broken: no compacted mask, a
  double cache update):

      cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
      cfg._attn_implementation = "eager"
      model = AutoModelForCausalLM.from_pretrained(d, config=cfg, trust_remote_code=True, torch_dtype=torch.float32)

- `use_cache` is false in config.json: with attention experts their forward raises NotImplementedError for a plain
  `model(ids)` with the default use_cache=True (their MoECache cannot be built from a legacy cache); `generate()`
  builds its own MoECache and works (greedy decoding equals the uncached forward). Beam search is not implemented
  there.
- `sliding_window` is null: their config class would otherwise apply 4096, counted in each expert's own tokens.

What that code computes: routers (attention and MLP) softmax over all experts in fp32, top-k, renormalise, times the
scale; each attention expert attends only over the tokens routed to it (token-sparse), at their absolute RoPE
positions (base `rope_theta`; `rope_scaling` is never read); head_dim = hidden_size / num_attention_heads; the
residual block is added unscaled.

transformers versions, as executed with that code (eager attention, the recipe above):

| transformers | forward | generate |
|---|---|---|
| 4.42.4 | yes | yes (use this: the version their repository pins) |
| 4.43.4 - 4.44.2 | yes | crashes (`isin()` TypeError) unless `attention_mask` is passed |
| 4.45.2 | yes | yes |
| 4.46.3 | yes | crashes (`_validate_assistant()` signature) |
| 4.47 - 4.48 | cannot import (`is_quanto_available`) | - |
| 4.57, 5.x | cannot build the config (`dict_torch_dtype_to_str`) | - |

megamoe loads this directory without their code: `megamoe.eval.load.load_model(dir)`, or
`megamoe-convert hf-to-moe --src DIR --out SHARDS` (checked against an independent forward of what their code
computes).
"""

# llama.cpp (llama-cpp-python 0.3.36's tree, docs/interchange.md) sizes its compute graph by the model's tensor count,
# not by the experts used per token: a 30-layer Mixtral GGUF runs at top-16 and aborts at context creation at top-24
LLAMACPP_MAX_TOP_K = 16

MIXTRAL_LLAMACPP_NOTE = """
## llama.cpp

This model routes {k} experts per token. transformers runs it (`MixtralForCausalLM`); llama.cpp converts it to GGUF
but aborts when it creates a context (`GGML_ASSERT(obj_new)`: its graph budget grows with the number of tensors, not
with the experts used per token; measured: top-16 runs, top-24 does not). For llama.cpp, convert with at most
{max_k} experts per token (e.g. `megamoe-convert hf-to-moe --experts 64 --top-k 16`).
"""

V2_FULL_KV_NOTE = """
## This export is full_kv: only megamoe computes it

The model was trained with megamoe's `attn_moe.mode: full_kv` (each attention expert's query heads attend over the
keys and values of every earlier token; only the query/output side is sparse). The v2 layout has no such option:
config.json carries `"attn_mode": "full_kv"`, a megamoe field that the released v2 code ignores, so **their code
computes token-sparse attention on these weights and gives other logits**. Load it with megamoe
(`megamoe.eval.load.load_model`, `hf-to-moe --src`), which reads `attn_mode`.
"""
