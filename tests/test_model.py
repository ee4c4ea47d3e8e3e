"""The model against independent references: transformers' LLaMA and Mixtral, the dense model it was split from,
and finite differences."""

import copy

import pytest
import torch

from megamoe.formats.hf_llama import config_from_hf, hf_to_ours, load_hf_llama
from megamoe.config import ModelConfig, MoEConfig
from megamoe.model import LlamaMoEModel

pytestmark = pytest.mark.usefixtures("world")

transformers = pytest.importorskip("transformers")


def tiny_hf_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False)
    base.update(kw)
    hc = LlamaConfig(**base)
    return hc, LlamaForCausalLM(hc).eval()


def ours_from_hf(hc, hf, **moe):
    cfg = config_from_hf(hc.to_dict())
    m = LlamaMoEModel(cfg).eval()
    m.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=True)
    return cfg, m


@pytest.mark.parametrize("variant", [
    {},                                                             # GQA, untied
    {"num_key_value_heads": 4, "tie_word_embeddings": True},        # MHA, tied (SmolLM2-style)
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
])
def test_dense_matches_transformers_llama(variant):
    hc, hf = tiny_hf_llama(**variant)
    _, m = ours_from_hf(hc, hf)
    ids = torch.randint(0, 128, (2, 24))
    labels, mask = torch.roll(ids, -1, dims=1), torch.ones_like(ids)  # ours takes aligned targets (megatron style)
    mask[:, -1] = 0
    with torch.no_grad():
        ref = hf(ids, labels=ids)                 # HF shifts internally
        out = m(ids, labels=labels, loss_mask=mask)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_smollm2_dense_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    cfg, state = load_hf_llama(smollm2_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.kv_heads) == (30, 576, 9, 3)
    m = LlamaMoEModel(cfg).eval()
    m.load_state_dict(state, strict=True)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 17, 90, 1200, 43, 7, 9, 11, 4021, 5]])
    with torch.no_grad():
        a, b = hf(ids).logits, m(ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_mixtral_ordered_moe_matches_transformers_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(1)
    E, k, F = 4, 2, 24
    hc = MixtralConfig(vocab_size=96, hidden_size=48, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=k, rope_theta=10000.0,
                       max_position_embeddings=64, sliding_window=None)
    hf = MixtralForCausalLM(hc).eval()
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=E * F, num_layers=2, num_heads=4,
                      num_kv_heads=2, rms_norm_eps=hc.rms_norm_eps, rope_theta=10000.0,
                      moe=MoEConfig(num_experts=E, top_k=k, router="mixtral", gate_network="linear", score_scale=1.0))
    m = LlamaMoEModel(cfg).eval()
    # independent key mapping from transformers' in-memory Mixtral layout (fused experts) to ours
    sd = {}
    for name, v in hf.state_dict().items():
        n = name.replace("model.embed_tokens", "embed").replace("model.norm", "norm").replace("model.layers", "layers")
        n = n.replace("self_attn", "attn").replace("input_layernorm", "attn_norm")
        n = n.replace("post_attention_layernorm", "mlp_norm").replace("mlp.gate.weight", "mlp.router.gate.weight")
        if n.endswith("experts.gate_up_proj"):
            for e in range(E):
                sd[n.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :F]
                sd[n.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, F:]
        elif n.endswith("experts.down_proj"):
            for e in range(E):
                sd[n.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            sd[n] = v
    m.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        a, b = hf(ids).logits, m(ids).logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


def split_dense_into_experts(dense_state, cfg, partition, moe):
    """Build an MoE state dict from a dense one by a neuron partition (independent of megamoe.construct)."""
    sizes = [len(p) for p in partition]
    mcfg = copy.deepcopy(cfg)
    mcfg.moe = moe
    mcfg.moe.expert_sizes = sizes
    sd = {}
    for k, v in dense_state.items():
        if ".mlp." not in k:
            sd[k] = v
    for i in range(cfg.num_layers):
        g, u, d = (dense_state[f"layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        for e, idx in enumerate(partition):
            idx = torch.tensor(idx)
            sd[f"layers.{i}.mlp.experts.{e}.gate_proj.weight"] = g[idx]
            sd[f"layers.{i}.mlp.experts.{e}.up_proj.weight"] = u[idx]
            sd[f"layers.{i}.mlp.experts.{e}.down_proj.weight"] = d[:, idx]
    return mcfg, sd


@pytest.mark.parametrize("gate_network", ["linear", "mlp"])
@pytest.mark.parametrize("router", ["topk_noisy", "mixtral"])
def test_all_experts_uniform_router_reproduces_dense(gate_network, router):
    hc, hf = tiny_hf_llama()
    cfg, dense = ours_from_hf(hc, hf)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(cfg.intermediate_size, generator=g).tolist()
    cuts = [0, 10, 31, 60, 96]  # uneven experts
    partition = [sorted(perm[a:b]) for a, b in zip(cuts, cuts[1:])]
    E = len(partition)
    moe = MoEConfig(num_experts=E, top_k=E, router=router, gate_network=gate_network, score_scale=float(E))
    mcfg, sd = split_dense_into_experts(dense.state_dict(), cfg, partition, moe)
    m = LlamaMoEModel(mcfg).eval()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all(".router." in k for k in missing)
    for name, p in m.named_parameters():
        if ".router." in name:
            torch.nn.init.zeros_(p)  # equal logits -> uniform softmax 1/E, times scale E = 1
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, dense(ids).logits, atol=2e-5, rtol=1e-5)


def test_gradients_match_finite_differences():
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
                      moe=MoEConfig(num_experts=4, top_k=2, router="topk_noisy", gate_network="mlp", score_scale=2.0,
                                    gate_init_std=0.5))
    m = LlamaMoEModel(cfg).double().eval()
    ids = torch.randint(0, 32, (1, 12))

    def loss():  # fp64 end to end (megatron's vocab-parallel cross entropy computes in fp32, too coarse for FD)
        out = m(ids)
        return torch.nn.functional.cross_entropy(out.logits.view(-1, 32), ids.view(-1)) + out.aux_loss

    L = loss()
    L.backward()
    stats = m(ids).router_stats[0]
    used = [e for e in range(4) if stats.tokens_per_expert[e] > 0]
    assert used, "no expert got a token"
    params = dict(m.named_parameters())
    grads = {n: p.grad for n, p in params.items()}
    ex = m.layers[0].mlp.experts   # stacked expert weights (moe/experts.py): checked per expert, through views
    for i, e in enumerate(ex.local_ids):
        for p, w, gw in zip(("gate", "up", "down"), ex.views(i), ex.views(i, ex.gate_up.grad, ex.down.grad)):
            n = f"layers.0.mlp.experts.{e}.{p}_proj.weight"
            params[n], grads[n] = w, gw
    names = ["layers.0.mlp.router.gate.0.weight", "layers.0.mlp.router.gate.2.weight"]
    names += [f"layers.0.mlp.experts.{e}.{p}_proj.weight" for e in used for p in ("gate", "up", "down")]
    g = torch.Generator().manual_seed(0)
    for n in names:
        p, grad = params[n], grads[n]
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {n}"
        for _ in range(3):
            i = tuple(int(torch.randint(s, (1,), generator=g)) for s in p.shape)
            eps = 1e-6
            with torch.no_grad():
                p[i] += eps
                up = loss().item()
                p[i] -= 2 * eps
                down = loss().item()
                p[i] += eps
            fd = (up - down) / (2 * eps)
            assert abs(fd - grad[i].item()) < 1e-6 + 1e-4 * abs(fd), f"{n}{i}: autograd {grad[i]} vs fd {fd}"


def test_attention_backend_choice_and_clear_errors():
    from megamoe.layers.attention import _pick_attention_backend
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2)
    x = torch.zeros(1, 2, 3, 8)
    assert _pick_attention_backend(cfg, x) == "sdpa"                      # auto on CPU fp32
    for want in ("flash", "te"):
        cfg.attention_backend = want
        with pytest.raises(RuntimeError, match=f"attention_backend: '{want}'"):
            _pick_attention_backend(cfg, x)


def test_bf16_model_tracks_fp32():
    """bf16 parameters on a CPU (the router scoring in fp32, SDPA run in fp32, expert rows padded for oneDNN's GEMM
    shapes, the fused loss in half): loss and gradients stay close to the fp32 model holding the same weights."""
    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              max_position_embeddings=64,
              moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="mlp", score_scale=1.0))
    m32 = LlamaMoEModel(ModelConfig(**kw, params_dtype="float32"))
    m16 = LlamaMoEModel(ModelConfig(**kw, params_dtype="bfloat16"))
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    sd = {k: v.bfloat16() for k, v in m32.state_dict().items() if v is not None}
    m16.load_state_dict(sd, strict=False)
    m32.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (m32, m16):
        out = m(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
        (out.lm_loss + out.aux_loss).backward()
        losses.append(float(out.lm_loss))
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[0]
    g32 = torch.cat([p.grad.flatten() for p in m32.parameters()])
    g16 = torch.cat([p.grad.float().flatten() for p in m16.parameters()])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_rmsnorm_cpu_functions_match_autograd_reference(dtype):
    """The CPU RMSNorm autograd functions (fp32/fp64 and half precision) against autograd through the reference."""
    from megamoe.layers.norm import RMSNorm, rms_norm_reference
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, 1e-5, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g) * 0.5 + 1)
    x0 = torch.randn(5, 3, 48, generator=g).to(dtype) * 3
    dy = torch.randn(5, 3, 48, generator=g).to(dtype)
    res = []
    for fn in (norm, lambda x: rms_norm_reference(x, norm.weight, 1e-5)):
        norm.weight.grad = None
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(dy)
        res.append((y.detach(), x.grad, norm.weight.grad))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*res):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), **tol)
