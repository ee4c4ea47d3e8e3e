"""Dense LLaMA weights + per-layer neuron partitions -> LLaMA-MoE config and state dict (our parameter names).

Expert e of layer i takes rows `gate_proj[idx_e]`, `up_proj[idx_e]` and columns `down_proj[:, idx_e]` (idx ascending,
as llama-moe's boolean masks do); the residual block becomes `layers.{i}.mlp.shared.*`. Attention, norms, embeddings
and the head are copied unchanged; dense layers (not in `moe.moe_layers`) stay dense.

Router initialisation (`gate_init`):
  "random"     normal(0, moe.gate_init_std) for every gate matrix (llama-moe v1's release, `use_random_gate=True`);
  "zeros"      all-zero gate: every expert gets the same logit (a uniform router; used by construct-then-check);
  "centroids"  k-means centroids [E, H] of the layer's MLP input (LLaMA-MoE v2 section 2b), so the router logit is
               x . c_e. Linear gate: the centroids are the rows. MLP gate (Linear, Tanh, Linear): the first layer is
               the centroids and the second the identity, so logits are tanh(x . c_e): tanh is monotone, hence the
               expert ranking (the top-k choice) is exactly that of the v2 dot-product router; only the softmax
               weights are compressed.
The top-k noisy router's noise weight is zeros (llama-moe v1's convert step), so no noise until it learns one.
"""

from __future__ import annotations

import copy

import torch

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.construct.partition import Partition

__all__ = ["build_moe", "moe_layer_state", "moe_config_for", "GATE_INITS"]

GATE_INITS = ("random", "zeros", "centroids")
_MLP = ("gate_proj", "up_proj", "down_proj")


def moe_config_for(dense_cfg: ModelConfig, partitions: dict, moe: MoEConfig) -> ModelConfig:
    """The MoE ModelConfig: `moe` with num_experts, expert_sizes (per MoE layer) and residual_size from the partitions.

    Raises ConfigError naming the field when the partitions do not fit the dense model or each other.
    """
    if dense_cfg.moe is not None:
        raise ConfigError("moe: the source config is already an MoE; build_moe starts from a dense model")
    cfg = copy.deepcopy(dense_cfg)
    moe = copy.deepcopy(moe)
    layers = [i for i in range(cfg.num_layers) if moe.is_moe_layer(i)]
    missing = [i for i in layers if i not in partitions]
    if missing:
        raise ConfigError(f"partitions: no partition for MoE layers {missing}")
    extra = sorted(set(partitions) - set(layers))
    if extra:
        raise ConfigError(f"partitions: layers {extra} are not MoE layers (moe.moe_layers = {moe.moe_layers})")
    e_counts = {partitions[i].num_experts for i in layers}
    if len(e_counts) != 1:
        raise ConfigError(f"partitions: layers disagree on the number of experts ({sorted(e_counts)})")
    res = {partitions[i].residual_size for i in layers}
    if len(res) != 1:
        raise ConfigError(f"partitions: layers disagree on the residual size ({sorted(res)}); "
                          "moe.residual_size is one number for all layers")
    widths = {sum(partitions[i].expert_sizes) + partitions[i].residual_size for i in layers}
    if len(widths) != 1:
        raise ConfigError(f"partitions: layers have different total MoE widths {sorted(widths)}")
    width = widths.pop()
    for i in layers:
        if partitions[i].ffn_width != dense_cfg.intermediate_size:
            raise ConfigError(f"partitions[{i}].ffn_width: {partitions[i].ffn_width} but the dense "
                              f"intermediate_size is {dense_cfg.intermediate_size}")
    if width != dense_cfg.intermediate_size and len(layers) != cfg.num_layers:
        raise ConfigError(f"moe.moe_layers: the MoE width ({width}, a sharing method) differs from the dense FFN "
                          f"width ({dense_cfg.intermediate_size}); intermediate_size is shared by dense and MoE "
                          "layers, so every layer must be MoE")
    moe.num_experts = e_counts.pop()
    moe.residual_size = res.pop()
    moe.expert_sizes = [partitions[i].expert_sizes for i in layers]
    cfg.moe = moe
    cfg.intermediate_size = width
    return cfg.validate()


def moe_layer_state(prefix: str, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor, part: Partition,
                    moe: MoEConfig, gate_init: str = "random", centroids=None,
                    generator: torch.Generator | None = None) -> dict:
    """State dict entries of one MoE MLP (names under `prefix`, e.g. "layers.3.mlp.") from its dense weights.

    Works on one layer at a time so that a converter can stream a large checkpoint.
    """
    f, h = gate_w.shape
    if up_w.shape != (f, h) or down_w.shape != (h, f):
        raise ConfigError(f"{prefix}: dense MLP shapes gate {tuple(gate_w.shape)}, up {tuple(up_w.shape)}, "
                          f"down {tuple(down_w.shape)} do not fit together")
    if part.ffn_width != f:
        raise ConfigError(f"{prefix}partition.ffn_width: {part.ffn_width} but the dense FFN width is {f}")
    out = {}
    for e, idx in enumerate(part.experts):
        ix = torch.as_tensor(idx, dtype=torch.long)
        out[f"{prefix}experts.{e}.gate_proj.weight"] = gate_w.index_select(0, ix).clone()
        out[f"{prefix}experts.{e}.up_proj.weight"] = up_w.index_select(0, ix).clone()
        out[f"{prefix}experts.{e}.down_proj.weight"] = down_w.index_select(1, ix).clone()
    if part.residual:
        ix = torch.as_tensor(part.residual, dtype=torch.long)
        out[f"{prefix}shared.gate_proj.weight"] = gate_w.index_select(0, ix).clone()
        out[f"{prefix}shared.up_proj.weight"] = up_w.index_select(0, ix).clone()
        out[f"{prefix}shared.down_proj.weight"] = down_w.index_select(1, ix).clone()
    out.update(router_state(prefix, h, part.num_experts, moe, gate_init, centroids, gate_w.dtype, generator))
    return out


def router_state(prefix, hidden, num_experts, moe, gate_init, centroids, dtype, generator):
    """Router weights of one layer: gate (linear or mlp) and, for the top-k noisy router, a zero noise weight."""
    if gate_init not in GATE_INITS:
        raise ConfigError(f"gate_init: {gate_init!r} is not one of {GATE_INITS}")
    e = num_experts

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32) * moe.gate_init_std

    if gate_init == "centroids":
        if centroids is None:
            raise ConfigError(f"centroids: gate_init='centroids' needs the k-means centroids of {prefix}")
        c = torch.as_tensor(centroids, dtype=torch.float32)
        if tuple(c.shape) != (e, hidden):
            raise ConfigError(f"centroids: {prefix} expects [{e}, {hidden}], got {list(c.shape)}")
        first = c
    elif gate_init == "zeros":
        first = torch.zeros(e, hidden)
    else:
        first = rand(e, hidden)
    out = {}
    if moe.gate_network == "linear":
        out[f"{prefix}router.gate.weight"] = first
    else:
        out[f"{prefix}router.gate.0.weight"] = first
        if gate_init == "random":
            out[f"{prefix}router.gate.2.weight"] = rand(e, e)
        elif gate_init == "zeros":
            out[f"{prefix}router.gate.2.weight"] = torch.zeros(e, e)
        else:
            out[f"{prefix}router.gate.2.weight"] = torch.eye(e)
    if moe.router == "topk_noisy":
        out[f"{prefix}router.noise.weight"] = torch.zeros(e, hidden)
    return {k: v.to(dtype) for k, v in out.items()}


def build_moe(dense_cfg: ModelConfig, dense_state: dict, partitions: dict, moe: MoEConfig,
              gate_init: str = "random", centroids: dict | None = None, seed: int = 0):
    """(ModelConfig, state dict) of the LLaMA-MoE built from a dense model (our names) and {layer: Partition}.

    moe: router, gate_network, top_k, score_scale, moe_layers, gate_init_std... (num_experts, expert_sizes and
    residual_size are taken from the partitions). centroids: {layer: [E, H]} for gate_init="centroids".
    Router weights are drawn from a torch.Generator seeded with `seed`, layer by layer, so a layer's router does not
    depend on which other layers are converted.
    """
    cfg = moe_config_for(dense_cfg, partitions, moe)
    out = {}
    for k, v in dense_state.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "mlp" and cfg.moe_index(int(parts[1])) is not None:
            continue
        out[k] = v
    for i in range(cfg.num_layers):
        if cfg.moe_index(i) is None:
            continue
        pre = f"layers.{i}.mlp."
        try:
            g, u, d = (dense_state[f"{pre}{n}.weight"] for n in _MLP)
        except KeyError as e:
            raise ConfigError(f"dense_state: missing {e.args[0]}") from None
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        c = None if centroids is None else centroids.get(i)
        out.update(moe_layer_state(pre, g, u, d, partitions[i], cfg.moe, gate_init, c, gen))
    return cfg, out
