"""An independent plain-torch forward of the released llama-moe v1 model (LlamaMoEForCausalLM, repo commit d7d0989),
written from its documented semantics (reference/llama-moe-v1.md section 3.4), on *their* key names and config.json.

Their remote code cannot be imported here (and must not be copied), yet an exported llama-moe v1 checkpoint has to
be checked against what their code computes. This module is that yardstick. It deliberately shares no code with
megamoe's model or with `forward.py`.

    logits = v1_logits(config_dict, get, ids)      # get(v1_key) -> Tensor; fp32 compute; eval mode (no noise)

Semantics (eval): LLaMA-2 decoder (RMSNorm in fp32, RoPE rotate_half, causal attention with GQA), then per MoE
layer: g = W2 tanh(W1 x) (gate_network "mlp") or W x ("linear"); top-k of g; w = softmax over the k logits;
y = sum_j (w_j * score_scale_factor) * Down_j(silu(Gate_j x) * Up_j x); residual add.

What their code reads from config.json, as executed (transformers 4.44.2, /work research notes in
docs/interchange.md): RoPE base 10000 ALWAYS (`rope_theta`/`rope_parameters` are never read); `rope_scaling` null
or exactly {"type": "linear", "factor": float > 1} (t / factor; anything else fails to load: ValueError here too);
head_dim = hidden_size / num_attention_heads (a `head_dim` field is ignored); rms_norm_eps default 1e-6; with
`tie_word_embeddings` the embedding is the head even when the file holds an lm_head (theirs ignores it).
"""

from __future__ import annotations

import math

import torch


def _norm(x, weight, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def v1_logits(config: dict, get, ids: torch.Tensor) -> torch.Tensor:
    c = config
    f = lambda k: get(k).to(torch.float32)  # noqa: E731
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = H // nh                          # their attention ignores a head_dim field
    eps = c.get("rms_norm_eps", 1e-6)
    theta = 10000.0                       # their rotary embedding never reads rope_theta
    E, k = c["num_experts"], c["num_selects"]
    scale = c.get("score_scale_factor", 1.0)
    mlp_gate = c.get("gate_network", "mlp") == "mlp"
    b, s = ids.shape

    inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    rs = c.get("rope_scaling")
    if rs is not None:
        if not (isinstance(rs, dict) and set(rs) == {"type", "factor"} and rs["type"] == "linear"
                and isinstance(rs["factor"], float) and rs["factor"] > 1):
            raise ValueError(f"rope_scaling {rs!r}: the released llama-moe v1 code refuses to load this (it takes "
                             "null or {'type': 'linear' | 'dynamic', 'factor': float > 1})")
        inv = inv / rs["factor"]
    t = torch.arange(s).float()
    freqs = torch.einsum("i,j->ij", t, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((s, s), float("-inf")).triu(1)

    h = f("model.embed_tokens.weight")[ids]
    for i in range(L):
        p = f"model.layers.{i}."
        x = _norm(h, f(p + "input_layernorm.weight"), eps)
        q = (x @ f(p + "self_attn.q_proj.weight").T).view(b, s, nh, hd).transpose(1, 2)
        kk = (x @ f(p + "self_attn.k_proj.weight").T).view(b, s, nkv, hd).transpose(1, 2)
        v = (x @ f(p + "self_attn.v_proj.weight").T).view(b, s, nkv, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        kk = kk * cos + _rotate_half(kk) * sin
        rep = nh // nkv
        kk = kk[:, :, None].expand(b, nkv, rep, s, hd).reshape(b, nh, s, hd)
        v = v[:, :, None].expand(b, nkv, rep, s, hd).reshape(b, nh, s, hd)
        att = (q @ kk.transpose(2, 3)) / math.sqrt(hd) + mask
        att = torch.softmax(att, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, nh * hd)
        h = h + o @ f(p + "self_attn.o_proj.weight").T

        x = _norm(h, f(p + "post_attention_layernorm.weight"), eps).reshape(b * s, H)
        if mlp_gate:
            g = torch.tanh(x @ f(p + "mlp.gate.gate_network.0.weight").T) @ f(p + "mlp.gate.gate_network.2.weight").T
        else:
            g = x @ f(p + "mlp.gate.gate_network.weight").T
        top_logits, top_idx = g.topk(k, dim=1)
        w = torch.softmax(top_logits, dim=1)
        sc = scale[i] if isinstance(scale, list) else scale
        e = p + "mlp.calculator.experts."
        experts = [(f(e + f"weight_gate.{j}"), f(e + f"weight_up.{j}"), f(e + f"weight_down.{j}")) for j in range(E)]
        y = torch.zeros_like(x)
        for tok in range(b * s):  # token by token, slot by slot: the plainest reading of the semantics
            for slot in range(k):
                wg, wu, wd = experts[int(top_idx[tok, slot])]
                xt = x[tok]
                a = torch.nn.functional.silu(wg @ xt) * (wu @ xt)
                y[tok] += (w[tok, slot] * sc) * (wd @ a)
        h = h + y.view(b, s, H)
    h = _norm(h, f("model.norm.weight"), eps)
    head = f("lm_head.weight") if not c.get("tie_word_embeddings", False) else f("model.embed_tokens.weight")
    return h @ head.T
