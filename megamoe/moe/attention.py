"""Attention experts (LLaMA-MoE v2): GQA head groups chosen per token by a router.

Parameters (the same names as dense attention, docs/architecture.md; `ModelConfig.attn_moe`, A experts, each with
g' = num_heads / A query heads and one KV head of its own, d = head_dim):

    attn.q_proj.weight   [A*g'*d, H]   expert e: rows [e*g'*d, (e+1)*g'*d)     (= the dense q_proj, heads in order)
    attn.k_proj.weight   [A*d, H]      expert e: rows [e*d, (e+1)*d)           (dense: KV head e // split, copied)
    attn.v_proj.weight   [A*d, H]      expert e: rows [e*d, (e+1)*d)
    attn.o_proj.weight   [H, A*g'*d]   expert e: columns [e*g'*d, (e+1)*g'*d)   (= the dense o_proj)
    attn.router.gate.weight [A, H]     the router (linear, no bias; replicated under TP)

Forward, per token t with router weights w_te (top-k of A, `AttnMoEConfig.score_order`, times the score scale):

    y_t = sum_{e in topk(t)} w_te * o_proj_e( softmax(q_e(t) K_e^T / sqrt(d) + mask_e(t)) V_e )

with q, k after RoPE at each token's absolute position. Which keys K_e / V_e expert e's query t sees:

    token_sparse  (as released v2) the tokens j routed to e with j allowed for t by the usual rule (same segment,
                  position <= t's; megamoe.layers.attention.attention_mask): tokens not routed to e do not exist for
                  e. Cache: `ExpertKVCache`, each expert's routed tokens only (v2's MoECache).
    full_kv       every token j allowed for t: expert e's KV head is computed for all tokens, only the queries (and
                  the output projection) are sparse. Cache: the plain `LayerKVCache` with A KV heads.

With every expert chosen and weight 1 this is dense GQA attention exactly (q/o are the dense heads, each expert's
KV head a copy of its group's): the construct-then-check identity.

Computation (the fast path, `AttentionMoE.forward`): per local expert, the tokens routed to it are gathered per
batch row into a compacted [B, L_e] block (in order; rows with fewer tokens padded with segment 0, which no real
token attends), only those tokens are projected (q, o; and k, v for token_sparse), attention runs on the block
under the mask rebuilt from the gathered positions and segments, and the weighted outputs are scattered back.
The plain reference (`attention_moe_reference`) computes every expert on every token under per-expert masks.

Tensor parallelism: experts partition over TP ranks like heads do (rank r holds experts [r*A/tp, (r+1)*A/tp):
q/k/v rows and o columns of the stacked tensors are exactly the column/row-parallel slices). Every rank routes all
tokens (under sequence parallelism each rank routes its own tokens and the weights are all-gathered), runs its
local experts, and the outputs are summed over TP as a row-parallel linear's are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tpar
from torch import nn

from megamoe.config import DTYPES, ModelConfig
from megamoe.layers.attention import AttentionContext, attention_mask, qkvo_projections
from megamoe.layers.kv_cache import LayerKVCache
from megamoe.layers.rope import apply_rope
from megamoe.moe.router import Router
from megamoe.parallel.collectives import make_stats_reducer

__all__ = ["AttentionMoE", "ExpertKVCache", "attention_moe_reference", "combine_weights", "compact"]


class ExpertKVCache(LayerKVCache):
    """One token_sparse attention-MoE layer's cache: per (local) expert e, the post-RoPE keys and values of the
    tokens routed to it, with their positions and segments (LLaMA-MoE v2's MoECache):

        experts[e] = (k [B, 1, n_e, d], v [B, 1, n_e, d], positions [B, n_e] int64, segments [B, n_e] int32)

    Rows are compacted independently; a row that routed fewer tokens to e than another in the same forward holds
    padding slots (segment 0, never attended by a real token) so that the rows stay aligned."""

    def __init__(self):
        super().__init__()
        self.experts: dict[int, tuple] = {}

    def __len__(self) -> int:
        return max((t[0].shape[2] for t in self.experts.values()), default=0)

    def update(self, k, v, positions=None, segments=None):
        raise TypeError("ExpertKVCache: use update_expert (token_sparse attention experts cache per expert)")

    def update_expert(self, e: int, k, v, positions, segments):
        """Append expert e's new entries; return everything it holds (k, v, positions, segments)."""
        old = self.experts.get(e)
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
            positions, segments = torch.cat([old[2], positions], dim=1), torch.cat([old[3], segments], dim=1)
        self.experts[e] = (k, v, positions, segments)
        return self.experts[e]

    def entries(self, e: int):
        return self.experts.get(e)

    def reorder(self, rows: torch.Tensor) -> None:
        self.experts = {e: tuple(t[rows] for t in ts) for e, ts in self.experts.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.experts.values() for t in ts[:2])


def combine_weights(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Routing [T, k] -> dense weights [T, A] (fp32, 0 where not chosen; differentiable) and the choice [T, A] bool."""
    dense = weights.new_zeros(weights.shape[0], num_experts).scatter(1, indices, weights)
    chosen = torch.zeros(weights.shape[0], num_experts, dtype=torch.bool, device=weights.device)
    chosen.scatter_(1, indices, True)
    return dense, chosen


def compact(chosen: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [B, S] bool -> (idx [B, L] int64: the chosen columns of each row in order, then other columns;
    valid [B, L] bool: the first n_b slots of row b), L = `length` >= every row's count."""
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :length]
    valid = torch.arange(length, device=chosen.device)[None, :] < chosen.sum(1, keepdim=True)
    return order, valid


class _CopyToTP(torch.autograd.Function):
    """Forward: identity (the tensor is replicated over TP). Backward: the gradient summed over TP. (megatron's
    copy_to_tensor_model_parallel_region all-reduces `grad.contiguous()` in place and returns the unreduced grad
    when it is strided, which the gathers here produce.)"""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad


def _per_token(t: torch.Tensor, B: int) -> torch.Tensor:
    """cos/sin [S, d] or [B, 1, S, d] -> [B, S, d]."""
    return t[None].expand(B, -1, -1) if t.dim() == 2 else t[:, 0]


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, S, C], idx [B, L] -> [B, L, C]."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


class AttentionMoE(nn.Module):
    """forward(x [S, B, H], cos, sin, ctx=None, cache=None) -> (y [S, B, H], RouterStats); see the module docstring.
    Under sequence parallelism x and y are this rank's slice of the sequence, as for `Attention`."""

    def __init__(self, cfg: ModelConfig, mp_cfg, layer_idx: int):
        super().__init__()
        a = cfg.attn_moe
        self.cfg, self.layer_idx, self.mode = cfg, layer_idx, a.mode
        self.tp = mp_cfg.tensor_model_parallel_size
        self.sp = mp_cfg.sequence_parallel
        self.num_experts, self.top_k = a.num_experts, a.top_k
        self.d = cfg.dim_head
        self.g = cfg.num_heads // a.num_experts                     # query heads per expert
        self.local = a.num_experts // self.tp
        self.first = ps.get_tensor_model_parallel_rank() * self.local
        H = cfg.hidden_size
        # one KV head per expert (module docstring: k/v rows [e*d, (e+1)*d))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = qkvo_projections(cfg, mp_cfg, a.num_experts)
        self.router = Router(a.router_moe(), H, a.score_scale, self.sp, DTYPES[cfg.params_dtype])
        self.router.noise = None   # the top-k-then-softmax order runs the topk_noisy router without its noise
        self.router.stats_reducer = make_stats_reducer(self.sp)

    # ---- tensor / sequence parallel plumbing (identities at TP 1) ----
    def _input(self, x):
        """This rank's view of the whole sequence, with the gradient summed over TP in the backward."""
        if self.tp == 1:
            return x
        if self.sp:
            return tpar.gather_from_sequence_parallel_region(x.contiguous())
        return _CopyToTP.apply(x)

    def _output(self, y):
        if self.tp == 1:
            return y
        y = y.contiguous()  # megatron's all-reduce works in place on `.contiguous()`: a strided y would stay unreduced
        if self.sp:
            return tpar.reduce_scatter_to_sequence_parallel_region(y)
        return tpar.reduce_from_tensor_model_parallel_region(y)

    def prepare_cache(self, cache: LayerKVCache | None) -> LayerKVCache | None:
        """The cache this layer needs: an `ExpertKVCache` for token_sparse (an empty plain one is replaced)."""
        if cache is None or self.mode != "token_sparse" or isinstance(cache, ExpertKVCache):
            return cache
        if len(cache):
            raise ValueError("AttentionMoE: a token_sparse layer needs an ExpertKVCache, got a filled LayerKVCache")
        return ExpertKVCache()

    def forward(self, x, cos, sin, ctx: AttentionContext | None = None, cache: LayerKVCache | None = None):
        S_loc, B, H = x.shape
        routing = self.router(x.reshape(-1, H))
        dense, chosen = combine_weights(routing.indices, routing.weights, self.num_experts)
        both = torch.cat([dense, chosen.to(dense.dtype)], dim=1)
        if self.tp > 1:   # every rank needs the weights of every token (its experts' columns)
            both = tpar.gather_from_sequence_parallel_region(both) if self.sp else _CopyToTP.apply(both)
        A, lo, hi = self.num_experts, self.first, self.first + self.local
        S = both.shape[0] // B
        w = both[:, lo:hi].view(S, B, self.local).transpose(0, 1)              # [B, S, A_loc] fp32
        sel = both[:, A + lo:A + hi].detach().view(S, B, self.local).transpose(0, 1) > 0.5
        xf = self._input(x)                                                     # [S, B, H]
        y = self._experts(xf, w, sel, cos, sin, ctx, cache)                     # [S, B, H]
        return self._output(y), routing.stats

    def _experts(self, xf, w, sel, cos, sin, ctx, cache):
        S, B, H = xf.shape
        d, g, dt = self.d, self.g, xf.dtype
        dev = xf.device
        half_cpu = not xf.is_cuda and dt in (torch.float16, torch.bfloat16)  # attention in fp32 on a CPU (as Attention)
        if ctx is None:
            pos = torch.arange(S, device=dev).expand(B, S)
            seg = torch.ones(B, S, dtype=torch.int32, device=dev)
            kpos, kseg = pos, seg
        else:
            pos, seg, kpos, kseg = ctx.positions, ctx.segments, ctx.key_positions, ctx.key_segments
        cos_b, sin_b = _per_token(cos, B), _per_token(sin, B)
        if half_cpu:
            cos_b, sin_b = cos_b.float(), sin_b.float()
        Wq, Wk, Wv, Wo = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight
        if self.mode == "full_kv":
            # every local expert's KV head for every token, as dense GQA with A_loc KV heads (and its cache)
            k_all = F.linear(xf, Wk).view(S, B, self.local, d).permute(1, 2, 0, 3)
            v_all = F.linear(xf, Wv).view(S, B, self.local, d).permute(1, 2, 0, 3)
            if half_cpu:
                k_all, v_all = k_all.float(), v_all.float()
            k_all = apply_rope(k_all, cos_b[:, None], sin_b[:, None])
            if cache is not None:
                k_all, v_all = cache.update(k_all, v_all, pos, seg)
        counts = sel.sum(1).max(0).values.tolist()                              # [A_loc]: the longest row per expert
        # every expert's compacted slots as rows of the flat [S*B] token axis (token (s, b) is row s*B + b), so that
        # one index_select gathers all experts' inputs and one index_add scatters all their outputs back
        experts, rows = [], []
        for e, L in enumerate(counts):
            if L:
                idx, valid = compact(sel[:, :, e], L)
                experts.append((e, L, idx, valid))
                rows.append((idx * B + torch.arange(B, device=dev)[:, None]).reshape(-1))
        if not experts:  # no local expert got a token: zeros, still connected to the weights (gradients defined)
            return xf * 0 + 0 * (Wq.sum() + Wk.sum() + Wv.sum() + Wo.sum())
        rows = torch.cat(rows)
        x_all = xf.reshape(S * B, -1).index_select(0, rows).split([B * L for _, L, _, _ in experts])
        contribs = []
        for (e, L, idx, valid), x_e in zip(experts, x_all):
            x_e = x_e.view(B, L, -1)                                             # [B, L, H]
            qs = slice(e * g * d, (e + 1) * g * d)
            q = F.linear(x_e, Wq[qs]).view(B, L, g, d).transpose(1, 2)           # [B, g, L, d]
            cos_e, sin_e = _gather_rows(cos_b, idx)[:, None], _gather_rows(sin_b, idx)[:, None]
            q = apply_rope(q.float() if half_cpu else q, cos_e, sin_e)
            qpos, qseg = pos.gather(1, idx), seg.gather(1, idx)
            if self.mode == "token_sparse":
                qseg = torch.where(valid, qseg, torch.zeros_like(qseg))   # padding slots: keys no one attends
                ks = slice(e * d, (e + 1) * d)
                k = F.linear(x_e, Wk[ks]).view(B, L, 1, d).transpose(1, 2)       # [B, 1, L, d]
                v = F.linear(x_e, Wv[ks]).view(B, L, 1, d).transpose(1, 2)
                if half_cpu:
                    k, v = k.float(), v.float()
                k = apply_rope(k, cos_e, sin_e)
                k_pos, k_seg = qpos, qseg
                if cache is not None:
                    k, v, k_pos, k_seg = cache.update_expert(self.first + e, k, v, qpos, qseg)
            else:
                k, v, k_pos, k_seg = k_all[:, e:e + 1], v_all[:, e:e + 1], kpos, kseg
            mask = attention_mask(qpos, qseg, k_pos, k_seg)                      # [B, 1, L, Lk]
            o = F.scaled_dot_product_attention(q, k.expand(-1, g, -1, -1), v.expand(-1, g, -1, -1), attn_mask=mask)
            o = o.to(dt).transpose(1, 2).reshape(B, L, g * d)
            we = w[:, :, e].gather(1, idx) * valid                               # [B, L] fp32, 0 on padding slots
            contribs.append((F.linear(o, Wo[:, qs]) * we[..., None].to(dt)).reshape(B * L, -1))
        out = torch.zeros(S * B, Wo.shape[0], dtype=dt, device=dev).index_add(0, rows, torch.cat(contribs))
        return out.view(S, B, -1)


@torch.no_grad()
def attention_moe_reference(x, wq, wk, wv, wo, weights, chosen, positions, segments, cos, sin, g: int, mode: str):
    """Plain reference: every expert on every token under its own mask, one (row, expert) at a time.

    x [B, S, H]; wq [A*g*d, H], wk/wv [A*d, H], wo [H, A*g*d]; weights/chosen [B, S, A]; positions/segments
    [B, S]; cos/sin [B, S, d]. token_sparse: query i of expert e sees key j iff j is chosen by e and allowed by the
    segment/position rule (and itself, for queries e did not choose: their output has weight 0)."""
    B, S, H = x.shape
    A = weights.shape[-1]
    d = wk.shape[0] // A
    y = torch.zeros(B, S, H, dtype=torch.float64)
    rot = lambda t: torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)  # noqa: E731
    for b in range(B):
        allowed = (segments[b][:, None] == segments[b][None, :]) & (positions[b][None, :] <= positions[b][:, None])
        for e in range(A):
            xe = x[b].double()
            q = (xe @ wq[e * g * d:(e + 1) * g * d].double().T).view(S, g, d)
            k = xe @ wk[e * d:(e + 1) * d].double().T
            v = xe @ wv[e * d:(e + 1) * d].double().T
            c, s_ = cos[b].double(), sin[b].double()
            q = q * c[:, None] + rot(q) * s_[:, None]
            k = k * c + rot(k) * s_
            m = allowed.clone()
            if mode == "token_sparse":
                m &= chosen[b, :, e][None, :]
                m |= torch.eye(S, dtype=torch.bool)
            att = torch.einsum("igd,jd->gij", q, k) / math.sqrt(d)
            att = att.masked_fill(~m[None], float("-inf")).softmax(-1)
            o = torch.einsum("gij,jd->igd", att, v).reshape(S, g * d)
            y[b] += (o @ wo[:, e * g * d:(e + 1) * g * d].double().T) * weights[b, :, e, None].double()
    return y

