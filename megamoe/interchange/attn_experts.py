"""Attention experts in `hf-to-moe` (LLaMA-MoE v2's construction): the GQA groups of a dense LLaMA become attention
experts, nothing is lost (q/o are the dense heads in order, each expert's KV head a copy of its group's), and a
router is added.

    attn = attn_moe_for(dense_cfg, where, num_experts=6, top_k=4, score_scale=None, mode="token_sparse")
    src.update(attn_layer_state(cfg, i, src, gate_init, generator))        # per layer, beside the MLP experts

The guard then checks the construct-then-check identity with every attention expert at weight 1 (megamoe's
interchange/forward.py): the dense model's logits, exactly.
"""

from __future__ import annotations

import torch

from megamoe.config import ATTN_MODES, AttnMoEConfig, ModelConfig
from megamoe.errors import ConfigError
from megamoe.formats.layout import expand_kv_heads

__all__ = ["check_attn_args", "attn_moe_for", "attn_layer_state"]


def check_attn_args(num_experts, top_k, score_scale, mode) -> None:
    """The flags' own ranges, before any file is read (flag names are the CLI's)."""
    if num_experts is None:
        if top_k is not None or score_scale is not None or mode is not None:
            raise ConfigError("--attn-top-k/--attn-scale/--attn-mode: give --attn-experts N to build attention experts")
        return
    for flag, v in (("--attn-experts", num_experts), ("--attn-top-k", top_k)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{flag}: {v!r} must be an integer >= 1")
    if top_k is not None and top_k > num_experts:
        raise ConfigError(f"--attn-top-k: {top_k} is more than the {num_experts} attention experts (--attn-experts)")
    if score_scale is not None and not score_scale > 0:
        raise ConfigError(f"--attn-scale: {score_scale!r} must be > 0")
    if mode is not None and mode not in ATTN_MODES:
        raise ConfigError(f"--attn-mode: {mode!r} is not one of {', '.join(ATTN_MODES)}")


def attn_moe_for(dense: ModelConfig, where: str, *, num_experts: int, top_k: int | None = None,
                 score_scale: float | None = None, mode: str | None = None,
                 score_order: str = "softmax_topk_renorm") -> AttnMoEConfig:
    """The AttnMoEConfig for the dense model `dense` (read from `where`), or a ConfigError that names the model's
    head layout: attention experts must be num_kv_heads x split with split dividing the query heads per KV head.
    top_k defaults to all experts but one (v2's top-7 of 8); the scale to k, which keeps each chosen expert at its
    dense weight under a uniform router (v2's AttnMoE-Top7-Scale1.0 gives each about 1/k of it: measured on SmolLM2
    with 6 of 9 experts, perplexity 40k-80k before training against 100-1800 at scale k; docs/attention_moe.md)."""
    nkv, nh = dense.kv_heads, dense.num_heads
    g = nh // nkv
    fits = [nkv * s for s in range(1, g + 1) if g % s == 0]
    layout = f"{where}: {nh} query heads / {nkv} KV heads"
    if num_experts % nkv:
        raise ConfigError(f"--attn-experts: {num_experts} does not divide into the KV heads x split ({layout}): each "
                          f"attention expert owns one KV head; choose one of {fits}")
    split = num_experts // nkv
    if split > 1 and g == 1:
        raise ConfigError(f"--attn-experts: {num_experts} asks for split {split} of each KV head, but the model is "
                          f"not GQA ({layout}: one query head per KV head); use --attn-experts {nkv}")
    if g % split:
        raise ConfigError(f"--attn-experts: {num_experts} = {nkv} KV heads x split {split}, but split must divide the "
                          f"{g} query heads of each KV head ({layout}); choose one of {fits}")
    k = top_k if top_k is not None else max(1, num_experts - 1)
    return AttnMoEConfig(num_experts=num_experts, top_k=k, score_scale=float(score_scale or k),
                         mode=mode or AttnMoEConfig.mode, score_order=score_order)


def attn_layer_state(cfg: ModelConfig, i: int, src: dict, gate_init: str, gen: torch.Generator) -> dict:
    """Layer i's attention-expert tensors from the dense ones in `src` (our names): k/v with each KV head copied into
    its `split` sibling experts, and the router (zeros: uniform; else normal(0, gate_init_std), seeded by `gen`)."""
    a = cfg.attn_moe
    split = a.split(cfg.kv_heads)
    p = f"layers.{i}.attn."
    out = {p + x: expand_kv_heads(src[p + x], cfg.kv_heads, split) for x in ("k_proj.weight", "v_proj.weight")}
    dt = src[p + "q_proj.weight"].dtype
    if gate_init == "zeros":
        gate = torch.zeros(a.num_experts, cfg.hidden_size, dtype=dt)
    else:
        gate = (torch.randn(a.num_experts, cfg.hidden_size, generator=gen) * a.gate_init_std).to(dt)
    out[p + "router.gate.weight"] = gate
    return out
