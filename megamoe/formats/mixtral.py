"""HF Mixtral layout <-> our LLaMA-MoE: config fields and tensor names.

A model fits Mixtral when every layer is an MoE layer with a *linear* gate, equal expert sizes, no residual
(shared) expert, and a router whose eval-time weights Mixtral reproduces: `mixtral` (softmax over all experts,
top-k, renormalise) or `topk_noisy` (softmax over the top-k logits, which is the same function of the logits).
Mixtral has no score scale, so it is folded into the expert weights: `w2 = scale * down_proj`. The top-k noisy
router's noise weight (training only) has no Mixtral counterpart and is dropped; importing back gives a `mixtral`
router with scale 1.

Keys (per layer L, expert j), the per-expert layout every transformers release reads (v5 fuses the experts
internally on load, through its conversion mapping):

    model.layers.L.block_sparse_moe.gate.weight          [E, H]   <- layers.L.mlp.router.gate.weight
    model.layers.L.block_sparse_moe.experts.j.w1.weight  [s, H]   <- layers.L.mlp.experts.j.gate_proj.weight
    model.layers.L.block_sparse_moe.experts.j.w3.weight  [s, H]   <- ...up_proj.weight
    model.layers.L.block_sparse_moe.experts.j.w2.weight  [H, s]   <- scale * ...down_proj.weight
"""

from __future__ import annotations

import re

import torch

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.formats.layout import (expected_names, hf_llama_to_ours_name, llama_fields_from_hf, llama_fields_to_hf,
                                    ours_to_hf_llama_name, validated_config)

_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_W_BACK = {v: k for k, v in _W.items()}
_OURS_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_HF_GATE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def why_not_mixtral(cfg: ModelConfig) -> str | None:
    """None when `cfg` fits the Mixtral layout exactly; otherwise the reason, naming the config field."""
    m = cfg.moe
    if m is None:
        return "the model is dense (no moe section)"
    if m.num_experts < 2:
        return "moe.num_experts: Mixtral needs at least 2 experts"
    if cfg.num_moe_layers != cfg.num_layers:
        return f"moe.moe_layers: {m.moe_layers}: Mixtral has no dense layers"
    if m.gate_network != "linear":
        return "moe.gate_network: 'mlp' (Linear-Tanh-Linear); Mixtral's gate is one linear layer"
    if m.router not in ("mixtral", "topk_noisy"):
        return f"moe.router: {m.router!r}; Mixtral reproduces only softmax-top-k routers (mixtral, topk_noisy)"
    if m.effective_score_order() == "softmax_topk":
        return ("moe.score_order: 'softmax_topk' (pre-softmax, no renormalisation); Mixtral always renormalises "
                "the top-k probabilities")
    if m.residual_size:
        return "moe.residual_size: Mixtral has no always-on shared expert"
    if m.capacity_factor is not None:
        return "moe.capacity_factor: Mixtral is dropless"
    sizes = {s for i in range(cfg.num_layers) for s in cfg.expert_sizes(i)}
    if len(sizes) != 1:
        return f"moe.expert_sizes: Mixtral needs equal expert sizes, got {sorted(sizes)}"
    return None


def export_plan(cfg: ModelConfig):
    """[(hf_name, our_name, scale or None)] in write order; scale multiplies the tensor (the folded score scale)."""
    plan = []
    for n in expected_names(cfg):
        m = _OURS_EXPERT.match(n)
        if m:
            i, e, w = int(m.group(1)), m.group(2), m.group(3)
            scale = cfg.moe.layer_scale(cfg.moe_index(i)) if w == "down_proj" else None
            plan.append((f"model.layers.{i}.block_sparse_moe.experts.{e}.{_W[w]}.weight", n,
                         None if scale == 1.0 else scale))
        elif n.endswith("mlp.router.gate.weight"):
            plan.append((f"model.layers.{n.split('.')[1]}.block_sparse_moe.gate.weight", n, None))
        elif n.endswith("mlp.router.noise.weight"):
            continue
        else:
            plan.append((ours_to_hf_llama_name(n), n, None))
    return plan


def apply_scale(t: torch.Tensor, scale, dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale * t computed in fp32, in `dtype` (default t's; the export writes half-precision shards with a scale that
    is not a power of two in fp32, megamoe/interchange/export_hf.py)."""
    dtype = dtype or t.dtype
    return t.to(dtype) if scale is None else (t.float() * scale).to(dtype)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    m = cfg.moe
    d = llama_fields_to_hf(cfg)
    d.update({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "intermediate_size": cfg.expert_sizes(0)[0],
        "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
        "sliding_window": None, "output_router_logits": False, "router_aux_loss_coef": m.balance_loss_weight,
        "router_jitter_noise": 0.0, "attention_dropout": 0.0, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype,
    })
    d.pop("pretraining_tp", None)
    return d


# LLaMA-MoE v2 writes Mixtral-typed checkpoints for its own modeling code: these fields change what is computed
# (a score scale, an always-on residual expert, attention experts, biases, dense layers); a stock-Mixtral import
# would drop them silently. Default values that change nothing are allowed.
V2_FIELDS = {"scale_factor": (None, 1.0), "scale_factor_attn": (None, 1.0), "use_attn_moe": (None, False),
             "attn_experts": (None,), "top_k_attn": (None,), "intermediate_size_residual": (None, 0),
             "add_rescale_bias": (None, False), "num_moe_contract_layers": (None, 0), "moe_type": (None, "modulelist")}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    if hf.get("model_type") != "mixtral":
        raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}, expected 'mixtral'")
    for k, harmless in V2_FIELDS.items():
        if hf.get(k) not in harmless:
            raise ConfigError(f"{where}: {k}={hf[k]!r}: a LLaMA-MoE v2 checkpoint (Mixtral-typed, for its own "
                              "modeling code); reading it as stock Mixtral would drop what this field computes, "
                              "so it is refused here (megamoe.formats.llama_moe_v2 reads it: hf-to-moe and "
                              "megamoe.eval route such directories there)")
    if hf.get("auto_map"):
        raise ConfigError(f"{where}: auto_map {hf['auto_map']}: this Mixtral-typed checkpoint ships its own modeling "
                          "code, which may compute something stock Mixtral does not; refused rather than imported "
                          "with stock Mixtral semantics")
    if hf.get("sliding_window") not in (None, 0):
        raise ConfigError(f"{where}: sliding_window={hf['sliding_window']}: sliding-window attention is not supported")
    f = llama_fields_from_hf(hf, where)
    try:
        E, k = int(hf["num_local_experts"]), int(hf["num_experts_per_tok"])
    except KeyError as e:
        raise ConfigError(f"{where}: field {e.args[0]!r} is missing") from None
    f["intermediate_size"] *= E
    moe = MoEConfig(num_experts=E, top_k=k, router="mixtral", gate_network="linear", noise=False,
                    balance_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)))
    return validated_config(where, **f, moe=moe)


def hf_to_ours_name(hf: str) -> str | None:
    m = _HF_EXPERT.match(hf)
    if m:
        return f"layers.{m.group(1)}.mlp.experts.{m.group(2)}.{_W_BACK[m.group(3)]}.weight"
    m = _HF_GATE.match(hf)
    if m:
        return f"layers.{m.group(1)}.mlp.router.gate.weight"
    return hf_llama_to_ours_name(hf)
