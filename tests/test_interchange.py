"""Interchange: HF LLaMA -> our shards -> HF Mixtral / llama-moe v1, checked against independent references
(transformers' LlamaForCausalLM and MixtralForCausalLM, an independent llama-moe v1 forward, bit-exact tensors,
megamoe's own LlamaMoEModel)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megamoe import interchange as convert
from megamoe.interchange.forward import reference_logits
from megamoe.interchange.guard import GuardError
from megamoe.formats.layout import hf_llama_to_ours_name
from megamoe.formats.shards import ShardedCheckpoint, load_shards
from megamoe.config import MoEConfig

pytestmark = pytest.mark.usefixtures("world")

transformers = pytest.importorskip("transformers")


def tiny_llama(path, seed=0, tie=False, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    c = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1000.0, tie_word_embeddings=tie)
    c.update(kw)
    m = LlamaForCausalLM(LlamaConfig(**c)).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped norm shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense") / "llama"
    model = tiny_llama(str(d))
    return str(d), model


def ids_for(v=96):
    return torch.randint(0, v, (2, 9), generator=torch.Generator().manual_seed(7))


def test_reference_forward_matches_transformers_llama(dense):
    path, model = dense
    from megamoe.formats.hf_llama import config_from_hf
    cfg = config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    sd = {hf_llama_to_ours_name(k): v for k, v in model.state_dict().items()}
    ids = ids_for()
    with torch.no_grad():
        ref = model(ids).logits
    got = reference_logits(cfg, sd.__getitem__, ids)
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


def test_names_agree_with_hf_llama_module(dense):
    """Our streaming name map and the lead's dict renaming (hf_llama.hf_to_ours) must agree on every key."""
    from megamoe.formats.hf_llama import config_from_hf, hf_to_ours
    path, model = dense
    cfg = config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    sd = model.state_dict()
    theirs = hf_to_ours({k: k for k in sd}, cfg)
    ours = {hf_llama_to_ours_name(k): k for k in sd if hf_llama_to_ours_name(k)}
    assert ours == theirs


def test_mixtral_export_loads_in_transformers_and_matches_our_model(dense, tmp_path):
    """hf-to-moe (linear gate, mixtral router, TP2/EP2, scale 3) -> moe-to-hf Mixtral -> MixtralForCausalLM logits
    equal our LlamaMoEModel's on the shards (the scale folded into w2)."""
    from transformers import MixtralForCausalLM
    from megamoe.model import LlamaMoEModel
    path, _ = dense
    shards, hf = str(tmp_path / "moe"), str(tmp_path / "mixtral")
    convert.hf_to_moe(path, shards, num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                      score_scale=3.0, tp=2, ep=2, progress=False)
    s = convert.moe_to_hf(shards, hf, "mixtral", progress=False)
    assert s["format"] == "mixtral"
    cfgj = json.load(open(os.path.join(hf, "config.json")))
    assert cfgj["model_type"] == "mixtral" and "auto_map" not in cfgj and cfgj["num_local_experts"] == 4
    keys = set(load_file(os.path.join(hf, "model.safetensors")))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # per-expert layout, not stacked
    ids = ids_for()
    mix = MixtralForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ck = ShardedCheckpoint(shards)
    ours = LlamaMoEModel(ck.config).eval()
    ours.load_state_dict(load_shards(shards), strict=True)
    with torch.no_grad():
        a, b = mix(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 1e-5 * b.abs().max()
    # and the experts are not at their init values: the converted model is not the transformers default
    w1 = mix.model.layers[0].mlp.experts.gate_up_proj
    exp0 = load_shards(shards)["layers.0.mlp.experts.0.gate_proj.weight"]
    assert torch.equal(w1[0, : exp0.shape[0]], exp0)


def test_mixtral_refused_with_reason(dense, tmp_path):
    """An mlp gate does not fit Mixtral; rope_theta 1000 does not fit the llama-moe v1 code (base 10000 always), so
    `auto` has nowhere to go; at rope_theta 10000 it falls back to llama-moe v1."""
    path, _ = dense
    shards = str(tmp_path / "moe")
    convert.hf_to_moe(path, shards, num_experts=4, progress=False)  # mlp gate
    with pytest.raises(Exception, match="moe.gate_network"):
        convert.moe_to_hf(shards, str(tmp_path / "x"), "mixtral", progress=False)
    with pytest.raises(Exception, match="rope_theta: 1000; the released llama-moe v1 code"):
        convert.moe_to_hf(shards, str(tmp_path / "y"), "auto", progress=False)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    tiny_llama(str(tmp_path / "dense10k"), rope_theta=10000.0)
    convert.hf_to_moe(str(tmp_path / "dense10k"), str(tmp_path / "moe10k"), num_experts=4, progress=False)
    s = convert.moe_to_hf(str(tmp_path / "moe10k"), str(tmp_path / "auto"), "auto", progress=False)
    assert s["format"] == "llama-moe-v1"


def tiny_v1(path, dtype=torch.float16):
    """A llama-moe v1 checkpoint (released key names and config fields) with uneven experts and per-layer scales."""
    os.makedirs(path)
    g = torch.Generator().manual_seed(3)
    H, V, L, E = 32, 80, 2, 4
    sizes = [[8, 16, 12, 12], [12, 12, 12, 12]]
    sd = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": [H, H], p + "self_attn.k_proj.weight": [16, H],
                   p + "self_attn.v_proj.weight": [16, H], p + "self_attn.o_proj.weight": [H, H],
                   p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
                   p + "mlp.gate.gate_network.0.weight": [E, H], p + "mlp.gate.gate_network.2.weight": [E, E],
                   p + "mlp.gate.weight_noise.weight": [E, H]})
        for j, s in enumerate(sizes[i]):
            c = p + "mlp.calculator.experts."
            sd.update({c + f"weight_gate.{j}": [s, H], c + f"weight_up.{j}": [s, H], c + f"weight_down.{j}": [H, s]})
    sd = {k: (torch.randn(v, generator=g) * 0.3).to(dtype) for k, v in sd.items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # a persistent buffer some files carry
    save_file(sd, os.path.join(path, "model.safetensors"))
    cfg = {"architectures": ["LlamaMoEForCausalLM"], "model_type": "llama_moe", "vocab_size": V, "hidden_size": H,
           "intermediate_size": 48, "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "num_experts": E, "num_selects": 2, "size_experts": sizes,
           "gate_type": "TopKBalancedNoisyGate", "gate_network": "mlp", "gate_use_softmax": True,
           "gate_use_balance": True, "gate_balance_loss_weight": 0.01, "gate_add_noise": True,
           "gate_noise_epsilon": 0.01, "calculator_type": "UniversalCalculator", "multiply_gate_scores": True,
           "score_scale_factor": [4.0, 2.5], "pretraining_tp": 1}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return sd, cfg


def test_llama_moe_v1_round_trip_bit_exact(tmp_path):
    sd, cfg = tiny_v1(str(tmp_path / "v1"))
    convert.hf_to_moe(str(tmp_path / "v1"), str(tmp_path / "shards"), tp=2, ep=2, progress=False)
    convert.moe_to_hf(str(tmp_path / "shards"), str(tmp_path / "back"), "llama-moe-v1", progress=False)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    sd.pop("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    out = json.load(open(tmp_path / "back" / "config.json"))
    for k in ("model_type", "num_experts", "num_selects", "size_experts", "score_scale_factor", "gate_network",
              "gate_type", "calculator_type", "intermediate_size"):
        assert out[k] == cfg[k], k
    assert out["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_moe_hf.LlamaMoEForCausalLM"
    readme = open(tmp_path / "back" / "README.md").read()
    for fact in ("| <= 4.44.2 | yes", "| 4.48.x | the default load also leaves `weight_gate.*` uninitialised",
                 "| 5.x | cannot build the model", "RoPE with base 10000 whatever config.json says"):
        assert fact in readme, fact


def test_v1_reference_and_our_model_agree(tmp_path):
    """The independent v1 forward (their keys, their config) and megamoe's LlamaMoEModel on the imported shards."""
    from megamoe.interchange.reference_v1 import v1_logits
    from megamoe.model import LlamaMoEModel
    sd, cfg = tiny_v1(str(tmp_path / "v1"), dtype=torch.float32)
    convert.hf_to_moe(str(tmp_path / "v1"), str(tmp_path / "shards"), progress=False)
    ck = ShardedCheckpoint(str(tmp_path / "shards"))
    m = LlamaMoEModel(ck.config).eval()
    m.load_state_dict(load_shards(str(tmp_path / "shards")), strict=True)
    ids = ids_for(80)
    with torch.no_grad():
        ours = m(ids).logits
    ref = v1_logits(cfg, sd.__getitem__, ids)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()


def _partition_dir(tmp, parts):
    from megamoe.construct.partition import write_partitions
    d = str(tmp / "parts")
    write_partitions(d, parts)
    return d


@pytest.mark.parametrize("method", ["random", "clustering", "gradient", "sharing-inter", "sharing-inner"])
def test_construct_then_check_every_method(dense, tmp_path, method):
    """All experts active, uniform router, scale E: each method's converted model reproduces the dense logits
    (checked here independently of the tool's guard); sharing-inner reports its duplicated neurons."""
    from megamoe.construct import partition as P
    path, model = dense
    F, E = 48, 4
    rng = np.random.default_rng(0)
    imp = rng.random((E, F))
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    make = {
        "random": lambda i: P.split_random(F, E, seed=i),
        "clustering": lambda i: P.split_clustering(up, E, seed=i)[0],
        "gradient": lambda i: P.split_gradient(imp),
        "sharing-inter": lambda i: P.split_sharing_inter(imp, residual_size=8, expert_size=10),
        "sharing-inner": lambda i: P.split_sharing_inner(imp, expert_size=16),
    }[method]
    parts = {i: make(i) for i in range(2)}
    out = str(tmp_path / "moe")
    s = convert.hf_to_moe(path, out, partitions_dir=_partition_dir(tmp_path, parts), top_k=2, progress=False)
    dup = sum(p.duplicated for p in parts.values())
    assert s["duplicated_neurons"] == dup
    ck = ShardedCheckpoint(out)
    cfg = ck.config
    ids = ids_for()
    with torch.no_grad():
        dense_logits = model(ids).logits
    moe_logits = reference_logits(cfg, ck.get, ids, all_experts=True)
    err = ((moe_logits - dense_logits).abs().max() / dense_logits.abs().max()).item()
    if method == "sharing-inner":
        assert dup > 0 and err > 1e-3 and any("[skip] construct identity" in g for g in s["guard"])
    else:
        assert dup == 0 and err < 1e-5, err
        assert s["guard"][0].startswith("[ok  ] construct identity")


def test_streamed_conversion_equals_build_moe(dense, tmp_path):
    """Our layer-streaming converter writes exactly what the construct module's in-memory build_moe produces."""
    from megamoe.construct.build import build_moe
    from megamoe.construct.partition import split_random
    from megamoe.formats.hf_llama import load_hf_llama
    path, _ = dense
    out = str(tmp_path / "moe")
    convert.hf_to_moe(path, out, num_experts=4, top_k=1, seed=5, tp=2, ep=4, etp=2, progress=False)
    dcfg, dstate = load_hf_llama(path)
    parts = {i: split_random(48, 4, seed=5 + i) for i in range(2)}
    cfg, state = build_moe(dcfg, dstate, parts, MoEConfig(num_experts=4, top_k=1, score_scale=4.0), seed=5)
    got = load_shards(out)
    assert ShardedCheckpoint(out).config.to_dict() == cfg.to_dict()
    assert set(got) == set(state)
    for k in state:
        assert torch.equal(got[k], state[k]), k


def test_guard_catches_silent_random_experts(dense, tmp_path, monkeypatch):
    """The Megatron importer failure: experts written at init values. The guard must refuse and leave nothing."""
    from megamoe.formats import shards
    path, _ = dense
    real = shards.ShardWriter.write

    def broken(self, name, tensor):
        if ".experts.2." in name:
            tensor = torch.randn_like(tensor) * 0.02
        return real(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", broken)
    with pytest.raises(GuardError, match="construct identity"):
        convert.hf_to_moe(path, str(tmp_path / "moe"), num_experts=4, progress=False)
    assert os.listdir(tmp_path) == []


def test_guard_catches_a_lost_score_scale(dense, tmp_path, monkeypatch):
    from megamoe.formats import mixtral
    path, _ = dense
    convert.hf_to_moe(path, str(tmp_path / "moe"), num_experts=4, router="mixtral", gate_network="linear",
                      progress=False)
    monkeypatch.setattr(mixtral, "apply_scale", lambda t, s, dtype=None: t)  # forget to fold the scale into w2
    with pytest.raises(GuardError, match="MixtralForCausalLM"):
        convert.moe_to_hf(str(tmp_path / "moe"), str(tmp_path / "hf"), "mixtral", progress=False)
    assert not os.path.exists(tmp_path / "hf")


def test_mixtral_import_round_trip(dense, tmp_path):
    """Mixtral -> shards -> Mixtral: the same tensors (scale folded once, imported as scale 1)."""
    path, _ = dense
    convert.hf_to_moe(path, str(tmp_path / "moe"), num_experts=4, router="mixtral", gate_network="linear",
                      progress=False)
    convert.moe_to_hf(str(tmp_path / "moe"), str(tmp_path / "m1"), "mixtral", progress=False)
    convert.hf_to_moe(str(tmp_path / "m1"), str(tmp_path / "moe2"), tp=2, progress=False)
    convert.moe_to_hf(str(tmp_path / "moe2"), str(tmp_path / "m2"), "mixtral", progress=False)
    a = load_file(str(tmp_path / "m1" / "model.safetensors"))
    b = load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_import_a_transformers_saved_mixtral(tmp_path):
    """A Mixtral written by transformers itself (not by us) imports, and our model reproduces its logits."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(1)
    mc = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4)
    m = MixtralForCausalLM(mc).eval()
    m.save_pretrained(str(tmp_path / "mix"))
    s = convert.hf_to_moe(str(tmp_path / "mix"), str(tmp_path / "moe"), tp=2, ep=2, progress=False)
    assert s["guard"][0].startswith("[ok  ] Mixtral source (transformers MixtralForCausalLM)")
    ck = ShardedCheckpoint(str(tmp_path / "moe"))
    ids = ids_for(64)
    with torch.no_grad():
        ref = m(ids).logits
    got = reference_logits(ck.config, ck.get, ids)
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


def test_v1_import_computes_what_the_released_code_computes(tmp_path, caplog):
    """A llama-moe v1 config.json that says rope_theta 1e5: the released code (d7d0989) ignores it and uses base
    10000, so the import takes 10000 (and warns), and the guard's reference computes base 10000 too: our model on
    the imported shards equals a LLaMA-MoE forward at base 10000 and differs from one at 1e5."""
    import logging
    from megamoe.interchange.reference_v1 import v1_logits
    from megamoe.model import LlamaMoEModel
    sd, cfg = tiny_v1(str(tmp_path / "v1"), dtype=torch.float32)
    cfg["rope_theta"] = 1e5
    json.dump(cfg, open(tmp_path / "v1" / "config.json", "w"))
    with caplog.at_level(logging.WARNING):
        convert.hf_to_moe(str(tmp_path / "v1"), str(tmp_path / "shards"), progress=False)
    assert "rope_theta 100000 is ignored by the released llama-moe v1 code" in caplog.text
    ck = ShardedCheckpoint(str(tmp_path / "shards"))
    assert ck.config.rope_theta == 10000.0
    m = LlamaMoEModel(ck.config).eval()
    m.load_state_dict(load_shards(str(tmp_path / "shards")), strict=True)
    ids = torch.randint(0, 80, (1, 40), generator=torch.Generator().manual_seed(1))  # long enough for RoPE to matter
    with torch.no_grad():
        ours = m(ids).logits
    ref = v1_logits(cfg, sd.__getitem__, ids)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    import copy
    at_1e5 = copy.deepcopy(ck.config)
    at_1e5.rope_theta = 1e5
    m2 = LlamaMoEModel(at_1e5).eval()
    m2.load_state_dict(load_shards(str(tmp_path / "shards")), strict=True)
    with torch.no_grad():
        assert (m2(ids).logits - ref).abs().max() > 1e-3 * ref.abs().max()
    # their loader refuses any rope_scaling but {"type": "linear", "factor": float > 1}: so does the import
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    json.dump(cfg, open(tmp_path / "v1" / "config.json", "w"))
    with pytest.raises(Exception, match="rope_scaling"):
        convert.hf_to_moe(str(tmp_path / "v1"), str(tmp_path / "shards2"), progress=False)


def test_exports_carry_the_sources_special_token_ids(tmp_path):
    """config_to_hf used to write bos/eos/pad 1/2/0 whatever the source had (SmolLM2: 1/2/2)."""
    src = str(tmp_path / "dense")
    tiny_llama(src, rope_theta=10000.0, bos_token_id=5, eos_token_id=[6, 9], pad_token_id=7)
    shards = str(tmp_path / "moe")
    convert.hf_to_moe(src, shards, num_experts=4, router="mixtral", gate_network="linear", progress=False)
    assert ShardedCheckpoint(shards).config.pad_token_id == 7
    for fmt in ("mixtral", "llama-moe-v1"):
        convert.moe_to_hf(shards, str(tmp_path / fmt), fmt, progress=False)
        out = json.load(open(tmp_path / fmt / "config.json"))
        assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (5, [6, 9], 7), fmt


def test_mixtral_typed_llama_moe_v2_fields_go_to_the_v2_importer(dense, tmp_path):
    """A Mixtral-layout checkpoint carrying LLaMA-MoE v2's scale_factor / residual / attention MoE used to import
    as stock Mixtral (the scale silently dropped) and pass the guard against stock Mixtral. Such a directory is now
    read by the llama-moe v2 importer (tests/test_interchange_v2.py), which honours the scale, and refuses what the
    directory does not hold (attention MoE without attn_experts, a residual block without its tensors)."""
    path, _ = dense
    shards, hf = str(tmp_path / "moe"), str(tmp_path / "mixtral")
    convert.hf_to_moe(path, shards, num_experts=4, top_k=2, router="mixtral", gate_network="linear", progress=False)
    convert.moe_to_hf(shards, hf, "mixtral", progress=False)
    cfgj = json.load(open(os.path.join(hf, "config.json")))
    json.dump({**cfgj, "scale_factor": 4.0}, open(os.path.join(hf, "config.json"), "w"))
    s = convert.hf_to_moe(hf, str(tmp_path / "v2"), progress=False)
    assert s["method"] == "import llama-moe-v2" and s["score_scale"] == 4.0
    for extra, msg in (({"use_attn_moe": True}, "attn_experts"),
                       ({"intermediate_size_residual": 8}, "mlp_residual")):
        json.dump({**cfgj, **extra}, open(os.path.join(hf, "config.json"), "w"))
        with pytest.raises(Exception, match=msg):
            convert.hf_to_moe(hf, str(tmp_path / f"back_{msg}"), progress=False)
        assert not os.path.exists(tmp_path / f"back_{msg}")
    # read as stock Mixtral directly, the v2 fields are still refused (they would be dropped)
    from megamoe.formats import mixtral
    with pytest.raises(Exception, match="scale_factor"):
        mixtral.config_from_hf({**cfgj, "scale_factor": 4.0})


def test_dense_dir_is_complete_for_every_loader(smollm2_dir, tmp_path):
    """transformers 5 writes config.json without `architectures` and with RoPE only under rope_parameters, and a
    tokenizer only it reads. llama.cpp's converter refused such a directory (no architectures) and, once patched,
    used RoPE base 10000 (perplexity 30.4 instead of 24.7); transformers 4.x could not load the tokenizer.
    complete_for_every_loader adds the fields and normalises the tokenizer, leaving what it encodes unchanged."""
    import shutil
    from transformers import AutoTokenizer
    from megamoe.formats.embedded import complete_for_every_loader
    d = tmp_path / "v5style"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(os.path.join(smollm2_dir, f), d / f)
    cfg = json.load(open(d / "config.json"))
    for k in ("architectures", "rope_theta", "rope_scaling"):
        cfg.pop(k, None)
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    json.dump(cfg, open(d / "config.json", "w"))
    tc = json.load(open(d / "tokenizer_config.json"))
    tc.pop("chat_template", None)
    tc["tokenizer_class"] = "TokenizersBackend"
    json.dump(tc, open(d / "tokenizer_config.json", "w"))
    tj = json.load(open(d / "tokenizer.json"))
    tj["model"]["merges"] = [m.split(" ") for m in tj["model"]["merges"]]
    json.dump(tj, open(d / "tokenizer.json", "w"))
    before = AutoTokenizer.from_pretrained(str(d))
    changed = complete_for_every_loader(str(d))
    assert set(changed) == {"config.json", "tokenizer_config.json", "tokenizer.json"}
    cfg = json.load(open(d / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_theta"] == 100000.0
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    tc = json.load(open(d / "tokenizer_config.json"))
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["chat_template"] == open(d / "chat_template.jinja").read()
    assert all(isinstance(m, str) for m in json.load(open(d / "tokenizer.json"))["model"]["merges"])
    after = AutoTokenizer.from_pretrained(str(d))
    text = "def f(x):\n    return x ** 2  # naïve 😀"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    assert after.apply_chat_template(msgs, tokenize=False) == before.apply_chat_template(msgs, tokenize=False)
    assert complete_for_every_loader(str(d)) == []  # idempotent


def test_mixtral_export_past_llama_cpps_top_k_says_so(tmp_path, caplog):
    """llama.cpp aborts at context creation on a Mixtral GGUF routing more than 16 experts per token (measured on
    SmolLM2: top-16 runs, top-24 and the megamoe recipe's top-32 abort): such an export warns and its model card
    says which loader runs it; a top-2 export does neither."""
    import logging
    path = str(tmp_path / "dense")
    tiny_llama(path, intermediate_size=96)   # 24 experts of 4 neurons (transformers' grouped_mm: 16-byte rows)
    for k, E in ((17, 24), (2, 4)):
        shards, hf = str(tmp_path / f"moe{k}"), str(tmp_path / f"mixtral{k}")
        convert.hf_to_moe(path, shards, num_experts=E, top_k=k, router="mixtral", gate_network="linear",
                          progress=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            convert.moe_to_hf(shards, hf, "mixtral", progress=False)
        card = open(os.path.join(hf, "README.md")).read()
        if k > 16:
            assert "17 experts per token" in caplog.text and "llama.cpp does not" in caplog.text
            assert "## llama.cpp" in card and "GGML_ASSERT(obj_new)" in card
        else:
            assert "llama.cpp" not in caplog.text and "GGML_ASSERT" not in card


def test_mixtral_export_summary_notes_are_the_exports_own(dense, tmp_path):
    """The summary's `notes` are the export's remarks (a list of lines), never the layouts' loading READMEs (a
    variable of the llama.cpp check once shadowed them: every Mixtral summary carried a dict of READMEs)."""
    path, _ = dense
    shards, hf = str(tmp_path / "moe"), str(tmp_path / "mixtral")
    convert.hf_to_moe(path, shards, num_experts=4, top_k=2, router="mixtral", gate_network="linear", progress=False)
    s = convert.moe_to_hf(shards, hf, "mixtral", progress=False)
    assert isinstance(s.get("notes", []), list)
    assert not any("llama-moe" in str(n) and "checkpoint (exported by megamoe)" in str(n) for n in s.get("notes", []))


def test_mixtral_export_of_half_precision_shards_with_a_calibrated_scale_is_exact(dense, tmp_path, caplog):
    """bf16 shards whose score scale is not a power of two (calibrated scales are ~32.2): w2 = scale * down rounded
    to bf16 is not the model (on SmolLM2 at 128 x top-32 the routing then flips, logits off by 1-4 of 28, and the
    guard refused the quickstart's bf16 export), so the export is written in float32 and matches our model on the
    shards in transformers; a power-of-two scale (v1's 4) multiplies exactly and the export stays bf16."""
    import logging
    from safetensors import safe_open
    from transformers import MixtralForCausalLM
    from megamoe.model import LlamaMoEModel
    path, _ = dense
    ids = ids_for()
    for scale, want in ((3.3, "F32"), (4.0, "BF16")):
        shards, hf = str(tmp_path / f"moe{scale}"), str(tmp_path / f"mixtral{scale}")
        convert.hf_to_moe(path, shards, num_experts=4, top_k=2, router="mixtral", gate_network="linear",
                          score_scale=scale, dtype="bfloat16", progress=False)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            s = convert.moe_to_hf(shards, hf, "mixtral", progress=False)
        with safe_open(os.path.join(hf, "model.safetensors"), "pt") as f:
            dts = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dts == {want}, (scale, dts)
        cfgj = json.load(open(os.path.join(hf, "config.json")))
        assert cfgj.get("torch_dtype", cfgj.get("dtype")) == ("float32" if want == "F32" else "bfloat16")
        assert ("writing the export in float32" in caplog.text) == (want == "F32")
        assert any("float32" in n for n in s.get("notes", [])) == (want == "F32")
        mix = MixtralForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        ck = ShardedCheckpoint(shards)
        ours = LlamaMoEModel(ck.config).eval()
        ours.load_state_dict({k: v.float() for k, v in load_shards(shards).items()}, strict=True)
        with torch.no_grad():
            a, b = mix(ids).logits, ours(ids).logits
        assert (a - b).abs().max() < 1e-5 * b.abs().max(), (scale, float((a - b).abs().max()))
