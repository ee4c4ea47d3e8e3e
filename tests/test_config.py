"""Bad configs fail with a message that names the field."""

import pytest

from megamoe.config import ConfigError, ModelConfig, ParallelConfig, load_yaml

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            moe=dict(num_experts=4, top_k=2))


def build(**over):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for k, v in over.items():
        if k.startswith("moe_"):
            d["moe"][k[4:]] = v
        else:
            d[k] = v
    return ModelConfig.from_dict(d).validate()


@pytest.mark.parametrize("over, field", [
    ({"moe_top_k": 5}, "moe.top_k"),
    ({"moe_top_k": 0}, "moe.top_k"),
    ({"moe_gate_network": "conv"}, "moe.gate_network"),
    ({"moe_router": "hash"}, "moe.router"),
    ({"moe_expert_sizes": [30, 30, 30, 30]}, "moe.expert_sizes[0]"),
    ({"moe_expert_sizes": [[32] * 4]}, "moe.expert_sizes"),
    ({"moe_num_experts": 3}, "moe.expert_sizes"),           # 3 does not divide 128 for an equal split
    ({"moe_router": "switch"}, "moe.top_k"),                 # switch is top-1
    ({"moe_score_scale": [1.0]}, "moe.score_scale"),
    ({"moe_drop_policy": "drop"}, "moe.drop_policy"),
    ({"moe_capacity_factor": -1.0}, "moe.capacity_factor"),
    ({"moe_moe_layers": [5]}, "moe.moe_layers"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.rope_type"),
    ({"moe_bogus": 1}, "moe.bogus"),
    ({"layers": 2}, "layers"),
])
def test_bad_model_config_names_field(over, field):
    with pytest.raises(ConfigError) as e:
        build(**over)
    assert str(e.value).startswith(field), str(e.value)


def test_valid_configs_and_uneven_sizes():
    c = build(moe_expert_sizes=[[10, 20, 30, 68], [32, 32, 32, 32]], moe_score_scale=[2.0, 4.0])
    assert c.expert_sizes(0) == [10, 20, 30, 68] and c.moe.layer_scale(1) == 4.0
    c = build(moe_residual_size=32)
    assert c.expert_sizes(1) == [24] * 4


def test_param_counts_llama_moe_3_5b():
    """The paper's 2/8 model: 6.7B total, ~3.5B activated (llama-moe v1 fact sheet, §5)."""
    from megamoe.config import MoEConfig
    c = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    moe=MoEConfig(num_experts=8, top_k=2, gate_network="mlp"))
    pc = c.validate().param_counts()
    assert 6.6e9 < pc["total"] < 6.8e9 and 3.4e9 < pc["active"] < 3.6e9


@pytest.mark.parametrize("pc, world, field", [
    (ParallelConfig(ep=3), 6, "parallel.ep"),             # 3 does not divide 4 experts
    (ParallelConfig(tp=4), 4, "parallel.tp"),             # 4 does not divide 2 kv heads
    (ParallelConfig(tp=2), 3, "parallel.tp"),             # world size
    (ParallelConfig(sequence_parallel=True), 1, "parallel.sequence_parallel"),
])
def test_bad_parallel_layout(pc, world, field):
    with pytest.raises(ConfigError) as e:
        pc.validate(build(), world)
    assert str(e.value).startswith(field), str(e.value)


def test_yaml_errors_name_file_and_field(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("vocab_size: 100\nhidden_size: 64\nintermediate_size: 128\nnum_layers: 2\nnum_heads: 4\n"
                 "moe:\n  num_experts: 4\n  top_k: 2\n")
    assert load_yaml(str(p), ModelConfig).validate().moe.top_k == 2
    p.write_text("moe:\n  top_kk: 2\n")
    with pytest.raises(ConfigError, match=r"m.yaml: moe.top_kk: unknown field"):
        load_yaml(str(p), ModelConfig)
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml(str(tmp_path / "missing.yaml"), ModelConfig)


def test_precision_auto(monkeypatch):
    import megamoe.training.config as C
    assert C.resolve_precision("fp32", cuda=True) == "fp32" and C.resolve_precision("bf16", cuda=False) == "bf16"
    assert C.resolve_precision("auto", cuda=True) == "bf16"
    for native in (True, False):   # fp32 on every CPU unless bf16 is asked for (issue 7: bf16 on GPU, fp32 on CPU)
        monkeypatch.setattr(C, "cpu_has_native_bf16", lambda native=native: native)
        assert C.resolve_precision("auto", cuda=False) == "fp32"
