"""llama-moe v1 (pjlab-sys4nlp/llama-moe, `trust_remote_code` LlamaMoEForCausalLM) <-> our LLaMA-MoE.

Keys per layer L (reference fact sheet llama-moe-v1.md section 3.3) and ours:

    model.layers.L.mlp.gate.gate_network.0.weight   [E, H]  <-> layers.L.mlp.router.gate.0.weight   (gate "mlp")
    model.layers.L.mlp.gate.gate_network.2.weight   [E, E]  <-> layers.L.mlp.router.gate.2.weight
    model.layers.L.mlp.gate.gate_network.weight     [E, H]  <-> layers.L.mlp.router.gate.weight     (gate "linear")
    model.layers.L.mlp.gate.weight_noise.weight     [E, H]  <-> layers.L.mlp.router.noise.weight (zeros if absent)
    model.layers.L.mlp.calculator.experts.weight_gate.j [s_j, H] <-> layers.L.mlp.experts.j.gate_proj.weight
    model.layers.L.mlp.calculator.experts.weight_up.j   [s_j, H] <-> ...up_proj.weight
    model.layers.L.mlp.calculator.experts.weight_down.j [H, s_j] <-> ...down_proj.weight

Expert keys have no `.weight` suffix (nn.ParameterList). `rotary_emb.inv_freq` buffers are dropped on import (they
are recomputed) and not written on export. The score scale stays a config field (`score_scale_factor`), so import
then export is bit-exact.

What their code computes differs from a LLaMA config in three places (executed against repo commit d7d0989, the
code of the released base models, with transformers 4.44.2: docs/interchange.md): RoPE always has base 10000
(`rope_theta` and `rope_parameters` are never read); `rope_scaling` must be null or exactly
{"type": "linear" | "dynamic", "factor": float > 1}; `head_dim` is always hidden_size / num_attention_heads. So an
export refuses models with another RoPE base or scaling (`why_not_v1`), and an import takes base 10000 whatever
the file says (what the loader computes), with a warning when the file says otherwise.

config.json: `model_type "llama_moe"`, the auto_map to their remote code (`configuration_llama_moe.LlamaMoEConfig`,
`modeling_llama_moe_hf.LlamaMoEModel` / `LlamaMoEForCausalLM`), `size_experts` per layer, the gate and calculator
fields. We do not ship their code: copy `configuration_llama_moe.py` and `modeling_llama_moe_hf.py` from a released
Hub repository (revision of repo commit d7d0989 for base models), or evaluate with our independent
`llama_moe_v1_reference.py`. Loading trap: transformers >= 4.45 renames keys containing `weight_g` under
meta-device loading (low_cpu_mem_usage / device_map), so `weight_gate.j` is silently left uninitialised; load with
transformers <= 4.44, or without low_cpu_mem_usage/device_map (docs/interchange.md).
"""

from __future__ import annotations

import logging
import re

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.formats.layout import (expected_names, hf_llama_to_ours_name, llama_fields_from_hf, llama_fields_to_hf,
                                    ours_to_hf_llama_name, validated_config)

log = logging.getLogger(__name__)

V1_ROPE_THETA = 10000.0    # their LlamaRotaryEmbedding is built without a base argument: 10000 always
AUTO_MAP = {
    "AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
    "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
    "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM",
}
_EXP = {"gate_proj": "weight_gate", "up_proj": "weight_up", "down_proj": "weight_down"}
_EXP_BACK = {v: k for k, v in _EXP.items()}
_OURS_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OURS_ROUTER = re.compile(r"^layers\.(\d+)\.mlp\.router\.(gate\.0|gate\.2|gate|noise)\.weight$")
_V1_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.calculator\.experts\.(weight_gate|weight_up|weight_down)\.(\d+)$")
_V1_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.(gate_network\.0|gate_network\.2|gate_network|weight_noise)\.weight$")
_R = {"gate.0": "gate_network.0", "gate.2": "gate_network.2", "gate": "gate_network", "noise": "weight_noise"}
_R_BACK = {v: k for k, v in _R.items()}


def why_not_v1(cfg: ModelConfig) -> str | None:
    m = cfg.moe
    if m is None:
        return "the model is dense (no moe section)"
    if cfg.num_moe_layers != cfg.num_layers:
        return f"moe.moe_layers: {m.moe_layers}: LlamaMoEForCausalLM makes every layer MoE"
    if m.residual_size:
        return ("moe.residual_size: the always-on residual block is llama-moe's separate llama_moe_residual model, "
                "not the released LlamaMoEForCausalLM layout")
    if m.router not in ("topk_noisy", "mixtral"):
        return f"moe.router: {m.router!r}; the released HF code always builds TopKBalancedNoisyGate"
    if cfg.rope_theta != V1_ROPE_THETA:
        return (f"rope_theta: {cfg.rope_theta:g}; the released llama-moe v1 code (repo commit d7d0989, what the Hub's "
                "models ship) builds RoPE with base 10000 and never reads rope_theta, so it would compute other logits")
    rs = cfg.rope_scaling
    if rs is not None and not (rs.get("rope_type", rs.get("type")) == "linear" and float(rs.get("factor", 0)) > 1):
        return (f"rope_scaling: {rs}; the released llama-moe v1 code accepts only null or "
                "{\"type\": \"linear\" | \"dynamic\", \"factor\": > 1} (llama3 scaling raises when it loads)")
    if cfg.dim_head * cfg.num_heads != cfg.hidden_size:
        return (f"head_dim: {cfg.dim_head}; the released llama-moe v1 code always uses hidden_size / "
                f"num_attention_heads = {cfg.hidden_size / cfg.num_heads:g}")
    if m.effective_score_order() == "softmax_topk":
        return ("moe.score_order: 'softmax_topk' (pre-softmax, no renormalisation); TopKBalancedNoisyGate takes a "
                "softmax over the k selected logits, which sums to 1")
    return None


def export_plan(cfg: ModelConfig):
    """[(v1_name, our_name or None)] in write order; None means zeros of the noise weight (a `mixtral` router)."""
    plan = []
    for n in expected_names(cfg):
        m = _OURS_EXPERT.match(n)
        r = _OURS_ROUTER.match(n)
        if m:
            plan.append((f"model.layers.{m.group(1)}.mlp.calculator.experts.{_EXP[m.group(3)]}.{m.group(2)}", n))
        elif r:
            plan.append((f"model.layers.{r.group(1)}.mlp.gate.{_R[r.group(2)]}.weight", n))
            if cfg.moe.router != "topk_noisy" and r.group(2) in ("gate", "gate.2"):
                plan.append((f"model.layers.{r.group(1)}.mlp.gate.weight_noise.weight", None))
        else:
            plan.append((ours_to_hf_llama_name(n), n))
    return plan


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    m = cfg.moe
    d = llama_fields_to_hf(cfg)
    for k in ("rope_parameters", "head_dim"):  # never read by their code (a v5 config would add rope_parameters)
        d.pop(k, None)
    if cfg.rope_scaling:  # the exact form their config class validates: two keys, a float factor > 1
        d["rope_scaling"] = {"type": "linear", "factor": float(cfg.rope_scaling["factor"])}
    sizes = [cfg.expert_sizes(i) for i in range(cfg.num_layers)]
    scale = m.score_scale if isinstance(m.score_scale, (list, tuple)) else float(m.score_scale)
    d.update({
        "architectures": ["LlamaMoEForCausalLM"], "model_type": "llama_moe", "auto_map": dict(AUTO_MAP),
        "intermediate_size": cfg.intermediate_size,
        "num_experts": m.num_experts, "num_selects": m.top_k, "size_experts": sizes,
        "gate_type": "TopKBalancedNoisyGate", "gate_network": m.gate_network, "gates": m.gate_network,
        "gate_use_softmax": True, "gate_use_balance": True, "gate_balance_loss_weight": m.balance_loss_weight,
        "gate_add_noise": bool(m.noise), "gate_noise_epsilon": m.noise_epsilon,
        "calculator_type": "UniversalCalculator", "multiply_gate_scores": True, "score_scale_factor": scale,
        "add_weight_norm": False, "drop_tokens": True, "dropped_padding": "zero", "capacity_factor": 1.25,
        "use_cache": True,
        "torch_dtype": dtype,
    })
    return d


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    if hf.get("model_type") != "llama_moe":
        raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}, expected 'llama_moe'")
    f = llama_fields_from_hf(hf, where)
    theta = f["rope_theta"]
    if theta != V1_ROPE_THETA:
        log.warning("%s: rope_theta %g is ignored by the released llama-moe v1 code, which computes RoPE with base "
                    "10000; imported as it computes (rope_theta 10000)", where, theta)
    f["rope_theta"], f["head_dim"] = V1_ROPE_THETA, None  # what their code computes: base 10000, H / heads
    rs = hf.get("rope_scaling")
    if rs is not None and not (isinstance(rs, dict) and set(rs) == {"type", "factor"} and rs["type"] == "linear"
                               and isinstance(rs["factor"], float) and rs["factor"] > 1):
        raise ConfigError(f"{where}: rope_scaling {rs!r}: the released llama-moe v1 code loads only null or "
                          "{\"type\": \"linear\", \"factor\": float > 1} that megamoe represents (dynamic NTK "
                          "scaling is not supported)")
    for k in ("num_experts", "num_selects"):
        if k not in hf:
            raise ConfigError(f"{where}: field {k!r} is missing")
    gate_type = hf.get("gate_type", "TopKBalancedNoisyGate")
    if gate_type != "TopKBalancedNoisyGate":
        raise ConfigError(f"{where}: gate_type {gate_type!r}: only TopKBalancedNoisyGate (the released HF code) "
                          "is supported")
    if hf.get("calculator_type", "UniversalCalculator") != "UniversalCalculator":
        raise ConfigError(f"{where}: calculator_type {hf['calculator_type']!r}: only UniversalCalculator is supported")
    if not hf.get("gate_use_softmax", True) or not hf.get("multiply_gate_scores", True):
        raise ConfigError(f"{where}: gate_use_softmax/multiply_gate_scores false is not supported")
    E, L = int(hf["num_experts"]), f["num_layers"]
    sizes = hf.get("size_experts")
    if sizes is not None:
        if not (isinstance(sizes, list) and len(sizes) == L and all(isinstance(s, list) and len(s) == E for s in sizes)):
            raise ConfigError(f"{where}: size_experts must be {L} lists of {E} sizes")
        f["intermediate_size"] = sum(sizes[0])
    scale = hf.get("score_scale_factor", 1.0)
    moe = MoEConfig(num_experts=E, top_k=int(hf["num_selects"]), router="topk_noisy",
                    gate_network=hf.get("gate_network", hf.get("gates", "mlp")), expert_sizes=sizes,
                    score_scale=[float(s) for s in scale] if isinstance(scale, list) else float(scale),
                    noise=bool(hf.get("gate_add_noise", True)),
                    noise_epsilon=float(hf.get("gate_noise_epsilon", 0.01)),
                    balance_loss_weight=float(hf.get("gate_balance_loss_weight", 0.01)))
    return validated_config(where, **f, moe=moe)


def hf_to_ours_name(hf: str) -> str | None:
    m = _V1_EXPERT.match(hf)
    if m:
        return f"layers.{m.group(1)}.mlp.experts.{m.group(3)}.{_EXP_BACK[m.group(2)]}.weight"
    m = _V1_GATE.match(hf)
    if m:
        return f"layers.{m.group(1)}.mlp.router.{_R_BACK[m.group(2)]}.weight"
    return hf_llama_to_ours_name(hf)
