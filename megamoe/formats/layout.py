"""Names and slicing rules shared by every format: HF LLaMA <-> our parameter names, and how each of our
tensors is split under tensor (TP), expert (EP) and expert-tensor (ETP) parallelism.

Our names are those of docs/architecture.md. The slicing rule of a tensor is one of

    ("tp", dim)       split along `dim` into TP parts (embedding/lm_head: vocab; q/k/v/gate/up: rows; o/down: columns)
    ("replicated",)   norms and routers: identical on every rank
    ("expert", e, dim) expert e's weight: owned by EP rank e // (E/EP), split along `dim` into ETP parts

`hf_llama_to_ours_name` also covers the attention/norm/embedding keys that HF Mixtral and llama-moe v1 share with
HF LLaMA; the MoE-specific keys are mapped in `mixtral.py` and `llama_moe_v1.py`.
"""

from __future__ import annotations

import re

import torch

from megamoe.config import ConfigError, ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

_HF_COMMON = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_OURS_COMMON = {v: k for k, v in _HF_COMMON.items()}
_GLOBAL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}


def hf_llama_to_ours_name(hf: str) -> str | None:
    """Our name for an HF LLaMA key; None for keys we drop (rotary inv_freq buffers); KeyError if unknown."""
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
    if m:
        if m.group(2).endswith("rotary_emb.inv_freq"):
            return None
        if m.group(2) in _HF_COMMON:
            return f"layers.{m.group(1)}.{_HF_COMMON[m.group(2)]}"
    raise KeyError(hf)


def ours_to_hf_llama_name(ours: str) -> str:
    if ours in _GLOBAL_BACK:
        return _GLOBAL_BACK[ours]
    m = _LAYER.match(ours)
    if m and m.group(2) in _OURS_COMMON:
        return f"model.layers.{m.group(1)}.{_OURS_COMMON[m.group(2)]}"
    raise KeyError(ours)


def slicing(name: str):
    """The slicing rule of one of our tensors (see the module docstring). KeyError for an unknown name."""
    if name in ("embed.weight", "lm_head.weight"):
        return ("tp", 0)
    if name == "norm.weight":
        return ("replicated",)
    m = _EXPERT.match(name)
    if m:
        return ("expert", int(m.group(2)), 1 if m.group(3) == "down_proj" else 0)
    m = _LAYER.match(name)
    if m:
        rest = m.group(2)
        if rest in ("attn_norm.weight", "mlp_norm.weight") or rest.startswith(("mlp.router.", "attn.router.")):
            return ("replicated",)
        if rest in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"):
            return ("tp", 0)
        if rest == "attn.o_proj.weight":
            return ("tp", 1)
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.shared.gate_proj.weight",
                    "mlp.shared.up_proj.weight"):
            return ("tp", 0)
        if rest in ("mlp.down_proj.weight", "mlp.shared.down_proj.weight"):
            return ("tp", 1)
    raise KeyError(f"{name}: no slicing rule for this parameter name (see docs/architecture.md)")


def expected_names(cfg: ModelConfig) -> list[str]:
    """Every parameter name of `cfg`'s full model, in our canonical order (embedding, layer by layer, norm, head)."""
    names = ["embed.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        names += [p + "attn_norm.weight"] + [p + f"attn.{x}_proj.weight" for x in "qkvo"]
        if cfg.is_attn_moe_layer(i):
            names.append(p + "attn.router.gate.weight")
        names.append(p + "mlp_norm.weight")
        mi = cfg.moe_index(i)
        if mi is None:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            continue
        m = cfg.moe
        if m.gate_network == "linear":
            names.append(p + "mlp.router.gate.weight")
        else:
            names += [p + "mlp.router.gate.0.weight", p + "mlp.router.gate.2.weight"]
        if m.router == "topk_noisy":
            names.append(p + "mlp.router.noise.weight")
        for e in range(m.num_experts):
            names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
        if m.residual_size:
            names += [p + f"mlp.shared.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def attn_expert_rows(cfg: ModelConfig, e: int) -> dict:
    """Where attention expert e lives in the stacked tensors of an attention-MoE layer (docs/architecture.md):
    {"q": rows of q_proj (= columns of o_proj), "kv": rows of k_proj / v_proj, "kv_head": the dense KV head it
    starts from (e // split)} as (start, stop) pairs."""
    d, A = cfg.dim_head, cfg.attn_moe.num_experts
    gd = cfg.num_heads // A * d
    return {"q": (e * gd, (e + 1) * gd), "kv": (e * d, (e + 1) * d), "kv_head": e // (A // cfg.kv_heads)}


def expand_kv_heads(t: torch.Tensor, num_kv_heads: int, split: int) -> torch.Tensor:
    """A dense k_proj / v_proj [n_kv*d, H] -> the attention experts' [n_kv*split*d, H]: KV head i copied into its
    `split` sibling experts i*split ... i*split + split - 1 (HF repeat_kv order: query head h uses KV head
    h // (num_heads / n_kv)). split 1 returns `t` itself."""
    if split == 1:
        return t
    d = t.shape[0] // num_kv_heads
    return t.view(num_kv_heads, 1, d, -1).expand(num_kv_heads, split, d, t.shape[-1]).reshape(
        num_kv_heads * split * d, t.shape[-1])


def expected_shape(cfg: ModelConfig, name: str) -> list[int]:
    """The full (unsharded) shape of parameter `name` under `cfg`."""
    H, V, d = cfg.hidden_size, cfg.vocab_size, cfg.dim_head
    if name in ("embed.weight", "lm_head.weight"):
        return [V, H]
    if name == "norm.weight":
        return [H]
    m = _EXPERT.match(name)
    if m:
        s = cfg.expert_sizes(int(m.group(1)))[int(m.group(2))]
        return [H, s] if m.group(3) == "down_proj" else [s, H]
    m = _LAYER.match(name)
    rest = m.group(2)
    E = cfg.moe.num_experts if cfg.moe else 0
    kv = cfg.attn_kv_heads(int(m.group(1)))   # attention experts: one KV head each
    table = {
        "attn_norm.weight": [H], "mlp_norm.weight": [H],
        "attn.q_proj.weight": [cfg.num_heads * d, H], "attn.k_proj.weight": [kv * d, H],
        "attn.v_proj.weight": [kv * d, H], "attn.o_proj.weight": [H, cfg.num_heads * d],
        "attn.router.gate.weight": [cfg.attn_moe.num_experts if cfg.attn_moe else 0, H],
        "mlp.gate_proj.weight": [cfg.intermediate_size, H], "mlp.up_proj.weight": [cfg.intermediate_size, H],
        "mlp.down_proj.weight": [H, cfg.intermediate_size],
        "mlp.router.gate.weight": [E, H], "mlp.router.gate.0.weight": [E, H], "mlp.router.gate.2.weight": [E, E],
        "mlp.router.noise.weight": [E, H],
    }
    if cfg.moe is not None:
        r = cfg.moe.residual_size
        table.update({"mlp.shared.gate_proj.weight": [r, H], "mlp.shared.up_proj.weight": [r, H],
                      "mlp.shared.down_proj.weight": [H, r]})
    return table[rest]


# ---- HF LLaMA config.json <-> ModelConfig (the fields every LLaMA-family format shares) ----

LLAMA_TYPES = ("llama",)


def llama_fields_from_hf(hf: dict, where: str) -> dict:
    """ModelConfig keyword arguments from the LLaMA fields of an HF config dict. `where` names the file in errors."""
    def need(k):
        if k not in hf:
            raise ConfigError(f"{where}: field {k!r} is missing")
        return hf[k]

    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act {act!r}: only SwiGLU (silu) LLaMA models are supported")
    for k in ("attention_bias", "mlp_bias"):
        if hf.get(k):
            raise ConfigError(f"{where}: {k}=true: LLaMA without biases is expected")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{where}: pretraining_tp={hf['pretraining_tp']}: only 1 is supported")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if scaling is None and rope and rtype != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    ids = {}
    for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(f)
        if v is None or (isinstance(v, int) and not isinstance(v, bool)) or (
                f == "eos_token_id" and isinstance(v, list) and all(isinstance(i, int) for i in v)):
            ids[f] = v
        else:
            raise ConfigError(f"{where}: {f} {v!r}: expected a token id (or a list of ids for eos_token_id)")
    return dict(
        **ids,
        vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
        num_heads=int(need("num_attention_heads")), num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        rope_scaling=scaling, max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_from_hf_llama(hf: dict, where: str = "config.json") -> ModelConfig:
    """A dense ModelConfig from an HF LLaMA config.json; a non-LLaMA config is a ConfigError naming the field."""
    mt = hf.get("model_type")
    if mt not in LLAMA_TYPES:
        raise ConfigError(f"{where}: model_type is {mt!r}; expected a dense LLaMA-architecture model "
                          "(model_type 'llama'); llama-moe v1 and Mixtral checkpoints are recognised and imported by "
                          "`megamoe-convert hf-to-moe`")
    return validated_config(where, **llama_fields_from_hf(hf, where))


def validated_config(where: str, **fields) -> ModelConfig:
    """`ModelConfig(**fields).validate()`, its ConfigError prefixed with the source file `where` (each HF format's
    reader ends with this)."""
    cfg = ModelConfig(**fields)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def llama_fields_to_hf(cfg: ModelConfig) -> dict:
    """The LLaMA fields of an HF config.json for `cfg` (written in both the v4 and v5 spellings of RoPE)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
        rope.setdefault("rope_type", rope.pop("type", "default"))
        # top-level rope_scaling under both spellings: transformers 4.x reads `rope_type` (older `type`), llama.cpp's
        # converter before rope_parameters support reads it here
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling["type"] = scaling["rope_type"]
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_head,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False, "pretraining_tp": 1, "initializer_range": cfg.init_std,
        **{f: getattr(cfg, f) for f in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(cfg, f) is not None},
    }
