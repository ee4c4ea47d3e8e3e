"""SwiGLU experts of (possibly) uneven sizes, stored stacked: the local slice of a layer's experts.

Expert e computes y_e = down_e(silu(gate_e x) * up_e x) [* p per row, `probs`]. The weights of the E_local experts
this rank holds live in two parameters (what DDP, the optimizer and the GEMMs see):

    gate_up [E_local, 2 Fm, H]   rows 0:F_e = gate_e, rows Fm:Fm + F_e = up_e, zeros elsewhere
    down    [E_local, H, Fm]     columns 0:F_e = down_e, zeros elsewhere

Fm = the widest local expert (its width under expert-TP), rounded up to a multiple of 8 (16-byte rows for the grouped
GEMM). The zero padding is exact: a zero gate/up row gives g = u = 0, so h = silu(0) * 0 = 0 and a zero down column
adds nothing; its gradient is exactly zero too (du = dh * silu(0) = 0, dg = silu'(0) * dh * u = 0, d_down = dy^T h
= 0), so AdamW (with weight decay: 0 * wd = 0) keeps it zero and it adds nothing to the gradient norm.

Names stay per expert. `state_dict()` shows the experts as `{e}.gate_proj.weight [F_e, H]`, `{e}.up_proj.weight`,
`{e}.down_proj.weight [H, F_e]` under their GLOBAL index e (names do not change with the expert-parallel layout),
as views of the stacked parameters; `load_state_dict` takes those names (or the stacked ones). With
`keep_vars=True` the views carry what the checkpoint code reads (`allreduce = False`: reduced over the
expert-data-parallel group; `tensor_model_parallel = True`, `partition_dim` 0 for gate/up, 1 for down: the
expert-TP split). `sharded_factories(prefix)` gives megatron dist-checkpointing one factory per stacked parameter
that writes and reads the same per-expert keys, so checkpoints (and optimizer states) from before the stacked layout
load unchanged. `experts[e]` is a view object with `.gate_proj.weight` etc. that can also be called on rows.

Under expert tensor parallelism (etp > 1) each expert's intermediate neurons are split across the etp ranks (gate/up
by rows, down by columns) and the dispatcher sums the partial outputs.

Backends (MEGAMOE_EXPERTS_BACKEND=grouped_mm|loop|te, or `Experts(backend=...)`; unset: the fastest correct one for
the device and dtype; one log line on `megamoe.moe.experts` says which runs):
  grouped_mm  torch.nn.functional.grouped_mm: one grouped GEMM per projection (2 in the forward, 4 in the backward)
              over the stacked weights, the per-expert row offsets on the device (no host read). CUTLASS on
              Hopper (bf16), a per-group loop in C++ on CPU (fp32/bf16/fp16). Needs 16-byte row strides (H * itemsize
              a multiple of 16); its own backward here (torch's CPU autograd formula for it fails in 2.13).
              Default on CUDA (bf16) and for fp32 on CPU.
  loop        one torch.mm per expert and projection over slices of the stacked weights (gate and up in one GEMM),
              one autograd node for all experts; counts on the host. Any dtype (fp64 too); the CPU default for
              bf16/fp16 (rows padded for oneDNN), fp64, and where grouped_mm cannot run.
  te          transformer-engine's GroupedLinear (cuBLAS grouped GEMM) run on views of the stacked weights; only
              where transformer_engine imports (a GPU). Unverified: no machine with TE has run it yet.
  dense       every local expert on every token, weighted by its routing weight (0 where the token is not routed
              there): y = (silu(x G^T) * (x U^T) * w_neuron) D^T with G, U, D every expert's neurons side by side
              (padding dropped), two GEMMs on the tokens themselves and no dispatch. E/k times the experts' FLOPs,
              but a few large GEMMs instead of E small ones on k-times-replicated rows and no permute/unpermute:
              the CPU default for fine-grained experts (DENSE_CPU_RULE; tools/bench_moe_layer.py --experts-backend
              measures it). Runs through `forward_dense(x, combine)`, which MoELayer calls when every expert is on
              this rank (EP = expert-TP = 1); anywhere else it is not available.
  `forward_reference` is the plain per-expert computation (F.linear on the views), what the backends are tested
  against.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.ops import _ext

logger = logging.getLogger(__name__)

BACKENDS = ("grouped_mm", "loop", "te", "dense")
ENV_VAR = "MEGAMOE_EXPERTS_BACKEND"
ALIGN = 8                     # Fm is a multiple of this many elements (16-byte rows at 2 bytes, 32 at 4)
PROJ = ("gate_proj", "up_proj", "down_proj")

# the CPU default per dtype, measured with tools/bench_train.py --experts-backend loop,grouped_mm (interleaved, same
# weights and losses; docs/benchmarks.md): fp32 grouped_mm 1.39-1.57x the loop's step rate; bf16 0.68x (the loop pads
# rows to a few shapes for oneDNN's per-shape half-precision kernels, torch's CPU grouped_mm cannot)
CPU_DEFAULT = {torch.float32: "grouped_mm", torch.bfloat16: "loop", torch.float16: "loop"}
# ... unless the experts are fine-grained: on a CPU the dense backend runs for at least MIN_EXPERTS local experts of
# at most MAX_WIDTH neurons on average when a token uses at least 1/MAX_RATIO of them (it computes E/k times the
# experts' FLOPs). Measured per MoE layer, forward + backward, 512 tokens, H 576 (tools/bench_moe_layer.py;
# docs/benchmarks.md): 128 experts of 12, top-32: dense 85 ms vs grouped_mm 109 (fp32), 31 vs 75 (bf16); 64 of 24,
# top-16: dense 76 vs 43 (fp32), 36 vs 36 (bf16); 16 of 96, top-4: dense 3.4x slower than grouped_mm.
DENSE_CPU_RULE = SimpleNamespace(MIN_EXPERTS=32, MAX_WIDTH=16, MAX_RATIO=4)


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_unsupported(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Why torch's grouped_mm cannot run the experts on x [N, H] and a stacked weight ('' if it can)."""
    if _grouped_mm_fn() is None:
        return f"torch {torch.__version__} has no grouped_mm"
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16:
            return f"grouped_mm on CUDA takes bf16, got {x.dtype}"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "grouped_mm on CUDA needs sm80 or newer"
    elif x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"grouped_mm on CPU takes fp32/bf16/fp16, got {x.dtype}"
    else:
        return f"no grouped_mm for device type {x.device.type!r}"
    if weight.dtype != x.dtype:
        return f"weights are {weight.dtype}, input {x.dtype}"
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return "under torch.compile: torch's meta kernel of grouped_mm takes bf16 only"
    if (x.shape[1] * x.element_size()) % 16:
        return f"hidden size {x.shape[1]} x {x.element_size()} bytes is not a multiple of 16 bytes"
    return ""


def te_unavailable() -> str:
    try:  # optional dependency (GPU machines with transformer-engine)
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"transformer_engine does not import ({type(exc).__name__}: {exc})"[:200]
    return ""


class Experts(nn.Module):
    """The experts this rank holds. `forward(x, tokens_per_expert, probs=None)` runs them on consecutive row blocks
    of x (in `local_ids` order); `tokens_per_expert` is a list of ints or an int tensor [E_local] on x's device."""

    def __init__(self, hidden: int, sizes: list[int], local_ids: list[int], etp: int = 1, std: float = 0.02,
                 num_layers: int = 1, dtype=torch.float32, backend: str | None = None):
        super().__init__()
        self.hidden, self.sizes, self.local_ids, self.etp = hidden, list(sizes), list(local_ids), etp
        for e in self.local_ids:
            if sizes[e] % etp:
                raise ValueError(f"expert {e}: width {sizes[e]} is not divisible by expert-TP {etp}")
        self.widths = [sizes[e] // etp for e in self.local_ids]     # local widths F_e
        self.fmax = -(-max(self.widths, default=0) // ALIGN) * ALIGN
        self.backend = backend
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"experts backend must be one of {BACKENDS}, got {backend!r}")
        E, H, Fm = len(self.local_ids), hidden, self.fmax
        self.gate_up = nn.Parameter(torch.zeros(E, 2 * Fm, H, dtype=dtype))
        self.down = nn.Parameter(torch.zeros(E, H, Fm, dtype=dtype))
        self._tag_parameters()
        self._init_like_per_expert_linears(std, std / math.sqrt(2 * num_layers))
        self._register_state_dict_hook(_per_expert_state_dict)
        self._register_load_state_dict_pre_hook(_load_per_expert, with_module=True)
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._tag_parameters())

    def _tag_parameters(self):
        """The attributes megatron's DDP / optimizer / grad norm read (again after a load with assign=True)."""
        for p in (self.gate_up, self.down):
            p.allreduce = False       # megatron DDP: reduce over the expert-data-parallel group
            # partitioned over expert-TP (like megatron's expert linears, even at etp = 1): megatron's grad norm then
            # counts expert grads on every TP rank instead of dropping them as "TP duplicates" on tp rank > 0
            p.tensor_model_parallel = True
            p.partition_dim = 1 if p is self.gate_up else 2
            p.partition_stride = 1

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, local_ids={self.local_ids}, widths={self.widths}, fmax={self.fmax}, "
                f"etp={self.etp}, backend={self.backend or 'auto'}")

    @torch.no_grad()
    def _init_like_per_expert_linears(self, std: float, out_std: float):
        """normal(0, std) for gate/up, normal(0, out_std) for down, drawn from the RNG in exactly the order (and with
        the same draws) as the former one-nn.Linear-per-projection modules: a seeded model is bit-identical to one
        built before the stacked layout."""
        H, dt = self.hidden, self.gate_up.dtype
        for i, f in enumerate(self.widths):
            for shape in ((f, H), (f, H), (H, f)):          # nn.Linear's kaiming_uniform_ draws, then discarded
                torch.empty(shape, dtype=dt).uniform_()
            g, u, d = self.views(i)
            for view, s in ((g, std), (u, std), (d, out_std)):
                view.copy_(torch.empty(view.shape, dtype=dt).normal_(std=s))

    # ---- per-expert views ------------------------------------------------------------------------------------
    def views(self, i: int, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None):
        """(gate [F, H], up [F, H], down [H, F]) of local expert i as views of the stacked tensors."""
        gu = self.gate_up if gate_up is None else gate_up
        dn = self.down if down is None else down
        f, Fm = self.widths[i], self.fmax
        return gu[i, :f], gu[i, Fm:Fm + f], dn[i, :, :f]

    def __getitem__(self, e: int) -> "ExpertView":
        if e not in self.local_ids:
            raise KeyError(f"expert {e} is not on this rank (local experts {self.local_ids})")
        return ExpertView(self, self.local_ids.index(e))

    def __len__(self) -> int:
        return len(self.local_ids)

    # ---- compute ---------------------------------------------------------------------------------------------
    def select_backend(self, x: torch.Tensor, top_k: int | None = None) -> str:
        """The backend that runs for x: Experts(backend=...), else MEGAMOE_EXPERTS_BACKEND, else the default for the
        device/dtype (CUDA bf16: grouped_mm; CPU: dense for fine-grained experts (DENSE_CPU_RULE), else CPU_DEFAULT;
        else loop). `top_k`: the experts a token uses, given by a caller that can run the dense backend
        (`forward_dense`); None: it cannot. A forced backend that cannot run raises."""
        forced = self.backend or _ext.forced_backend(ENV_VAR, BACKENDS, logger, "experts")
        if forced:
            why = self._unsupported(forced, x, top_k)
            if why:
                raise ValueError(f"experts backend {forced!r} cannot run here: {why}")
            _ext.log_backend_once(logger, "experts", forced, "forced" + ("" if self.backend else f" by {ENV_VAR}"))
            return forced
        if x.device.type == "cuda":
            want = "grouped_mm"
        elif self.dense_by_default(top_k):
            _ext.log_backend_once(logger, "experts", "dense", f"all {len(self.local_ids)} experts on every token in "
                                  f"two GEMMs (fine-grained: {sum(self.widths) / len(self.widths):g} neurons each, "
                                  f"top-{top_k}), the CPU default for such experts")
            return "dense"
        else:
            want = CPU_DEFAULT.get(x.dtype, "loop")
        why = self._unsupported(want, x) if want != "loop" else ""
        if why:
            _ext.log_backend_once(logger, "experts", "loop", f"per-expert GEMMs; {want} unavailable: {why}")
            return "loop"
        detail = {"grouped_mm": "torch grouped_mm, one grouped GEMM per projection",
                  "loop": f"per-expert GEMMs over the stacked weights, the {x.device.type} default for {x.dtype}"}
        _ext.log_backend_once(logger, "experts", want, detail[want])
        return want

    def dense_by_default(self, top_k: int | None) -> bool:
        """DENSE_CPU_RULE: many fine-grained experts (>= MIN_EXPERTS, mean width <= MAX_WIDTH) of which a token uses
        at least 1/MAX_RATIO."""
        if top_k is None or not self.local_ids or self.etp != 1:
            return False
        E, mean_width = len(self.local_ids), sum(self.widths) / len(self.widths)
        r = DENSE_CPU_RULE
        return E >= r.MIN_EXPERTS and mean_width <= r.MAX_WIDTH and E <= r.MAX_RATIO * top_k

    def _unsupported(self, backend: str, x: torch.Tensor, top_k: int | None = None) -> str:
        if backend == "dense":
            if top_k is None:
                return ("the dense backend runs every expert on the tokens themselves: it needs every expert on this "
                        "rank (expert parallelism and expert-TP 1) and is called by MoELayer, not on dispatched rows")
            return ""
        if backend == "grouped_mm":
            return grouped_mm_unsupported(x, self.gate_up)
        if backend == "te":
            if x.device.type != "cuda":
                return "transformer-engine needs CUDA tensors"
            return te_unavailable()
        return ""

    def forward(self, x: torch.Tensor, tokens_per_expert, probs: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, H], rows grouped by local expert in `local_ids` order with the given counts -> [N, H].
        probs: optional [N] weight of each row, applied to the activation (y = down(silu(g) * u * p))."""
        if not self.local_ids:
            return x.new_zeros(x.shape)
        backend = self.select_backend(x)
        if backend == "grouped_mm":
            offs = _offsets(tokens_per_expert, x)
            return _GroupedMMSwiGLU.apply(x, offs, self.gate_up, self.down, probs)
        counts = _host_counts(tokens_per_expert)     # the loop slices rows on the host (CPU: no sync)
        if sum(counts) != x.shape[0]:
            raise ValueError(f"experts: tokens_per_expert sums to {sum(counts)}, but the input has {x.shape[0]} rows")
        if backend == "te":
            return _te_swiglu(self, x, counts, probs)
        return _LoopSwiGLU.apply(x, counts, tuple(self.widths), self.gate_up, self.down, probs)

    def forward_dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """The dense backend: x [T, H] (the tokens, not dispatched), combine [T, E_local] (each token's weight for each
        local expert, 0 where it is not routed there) -> sum_e combine[:, e] * expert_e(x) [T, H].

            gu = x [G; U]^T            [T, 2 F]   G, U: every expert's gate / up rows, padding dropped (F = sum F_e)
            h = silu(g) * u * c        [T, F]     c: combine repeated over each expert's neurons
            y = h D^T                  [T, H]     D: every expert's down columns

        Plain autograd (index_select / matmul / elementwise): gradients reach the experts a token is routed to and,
        through combine, the router; a zero weight gives its expert exactly zero gradient from that token."""
        E = len(self.local_ids)
        if combine.shape != (x.shape[0], E):
            raise ValueError(f"experts.forward_dense: combine {tuple(combine.shape)} for {x.shape[0]} tokens and {E} "
                             "local experts")
        H, Fm = self.hidden, self.fmax
        rows, cols, owner = self._dense_index(x.device)
        w_gu = self.gate_up.reshape(E * 2 * Fm, H).index_select(0, rows)      # [G; U] [2F, H], no padding
        w_d = self.down.permute(1, 0, 2).reshape(H, E * Fm).index_select(1, cols)   # D [H, F]
        F_ = w_d.shape[1]
        gu = F.linear(x, w_gu.to(x.dtype))                                     # [T, 2F]
        c = combine.to(x.dtype).index_select(1, owner)                         # [T, F]
        h = F.silu(gu[:, :F_]) * gu[:, F_:] * c
        return F.linear(h, w_d.to(x.dtype))

    def _dense_index(self, device):
        """(rows of [G; U] in gate_up.reshape(E * 2 Fm, H): every gate row, then every up row, expert by expert;
        columns of D in down.permute(1, 0, 2).reshape(H, E * Fm); the expert owning each of the F neurons), cached."""
        key = (str(device),)
        cache = getattr(self, "_dense_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        Fm = self.fmax
        gate = [e * 2 * Fm + j for e, f in enumerate(self.widths) for j in range(f)]
        up = [e * 2 * Fm + Fm + j for e, f in enumerate(self.widths) for j in range(f)]
        cols = [e * Fm + j for e, f in enumerate(self.widths) for j in range(f)]
        owner = [e for e, f in enumerate(self.widths) for _ in range(f)]
        t = lambda v: torch.tensor(v, dtype=torch.long, device=device)   # noqa: E731
        out = (t(gate + up), t(cols), t(owner))
        self._dense_cache = (key, out)
        return out

    def forward_reference(self, x: torch.Tensor, tokens_per_expert, probs: torch.Tensor | None = None):
        """The plain per-expert computation (one F.linear per projection on the views): the tests' reference."""
        counts = _host_counts(tokens_per_expert)
        outs = [self[e](rows) for e, rows in zip(self.local_ids, x.split(counts))]
        y = torch.cat(outs) if outs else x.new_zeros(x.shape)
        return y if probs is None else y * probs.unsqueeze(-1).to(y.dtype)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def per_expert_names(self, prefix: str = "") -> list[str]:
        return [f"{prefix}{e}.{p}.weight" for e in self.local_ids for p in PROJ]

    def sharded_factories(self, prefix: str) -> dict:
        """{stacked parameter name: ShardedTensorFactory} for megatron dist-checkpointing (model and optimizer
        states): each factory writes/reads the per-expert tensors under their global names with the same sharding
        as per-expert parameters had (expert-TP: gate/up on dim 0, down on dim 1; replicas over expert-DP)."""
        # megatron is imported here, not at the top: the computation needs none of it, and importing it pulls in
        # triton, which must be imported after TRITON_INTERPRET is set in the gating tests (tests/triton_import.py)
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        edp_rank = ps.get_expert_data_parallel_rank()
        replica = edp_rank if etp > 1 else (etp_rank, edp_rank)
        return {prefix + "gate_up": ShardedTensorFactory(prefix + "gate_up", self.gate_up,
                                                         self._build_fn("gate_up", etp, etp_rank),
                                                         self._merge_fn("gate_up"), replica),
                prefix + "down": ShardedTensorFactory(prefix + "down", self.down, self._build_fn("down", etp, etp_rank),
                                                      self._merge_fn("down"), replica)}

    def _build_fn(self, which: str, etp: int, etp_rank: int):
        from megatron.core.dist_checkpointing import ShardedTensor  # see sharded_factories

        def build(key, data, replica_id, flattened_range):
            if flattened_range is not None:
                raise ValueError(f"{key}: flattened expert tensors are not supported")
            base = key[:-len(which)]                         # "...experts." (any optimizer prefix kept)
            out = {}
            for i, e in enumerate(self.local_ids):
                g, u, d = self.views(i, data if which == "gate_up" else None, data if which == "down" else None)
                parts = (("gate_proj", g, 0), ("up_proj", u, 0)) if which == "gate_up" else (("down_proj", d, 1),)
                for proj, t, axis in parts:
                    t = t if t.is_contiguous() else t.contiguous()
                    name = f"{base}{e}.{proj}.weight"
                    offsets = ((axis, etp_rank, etp),) if etp > 1 else ()
                    out[name] = ShardedTensor.from_rank_offsets(name, t.detach(), *offsets, replica_id=replica_id)
            return out
        return build

    def _merge_fn(self, which: str):
        def merge(loaded: dict):
            first = next(iter(loaded.values()))
            shape = self.gate_up.shape if which == "gate_up" else self.down.shape
            out = torch.zeros(shape, dtype=first.dtype, device=first.device)
            for i, e in enumerate(self.local_ids):
                g, u, d = self.views(i, out if which == "gate_up" else None, out if which == "down" else None)
                pieces = ((g, "gate_proj"), (u, "up_proj")) if which == "gate_up" else ((d, "down_proj"),)
                for view, proj in pieces:
                    src = next(v for k, v in loaded.items() if k.endswith(f".{e}.{proj}.weight"))
                    view.copy_(src)
            return out
        return merge


def per_expert_items(model: nn.Module, values: dict) -> dict:
    """{parameter name: tensor shaped like the parameter} (e.g. gradients, optimizer moments) -> the same keyed by
    state-dict names: each stacked expert tensor becomes per-expert views `{prefix}{e}.{gate,up,down}_proj.weight`
    (what a per-expert reference, `local_slice` or a checkpoint compares against); other entries unchanged."""
    out = dict(values)
    for prefix, sub in model.named_modules():
        if isinstance(sub, Experts):
            pre = prefix + "." if prefix else ""
            gu, dn = out.pop(pre + "gate_up", None), out.pop(pre + "down", None)
            if gu is None or dn is None:
                continue
            for i, e in enumerate(sub.local_ids):
                for proj, view in zip(PROJ, sub.views(i, gu, dn)):
                    out[f"{pre}{e}.{proj}.weight"] = view
    return out


class ExpertView:
    """`experts[e]`: expert e's weights as views of the stacked parameters (`.gate_proj.weight` [F, H],
    `.up_proj.weight`, `.down_proj.weight` [H, F]; in-place writes under no_grad reach the parameters) and its
    forward on rows x [n, H] -> [n, H] (gradients flow to the stacked parameters)."""

    def __init__(self, experts: Experts, i: int):
        self._experts, self._i = experts, i

    def _views(self):
        return self._experts.views(self._i)

    @property
    def gate_proj(self):
        return SimpleNamespace(weight=self._views()[0])

    @property
    def up_proj(self):
        return SimpleNamespace(weight=self._views()[1])

    @property
    def down_proj(self):
        return SimpleNamespace(weight=self._views()[2])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self._views()
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


# ---------------------------------------------------------------------------------------------------------------
# state-dict boundary: stacked parameters <-> per-expert names

def _per_expert_state_dict(module: Experts, state_dict, prefix, local_metadata):
    """state_dict hook: replace `gate_up` / `down` with per-expert views under the global expert index."""
    gu = state_dict.pop(prefix + "gate_up", None)
    dn = state_dict.pop(prefix + "down", None)
    if gu is None or dn is None:
        return
    for i, e in enumerate(module.local_ids):
        for proj, view in zip(PROJ, module.views(i, gu, dn)):
            view = view.detach()
            view.allreduce = False
            view.tensor_model_parallel = True
            view.partition_dim = 1 if proj == "down_proj" else 0
            view.partition_stride = 1
            view.stacked_expert_view = True       # covered by Experts.sharded_factories in dist checkpoints
            state_dict[f"{prefix}{e}.{proj}.weight"] = view


def _load_per_expert(module: Experts, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs):
    """load_state_dict pre-hook: per-expert tensors -> the stacked parameters. Experts whose tensors are absent keep
    their values and are reported missing under their per-expert names; other experts' tensors stay in the dict and
    are reported unexpected (by nn.Module), as with per-expert modules."""
    names = module.per_expert_names(prefix)
    present = [n for n in names if n in state_dict]
    for key in ("gate_up", "down"):
        if prefix + key in state_dict and present:
            error_msgs.append(f"{prefix}: both the stacked {key} and per-expert tensors were given")
            return
    if prefix + "gate_up" in state_dict or prefix + "down" in state_dict:
        return                                          # stacked tensors (e.g. merged by a dist-checkpoint factory)
    gu, dn = module.gate_up.detach().clone(), module.down.detach().clone()
    for i, e in enumerate(module.local_ids):
        for proj, view in zip(PROJ, module.views(i, gu, dn)):
            name = f"{prefix}{e}.{proj}.weight"
            if name not in state_dict:
                missing_keys.append(name)
                continue
            src = state_dict.pop(name)
            if tuple(src.shape) != tuple(view.shape):
                error_msgs.append(f"size mismatch for {name}: copying a param with shape {tuple(src.shape)}, the "
                                  f"model holds {tuple(view.shape)}")
                continue
            view.copy_(src)
    state_dict[prefix + "gate_up"], state_dict[prefix + "down"] = gu, dn


# ---------------------------------------------------------------------------------------------------------------
# counts and offsets

def _host_counts(tokens_per_expert) -> tuple[int, ...]:
    if torch.is_tensor(tokens_per_expert):
        return tuple(int(n) for n in tokens_per_expert.tolist())    # a host read (free on CPU)
    return tuple(int(n) for n in tokens_per_expert)


def _offsets(tokens_per_expert, x: torch.Tensor) -> torch.Tensor:
    """int32 end offsets [E] of the experts' row blocks, on x's device: cumsum of the counts (no host read when the
    counts are a device tensor)."""
    if torch.is_tensor(tokens_per_expert):
        # consistent with x by construction (the dispatcher); checking would cost a host read
        return torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
    counts = [int(n) for n in tokens_per_expert]
    if sum(counts) != x.shape[0]:
        raise ValueError(f"experts: tokens_per_expert sums to {sum(counts)}, but the input has {x.shape[0]} rows")
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x.device)


def _activation(gu: torch.Tensor, fm: int, probs):
    """h = silu(g) * u (* p) for gu = [g | u] [n, 2 Fm]."""
    h = F.silu(gu[:, :fm]) * gu[:, fm:]
    return h if probs is None else h * probs.unsqueeze(-1).to(h.dtype)


def _activation_backward(gu: torch.Tensor, fm: int, dh: torch.Tensor, probs):
    """Given dL/dh, return (dL/d[g | u] [n, 2 Fm], dL/dp [n] (at least fp32) or None).
    h = silu(g) u p: du = dh p silu(g), dg = dh p u silu'(g), dp = <silu(g) u, dh>."""
    g, u = gu[:, :fm], gu[:, fm:]
    sg = F.silu(g)
    dp = None
    if probs is not None:
        acc = torch.promote_types(dh.dtype, torch.float32)       # fp32 sums for half precision
        dp = (sg * u).to(acc).mul_(dh.to(acc)).sum(1)
        dh = dh * probs.unsqueeze(-1).to(dh.dtype)
    if torch.compiler.is_compiling():       # dynamo takes no out= into a strided view; the copy is fused away
        return torch.cat([torch.ops.aten.silu_backward(dh * u, g), dh * sg], dim=1), dp
    dgu = torch.empty_like(gu)              # eager: written in place, no concatenation copy
    torch.mul(dh, sg, out=dgu[:, fm:])
    torch.ops.aten.silu_backward.grad_input(dh * u, g, grad_input=dgu[:, :fm])
    return dgu, dp


def _probs_grad(dp, probs):
    return None if dp is None else dp.to(probs.dtype)


class _GroupedMMSwiGLU(torch.autograd.Function):
    """All local experts with torch's grouped GEMM. offs [E] int32 = end row of each expert's block (device).
    forward:  gu = x @ W_gu[e]^T (grouped), h = silu(g) * u (* p), y = h @ W_d[e]^T (grouped)
    backward: dh = dy @ W_d[e] (grouped), dW_d[e] = dy_e^T h_e (grouped, jagged K), d[g|u] from dh,
              dx = d[g|u] @ W_gu[e] (grouped), dW_gu[e] = d[g|u]_e^T x_e (grouped, jagged K)."""

    @staticmethod
    def forward(ctx, x, offs, w_gu, w_d, probs):
        gmm = _grouped_mm_fn()
        fm = w_d.shape[2]
        gu = gmm(x, w_gu.transpose(-2, -1), offs=offs)              # [N, 2 Fm]
        h = _activation(gu, fm, probs)
        y = gmm(h, w_d.transpose(-2, -1), offs=offs)                # [N, H]
        ctx.save_for_backward(x, offs, w_gu, w_d, gu, h, probs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offs, w_gu, w_d, gu, h, probs = ctx.saved_tensors
        gmm = _grouped_mm_fn()
        fm = w_d.shape[2]
        dy = dy.contiguous()
        dh = gmm(dy, w_d, offs=offs)                                # [N, Fm]
        d_wd = gmm(dy.t(), h, offs=offs)                            # [E, H, Fm]
        dgu, dp = _activation_backward(gu, fm, dh, probs)
        dx = gmm(dgu, w_gu, offs=offs) if ctx.needs_input_grad[0] else None
        d_wgu = gmm(dgu.t(), x, offs=offs)                          # [E, 2 Fm, H]
        return dx, None, d_wgu, d_wd, _probs_grad(dp, probs)


class _LoopSwiGLU(torch.autograd.Function):
    """All local experts in one autograd node, one GEMM per expert and projection: expert e (rows s:s+n of x,
    width f) computes gu = x_e [gate; up]^T (one GEMM on the stacked rows, or on a concatenated copy when f < Fm),
    h = silu(g) * u (* p), y_e = h down^T. Backward: dh = dy_e down, d_down = dy_e^T h, d[g, u] from dh,
    dx_e = d[g, u] [gate; up], d[gate; up] = d[g, u]^T x_e; gradients written into zero-padded stacked tensors."""

    @staticmethod
    def forward(ctx, x, counts, widths, w_gu, w_d, probs):
        rows = padded_counts(counts) if _pads_rows(x) else counts
        xp = _to_padded(x, counts, rows)
        pp = None if probs is None else _to_padded(probs.unsqueeze(-1), counts, rows)[:, 0]
        fm = w_d.shape[2]
        y = torch.empty_like(xp)
        gus, hs = [], []
        s = 0
        for e, (n, f) in enumerate(zip(rows, widths)):
            gu = torch.mm(xp[s:s + n], _gate_up(w_gu, e, f, fm).t())      # [n, 2f]
            h = _activation(gu, f, None if pp is None else pp[s:s + n])
            torch.mm(h, w_d[e, :, :f].t(), out=y[s:s + n])
            gus.append(gu), hs.append(h)
            s += n
        ctx.counts, ctx.rows, ctx.widths = counts, rows, widths
        ctx.save_for_backward(xp, w_gu, w_d, pp, *gus, *hs)
        return _from_padded(y, counts, rows)

    @staticmethod
    def backward(ctx, dy):
        counts, rows, widths = ctx.counts, ctx.rows, ctx.widths
        E = len(counts)
        x, w_gu, w_d, pp, *rest = ctx.saved_tensors
        gus, hs = rest[:E], rest[E:]
        fm = w_d.shape[2]
        dy = _to_padded(dy.contiguous(), counts, rows)       # padding rows of dy are zero: they add nothing below
        dx = torch.empty_like(x)
        d_wgu, d_wd = torch.zeros_like(w_gu), torch.zeros_like(w_d)
        dps = []
        s = 0
        for e, (n, f) in enumerate(zip(rows, widths)):
            xe, dye, gu, h = x[s:s + n], dy[s:s + n], gus[e], hs[e]
            dh = torch.mm(dye, w_d[e, :, :f])                                 # [n, f]
            torch.mm(dye.t(), h, out=d_wd[e, :, :f])                          # [H, f]
            dgu, dp = _activation_backward(gu, f, dh, None if pp is None else pp[s:s + n])
            dps.append(dp)
            torch.mm(dgu, _gate_up(w_gu, e, f, fm), out=dx[s:s + n])
            d = torch.mm(dgu.t(), xe)                                         # [2f, H]
            d_wgu[e, :f], d_wgu[e, fm:fm + f] = d[:f], d[f:]
            s += n
        dp = None
        if pp is not None:
            dp = _from_padded(torch.cat(dps).unsqueeze(-1), counts, rows)[:, 0]
        return _from_padded(dx, counts, rows), None, None, d_wgu, d_wd, dp if dp is None else dp.to(pp.dtype)


def _gate_up(w_gu, e, f, fm):
    """[gate_e; up_e] [2f, H]: a view of the stacked rows when f == Fm, else a concatenated copy."""
    return w_gu[e] if f == fm else torch.cat([w_gu[e, :f], w_gu[e, fm:fm + f]])


# ---------------------------------------------------------------------------------------------------------------
# transformer-engine GroupedLinear (optional; GPU machines with transformer_engine installed)

_TE_CACHE: dict = {}


def _te_linear(num_gemms, in_f, out_f, dtype, device):
    """A TE GroupedLinear without weights of its own (they are set per call to views of our stacked parameters)."""
    key = (num_gemms, in_f, out_f, dtype, str(device))
    if key not in _TE_CACHE:
        import transformer_engine.pytorch as te  # optional dependency, checked by te_unavailable()
        lin = te.GroupedLinear(num_gemms, in_f, out_f, bias=False, params_dtype=dtype, device=device)
        for i in range(num_gemms):
            lin._parameters[f"weight{i}"] = None      # its own weights are never used: free them
        _TE_CACHE[key] = lin
    return _TE_CACHE[key]


def _te_call(lin, x, counts, weights):
    saved = {f"weight{i}": lin._parameters[f"weight{i}"] for i in range(len(weights))}
    try:
        for i, w in enumerate(weights):
            lin._parameters[f"weight{i}"] = w        # views: autograd reaches the stacked parameters
        return lin(x, list(counts))
    finally:
        lin._parameters.update(saved)


def _te_swiglu(experts: Experts, x, counts, probs):
    """y = down(silu(g) * u (* p)) with two TE GroupedLinear calls over the padded stacked weights."""
    E, H, fm = len(experts.local_ids), experts.hidden, experts.fmax
    gu = _te_call(_te_linear(E, H, 2 * fm, x.dtype, x.device), x, counts, list(experts.gate_up.unbind(0)))
    h = _activation(gu, fm, probs)
    return _te_call(_te_linear(E, fm, H, x.dtype, x.device), h, counts, list(experts.down.unbind(0)))


# ---------------------------------------------------------------------------------------------------------------
# Row padding for CPU half precision (loop backend). A CPU runs bf16/fp16 GEMMs through oneDNN, which builds
# (JIT-compiles) a kernel for every new shape: ~0.5 ms each, against ~0.2 ms for the GEMM of an expert with 512
# tokens. The token count of an expert changes every step, so every expert GEMM would pay it. Padding each expert's
# rows with zeros up to a bucket (at most 1/8 more rows) keeps the shapes to a few that oneDNN has cached. Zero rows
# give zero outputs and add nothing to the weight gradients, so the result is exactly the unpadded one. fp32 CPU
# GEMMs (MKL) and GPU GEMMs have no per-shape cost and run unpadded.

def _pads_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and \
        os.environ.get("MEGAMOE_EXPERTS_PAD_ROWS", "1") != "0"


def padded_counts(counts) -> tuple[int, ...]:
    """Each count rounded up to a multiple of max(16, 2^(floor(log2 n) - 3)): <= 12.5% padding, 8 sizes an octave."""
    out = []
    for n in counts:
        step = max(16, 1 << max(0, int(n).bit_length() - 4))
        out.append(-(-n // step) * step)
    return tuple(out)


def _to_padded(x: torch.Tensor, counts, rows) -> torch.Tensor:
    if rows == counts:
        return x
    xp = x.new_zeros((sum(rows), x.shape[1]))
    s = p = 0
    for n, r in zip(counts, rows):
        xp[p:p + n] = x[s:s + n]
        s, p = s + n, p + r
    return xp


def _from_padded(xp: torch.Tensor, counts, rows) -> torch.Tensor:
    if rows == counts:
        return xp
    starts = itertools.accumulate(rows[:-1], initial=0)
    return torch.cat([xp[p:p + n] for p, n in zip(starts, counts)])
