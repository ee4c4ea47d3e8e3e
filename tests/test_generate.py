"""Generation and the KV cache: decoding step by step with the cache gives the full forward's logits token for
token (GQA, MoE, left padding); cached greedy generation equals generation by repeated full forwards and equals
transformers' generate on the same weights (LLaMA and Mixtral, batched prompts of different lengths, EOS);
sampling filters equal transformers' warpers; under TP2 (torchrun) the cache gives the single-process logits."""

import os
import subprocess
import sys

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.layers.kv_cache import KVCache
from megamoe.model import LlamaMoEModel
from megamoe.model.generate import generate, next_token_logits_filter, pad_prompts

pytestmark = pytest.mark.usefixtures("world", "one_thread")

transformers = pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3], [40, 41, 42, 43]]


def moe_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                max_position_embeddings=128, init_std=0.08,
                moe=MoEConfig(num_experts=4, top_k=2, router="topk_noisy", gate_network="mlp", score_scale=2.0,
                              gate_init_std=0.3, moe_layers=[1]))
    base.update(kw)
    return LlamaMoEModel(ModelConfig(**base)).eval()


def test_cached_decoding_equals_full_forward_token_for_token():
    m = moe_model()
    ids, mask = pad_prompts(PROMPTS, pad_token_id=0)
    g = torch.Generator().manual_seed(1)
    cont = torch.randint(1, 96, (len(PROMPTS), 6), generator=g)        # a fixed continuation, fed token by token
    full_ids = torch.cat([ids, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0) * full_mask
    with torch.no_grad():
        ref = m(full_ids, position_ids=pos, segment_ids=full_mask).logits        # [B, P+6, V]
        cache = KVCache(len(m.layers))
        P = ids.shape[1]
        out = m(ids, position_ids=pos[:, :P], segment_ids=mask, cache=cache).logits
        got = [out]
        for t in range(cont.shape[1]):
            # default positions: one past each row's last real token (the cache knows them)
            got.append(m(cont[:, t:t + 1], cache=cache).logits)
        got = torch.cat(got, 1)
    real = full_mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-5)
    assert len(cache) == P + 6 and cache.layers[0].k.shape == (len(PROMPTS), 2, P + 6, 8)
    # and each prompt alone, unpadded, gives the same logits at its real tokens (padding is invisible)
    with torch.no_grad():
        for b, p in enumerate(PROMPTS):
            alone = m(torch.tensor([p + cont[b].tolist()])).logits[0]
            torch.testing.assert_close(got[b][real[b]], alone, rtol=1e-4, atol=1e-5)


def test_cached_generation_equals_repeated_full_forwards():
    m = moe_model(seed=3)
    a = generate(m, PROMPTS, 12, eos_token_id=[7, 19], pad_token_id=0)
    b = generate(m, PROMPTS, 12, eos_token_id=[7, 19], pad_token_id=0, use_cache=False)
    assert torch.equal(a.sequences, b.sequences) and a.new_tokens == b.new_tokens
    assert a.sequences.shape[0] == 4 and all(1 <= len(t) <= 12 for t in a.new_tokens)
    for row, toks in zip(a.sequences, a.new_tokens):     # after EOS only padding
        tail = row[a.prompt_length:].tolist()
        assert tail[:len(toks)] == toks and all(t == 0 for t in tail[len(toks):])
    # each prompt alone generates the same tokens (batching and padding change nothing)
    for p, toks in zip(PROMPTS, a.new_tokens):
        assert generate(m, [p], 12, eos_token_id=[7, 19], pad_token_id=0).new_tokens[0] == toks


def _llama_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megamoe.formats.hf_llama import config_from_hf, hf_to_ours
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                     tie_word_embeddings=False)
    hf = LlamaForCausalLM(hc).eval()
    cfg = config_from_hf(hc.to_dict())
    m = LlamaMoEModel(cfg).eval()
    m.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=True)
    return hf, m


def _mixtral_pair():
    """transformers' Mixtral and ours from the same weights (the key mapping of tests/test_model.py)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(1)
    E, k, F = 4, 2, 24
    hc = MixtralConfig(vocab_size=96, hidden_size=48, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=k, rope_theta=10000.0,
                       max_position_embeddings=128, sliding_window=None)
    hf = MixtralForCausalLM(hc).eval()
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=E * F, num_layers=2, num_heads=4,
                      num_kv_heads=2, rms_norm_eps=hc.rms_norm_eps, rope_theta=10000.0, max_position_embeddings=128,
                      moe=MoEConfig(num_experts=E, top_k=k, router="mixtral", gate_network="linear", score_scale=1.0))
    m = LlamaMoEModel(cfg).eval()
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
    return hf, m


@pytest.mark.parametrize("pair", [_llama_pair, _mixtral_pair], ids=["llama", "mixtral"])
def test_greedy_generation_equals_transformers(pair):
    hf, m = pair()
    ids, mask = pad_prompts(PROMPTS, pad_token_id=0)
    # an EOS that some rows produce: the most frequent first generated token of our own run
    first = generate(m, PROMPTS, 1, pad_token_id=0).new_tokens
    eos = max(set(t[0] for t in first), key=[t[0] for t in first].count)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=eos)
    ours = generate(m, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours.sequences, ref)
    # right padding is handled too: the same new tokens
    right = torch.zeros_like(ids)
    rmask = torch.zeros_like(mask)
    for b, p in enumerate(PROMPTS):
        right[b, :len(p)], rmask[b, :len(p)] = torch.tensor(p), 1
    assert generate(m, right, 10, attention_mask=rmask, eos_token_id=eos, pad_token_id=0).new_tokens == \
        ours.new_tokens


def test_sampling_filters_equal_transformers_warpers_and_seeded_sampling():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g) * 3
    for k, p in ((0, 0.9), (10, 1.0), (10, 0.7), (1, 1.0), (0, 0.05)):
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        got = next_token_logits_filter(logits, k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (k, p)
    m = moe_model(seed=5)
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    a = generate(m, PROMPTS, 8, seed=11, **kw)
    b = generate(m, PROMPTS, 8, seed=11, **kw)
    c = generate(m, PROMPTS, 8, seed=12, **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    greedy = generate(m, PROMPTS, 8, pad_token_id=0)
    assert torch.equal(generate(m, PROMPTS, 8, do_sample=True, top_k=1, seed=3, pad_token_id=0).sequences,
                       greedy.sequences)


def test_bad_generation_input():
    m = moe_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="without any real token"):
        generate(m, torch.ones(2, 3, dtype=torch.long), 4, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_tp2_cache_equals_single_process():
    """torchrun, 2 ranks at TP2 (heads and kv heads split, GQA): cached decoding of a left-padded batch gives the
    logits of the single-process full forward, and greedy generation the same tokens."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MEGAMOE_DIST_TIMEOUT="120")
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        os.path.join(HERE, "dist_scripts", "generate_worker.py")], env=env, capture_output=True,
                       text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "FAIL" not in out and out.count("OK ") >= 2, out[-4000:]
