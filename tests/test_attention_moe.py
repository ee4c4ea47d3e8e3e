"""Attention experts (LLaMA-MoE v2, megamoe/moe/attention.py) against independent references:

- every expert chosen with weight 1 (uniform router, scale A): the logits of the dense model whose heads they were
  cut from (split 1 and 2, SmolLM2's 9/3 head layout with split 1 and 3, tied and untied, both modes);
- token_sparse: a per-expert loop written here that gathers each expert's tokens, rebuilds the causal mask on them
  and applies RoPE at their absolute positions; full_kv: the same loop with every token as a key; both also
  against the module's masked reference (attention_moe_reference);
- cached step-by-step decoding equals the full forward token for token (MLP MoE and dense layers in the stack);
- the balance loss: the switch formula computed here, with a non-zero router gradient;
- bad configurations: clear errors before any model is built."""

import math

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import AttnMoEConfig, ModelConfig, MoEConfig
from megamoe.errors import ConfigError
from megamoe.formats.layout import expand_kv_heads, expected_names, expected_shape
from megamoe.layers.attention import AttentionContext
from megamoe.layers.kv_cache import KVCache
from megamoe.layers.rope import rope_cos_sin, rope_inv_freq
from megamoe.model import LlamaMoEModel
from megamoe.model.generate import generate, pad_prompts
from megamoe.moe.attention import ExpertKVCache, attention_moe_reference

pytestmark = pytest.mark.usefixtures("world", "one_thread")


def base_cfg(heads=4, kv=2, d=8, layers=2, tie=False, **kw):
    c = dict(vocab_size=64, hidden_size=heads * d, intermediate_size=48, num_layers=layers, num_heads=heads,
             num_kv_heads=kv, rope_theta=1000.0, tie_word_embeddings=tie, init_std=0.1,
             max_position_embeddings=128)
    c.update(kw)
    return ModelConfig(**c)


def moe_from_dense(dense_cfg, dense_state, attn: AttnMoEConfig, **kw):
    """The attention-MoE model cut from a dense one: q/o unchanged, k/v heads copied into sibling experts,
    router zero (uniform)."""
    cfg = ModelConfig(**{**dense_cfg.__dict__, "attn_moe": attn, **kw})
    model = LlamaMoEModel(cfg)
    split = attn.num_experts // dense_cfg.kv_heads
    state = {}
    for n in expected_names(cfg):
        if n.endswith("attn.router.gate.weight"):
            state[n] = torch.zeros(expected_shape(cfg, n))
        elif n.endswith(("attn.k_proj.weight", "attn.v_proj.weight")) and cfg.is_attn_moe_layer(int(n.split(".")[1])):
            state[n] = expand_kv_heads(dense_state[n], dense_cfg.kv_heads, split)
        else:
            state[n] = dense_state[n]
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("heads,kv,split", [(4, 2, 1), (4, 2, 2), (9, 3, 1), (9, 3, 3)])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["token_sparse", "full_kv"])
def test_every_expert_with_weight_one_is_the_dense_model(heads, kv, split, tie, mode):
    torch.manual_seed(0)
    dense_cfg = base_cfg(heads, kv, tie=tie)
    dense = LlamaMoEModel(dense_cfg).eval()
    A = kv * split
    moe = moe_from_dense(dense_cfg, dense.state_dict(),
                         AttnMoEConfig(num_experts=A, top_k=A, score_scale=float(A), mode=mode))
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = dense(ids).logits, moe(ids).logits
    assert (got - ref).abs().max() <= 2e-6 * ref.abs().max()
    # and a real routing (top-1) differs: the check can fail
    moe.cfg.attn_moe.top_k = 1
    for layer in moe.layers:
        layer.attn.router.top_k = 1
    with torch.no_grad():
        assert (moe(ids).logits - ref).abs().max() > 1e-3 * ref.abs().max()


def per_expert_loop(layer, x, positions, segments, mode):
    """Independent token_sparse / full_kv attention MoE for one layer: x [B, S, H] -> [B, S, H] (fp64), written
    from the definition: for each expert, gather its tokens, rebuild the mask on them, RoPE at absolute positions."""
    a = layer.cfg.attn_moe
    A, d = a.num_experts, layer.cfg.dim_head
    g = layer.cfg.num_heads // A
    B, S, H = x.shape
    x64 = x.double()
    Wq, Wk, Wv, Wo = (p.weight.detach().double() for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    logits = x64 @ layer.router.gate.weight.detach().double().T                 # [B, S, A]
    p = logits.softmax(-1)
    top, idx = p.topk(a.top_k, dim=-1)
    if a.score_order == "softmax_topk_renorm":
        top = top / top.sum(-1, keepdim=True)
    inv = 1.0 / (layer.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))

    def rope(t, pos):                                                            # t [n, heads, d], pos [n]
        ang = pos.double()[:, None] * inv[None]
        c, s = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        return t * c + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * s

    y = torch.zeros(B, S, H, dtype=torch.float64)
    for b in range(B):
        for e in range(A):
            toks = [t for t in range(S) if e in idx[b, t].tolist()]            # the expert's tokens, in order
            if not toks:
                continue
            keys = toks if mode == "token_sparse" else list(range(S))
            xe, xk = x64[b, toks], x64[b, keys]
            q = rope((xe @ Wq[e * g * d:(e + 1) * g * d].T).view(len(toks), g, d), positions[b, toks])
            k = rope((xk @ Wk[e * d:(e + 1) * d].T).view(len(keys), 1, d), positions[b, keys])[:, 0]
            v = xk @ Wv[e * d:(e + 1) * d].T
            for qi, t in enumerate(toks):
                seen = [ki for ki, j in enumerate(keys) if segments[b, j] == segments[b, t]
                        and positions[b, j] <= positions[b, t]]
                att = torch.einsum("gd,kd->gk", q[qi], k[seen]) / math.sqrt(d)
                o = (att.softmax(-1) @ v[seen]).reshape(g * d)
                w = top[b, t][idx[b, t] == e].item() * a.score_scale
                y[b, t] += w * (Wo[:, e * g * d:(e + 1) * g * d] @ o)
    return y


@pytest.mark.parametrize("mode", ["token_sparse", "full_kv"])
@pytest.mark.parametrize("heads,kv,split,k,order", [(4, 2, 2, 2, "softmax_topk_renorm"), (9, 3, 1, 2, "softmax_topk"),
                                                    (9, 3, 3, 4, "softmax_topk_renorm")])
def test_layer_equals_the_per_expert_loop(mode, heads, kv, split, k, order):
    torch.manual_seed(3)
    A = kv * split
    cfg = base_cfg(heads, kv, attn_moe=AttnMoEConfig(num_experts=A, top_k=k, score_scale=1.5, mode=mode,
                                                     score_order=order, gate_init_std=0.5))
    layer = LlamaMoEModel(cfg).layers[0].attn.eval()
    B, S = 2, 13
    x = torch.randn(B, S, cfg.hidden_size)
    # row 0: two packed documents (positions restart), row 1: left padding then one document
    positions = torch.tensor([list(range(6)) + list(range(7)), [0, 0, 0] + list(range(10))])
    segments = torch.tensor([[1] * 6 + [2] * 7, [0] * 3 + [1] * 10], dtype=torch.int32)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), positions, torch.float32)
    with torch.no_grad():
        y, stats = layer(x.transpose(0, 1), cos, sin, AttentionContext(positions, segments))
    y = y.transpose(0, 1).double()
    ref = per_expert_loop(layer, x, positions, segments, mode)
    real = segments != 0
    assert (y - ref)[real].abs().max() < 1e-5 * ref.abs().max()
    # the module's masked reference agrees too, and the two modes differ (the test tells them apart)
    logits = x @ layer.router.gate.weight.T
    p = logits.softmax(-1)
    top, idx = p.topk(k, -1)
    if order == "softmax_topk_renorm":
        top = top / top.sum(-1, keepdim=True)
    w = torch.zeros(B, S, A).scatter(-1, idx, top * 1.5)
    chosen = torch.zeros(B, S, A, dtype=torch.bool).scatter(-1, idx, True)
    masked = attention_moe_reference(x, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight,
                                     layer.o_proj.weight, w, chosen, positions, segments, cos[:, 0], sin[:, 0],
                                     heads // A, mode)
    assert (masked - ref)[real].abs().max() < 1e-6 * ref.abs().max()
    other = per_expert_loop(layer, x, positions, segments, "full_kv" if mode == "token_sparse" else "token_sparse")
    assert (other - ref)[real].abs().max() > 1e-2 * ref.abs().max()
    assert stats.tokens_per_expert.sum() == B * S * k


def stack_model(mode, seed=0):
    """Attention experts in layers 0 and 2, dense attention in layer 1; MLP MoE in layers 1 and 2."""
    torch.manual_seed(seed)
    cfg = base_cfg(6, 2, layers=3, attn_moe=AttnMoEConfig(num_experts=6, top_k=2, score_scale=2.0, mode=mode,
                                                           layers=[0, 2], gate_init_std=0.5),
                   moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear", moe_layers=[1, 2],
                                 gate_init_std=0.3))
    return LlamaMoEModel(cfg).eval()


@pytest.mark.parametrize("mode", ["token_sparse", "full_kv"])
def test_cached_decoding_equals_the_full_forward(mode):
    m = stack_model(mode)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3]]
    ids, mask = pad_prompts(prompts, pad_token_id=0)
    cont = torch.randint(1, 64, (len(prompts), 7), generator=torch.Generator().manual_seed(2))
    full_ids, full_mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0) * full_mask
    P = ids.shape[1]
    with torch.no_grad():
        ref = m(full_ids, position_ids=pos, segment_ids=full_mask).logits
        cache = KVCache(len(m.layers))
        got = [m(ids, position_ids=pos[:, :P], segment_ids=mask, cache=cache).logits]
        for t in range(cont.shape[1]):
            got.append(m(cont[:, t:t + 1], cache=cache).logits)
        got = torch.cat(got, 1)
    real = full_mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-5)
    kinds = [type(c).__name__ for c in cache.layers]
    assert kinds == (["ExpertKVCache", "LayerKVCache", "ExpertKVCache"] if mode == "token_sparse"
                     else ["LayerKVCache"] * 3)
    if mode == "token_sparse":   # each expert holds its routed tokens only: k of A experts per token, at most
        stored = sum(ts[0].shape[2] for ts in cache.layers[0].experts.values())
        assert stored < 6 * full_ids.shape[1]
    else:
        assert cache.layers[0].k.shape[1] == 6
    # generate: cached greedy == greedy by full forwards, row by row equal to each prompt alone
    with torch.no_grad():
        a = generate(m, prompts, 6, use_cache=True)
        b = generate(m, prompts, 6, use_cache=False)
        assert a.new_tokens == b.new_tokens
        for i, p in enumerate(prompts):
            assert generate(m, [p], 6).new_tokens[0] == a.new_tokens[i]


def test_balance_loss_formula_and_gradient():
    torch.manual_seed(4)
    cfg = base_cfg(4, 2, layers=1, attn_moe=AttnMoEConfig(num_experts=4, top_k=2, balance_loss_weight=0.1,
                                                           gate_init_std=0.5))
    m = LlamaMoEModel(cfg)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    out = m(ids, labels=ids)
    (st,) = out.attn_router_stats
    assert out.router_stats == []
    # the switch formula from the router's input (the input_layernorm output), computed here
    layer = m.layers[0]
    with torch.no_grad():
        h = layer.attn_norm(m.embed(ids).transpose(0, 1)).reshape(-1, cfg.hidden_size)
        p = (h @ layer.attn.router.gate.weight.T).softmax(-1)
        idx = p.topk(2, -1).indices
        f = torch.zeros(4).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / h.shape[0]
        want = 0.1 * 4 * (f * p.mean(0)).sum()
    torch.testing.assert_close(st.balance_loss.detach(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.aux_loss.detach(), want, rtol=1e-5, atol=1e-7)
    g = torch.autograd.grad(st.balance_loss, layer.attn.router.gate.weight)[0]
    assert g.abs().max() > 1e-6
    # LLaMA-MoE v2's own (load_balancing_loss_func: softmax over the k selected logits only; the choice and that
    # softmax averaged over the k slots) is the constant A/k for [T, A] router logits: no gradient at all
    logits = (h @ layer.attn.router.gate.weight.T).detach().requires_grad_(True)
    top = logits.topk(2, -1).values.softmax(-1)
    chosen = torch.zeros(h.shape[0], 4).scatter(1, idx, 1.0)
    v2 = ((chosen / 2) * top.mean(-1, keepdim=True)).mean() * 4 ** 2
    assert abs(float(v2) - 4 / 2) < 1e-6
    assert torch.autograd.grad(v2, logits)[0].abs().max() < 1e-7

@pytest.mark.parametrize("attn,msg", [
    (dict(num_experts=5), "do not divide into the 2 KV heads x split"),
    (dict(num_experts=6), "split must divide the 2 query heads"),
    (dict(num_experts=4, top_k=5), "attn_moe.top_k: 5 must be between 1 and attn_moe.num_experts (4)"),
    (dict(num_experts=2, top_k=1, mode="dense"), "attn_moe.mode"),
])
def test_bad_configurations_are_clear_errors(attn, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        base_cfg(4, 2, attn_moe=AttnMoEConfig(**attn)).validate()
    with pytest.raises(ConfigError, match="not GQA"):
        base_cfg(4, 4, attn_moe=AttnMoEConfig(num_experts=8, top_k=2)).validate()


def test_expert_cache_reorder_and_size():
    c = ExpertKVCache()
    k = torch.randn(3, 1, 2, 4)
    c.update_expert(1, k, k, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.int32))
    c.reorder(torch.tensor([2, 0]))
    assert c.experts[1][0].shape == (2, 1, 2, 4) and torch.equal(c.experts[1][0][0], k[2])
    assert len(c) == 2 and c.nbytes() == 2 * 2 * 2 * 4 * 4
    with pytest.raises(TypeError):
        c.update(k, k)


@pytest.mark.distributed
@pytest.mark.slow  # ~30 s idle (a reference run and one torchrun launch of three layouts), minutes when busy
def test_tp2_sp_and_ep_equal_one_process(tmp_path):
    """torchrun, 2 ranks: attention experts (token_sparse in every layer beside a Mixtral MLP MoE layer; full_kv in
    one layer beside dense attention, a v1 MLP MoE with a residual expert, tied embeddings) trained 4 steps at TP2,
    TP2 + SP and TP2 x EP2 + SP: the single-process losses, grad norms and every parameter's gradient."""
    import os
    import socket
    import subprocess
    import sys
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_scripts", "attn_moe_worker.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MEGAMOE_DIST_TIMEOUT="120")
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    p = subprocess.run([sys.executable, worker, "reference", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        worker, "layouts", str(tmp_path), "tp2,tp2sp,tp2ep2sp"], env=env, capture_output=True,
                       text=True, timeout=400)
    out = p.stdout + p.stderr
    oks = [ln for ln in out.splitlines() if ln.startswith("OK ")]
    assert p.returncode == 0 and "FAIL" not in out and len(oks) == 60, out[-4000:]
    assert any("tp2sp/attn_sparse gradients of all" in ln for ln in oks)


def test_training_logs_attention_routers_and_resumes(tmp_path):
    """The trainer on configs/tiny.yaml with attention experts: metrics rows carry the attention routers' load,
    importance and balance loss under attn_ names (one row per attention-MoE layer), evaluations their routing per
    domain, the plots their own heat-maps; a resumed run reproduces the uninterrupted losses; the final model loads."""
    import json
    import os

    import yaml

    from megamoe.formats.shards import ShardedCheckpoint
    from megamoe.training.config import TrainConfig
    from megamoe.training.trainer import run
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")

    def cfg(out, **over):
        d = yaml.safe_load(open(tiny))
        d["out_dir"] = str(out)
        d["model"]["attn_moe"] = {"num_experts": 4, "top_k": 2, "score_scale": 2.0, "mode": "token_sparse",
                                  "layers": [1], "balance_loss_weight": 0.05}
        d["train"]["steps"] = 6
        d["eval"] = {"interval": 3, "at_end": True, "batches": 1, "batch_size": 4, "plots": True}
        d["checkpoint"] = {"interval": 3, "keep_last": 2}
        for k, v in over.items():
            sec, field = k.split("__")
            d[sec][field] = v
        return TrainConfig.from_dict(d)

    full = run(cfg(tmp_path / "full", checkpoint__interval=0))
    rows = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    train = [r for r in rows if r.get("kind") == "train" and "attn_expert_load" in r]
    assert train and len(train[0]["attn_expert_load"]) == 1 and len(train[0]["attn_expert_load"][0]) == 4
    assert abs(sum(train[0]["attn_expert_load"][0]) - 1) < 1e-6 and train[0]["attn_router_balance_loss"] > 0
    assert len(train[0]["expert_load"]) == 2            # the MLP routers keep their own rows
    ev = [r for r in rows if r.get("kind") == "eval" and r.get("attn_routing_by_domain")]
    assert ev and all(len(v) == 1 for v in ev[-1]["attn_routing_by_domain"].values())
    assert os.path.isfile(tmp_path / "full" / "plots" / "attn_expert_load.png")
    assert os.path.isfile(tmp_path / "full" / "plots" / "attn_routing_by_domain.png")
    final = ShardedCheckpoint(str(tmp_path / "full" / "final_model"))
    assert final.config.attn_moe.layers == [1] and "layers.1.attn.router.gate.weight" in final.names
    part = run(cfg(tmp_path / "run", train__steps=3))
    resumed = run(cfg(tmp_path / "run", checkpoint__resume=True))
    assert {**part["losses"], **resumed["losses"]} == full["losses"]
