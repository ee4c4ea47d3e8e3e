"""LLaMA-MoE v2 (OpenSparseLLMs/LLaMA-MoE-v2 @ cfca9f7, Mixtral-typed with its own modeling code) <-> our
LLaMA-MoE: config fields, tensor names, and which models fit.

Keys per layer L (attention expert a, MLP expert j; reference fact sheet llama-moe-v2.md section 5, verified by
loading with the released code: docs/interchange.md) and ours (docs/architecture.md):

    model.layers.L.self_attn.gate.weight          [A, H]     <- layers.L.attn.router.gate.weight
    model.layers.L.self_attn.q_proj.a.weight      [g'd, H]   <- rows [a*g'd, (a+1)*g'd) of layers.L.attn.q_proj.weight
    model.layers.L.self_attn.k_proj.a.weight      [d, H]     <- rows [a*d, (a+1)*d) of layers.L.attn.k_proj.weight
    model.layers.L.self_attn.v_proj.a.weight      [d, H]     <- rows [a*d, (a+1)*d) of layers.L.attn.v_proj.weight
    model.layers.L.self_attn.o_proj.a.weight      [H, g'd]   <- columns [a*g'd, (a+1)*g'd) of layers.L.attn.o_proj
    model.layers.L.self_attn.{q,k,v,o}_proj.weight           <- dense attention (use_attn_moe false)
    model.layers.L.block_sparse_moe.gate.weight   [E, H]     <- layers.L.mlp.router.gate.weight
    model.layers.L.block_sparse_moe.experts.j.{w1,w3,w2}.weight <- layers.L.mlp.experts.j.{gate,up,down}_proj.weight
    model.layers.L.mlp_residual.{w1,w3,w2}.weight            <- layers.L.mlp.shared.{gate,up,down}_proj.weight
    model.layers.L.block_sparse_moe.{w1,w3,w2}.weight  [E*I, H] <- a dense layer's mlp.{gate,up,down}_proj (the first
                                                                and last `num_moe_contract_layers` layers)

The score scales stay config fields (`scale_factor`, `scale_factor_attn`), so export then import is bit-exact.

What the released modeling code computes (executed with transformers 4.42.4: docs/interchange.md), and so what an
export must fit (`why_not_v2`):
  - routers (attention and MLP): softmax over all experts (fp32), top-k, renormalise, times the scale; a linear gate
    without bias; no capacity. megamoe's `topk_softmax` order gives the same weights; `softmax_topk` does not.
  - attention MoE is global (`use_attn_moe`: every layer) and token-sparse: each expert attends only over the tokens
    routed to it (megamoe's `token_sparse`). A `full_kv` model is written with `attn_mode: "full_kv"` (a megamoe
    field the released code ignores): only megamoe's loaders compute it (the README written beside it says so).
  - dense MLP layers only as the first and last `num_moe_contract_layers` layers; equal expert sizes; the residual
    block added unscaled; RoPE base `rope_theta`, no `rope_scaling` (ignored by their code), head_dim =
    hidden_size / num_attention_heads; exports write `sliding_window: null` (their config class defaults to 4096,
    counted in each expert's compacted tokens); an import refuses a window shorter than max_position_embeddings.
  - `use_cache: false` in config.json: with attention MoE a plain forward with the default use_cache=True raises
    NotImplementedError in their MoECache (generate still works and builds its own cache).
"""

from __future__ import annotations

import logging
import re

import torch

from megamoe.config import AttnMoEConfig, ConfigError, ModelConfig, MoEConfig
from megamoe.formats.layout import (attn_expert_rows, expected_names, hf_llama_to_ours_name, llama_fields_from_hf,
                                    llama_fields_to_hf, ours_to_hf_llama_name, validated_config)

log = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_mixtral.MixtralConfig",
    "AutoModel": "modeling_mixtral.MixtralModel",
    "AutoModelForCausalLM": "modeling_mixtral.MixtralForCausalLM",
}
# config.json fields only LLaMA-MoE v2's layout writes (a Mixtral-typed directory with any of them is v2)
V2_FIELDS = ("use_attn_moe", "attn_experts", "top_k_attn", "scale_factor_attn", "moe_type",
             "intermediate_size_residual", "num_moe_contract_layers", "scale_factor", "use_layer_wise_balance",
             "add_rescale_bias")
V2_ORDERS = ("softmax_topk_renorm", "topk_softmax")  # both give v2's weights: softmax over the k, renormalised

_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_W_BACK = {v: k for k, v in _W.items()}


def is_llama_moe_v2(hf: dict) -> bool:
    return hf.get("model_type") == "mixtral" and any(k in hf for k in V2_FIELDS)


def contract_layers(cfg: ModelConfig) -> int | None:
    """N such that the dense MLP layers are exactly the first N and last N (0 for none); None if they are not."""
    L = cfg.num_layers
    dense = [i for i in range(L) if cfg.moe_index(i) is None]
    if not dense:
        return 0
    for n in range(1, L):
        if dense == [i for i in range(L) if i < n or i >= L - n]:
            return n
    return None


def why_not_v2(cfg: ModelConfig) -> str | None:
    """None when the released v2 code computes `cfg`'s forward (`full_kv` aside: see the module docstring);
    otherwise the reason, naming the config field."""
    m, a = cfg.moe, cfg.attn_moe
    if m is None and a is None:
        return "the model is dense (neither moe nor attn_moe)"
    if cfg.rope_scaling:
        return f"rope_scaling: {cfg.rope_scaling}; the released v2 code never reads rope_scaling (unscaled RoPE)"
    if cfg.dim_head * cfg.num_heads != cfg.hidden_size:
        return (f"head_dim: {cfg.dim_head}; the released v2 code always uses hidden_size / num_attention_heads = "
                f"{cfg.hidden_size / cfg.num_heads:g}")
    if a is not None:
        if a.layers is not None and sorted(a.layers) != list(range(cfg.num_layers)):
            return f"attn_moe.layers: {a.layers}; the released v2 code puts attention experts in every layer"
        if a.score_order not in V2_ORDERS:
            return (f"attn_moe.score_order: {a.score_order!r}; the released v2 code renormalises the top-k "
                    "probabilities")
    if m is not None:
        if contract_layers(cfg) is None:
            return (f"moe.moe_layers: {m.moe_layers}; the released v2 code keeps dense MLPs only in the first and last "
                    "num_moe_contract_layers layers")
        if cfg.num_moe_layers == 0:
            return "moe.moe_layers: no MoE layer"
        if m.gate_network != "linear":
            return "moe.gate_network: 'mlp' (Linear-Tanh-Linear); the v2 gate is one linear layer"
        if m.router not in ("mixtral", "topk_noisy"):
            return f"moe.router: {m.router!r}; v2 reproduces only softmax-top-k routers (mixtral, topk_noisy)"
        if m.effective_score_order() not in V2_ORDERS:
            return "moe.score_order: 'softmax_topk' (no renormalisation); the v2 MLP router renormalises"
        if m.capacity_factor is not None:
            return "moe.capacity_factor: the v2 MoE is dropless"
        if isinstance(m.score_scale, (list, tuple)) and len({float(s) for s in m.score_scale}) > 1:
            return f"moe.score_scale: per-layer values {m.score_scale}; v2 has one scale_factor"
        sizes = {s for i in range(cfg.num_layers) if cfg.moe_index(i) is not None for s in cfg.expert_sizes(i)}
        if len(sizes) != 1:
            return f"moe.expert_sizes: v2 needs equal expert sizes, got {sorted(sizes)}"
        if contract_layers(cfg) and (m.residual_size or cfg.intermediate_size != m.num_experts * sizes.pop()):
            return ("moe.moe_layers: a v2 dense (contract) layer's MLP is num_local_experts x intermediate_size "
                    "wide, without the residual block")
    return None


def _mlp_scale(m: MoEConfig) -> float:
    return float(m.score_scale[0]) if isinstance(m.score_scale, (list, tuple)) else float(m.score_scale)


def hf_plan(cfg: ModelConfig) -> list[tuple[str, str, tuple | None]]:
    """[(v2 key, our name, piece)] in write order; piece (dim, start, stop) is the part of our tensor the key holds
    (None: all of it). Export reads each of our tensors once and slices it; import concatenates the pieces."""
    plan = []
    A = cfg.attn_moe.num_experts if cfg.attn_moe else 0
    for n in expected_names(cfg):
        parts = n.split(".")
        if n.startswith("layers."):
            i, rest = int(parts[1]), ".".join(parts[2:])
            p = f"model.layers.{i}."
            if cfg.is_attn_moe_layer(i) and rest.startswith("attn.") and rest.endswith("_proj.weight"):
                x = rest.split(".")[1]                     # q_proj ...
                for e in range(A):
                    rows = attn_expert_rows(cfg, e)
                    a, b = rows["kv"] if x in ("k_proj", "v_proj") else rows["q"]
                    plan.append((f"{p}self_attn.{x}.{e}.weight", n, (1 if x == "o_proj" else 0, a, b)))
                continue
            if rest == "attn.router.gate.weight":
                plan.append((f"{p}self_attn.gate.weight", n, None))
                continue
            if rest == "mlp.router.gate.weight":
                plan.append((f"{p}block_sparse_moe.gate.weight", n, None))
                continue
            if rest == "mlp.router.noise.weight":
                continue                                   # training-only noise of a topk_noisy router
            m = re.match(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
            if m:
                plan.append((f"{p}block_sparse_moe.experts.{m.group(1)}.{_W[m.group(2)]}.weight", n, None))
                continue
            m = re.match(r"^mlp\.shared\.(gate_proj|up_proj|down_proj)\.weight$", rest)
            if m:
                plan.append((f"{p}mlp_residual.{_W[m.group(1)]}.weight", n, None))
                continue
            m = re.match(r"^mlp\.(gate_proj|up_proj|down_proj)\.weight$", rest)
            if m:                                           # a dense (contract) layer
                plan.append((f"{p}block_sparse_moe.{_W[m.group(1)]}.weight", n, None))
                continue
        plan.append((ours_to_hf_llama_name(n), n, None))
    return plan


def piece_shape(shape: list, piece) -> list:
    if piece is None:
        return list(shape)
    dim, a, b = piece
    s = list(shape)
    s[dim] = b - a
    return s


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    m, a = cfg.moe, cfg.attn_moe
    d = llama_fields_to_hf(cfg)
    for k in ("rope_parameters", "head_dim", "pretraining_tp", "rope_scaling"):   # never read by their code
        d.pop(k, None)
    if m is not None:
        size = next(cfg.expert_sizes(i)[0] for i in range(cfg.num_layers) if cfg.moe_index(i) is not None)
        E, k, scale, residual = m.num_experts, m.top_k, _mlp_scale(m), m.residual_size or None
        balance = m.balance_loss_weight
    else:   # attention experts only: every MLP is a dense "contract" layer, num_local_experts 1
        size, E, k, scale, residual, balance = cfg.intermediate_size, 1, 1, 1.0, None, a.balance_loss_weight
    d.update({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "auto_map": dict(AUTO_MAP),
        "intermediate_size": size, "intermediate_size_residual": residual,
        "num_local_experts": E, "num_experts_per_tok": k, "scale_factor": scale, "moe_type": "modulelist",
        "num_moe_contract_layers": contract_layers(cfg) if m is not None else (cfg.num_layers + 1) // 2,
        "router_aux_loss_coef": balance, "output_router_logits": False, "use_layer_wise_balance": False,
        "add_rescale_bias": False,
        "use_attn_moe": a is not None, "attn_experts": a.num_experts if a else None,
        "top_k_attn": a.top_k if a else None, "scale_factor_attn": float(a.score_scale) if a else None,
        "sliding_window": None, "attention_dropout": 0.0, "router_jitter_noise": 0.0,
        # with attention MoE their forward raises on use_cache=True without a cache (generate makes its own)
        "use_cache": a is None,
        "torch_dtype": dtype,
    })
    if a is not None and a.mode != "token_sparse":
        d["attn_mode"] = a.mode   # megamoe's own field: the released code ignores it (README)
    return d


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config for a v2 config.json: what the released code computes, or a ConfigError naming the field that
    megamoe cannot represent."""
    if hf.get("model_type") != "mixtral":
        raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}, expected 'mixtral' (llama-moe v2)")
    if hf.get("moe_type", "modulelist") != "modulelist":
        raise ConfigError(f"{where}: moe_type {hf['moe_type']!r}: only the released 'modulelist' MoE is supported")
    if hf.get("add_rescale_bias"):
        raise ConfigError(f"{where}: add_rescale_bias=true (llama-moe v2 alignment biases on o_proj/w2): megamoe's "
                          "layers have no biases")
    sw, max_pos = hf.get("sliding_window", 4096), int(hf.get("max_position_embeddings", 0) or 0)
    if "sliding_window" in hf and sw is not None and sw < max_pos:
        raise ConfigError(f"{where}: sliding_window {sw} (< max_position_embeddings {max_pos}): a window counted in "
                          "each attention expert's own tokens is not supported; null if the model was trained "
                          "without one")
    if "sliding_window" not in hf and max_pos > sw:
        log.warning("%s: no sliding_window: the released v2 config class applies %d (counted in each expert's "
                    "tokens) to sequences longer than that; megamoe imports the model without a window", where, sw)
    if hf.get("rope_scaling"):
        log.warning("%s: rope_scaling %s is ignored by the released llama-moe v2 code; imported as it computes "
                    "(no scaling)", where, hf["rope_scaling"])
    if hf.get("head_dim") not in (None, hf.get("hidden_size", 0) // max(1, hf.get("num_attention_heads", 1))):
        log.warning("%s: head_dim %s is ignored by the released llama-moe v2 code (hidden_size / heads)", where,
                    hf["head_dim"])
    f = llama_fields_from_hf(hf, where)
    f["rope_scaling"], f["head_dim"] = None, None
    try:
        E, k = int(hf["num_local_experts"]), int(hf["num_experts_per_tok"])
        size = int(hf["intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"{where}: field {e.args[0]!r} is missing") from None
    residual = int(hf.get("intermediate_size_residual") or 0)
    L = f["num_layers"]
    n = int(hf.get("num_moe_contract_layers") or 0)
    moe_layers = [i for i in range(L) if n <= i < L - n]
    f["intermediate_size"] = size * E + residual
    moe = None
    if moe_layers:
        if residual and n:
            raise ConfigError(f"{where}: intermediate_size_residual with num_moe_contract_layers: the dense layers "
                              "would be narrower than the MoE layers' FFN (megamoe has one intermediate_size)")
        scale = hf.get("scale_factor", 1.0)
        moe = MoEConfig(num_experts=E, top_k=k, router="mixtral", gate_network="linear", noise=False,
                        residual_size=residual, score_scale=float(1.0 if scale is None else scale),
                        moe_layers=None if len(moe_layers) == L else moe_layers,
                        balance_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)))
    attn = None
    if hf.get("use_attn_moe"):
        for key in ("attn_experts", "top_k_attn", "scale_factor_attn"):
            if hf.get(key) is None:
                raise ConfigError(f"{where}: llama-moe v2: use_attn_moe is true but {key} is "
                                  f"{'missing' if key not in hf else 'null'} (the released code fails to build or "
                                  "run such a model)")
        attn = AttnMoEConfig(num_experts=int(hf["attn_experts"]), top_k=int(hf["top_k_attn"]),
                             score_scale=float(hf["scale_factor_attn"]), mode=hf.get("attn_mode", "token_sparse"),
                             balance_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)))
    if moe is None and attn is None:
        raise ConfigError(f"{where}: llama-moe v2 without MoE layers or attention experts: a dense model")
    return validated_config(where, **f, moe=moe, attn_moe=attn)


def read_tensors(get, cfg: ModelConfig, names=None) -> dict:
    """{our name: a function returning the full tensor} from a v2 directory's `get(key)`: attention experts'
    pieces concatenated in expert order. `names`: only these of our names (default all)."""
    pieces: dict[str, list] = {}
    for key, ours, piece in hf_plan(cfg):
        if names is None or ours in names:
            pieces.setdefault(ours, []).append((key, piece))

    def loader(items):
        def load():
            if items[0][1] is None:
                return get(items[0][0])
            return torch.cat([get(k) for k, _ in items], dim=items[0][1][0])
        return load
    return {n: loader(items) for n, items in pieces.items()}


def hf_to_ours_name(hf: str) -> str | None:
    """Our name for a v2 key that holds a whole tensor of ours (attention experts' pieces: see `hf_plan`)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
    if m:
        i, rest = m.group(1), m.group(2)
        table = {"self_attn.gate.weight": "attn.router.gate.weight",
                 "block_sparse_moe.gate.weight": "mlp.router.gate.weight"}
        if rest in table:
            return f"layers.{i}.{table[rest]}"
        m2 = re.match(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$", rest)
        if m2:
            return f"layers.{i}.mlp.experts.{m2.group(1)}.{_W_BACK[m2.group(2)]}.weight"
        m2 = re.match(r"^mlp_residual\.(w1|w2|w3)\.weight$", rest)
        if m2:
            return f"layers.{i}.mlp.shared.{_W_BACK[m2.group(1)]}.weight"
        m2 = re.match(r"^block_sparse_moe\.(w1|w2|w3)\.weight$", rest)
        if m2:
            return f"layers.{i}.mlp.{_W_BACK[m2.group(1)]}.weight"
    return hf_llama_to_ours_name(hf)
