"""MFU / TGS / FLOPs formulas against hand computations; LR schedule against the recipe; config validation."""

import math

import pytest

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.config import apply_overrides
from megamoe.training.config import load_train_config, save_train_config
from megamoe.training.metrics import ThroughputMeter, flops_per_token, matmul_active_params, mfu
from megamoe.training.schedule import LRSchedule


def small_moe(**kw):
    # H=64, F=256 split into 4 experts of 64, top-2, 2 layers, 4 heads (d=16), 2 kv heads, V=100, untied
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                tie_word_embeddings=False, moe=MoEConfig(num_experts=4, top_k=2, router="mixtral",
                                                       gate_network="linear"))
    base.update(kw)
    return ModelConfig(**base).validate()


def test_flops_per_token_hand_computation():
    cfg = small_moe()
    H, V, L, S = 64, 100, 2, 128
    attn_params = H * 16 * (2 * 4 + 2 * 2)          # q,o: 4 heads x 16; k,v: 2 heads x 16 -> 64*16*12 = 12288
    experts_active = 2 * 3 * H * 64                  # 2 experts of 64 neurons, gate/up/down
    router = H * 4
    lm_head = V * H                                  # the input embedding is a lookup, not counted
    n = L * (attn_params + experts_active + router) + lm_head
    assert n == 2 * (12288 + 24576 + 256) + 6400 == 80640
    assert matmul_active_params(cfg) == n
    attn = 12 * L * S * 4 * 16 / 2                   # causal: half of 12*L*S*heads*d
    assert flops_per_token(cfg, S) == pytest.approx(6 * n + attn)
    assert flops_per_token(cfg, S, causal_half=False) == pytest.approx(6 * n + 2 * attn)


def test_activated_not_total_params():
    cfg = small_moe()
    total = cfg.param_counts()["total"]
    # all 4 experts would add 2 more experts' worth per layer: MFU on total params overstates FLOPs
    assert total - cfg.param_counts()["active"] == 2 * (2 * 3 * 64 * 64)
    tied = small_moe(tie_word_embeddings=True)
    assert matmul_active_params(tied) == matmul_active_params(cfg)  # tied: the table counts once, as lm_head


def test_llama_moe_3_5b_flops_match_paper_count():
    # llama-moe v1 2/8 from LLaMA-2-7B: activated ~3.49B of which 0.262B embeddings+head (llama-moe-v1.md §5)
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      moe=MoEConfig(num_experts=8, top_k=2)).validate()
    act = cfg.param_counts()["active"]
    assert 3.45e9 < act < 3.55e9
    # matmul params drop the 131M input embedding and the norms
    assert matmul_active_params(cfg) == act - 32000 * 4096 - 4096 * 65


def test_tgs_window_and_mfu():
    m = ThroughputMeter(window=3, world_size=4)
    m.record(8000, 100.0)      # a slow first step (compilation, eval ...) falls out of the window
    for _ in range(3):
        m.record(8000, 2.0)
    assert m.tokens_per_second == pytest.approx(4000.0)
    assert m.tgs == pytest.approx(1000.0)          # per device
    fpt = 6 * 3.0e9
    assert mfu(m.tgs, fpt, 989.4e12) == pytest.approx(1000 * 18e9 / 989.4e12)
    assert mfu(m.tgs, fpt, None) is None


def test_schedule_warmup_cosine_floor():
    s = LRSchedule(2e-4, warmup_steps=100, decay_steps=1100, min_lr_ratio=0.1, style="cosine")
    assert s.lr_at(0) == pytest.approx(2e-6)               # (0+1)/100 of lr: the first update is not wasted
    assert s.lr_at(99) == pytest.approx(2e-4)
    assert s.lr_at(100) == pytest.approx(2e-4)
    assert s.lr_at(600) == pytest.approx(2e-4 * 0.5)        # half way through the decay: cos(pi/2)
    # the cosine reaches 10% at p = acos(-0.8)/pi, then stays at the floor
    p = math.acos(-0.8) / math.pi
    assert s.lr_at(100 + int(p * 1000) + 5) == pytest.approx(2e-5)
    assert s.lr_at(5000) == pytest.approx(2e-5)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(100, 1200))


def test_schedule_applies_weight_decay_multipliers():
    class Opt:
        param_groups = [{"wd_mult": 1.0, "lr_mult": 1.0}, {"wd_mult": 0.0, "lr_mult": 1.0}]
    s = LRSchedule(1e-3, 0, 10, 0.1, "constant", weight_decay=0.1)
    s.apply(Opt, 3)
    assert [g["weight_decay"] for g in Opt.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in Opt.param_groups] == [1e-3, 1e-3]


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: {vocab_size: 128, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4}\n"
                 "data: {seq_len: 32}\ntrain: {steps: 10, global_batch_tokens: 100}\n")
    cfg = load_train_config(str(p))
    with pytest.raises(ConfigError, match=r"^train.global_batch_tokens"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"optim.lrr: unknown field"):
        load_train_config(str(p), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer"):
        load_train_config(str(p), ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model.moe.top_k"):
        load_train_config(str(p), ["train.global_batch_tokens=64", "model.moe.top_k=9"]).validate()
    ok = load_train_config(str(p), ["train.global_batch_tokens=64", "optim.lr=1e-4"]).validate()
    assert ok.optim.lr == 1e-4 and ok.train.global_batch_tokens == 64
    out = tmp_path / "saved.yaml"
    save_train_config(ok, str(out))
    again = load_train_config(str(out)).validate()
    assert again.to_dict() == ok.to_dict()


def test_overrides_create_sections():
    d = apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "x.y.z=true", "a.b=2.5"])
    assert d == {"a": {"b": 2.5, "c": [1, 2]}, "x": {"y": {"z": True}}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])
