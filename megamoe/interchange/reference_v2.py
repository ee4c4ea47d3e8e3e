"""An independent plain-torch forward of the released LLaMA-MoE v2 model (MixtralForCausalLM of
OpenSparseLLMs/LLaMA-MoE-v2 @ cfca9f7, its eager attention), written from its documented semantics (reference fact
sheet llama-moe-v2.md sections 1-3 and the executed notes in docs/interchange.md), on *their* key names and
config.json. It shares no code with megamoe's model or with `forward.py`; it is the guard's yardstick for the
llama-moe-v2 layout (their code cannot be imported here and must not be copied).

    logits = v2_logits(config_dict, get, ids)           # get(v2_key) -> Tensor; fp32; ids [B, S] (no padding)

Semantics (eval; positions 0..S-1 of each row):
  attention MoE (`use_attn_moe`, every layer): p = softmax_fp32(gate(x)), top `top_k_attn`, renormalised; for each
      expert e and each row, the tokens routed to e are taken in order; each attends to the earlier ones among them
      (itself included) and, with `sliding_window` W (the config class's default 4096 when the key is absent), to
      fewer than W of them, counted in that compacted order; RoPE (base `rope_theta`, default 1e6) at the tokens'
      absolute positions; y += scale_factor_attn * w_e * o_proj.e(attn).
      `attn_mode="full_kv"` (megamoe's own field, ignored by their code; only when `honour_attn_mode`): every
      earlier token is a key instead.
  dense attention otherwise: causal GQA with an absolute window q - k < W.
  MLP: layers n <= i < L - n (n = num_moe_contract_layers) are MoE: softmax_fp32, top-k, renormalise,
      y = sum scale_factor * w_j * w2_j(silu(w1_j x) * w3_j x), plus mlp_residual(x) unscaled; the other layers
      are a dense SwiGLU with keys block_sparse_moe.{w1,w3,w2}.
  head_dim = hidden_size / num_attention_heads; rope_scaling ignored; RMSNorm eps `rms_norm_eps` (default 1e-5).
"""

from __future__ import annotations

import math

import torch

DEFAULT_WINDOW = 4096     # their MixtralConfig's sliding_window when config.json has no such key
DEFAULT_THETA = 1e6


def _norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(t, positions, theta, hd):
    """t [n, heads, hd] at integer positions [n] (HF rotate_half convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = positions.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    half = hd // 2
    rot = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * cos + rot * sin


def _attend(q, k, v, allowed, hd):
    """q [n, h, hd], k/v [m, hd] (one KV head) or [m, h, hd]; allowed [n, m] bool -> [n, h*hd]."""
    if k.dim() == 2:
        k, v = k[:, None].expand(-1, q.shape[1], -1), v[:, None].expand(-1, q.shape[1], -1)
    s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(hd)
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), v).reshape(q.shape[0], -1)


def _route(x, gate_w, k):
    p = torch.softmax(x @ gate_w.T, dim=-1, dtype=torch.float32)
    w, idx = p.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


@torch.no_grad()
def v2_logits(config: dict, get, ids: torch.Tensor, honour_attn_mode: bool = False) -> torch.Tensor:
    c = config
    f = lambda key: get(key).to(torch.float32)  # noqa: E731
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = H // nh
    eps = c.get("rms_norm_eps", 1e-5)
    theta = c.get("rope_theta", DEFAULT_THETA)
    W = c["sliding_window"] if "sliding_window" in c else DEFAULT_WINDOW
    W = W or 10 ** 12
    n_contract = c.get("num_moe_contract_layers") or 0
    mode = c.get("attn_mode", "token_sparse") if honour_attn_mode else "token_sparse"
    B, S = ids.shape
    pos = torch.arange(S)
    causal = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < W)

    h = f("model.embed_tokens.weight")[ids]
    for i in range(L):
        p = f"model.layers.{i}."
        x = _norm(h, f(p + "input_layernorm.weight"), eps)
        out = torch.zeros_like(h)
        if c.get("use_attn_moe"):
            A, k = c["attn_experts"], c["top_k_attn"]
            g = nh // A
            w, idx = _route(x.reshape(B * S, H), f(p + "self_attn.gate.weight"), k)
            w, idx = w.view(B, S, k), idx.view(B, S, k)
            for e in range(A):
                wq, wk = f(p + f"self_attn.q_proj.{e}.weight"), f(p + f"self_attn.k_proj.{e}.weight")
                wv, wo = f(p + f"self_attn.v_proj.{e}.weight"), f(p + f"self_attn.o_proj.{e}.weight")
                for b in range(B):
                    hit = (idx[b] == e)                                   # [S, k]
                    toks = hit.any(-1).nonzero().squeeze(1)               # this expert's tokens, in order
                    if toks.numel() == 0:
                        continue
                    xe = x[b, toks]
                    q = _rope((xe @ wq.T).view(-1, g, hd), toks, theta, hd)
                    if mode == "token_sparse":
                        keys = toks
                        n = toks.numel()
                        cpos = torch.arange(n)                            # compacted order
                        allowed = (cpos[None, :] <= cpos[:, None]) & (cpos[:, None] - cpos[None, :] < W)
                    else:
                        keys = pos
                        allowed = causal[toks]
                    kk = _rope((x[b, keys] @ wk.T)[:, None], keys, theta, hd)[:, 0]
                    vv = x[b, keys] @ wv.T
                    o = _attend(q, kk, vv, allowed, hd) @ wo.T            # [n, H]
                    we = (w[b, toks] * hit[toks].float()).sum(-1)         # this expert's weight per token
                    out[b, toks] += c["scale_factor_attn"] * we[:, None] * o
        else:
            q = (x @ f(p + "self_attn.q_proj.weight").T).view(B, S, nh, hd)
            kk = (x @ f(p + "self_attn.k_proj.weight").T).view(B, S, nkv, hd)
            vv = (x @ f(p + "self_attn.v_proj.weight").T).view(B, S, nkv, hd)
            for b in range(B):
                qb = _rope(q[b], pos, theta, hd)
                kb = _rope(kk[b], pos, theta, hd).repeat_interleave(nh // nkv, 1)
                vb = vv[b].repeat_interleave(nh // nkv, 1)
                out[b] = _attend(qb, kb, vb, causal, hd) @ f(p + "self_attn.o_proj.weight").T
        h = h + out

        x = _norm(h, f(p + "post_attention_layernorm.weight"), eps).reshape(B * S, H)
        if n_contract <= i < L - n_contract:
            E, k = c["num_local_experts"], c["num_experts_per_tok"]
            w, idx = _route(x, f(p + "block_sparse_moe.gate.weight"), k)
            scale = c.get("scale_factor", 1.0)
            scale = 1.0 if scale is None else scale
            y = torch.zeros_like(x)
            for j in range(E):
                tok, slot = (idx == j).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                q = f"{p}block_sparse_moe.experts.{j}."
                a = torch.nn.functional.silu(x[tok] @ f(q + "w1.weight").T) * (x[tok] @ f(q + "w3.weight").T)
                y.index_add_(0, tok, (a @ f(q + "w2.weight").T) * (scale * w[tok, slot])[:, None])
            if c.get("intermediate_size_residual"):
                r = p + "mlp_residual."
                y = y + (torch.nn.functional.silu(x @ f(r + "w1.weight").T) * (x @ f(r + "w3.weight").T)) @ \
                    f(r + "w2.weight").T
        else:
            r = p + "block_sparse_moe."
            y = (torch.nn.functional.silu(x @ f(r + "w1.weight").T) * (x @ f(r + "w3.weight").T)) @ f(r + "w2.weight").T
        h = h + y.view(B, S, H)
    h = _norm(h, f("model.norm.weight"), eps)
    head = f("model.embed_tokens.weight") if c.get("tie_word_embeddings", False) else f("lm_head.weight")
    return h @ head.T
