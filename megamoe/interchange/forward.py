"""A plain-torch LLaMA / LLaMA-MoE forward over *our* parameter names, streaming one layer at a time.

It is the conversion guard's yardstick: after writing a checkpoint, the converter runs this on a few tokens from
the source and from the written files and refuses to report success when the logits differ. It reads weights
through an accessor (`get(name) -> Tensor`), so a 7B checkpoint is evaluated with one layer in memory, and it
computes in fp32 whatever the stored dtype.

    logits = reference_logits(cfg, get, ids)                       # the model's real routing (eval: no noise)
    logits = reference_logits(cfg, get, ids, all_experts=True)     # every expert weight 1: the dense identity

Routing at eval, per `cfg.moe.router`:
    topk_noisy  top-k of the gate logits, softmax over the k (llama-moe v1 TopKBalancedNoisyGate without noise)
    mixtral     softmax over all E, top-k, renormalise (equal to topk_noisy's weights, as a function of the logits)
    switch      top-1 of the softmax, weight = that probability (capacity dropping is not modelled)
then weights x score_scale, y = sum_k w_k expert_k(x) (+ shared(x), always on).
Attention experts (cfg.attn_moe): every expert on every token under its own mask (token_sparse: only the keys
routed to it; full_kv: all), its heads weighted by the combine weight (`Forward._attention_experts`).
`all_experts=True` replaces routing by weight 1 for every expert: with score scale E and a uniform router this is
what the construct-then-check identity evaluates; for a disjoint partition covering every neuron it equals the
dense FFN exactly (up to float summation order).

Tested against transformers' LlamaForCausalLM and MixtralForCausalLM (tests/test_interchange.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig
from megamoe.layers.rope import rope_inv_freq  # the model's own RoPE table (default, linear, llama3)


class SplitWeight:
    """A weight stored as pieces along `dim` (e.g. the TP parts of a shard, each memory-mapped): `_lin` multiplies
    piece by piece, so the full matrix is never assembled."""

    def __init__(self, pieces, dim: int):
        self.pieces, self.dim = list(pieces), dim
        shape = list(self.pieces[0].shape)
        shape[dim] = sum(p.shape[dim] for p in self.pieces)
        self.shape = torch.Size(shape)
        self.dtype = self.pieces[0].dtype

    def float(self) -> torch.Tensor:
        return torch.cat([p.float() for p in self.pieces], dim=self.dim)


BLOCK_BYTES = 4 << 20  # fp32 bytes of weight converted per block: stays in cache (fastest of 0.25-16 MB here)


def _lin(x: torch.Tensor, w) -> torch.Tensor:
    """F.linear(x, w.float()) for a weight of any float dtype, without materialising w in fp32: a low-precision
    weight is converted block of rows by block into a small cached buffer and multiplied there (exact conversion,
    fp32 arithmetic: equal to F.linear on the fp32 weight up to summation order)."""
    if isinstance(w, SplitWeight):
        if w.dim == 0:
            return torch.cat([_lin(x, p) for p in w.pieces], dim=-1)
        out, a = None, 0
        for p in w.pieces:
            y = _lin(x[..., a:a + p.shape[1]], p)
            out = y if out is None else out + y
            a += p.shape[1]
        return out
    if w.dtype == torch.float32:
        return F.linear(x, w)
    N, K = w.shape
    x2 = x.reshape(-1, K)
    rows = max(1, BLOCK_BYTES // (4 * K))
    if rows >= N:
        return F.linear(x, w.float())
    out_t = torch.empty(N, x2.shape[0])
    xt = x2.t()

    def run(a, b):
        buf = torch.empty(min(rows, b - a), K)
        for i in range(a, b, rows):
            n = min(rows, b - i)
            torch.mm(buf[:n].copy_(w[i:i + n]), xt, out=out_t[i:i + n])

    pool, workers = _POOL
    parts = min(workers, N // (2 * rows))  # each part at least two blocks; 1 without a `threads` block
    if parts <= 1:
        run(0, N)
    else:  # contiguous, block-aligned row ranges on `parts` threads (torch releases the GIL; no OpenMP spin-waits)
        step = (N + parts - 1) // parts
        step = (step + rows - 1) // rows * rows
        futs = [pool.submit(run, a, min(a + step, N)) for a in range(step, N, step)]
        run(0, min(step, N))
        for f in futs:
            f.result()
    return out_t.t().reshape(*x.shape[:-1], N)


_POOL = [None, 1]  # (executor, workers including the calling thread) while a `threads` block is open


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def threads(n: int):
    """Within this block `_lin` splits each large matrix into up to `n` block-aligned row ranges: the calling
    thread takes the first, n - 1 helper threads the others. Every output element is computed by the same
    blocked loop whatever `n`, so the result does not depend on it (bit for bit)."""
    from concurrent.futures import ThreadPoolExecutor
    prev = list(_POOL)
    pool = ThreadPoolExecutor(n - 1, thread_name_prefix="megamoe-forward") if n > 1 else None
    _POOL[:] = [pool, max(1, n)]
    try:
        yield
    finally:
        _POOL[:] = prev
        if pool is not None:
            pool.shutdown(wait=True)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rot(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _swiglu(x, g, u, d):
    return _lin(F.silu(_lin(x, g)) * _lin(x, u), d)


class Forward:
    """The same forward, advanced one layer at a time, so that a converter can evaluate a model while it streams
    the weights through memory (each `layer(i, get)` only asks `get` for layer i's tensors).

        f = Forward(cfg, ids); f.embed(get); for i in range(L): f.layer(i, get); logits = f.head(get)
    """

    def __init__(self, cfg: ModelConfig, ids: torch.Tensor, all_experts: bool = False, partitions: dict | None = None,
                 row_modes: list | None = None):
        """partitions: {layer: Partition} evaluates each MoE layer from the *dense* FFN weights (names
        `layers.i.mlp.{gate,up,down}_proj.weight`) and the router: neuron j of the dense FFN gets the summed combine
        weight of the experts holding it (+1 when it is in the residual block). This is the converted model computed
        without cutting the expert tensors: the yardstick for the experts actually written.

        row_modes: one mode per batch row, so that several variants share one pass over the weights (each weight
        matrix is read once for all rows): "routed" (the real routing), "identity" (every expert weight 1; with
        partitions: every neuron weight 1, i.e. the dense FFN). Default: "identity" if all_experts else "routed"."""
        self.cfg, self.ids, self.all_experts = cfg, ids, all_experts
        B, S = ids.shape
        modes = row_modes or ["identity" if all_experts else "routed"] * B
        if len(modes) != B or any(m not in ("routed", "identity") for m in modes):
            raise ValueError(f"row_modes: {modes!r}: one of 'routed'/'identity' per batch row ({B})")
        self.identity_rows = torch.tensor([m == "identity" for m in modes]).repeat_interleave(S)  # token mask [B*S]
        self.masks = None
        if partitions is not None:
            self.masks = {}
            for i, part in partitions.items():
                member = torch.zeros(part.num_experts, part.ffn_width)
                for e, idx in enumerate(part.experts):
                    member[e, torch.as_tensor(idx, dtype=torch.long)] = 1.0
                res = torch.zeros(part.ffn_width)
                if part.residual:
                    res[torch.as_tensor(part.residual, dtype=torch.long)] = 1.0
                self.masks[i] = (member, res)
        S = ids.shape[1]
        ang = torch.outer(torch.arange(S, dtype=torch.float32), rope_inv_freq(cfg))
        self.cos, self.sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        self.x = None

    @torch.no_grad()
    def embed(self, get):
        self.x = _embed(get("embed.weight"), self.ids)

    @torch.no_grad()
    def layer(self, i: int, get):
        """`get(name)` may return weights in any float dtype (memory-mapped ones included) or SplitWeight pieces:
        they are used in fp32 without an fp32 copy of the whole matrix."""
        cfg, x = self.cfg, self.x
        w = get
        B, S = self.ids.shape
        H, nh, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_head
        p = f"layers.{i}."
        h = _rms(x, w(p + "attn_norm.weight").float(), cfg.rms_norm_eps)
        if cfg.is_attn_moe_layer(i):
            x = x + self._attention_experts(i, h, w)
        else:
            q = _lin(h, w(p + "attn.q_proj.weight")).view(B, S, nh, d).transpose(1, 2)
            k = _lin(h, w(p + "attn.k_proj.weight")).view(B, S, nkv, d).transpose(1, 2)
            v = _lin(h, w(p + "attn.v_proj.weight")).view(B, S, nkv, d).transpose(1, 2)
            q, k = q * self.cos + _rot(q) * self.sin, k * self.cos + _rot(k) * self.sin
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + _lin(a.transpose(1, 2).reshape(B, S, nh * d), w(p + "attn.o_proj.weight"))
        h = _rms(x, w(p + "mlp_norm.weight").float(), cfg.rms_norm_eps)
        mi = cfg.moe_index(i)
        if mi is None:
            x = x + _swiglu(h, w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight"),
                            w(p + "mlp.down_proj.weight"))
        elif self.masks is not None:
            h2 = h.reshape(-1, H)
            member, res = self.masks[i]
            m = router_weights(cfg, mi, p, w, h2) @ member + res
            m[self.identity_rows] = 1.0
            a = F.silu(_lin(h2, w(p + "mlp.gate_proj.weight"))) * _lin(h2, w(p + "mlp.up_proj.weight"))
            x = x + _lin(a * m, w(p + "mlp.down_proj.weight")).view(B, S, H)
        else:
            x = x + _moe(cfg, mi, p, w, h.reshape(-1, H), self.identity_rows).view(B, S, H)
        self.x = x

    def _attention_experts(self, i: int, h: torch.Tensor, w) -> torch.Tensor:
        """Attention experts (cfg.attn_moe) of layer i on the normed input h [B, S, H], every expert on every token
        under its own mask (token_sparse: the keys routed to it, and the query itself; full_kv: every key), heads
        weighted by their expert's combine weight (1 for every expert on identity rows). A dense source's k/v (one
        KV head per group: the conversion's source pass) are copied into the sibling experts."""
        cfg, a = self.cfg, self.cfg.attn_moe
        B, S, H = h.shape
        nh, nkv, d, A = cfg.num_heads, cfg.kv_heads, cfg.dim_head, a.num_experts
        g = nh // A
        p = f"layers.{i}.attn."
        q = _lin(h, w(p + "q_proj.weight")).view(B, S, nh, d).transpose(1, 2)
        k, v = _lin(h, w(p + "k_proj.weight")), _lin(h, w(p + "v_proj.weight"))
        if k.shape[-1] != A * d:   # dense source: KV head j -> experts j*split ... (j+1)*split - 1
            k, v = (t.view(B, S, nkv, d).repeat_interleave(A // nkv, 2) for t in (k, v))
        k, v = k.reshape(B, S, A, d).transpose(1, 2), v.reshape(B, S, A, d).transpose(1, 2)
        q, k = q * self.cos + _rot(q) * self.sin, k * self.cos + _rot(k) * self.sin
        weights, chosen = attn_router_weights(cfg, w(p + "router.gate.weight"), h.reshape(-1, H))
        weights[self.identity_rows], chosen[self.identity_rows] = 1.0, True
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        if a.mode == "token_sparse":   # [B, A, S, S]: key j of expert e exists iff j was routed to e
            mask = causal & chosen.view(B, 1, S, A).permute(0, 3, 1, 2) | torch.eye(S, dtype=torch.bool)
            mask = mask.repeat_interleave(g, 1)
        else:
            mask = causal
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
        o = o * weights.view(B, S, A).permute(0, 2, 1).repeat_interleave(g, 1)[..., None]
        return _lin(o.transpose(1, 2).reshape(B, S, nh * d), w(p + "o_proj.weight"))

    @torch.no_grad()
    def head(self, get) -> torch.Tensor:
        cfg = self.cfg
        x = _rms(self.x, get("norm.weight").float(), cfg.rms_norm_eps)
        head = get("embed.weight") if cfg.tie_word_embeddings else get("lm_head.weight")
        return _lin(x, head)


def _embed(table, ids: torch.Tensor) -> torch.Tensor:
    """F.embedding(ids, table.float()), converting only the looked-up rows (table: tensor or SplitWeight on dim 0)."""
    if isinstance(table, SplitWeight):
        if table.dim != 0:
            return F.embedding(ids, table.float())
        out = torch.empty(*ids.shape, table.shape[1])
        a = 0
        for p in table.pieces:
            sel = (ids >= a) & (ids < a + p.shape[0])
            if bool(sel.any()):
                out[sel] = p[ids[sel] - a].float()
            a += p.shape[0]
        return out
    return table[ids].float()


def reference_logits(cfg: ModelConfig, get: Callable[[str], torch.Tensor], ids: torch.Tensor,
                     all_experts: bool = False) -> torch.Tensor:
    """Logits [B, S, V] (fp32) of the model `cfg` whose weights `get(name)` returns, on token ids [B, S]."""
    f = Forward(cfg, ids, all_experts)
    f.embed(get)
    for i in range(cfg.num_layers):
        f.layer(i, get)
    return f.head(get)


def router_weights(cfg: ModelConfig, mi: int, p: str, w, h: torch.Tensor) -> torch.Tensor:
    """Dense [T, E] combine weights (zeros for unselected experts), score scale included."""
    m = cfg.moe
    if m.gate_network == "linear":
        logits = _lin(h, w(p + "mlp.router.gate.weight"))
    else:
        logits = _lin(torch.tanh(_lin(h, w(p + "mlp.router.gate.0.weight"))), w(p + "mlp.router.gate.2.weight"))
    dense = torch.zeros_like(logits)
    order = m.effective_score_order()
    if order == "topk_softmax":                 # llama-moe v1: top-k of the logits, softmax over the k
        top, idx = logits.topk(m.top_k, dim=-1)
        dense.scatter_(1, idx, top.softmax(-1))
    else:                                       # softmax over all, top-k, renormalised (Mixtral) or not
        top, idx = logits.softmax(-1).topk(m.top_k, dim=-1)
        dense.scatter_(1, idx, top / top.sum(-1, keepdim=True) if order == "softmax_topk_renorm" else top)
    return dense * m.layer_scale(mi)


def attn_router_weights(cfg: ModelConfig, gate, h: torch.Tensor):
    """Attention experts' dense [T, A] combine weights (score scale included; 0 where not chosen) and choice."""
    a = cfg.attn_moe
    logits = _lin(h, gate)
    dense = torch.zeros_like(logits)
    if a.score_order == "topk_softmax":
        top, idx = logits.topk(a.top_k, dim=-1)
        dense.scatter_(1, idx, top.softmax(-1))
    else:
        top, idx = logits.softmax(-1).topk(a.top_k, dim=-1)
        dense.scatter_(1, idx, top / top.sum(-1, keepdim=True) if a.score_order == "softmax_topk_renorm" else top)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)
    return dense * a.score_scale, chosen


def _moe(cfg, mi, p, w, h, identity_rows):
    """Experts on every token, times the [T, E] combine weights (0 for unselected experts, 1 on identity rows).
    Running each expert on all T tokens costs the same weight read as on its routed subset (T is small here) and
    keeps the arithmetic free of gathers and scatters."""
    m = cfg.moe
    weights = router_weights(cfg, mi, p, w, h)
    weights[identity_rows] = 1.0
    y = torch.zeros_like(h)
    for e in range(m.num_experts):
        if not bool((weights[:, e] != 0).any()):
            continue
        q = f"{p}mlp.experts.{e}."
        out = _swiglu(h, w(q + "gate_proj.weight"), w(q + "up_proj.weight"), w(q + "down_proj.weight"))
        y += out * weights[:, e, None]
    if m.residual_size:
        y = y + _swiglu(h, w(p + "mlp.shared.gate_proj.weight"), w(p + "mlp.shared.up_proj.weight"),
                        w(p + "mlp.shared.down_proj.weight"))
    return y


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a-b|, the reference magnitude max |a|, and their ratio (the guard's relative error)."""
    diff = (a.float() - b.float()).abs().max().item()
    ref = a.float().abs().max().item()
    return {"max_abs_diff": diff, "max_abs_ref": ref, "rel": diff / max(ref, 1e-12)}
