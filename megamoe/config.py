"""Configuration: dataclasses loadable from YAML, validated with errors that name the field.

One `ModelConfig` describes the decoder (its `moe` field, a `MoEConfig`, makes it a LLaMA-MoE); `ParallelConfig`
describes the layout. The training config (`megamoe/training/config.py`) nests these two. Every YAML file is read
by this module's one loader (`read_yaml`: `2e-4` is a number), with `a.b=value` overrides (`apply_overrides`).

    cfg = load_yaml("model.yaml", ModelConfig)      # or ModelConfig.from_dict(d)
    cfg.validate()                                 # raises ConfigError("moe.top_k: ...")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from megamoe.errors import ConfigError

ROUTERS = ("topk_noisy", "mixtral", "switch")
SCORE_ORDERS = ("topk_softmax", "softmax_topk_renorm", "softmax_topk")
DEFAULT_SCORE_ORDER = {"topk_noisy": "topk_softmax", "mixtral": "softmax_topk_renorm", "switch": "softmax_topk"}
GATE_NETWORKS = ("linear", "mlp")
DROP_POLICIES = ("zero", "input")
LOAD_ESTIMATES = ("shazeer", "llama_moe")
ROPE_TYPES = ("default", "linear", "llama3")
ATTN_MODES = ("token_sparse", "full_kv")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # ModelConfig.params_dtype


@dataclass
class MoEConfig:
    """The MoE part of a LLaMA-MoE model.

    Routers:
      topk_noisy  llama-moe v1 TopKBalancedNoisyGate: top-k of the gate logits (Gaussian noise with learned sigma in
                  training), softmax over the k, cv^2 balance loss on importance and load.
      mixtral     softmax over all experts, top-k, renormalise; switch-style aux loss; optional z-loss.
      switch      top-1 of the softmax with a capacity (token dropping); switch aux loss.
    Score orders (`score_order`; None: the router's own, in parentheses):
      topk_softmax         top-k of the logits, softmax over the k (topk_noisy: llama-moe v1)
      softmax_topk_renorm  softmax over all experts, top-k, renormalised over the k (mixtral)
      softmax_topk         softmax over all experts, top-k, no renormalisation: "pre-softmax" (switch). With top-1
                           the other two give every token the weight 1.0 exactly, so the router gets no gradient from
                           the LM loss (only from the balance loss); this one keeps the probability as the weight.
    Expert sizes: `expert_sizes` is None (equal split of the layer's routed FFN width), a list of E sizes for every
    layer, or a list (one per MoE layer) of lists of E sizes.
    """
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk_noisy"
    gate_network: str = "mlp"
    expert_sizes: list | None = None
    residual_size: int = 0                 # always-on shared expert (sharing-inter / v2 residual), FFN neurons
    score_scale: float | list = 1.0        # multiplies combine weights; a float or one per MoE layer
    noise: bool = True                     # topk_noisy: noise in training; switch: Gumbel noise in training
    noise_epsilon: float = 0.01
    load_estimate: str = "shazeer"         # topk_noisy in training: "shazeer" (noisy logits vs threshold) or
                                           # "llama_moe" (their quirk: pure noise term vs threshold)
    balance_loss_weight: float = 0.01      # topk_noisy cv^2 loss weight; mixtral/switch aux loss weight
    z_loss_weight: float = 0.0
    capacity_factor: float | None = None   # None: dropless. switch defaults to 1.25 when None
    drop_policy: str = "zero"              # a dropped (token, expert) slot contributes 0 or weight * its input
    moe_layers: list | None = None         # indices of MoE layers; None: every layer
    gate_init_std: float = 0.02
    score_order: str | None = None         # None: the router's own (above)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_layers is None or i in self.moe_layers

    def layer_scale(self, moe_index: int) -> float:
        s = self.score_scale
        return float(s[moe_index]) if isinstance(s, (list, tuple)) else float(s)

    def sizes_for(self, moe_index: int, routed_width: int) -> list[int]:
        """Per-expert sizes of the `moe_index`-th MoE layer (routed width = FFN width minus the residual)."""
        es = self.expert_sizes
        if es is None:
            return [routed_width // self.num_experts] * self.num_experts
        if es and isinstance(es[0], (list, tuple)):
            return [int(s) for s in es[moe_index]]
        return [int(s) for s in es]

    def effective_score_order(self) -> str:
        return self.score_order or DEFAULT_SCORE_ORDER[self.router]

    def router_gets_lm_gradient(self) -> bool:
        """False when every combine weight is the constant 1.0 (top-1 with a softmax over the selected expert only,
        or renormalised over it): the LM loss then gives the router no gradient."""
        return not (self.top_k == 1 and self.effective_score_order() != "softmax_topk")

    def effective_capacity_factor(self) -> float | None:
        if self.capacity_factor is None and self.router == "switch":
            return 1.25
        return self.capacity_factor


@dataclass
class AttnMoEConfig:
    """Attention experts (LLaMA-MoE v2): the query heads of each GQA group, with their KV head, become experts that a
    router picks per token (megamoe/moe/attention.py; docs/attention_moe.md).

    With n_kv KV heads and g = num_heads / n_kv query heads per KV head, `num_experts` A = n_kv * split for a
    `split` dividing g: expert e owns the g/split query heads [e*g/split, (e+1)*g/split) and a KV head of its own,
    which starts as a copy of KV head e // split (split > 1 duplicates a KV head into sibling experts).

    Router: Linear(H, A) on the attention input (the input_layernorm output), scores as `score_order`
    (MoEConfig's vocabulary; default LLaMA-MoE v2's softmax over all, top-k, renormalise), times `score_scale`:
        y = sum_{e in topk} score_scale * w_e * o_proj_e(Attn_e(x))
    Balance loss (with a gradient, unlike v2's, which is identically A): the switch aux loss
    balance_loss_weight * A * sum_e f_e * P_e for the softmax orders, the cv^2 loss of importance and load for
    topk_softmax (as MoEConfig's routers).

    mode:
      token_sparse  as released v2: a token attends only to earlier tokens routed to the same expert (each at its
                    absolute RoPE position); the KV cache holds each expert's routed tokens only.
      full_kv       (default) each expert's query heads see the K/V of every earlier token (its KV head is computed
                    for every token); only the query/output side is sparse (LLaMA-MoE v2 issue #1). Measured on
                    SmolLM2-135M (docs/attention_moe.md): 7x lower perplexity than token_sparse as converted, 1.9x
                    after the same 40 training steps. Exports to the v2 layout are then computed only by megamoe.
    """
    num_experts: int = 8                   # A = num_kv_heads * split
    top_k: int = 7
    score_scale: float = 1.0
    score_order: str = "softmax_topk_renorm"
    mode: str = "full_kv"                  # measured better than token_sparse before and after training
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    layers: list | None = None             # indices of layers with attention experts; None: every layer (as v2)
    gate_init_std: float = 0.02

    def is_layer(self, i: int) -> bool:
        return self.layers is None or i in self.layers

    def split(self, num_kv_heads: int) -> int:
        return self.num_experts // num_kv_heads

    def router_moe(self) -> MoEConfig:
        """The router's settings in MoEConfig's vocabulary (megamoe.moe.router.Router): a linear gate, no noise,
        the mixtral router (softmax orders) or the top-k-then-softmax one (topk_softmax)."""
        return MoEConfig(num_experts=self.num_experts, top_k=self.top_k,
                         router="topk_noisy" if self.score_order == "topk_softmax" else "mixtral",
                         gate_network="linear", score_scale=self.score_scale, noise=False,
                         balance_loss_weight=self.balance_loss_weight, z_loss_weight=self.z_loss_weight,
                         gate_init_std=self.gate_init_std, score_order=self.score_order)


@dataclass
class ModelConfig:
    """A LLaMA-architecture decoder; with `moe` set, a LLaMA-MoE."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008         # FFN width; for an MoE layer, sum of expert sizes + residual_size
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None        # None: = num_heads (MHA)
    head_dim: int | None = None            # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    moe: MoEConfig | None = None
    attn_moe: AttnMoEConfig | None = None  # attention experts (LLaMA-MoE v2); None: dense attention everywhere
    attention_backend: str = "auto"        # auto | sdpa | flash | te
    init_std: float = 0.02
    recompute: bool = False                # activation checkpointing of every decoder layer
    params_dtype: str = "float32"          # float32 | bfloat16 | float16
    # special token ids of the source checkpoint, carried to every export (None: unknown, read from the tokenizer
    # files beside the weights); not part of the architecture
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def moe_index(self, layer: int) -> int | None:
        """Position of `layer` among MoE layers, or None for a dense layer."""
        if self.moe is None or not self.moe.is_moe_layer(layer):
            return None
        if self.moe.moe_layers is None:
            return layer
        return sorted(self.moe.moe_layers).index(layer)

    def is_attn_moe_layer(self, layer: int) -> bool:
        return self.attn_moe is not None and self.attn_moe.is_layer(layer)

    def attn_kv_heads(self, layer: int) -> int:
        """KV heads of layer `layer`'s k/v projections: one per attention expert there, else num_kv_heads."""
        return self.attn_moe.num_experts if self.is_attn_moe_layer(layer) else self.kv_heads

    @property
    def num_attn_moe_layers(self) -> int:
        return sum(self.is_attn_moe_layer(i) for i in range(self.num_layers))

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_index(i) is not None for i in range(self.num_layers))

    def expert_sizes(self, layer: int) -> list[int]:
        mi = self.moe_index(layer)
        assert mi is not None, f"layer {layer} is dense"
        return self.moe.sizes_for(mi, self.intermediate_size - self.moe.residual_size)

    def validate(self) -> "ModelConfig":
        _positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"))
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ConfigError(f"num_kv_heads: {self.num_kv_heads} must be >= 1 and divide num_heads ({self.num_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads: {self.num_heads} does not divide hidden_size ({self.hidden_size}); "
                              "set head_dim explicitly")
        if self.dim_head % 2:
            raise ConfigError(f"head_dim: {self.dim_head} must be even for RoPE")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rt not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling.rope_type: {rt!r} is not one of {ROPE_TYPES}")
        if self.attention_backend not in ("auto", "sdpa", "flash", "te"):
            raise ConfigError(f"attention_backend: {self.attention_backend!r} is not one of auto, sdpa, flash, te")
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"params_dtype: {self.params_dtype!r} is not one of float32, bfloat16, float16")
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size
                                         for i in ids):
                raise ConfigError(f"{f}: {v!r} must be a token id in [0, vocab_size={self.vocab_size}) or null")
        if self.moe is not None:
            self._validate_moe()
        if self.attn_moe is not None:
            self._validate_attn_moe()
        return self

    def _validate_attn_moe(self):
        a, nkv, nh = self.attn_moe, self.kv_heads, self.num_heads
        g = nh // nkv
        if not isinstance(a.num_experts, int) or a.num_experts < 1:
            raise ConfigError(f"attn_moe.num_experts: {a.num_experts!r} must be a positive integer")
        if a.num_experts % nkv:
            raise ConfigError(f"attn_moe.num_experts: {a.num_experts} attention experts do not divide into the "
                              f"{nkv} KV heads x split: each attention expert owns exactly one KV head, so the "
                              f"count must be num_kv_heads x split (split dividing the {g} query heads per KV "
                              f"head): one of {[nkv * s for s in range(1, g + 1) if g % s == 0]}")
        split = a.num_experts // nkv
        if split > 1 and g == 1:
            raise ConfigError(f"attn_moe.num_experts: {a.num_experts} asks for split {split}, but the model is not "
                              f"GQA (num_heads {nh} = num_kv_heads {nkv}: one query head per KV head, nothing to "
                              f"split); use attn_moe.num_experts {nkv}")
        if g % split:
            raise ConfigError(f"attn_moe.num_experts: {a.num_experts} = {nkv} KV heads x split {split}, but split "
                              f"must divide the {g} query heads of each KV head (num_heads {nh} / num_kv_heads "
                              f"{nkv}); choose one of {[nkv * s for s in range(1, g + 1) if g % s == 0]}")
        if not 1 <= a.top_k <= a.num_experts:
            raise ConfigError(f"attn_moe.top_k: {a.top_k} must be between 1 and attn_moe.num_experts "
                              f"({a.num_experts})")
        if a.score_order not in SCORE_ORDERS:
            raise ConfigError(f"attn_moe.score_order: {a.score_order!r} is not one of {SCORE_ORDERS}")
        if a.mode not in ATTN_MODES:
            raise ConfigError(f"attn_moe.mode: {a.mode!r} is not one of {ATTN_MODES}")
        if not a.score_scale > 0:
            raise ConfigError(f"attn_moe.score_scale: {a.score_scale} must be > 0")
        if a.layers is not None:
            bad = [i for i in a.layers if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"attn_moe.layers: {bad} are not layer indices in [0, {self.num_layers})")

    def _validate_moe(self):
        m = self.moe
        if m.num_experts < 1:
            raise ConfigError(f"moe.num_experts: {m.num_experts} must be >= 1")
        if not 1 <= m.top_k <= m.num_experts:
            raise ConfigError(f"moe.top_k: {m.top_k} must be between 1 and moe.num_experts ({m.num_experts})")
        if m.router not in ROUTERS:
            raise ConfigError(f"moe.router: {m.router!r} is not one of {ROUTERS}")
        if m.gate_network not in GATE_NETWORKS:
            raise ConfigError(f"moe.gate_network: unknown gate type {m.gate_network!r}; expected one of {GATE_NETWORKS}")
        if m.router == "switch" and m.top_k != 1:
            raise ConfigError(f"moe.top_k: the switch router is top-1, got {m.top_k}")
        if m.score_order is not None and m.score_order not in SCORE_ORDERS:
            raise ConfigError(f"moe.score_order: {m.score_order!r} is not one of {SCORE_ORDERS} (or null)")
        if m.router == "mixtral" and m.effective_score_order() == "topk_softmax":
            raise ConfigError("moe.score_order: the mixtral router's aux loss is defined on the softmax over all "
                              "experts: use softmax_topk_renorm (Mixtral) or softmax_topk (pre-softmax)")
        if m.router == "switch" and m.effective_score_order() != "softmax_topk":
            raise ConfigError(f"moe.score_order: the switch router weighs its expert by the raw probability "
                              f"(softmax_topk), got {m.score_order!r}")
        if m.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"moe.drop_policy: {m.drop_policy!r} is not one of {DROP_POLICIES}")
        if m.load_estimate not in LOAD_ESTIMATES:
            raise ConfigError(f"moe.load_estimate: {m.load_estimate!r} is not one of {LOAD_ESTIMATES}")
        if m.capacity_factor is not None and m.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor: {m.capacity_factor} must be > 0 (or null for dropless)")
        if not 0 <= m.residual_size < self.intermediate_size:
            raise ConfigError(f"moe.residual_size: {m.residual_size} must be in [0, intermediate_size)")
        if m.moe_layers is not None:
            bad = [i for i in m.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"moe.moe_layers: {bad} are not layer indices in [0, {self.num_layers})")
        n_moe = self.num_moe_layers
        if isinstance(m.score_scale, (list, tuple)) and len(m.score_scale) != n_moe:
            raise ConfigError(f"moe.score_scale: {len(m.score_scale)} values for {n_moe} MoE layers")
        routed = self.intermediate_size - m.residual_size
        es = m.expert_sizes
        if es is None:
            if routed % m.num_experts:
                raise ConfigError(f"moe.expert_sizes: null asks for an equal split, but num_experts ({m.num_experts}) "
                                  f"does not divide the routed FFN width ({routed}); give expert_sizes explicitly")
            return
        per_layer = es if es and isinstance(es[0], (list, tuple)) else [es] * n_moe
        if len(per_layer) != n_moe:
            raise ConfigError(f"moe.expert_sizes: {len(per_layer)} layers given for {n_moe} MoE layers")
        for li, sizes in enumerate(per_layer):
            if len(sizes) != m.num_experts:
                raise ConfigError(f"moe.expert_sizes[{li}]: {len(sizes)} sizes for {m.num_experts} experts")
            if any(int(s) < 1 for s in sizes):
                raise ConfigError(f"moe.expert_sizes[{li}]: every expert needs at least one neuron, got {sizes}")
            if sum(sizes) != routed:
                raise ConfigError(f"moe.expert_sizes[{li}]: sizes add up to {sum(sizes)}, but the routed FFN width "
                                  f"is intermediate_size - residual_size = {routed}")

    # ---- parameter counts (for summaries and MFU) ----
    def param_counts(self) -> dict:
        """Total and activated (per token) parameter counts, embeddings included."""
        H, d = self.hidden_size, self.dim_head
        attn = H * d * (2 * self.num_heads + 2 * self.kv_heads)
        emb = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        total = active = emb + H  # + final norm
        for i in range(self.num_layers):
            if self.is_attn_moe_layer(i):
                # attention experts: q/o heads of the k chosen experts; k/v of the k chosen (token_sparse) or of
                # every expert (full_kv: each expert's KV head is computed for every token); the router
                a = self.attn_moe
                qo, kv = 2 * H * d * self.num_heads, 2 * H * d * a.num_experts
                total += qo + kv + H * a.num_experts + 2 * H
                active += (qo * a.top_k // a.num_experts + (kv * a.top_k // a.num_experts if a.mode == "token_sparse"
                                                           else kv) + H * a.num_experts + 2 * H)
            else:
                total += attn + 2 * H
                active += attn + 2 * H
            mi = self.moe_index(i)
            if mi is None:
                total += 3 * H * self.intermediate_size
                active += 3 * H * self.intermediate_size
                continue
            sizes = self.expert_sizes(i)
            gate = H * self.moe.num_experts + (self.moe.num_experts ** 2 if self.moe.gate_network == "mlp" else 0)
            gate += H * self.moe.num_experts if self.moe.router == "topk_noisy" else 0
            shared = 3 * H * self.moe.residual_size
            total += 3 * H * sum(sizes) + gate + shared
            # activated: the k largest experts bound the per-token cost; equal sizes make it exact
            active += 3 * H * sum(sorted(sizes)[-self.moe.top_k:]) + gate + shared
        return {"total": total, "active": active}

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "ModelConfig":
        return from_dict(cls, d, where)


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size is derived: dp = world / (tp * pp * cp) for the dense parts; experts use
    their own grid ep * etp * edp = world / pp (megatron's parallel folding, within one pipeline stage).

    Pipeline (docs/parallel.md, "Pipeline parallelism"): `pp` stages, each rank holding `vpp` virtual stages
    (interleaved 1F1B when vpp > 1). The decoder layers are split over the pp * vpp virtual stages in execution order
    (virtual stage s = v * pp + pp_rank holds a contiguous block of layers): evenly by default, else `pp_layers` (one
    count per virtual stage) or megatron's `pp_first_stage_layers` / `pp_last_stage_layers` (the other stages split
    the rest evenly; with vpp > 1 each rank's count is split evenly over its virtual stages).
    Context parallelism (`cp`): each sequence split over cp ranks in 2 * cp load-balanced chunks (rank r holds chunks
    r and 2cp-1-r); attention runs as ring attention over the CP group (megamoe/parallel/context.py)."""
    tp: int = 1               # tensor parallel
    ep: int = 1               # expert parallel
    etp: int = 1              # expert tensor parallel
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    pp: int = 1               # pipeline parallel stages
    vpp: int = 1              # virtual pipeline stages per pipeline rank (interleaved schedule when > 1)
    pp_layers: list | None = None          # decoder layers per virtual stage, in execution order (pp * vpp counts)
    pp_first_stage_layers: int | None = None   # megatron's num_layers_in_first_pipeline_stage
    pp_last_stage_layers: int | None = None    # megatron's num_layers_in_last_pipeline_stage
    cp: int = 1               # context parallel: the sequence split over cp ranks

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.vpp

    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers of each virtual stage, in execution order (length pp * vpp); ConfigError naming the field
        when the layers do not split as asked."""
        pp, vpp, n = self.pp, self.vpp, self.virtual_stages
        if self.pp_layers is not None:
            counts = self.pp_layers
            if not isinstance(counts, (list, tuple)) or len(counts) != n or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise ConfigError(f"parallel.pp_layers: {counts!r} must list {n} layer counts, one per virtual "
                                  f"pipeline stage (pp {pp} x vpp {vpp}) in execution order")
            if sum(counts) != num_layers:
                raise ConfigError(f"parallel.pp_layers: {list(counts)} add up to {sum(counts)} layers, the model has "
                                  f"num_layers {num_layers}")
            if min(counts) < 1:
                raise ConfigError(f"parallel.pp_layers: {list(counts)}: every pipeline stage needs at least one layer")
            return [int(c) for c in counts]
        first, last = self.pp_first_stage_layers, self.pp_last_stage_layers
        if first is None and last is None:
            if num_layers % n:
                raise ConfigError(f"parallel.pp: num_layers {num_layers} do not split evenly over pp * vpp = {n} "
                                  f"pipeline stages; give parallel.pp_layers (one count per stage) or "
                                  f"parallel.pp_first_stage_layers / pp_last_stage_layers")
            return [num_layers // n] * n
        per_rank: list[int | None] = [None] * pp
        rest, free = num_layers, pp
        for name, val, idx in (("pp_first_stage_layers", first, 0), ("pp_last_stage_layers", last, pp - 1)):
            if val is None:
                continue
            if pp == 1:
                raise ConfigError(f"parallel.{name}: needs pp > 1")
            if val < 1:
                raise ConfigError(f"parallel.{name}: {val} must be >= 1")
            if val % vpp:
                raise ConfigError(f"parallel.{name}: {val} layers do not split over vpp = {vpp} virtual stages")
            per_rank[idx] = val
            rest, free = rest - val, free - 1
        if free == 0 and rest != 0 or free > 0 and (rest < free * vpp or rest % (free * vpp)):
            raise ConfigError(f"parallel.pp_first_stage_layers / pp_last_stage_layers: the remaining {rest} of "
                              f"num_layers {num_layers} do not split evenly over the other {free} pipeline stages "
                              f"x vpp {vpp}")
        per_rank = [c if c is not None else rest // free for c in per_rank]
        return [per_rank[r] // vpp for v in range(vpp) for r in range(pp)]

    def validate(self, model: ModelConfig | None = None, world_size: int | None = None,
                 batch: "BatchShape | None" = None) -> "ParallelConfig":
        for f in ("tp", "ep", "etp", "pp", "vpp", "cp"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"parallel.{f}: {v} must be >= 1")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel: needs tp > 1")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp: {self.vpp} virtual stages need pipeline parallelism (pp > 1)")
        if self.pp_layers is not None and (self.pp_first_stage_layers is not None
                                           or self.pp_last_stage_layers is not None):
            raise ConfigError("parallel.pp_layers: give either pp_layers or pp_first_stage_layers / "
                              "pp_last_stage_layers, not both")
        if world_size is not None:
            if world_size % self.tp:
                raise ConfigError(f"parallel.tp: {self.tp} does not divide the world size {world_size}")
            if world_size % (self.tp * self.pp):
                raise ConfigError(f"parallel.pp: tp*pp = {self.tp * self.pp} does not divide the world size "
                                  f"{world_size}")
            if world_size % (self.tp * self.pp * self.cp):
                raise ConfigError(f"parallel.cp: tp*pp*cp = {self.tp * self.pp * self.cp} does not divide the world "
                                  f"size {world_size}")
            stage_world = world_size // self.pp
            if stage_world % (self.ep * self.etp):
                where = f"the world size {world_size}" if self.pp == 1 else \
                    f"the {stage_world} ranks of one pipeline stage (world {world_size} / pp {self.pp})"
                raise ConfigError(f"parallel.ep: ep*etp = {self.ep * self.etp} does not divide {where}")
        if model is not None:
            self._validate_model(model)
        if batch is not None:
            self._validate_batch(batch, model, world_size)
        return self

    def _validate_model(self, model: ModelConfig) -> None:
        if model.num_heads % self.tp:
            raise ConfigError(f"parallel.tp: {self.tp} does not divide num_heads ({model.num_heads})")
        if model.kv_heads % self.tp:
            raise ConfigError(f"parallel.tp: {self.tp} does not divide num_kv_heads ({model.kv_heads})")
        if model.attn_moe is not None and model.attn_moe.num_experts % self.tp:
            raise ConfigError(f"parallel.tp: {self.tp} does not divide attn_moe.num_experts "
                              f"({model.attn_moe.num_experts}): attention experts partition over TP like heads")
        if model.vocab_size % self.tp:
            raise ConfigError(f"parallel.tp: {self.tp} does not divide vocab_size ({model.vocab_size})")
        if model.moe is not None:
            if model.moe.num_experts % self.ep:
                raise ConfigError(f"parallel.ep: {self.ep} does not divide moe.num_experts "
                                  f"({model.moe.num_experts})")
            for i in range(model.num_layers):
                if model.moe_index(i) is None:
                    continue
                bad = [s for s in model.expert_sizes(i) if s % self.etp]
                if bad:
                    raise ConfigError(f"parallel.etp: {self.etp} does not divide expert sizes {bad} of layer {i}")
            if model.moe.residual_size % self.tp:
                raise ConfigError(f"parallel.tp: {self.tp} does not divide moe.residual_size")
        if any(model.moe_index(i) is None for i in range(model.num_layers)) and model.intermediate_size % self.tp:
            raise ConfigError(f"parallel.tp: {self.tp} does not divide intermediate_size ({model.intermediate_size})")
        if self.pp > 1 or self.pp_layers is not None or self.pp_first_stage_layers is not None \
                or self.pp_last_stage_layers is not None:
            self.stage_layers(model.num_layers)
        if self.cp > 1 and model.attn_moe is not None:
            raise ConfigError(f"parallel.cp: attention experts (attn_moe, mode {model.attn_moe.mode}) do not run under "
                              "context parallelism: an expert's tokens would have to be exchanged around the CP ring "
                              "per expert; train them with cp 1 (tp / pp / ep split the model instead)")

    def _validate_batch(self, b: "BatchShape", model: ModelConfig | None, world_size: int | None) -> None:
        if self.cp > 1 and b.seq_len % (2 * self.cp):
            raise ConfigError(f"parallel.cp: data.seq_len {b.seq_len} does not split into 2 * cp = {2 * self.cp} "
                              f"equal chunks (context parallelism balances the causal work with 2 chunks per rank)")
        if self.sequence_parallel and (b.seq_len // self.cp) % self.tp:
            raise ConfigError(f"parallel.sequence_parallel: data.seq_len {b.seq_len} / cp {self.cp} does not split "
                              f"over tp {self.tp} ranks")
        if world_size is None or self.pp == 1:
            return
        dp = world_size // (self.tp * self.pp * self.cp)
        per_step = b.micro_batch_size * b.seq_len * dp
        if b.global_batch_tokens % per_step:
            return  # the training config reports this one (train.global_batch_tokens)
        m = b.global_batch_tokens // per_step
        if m < self.pp:
            raise ConfigError(f"train.global_batch_tokens: {m} micro-batch(es) per step on each data-parallel rank "
                              f"(global_batch_tokens {b.global_batch_tokens} / (micro_batch_size {b.micro_batch_size}"
                              f" x seq_len {b.seq_len} x dp {dp})) for parallel.pp {self.pp} stages: the 1F1B "
                              f"schedule needs at least one micro-batch per stage (megatron); raise "
                              f"train.global_batch_tokens or lower train.micro_batch_size")
        if self.vpp > 1 and m % self.pp:
            raise ConfigError(f"parallel.vpp: the interleaved schedule needs the micro-batches per step ({m}) to be "
                              f"a multiple of parallel.pp ({self.pp}) (megatron)")


@dataclass
class BatchShape:
    """What the parallel layout is checked against before a run: the sequence length, the micro-batch size and the
    tokens of one optimizer step (all ranks together)."""
    seq_len: int
    micro_batch_size: int
    global_batch_tokens: int


# ---------------------------------------------------------------------------------------------------------------
# generic dataclass <- dict with field-naming errors

def _positive(obj, names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{n}: {v!r} must be a positive integer")


def from_dict(cls, d: Any, where: str = ""):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field of {cls.__name__} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else k
        sub = _dataclass_in(hints[k])
        if sub is not None and isinstance(v, dict):
            v = from_dict(sub, v, path)
        kwargs[k] = _check_scalar(hints[k], v, path)
    return cls(**kwargs)


def _dataclass_in(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def _check_scalar(tp, v, path):
    """Light type check for scalars: catches `top_k: "two"` or `hidden_size: 4.5` with the field's name."""
    args = set(typing.get_args(tp)) or {tp}
    if v is None:
        if type(None) in args:
            return v
        raise ConfigError(f"{path}: null is not allowed")
    if int in args and isinstance(v, bool) and bool not in args:
        raise ConfigError(f"{path}: expected an integer, got {v!r}")
    if args <= {int, type(None)} and not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ConfigError(f"{path}: expected an integer, got {v!r}")
    if args <= {float, type(None)} and not isinstance(v, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {v!r}")
    if float in args and isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{path}: {v} is not finite")
        return float(v) if list not in args else v
    if args <= {bool, type(None)} and not isinstance(v, bool):
        raise ConfigError(f"{path}: expected true or false, got {v!r}")
    if args <= {str, type(None)} and not isinstance(v, str):
        raise ConfigError(f"{path}: expected a string, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------------------------
# YAML: the one loader of every config file (model configs, training configs, overrides)

class _Loader(yaml.SafeLoader):
    """safe_load, but `2e-4` is a float (YAML 1.1 wants `2.0e-4`, which nobody writes)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text_or_file):
    """yaml.safe_load with `2e-4` read as a number."""
    return yaml.load(text_or_file, Loader=_Loader)


def read_yaml(path: str) -> dict:
    """The mapping at the top of a YAML file; ConfigError naming the file when it is missing, invalid or not a
    mapping."""
    try:
        with open(path) as f:
            d = parse_yaml(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(d).__name__}")
    return d


def _parse_value(text: str):
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict; returns a new dict."""
    d = copy.deepcopy(d)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: an override is written key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"{key}: not a dotted field path")
        node = d
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: {p} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(text)
    return d


def load_yaml(path: str, cls):
    """A dataclass config (ModelConfig, TrainConfig, ...) from a YAML file; errors name the file and the field."""
    d = read_yaml(path)
    try:
        return from_dict(cls, d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
