"""Our sharded format: streaming safetensors I/O, writing, lazy per-rank loading and re-sharding."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
from megamoe.formats.layout import expected_names, expected_shape
from megamoe.formats.safetensors_io import CheckpointError, SafetensorsReader, StreamingWriter, NAMES
from megamoe.formats.shards import ShardWriter, ShardedCheckpoint, load_shards, reshard, save_shards


def tiny_moe_cfg(**moe):
    m = dict(num_experts=8, top_k=2, router="topk_noisy", gate_network="mlp")
    m.update(moe)
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, moe=MoEConfig(**m)).validate()


def random_state(cfg, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(expected_shape(cfg, n), generator=g).to(dtype) for n in expected_names(cfg)}


def write(path, cfg, state, par):
    os.makedirs(path)
    w = ShardWriter(str(path), cfg, par, {n: NAMES[t.dtype] for n, t in state.items()}, {"partition": {"method": "t"}})
    for n in w.names:
        w.write(n, state[n])
    w.close()


def test_streaming_writer_matches_safetensors(tmp_path):
    ts = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0, 4)}
    p = str(tmp_path / "x.safetensors")
    w = StreamingWriter(p, [(k, NAMES[v.dtype], list(v.shape)) for k, v in ts.items()], {"format": "pt"})
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    back = load_file(p)  # the reference reader
    for k in ts:
        assert torch.equal(back[k], ts[k])
    r = SafetensorsReader(p)
    assert torch.equal(r.get("a"), ts["a"]) and torch.equal(r.get_rows("a", 1, 3), ts["a"][1:3])


def test_writer_refuses_wrong_order_and_early_close(tmp_path):
    p = str(tmp_path / "x.safetensors")
    w = StreamingWriter(p, [("a", "F32", [2]), ("b", "F32", [2])])
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="1 of 2"):
        w.close()


def test_truncated_file_is_named(tmp_path):
    p = str(tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.randn(100)}, p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 10)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: truncated"):
        SafetensorsReader(p)
    with open(p, "wb") as f:
        f.write(b"\x05\x00")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsReader(p)


def test_reshard_chain_bit_identical(tmp_path):
    cfg = tiny_moe_cfg()
    state = random_state(cfg)
    write(tmp_path / "a", cfg, state, ParallelConfig(tp=2, ep=2, etp=1))
    os.makedirs(tmp_path / "b")
    reshard(str(tmp_path / "a"), str(tmp_path / "b"), ParallelConfig(tp=1, ep=1), progress=False)
    os.makedirs(tmp_path / "c")
    reshard(str(tmp_path / "b"), str(tmp_path / "c"), ParallelConfig(tp=2, ep=4, etp=2), progress=False)
    for d in "abc":
        got = load_shards(str(tmp_path / d))
        assert set(got) == set(state)
        for n in state:
            assert got[n].dtype == state[n].dtype and torch.equal(got[n], state[n]), (d, n)
    m = json.load(open(tmp_path / "c" / "manifest.json"))
    assert m["parallel"] == {"tp": 2, "ep": 4, "etp": 2} and m["partition"] == {"method": "t"}
    assert sorted(os.listdir(tmp_path / "c")) == sorted(["manifest.json", "model-tp00-of-02.safetensors",
        "model-tp01-of-02.safetensors"] + [f"experts-ep{e:02d}-etp{r:02d}.safetensors" for e in range(4) for r in range(2)])


def test_rank_slices_follow_megatron_rules(tmp_path):
    cfg = tiny_moe_cfg()
    state = random_state(cfg)
    write(tmp_path / "a", cfg, state, ParallelConfig(tp=2, ep=2))
    # ask for a layout different from the stored one: TP4, EP4, ETP2
    for tp in range(4):
        for ep in range(4):
            got = load_shards(str(tmp_path / "a"), tp=(tp, 4), ep=(ep, 4), etp=(1, 2))
            q = state["layers.0.attn.q_proj.weight"]
            assert torch.equal(got["layers.0.attn.q_proj.weight"], q.chunk(4, 0)[tp])
            assert torch.equal(got["layers.1.attn.o_proj.weight"], state["layers.1.attn.o_proj.weight"].chunk(4, 1)[tp])
            assert torch.equal(got["embed.weight"], state["embed.weight"].chunk(4, 0)[tp])
            assert torch.equal(got["layers.0.mlp.router.gate.0.weight"], state["layers.0.mlp.router.gate.0.weight"])
            experts = sorted({int(n.split(".")[4]) for n in got if ".experts." in n})
            assert experts == [2 * ep, 2 * ep + 1]
            e = experts[0]
            assert torch.equal(got[f"layers.1.mlp.experts.{e}.gate_proj.weight"],
                               state[f"layers.1.mlp.experts.{e}.gate_proj.weight"].chunk(2, 0)[1])
            assert torch.equal(got[f"layers.1.mlp.experts.{e}.down_proj.weight"],
                               state[f"layers.1.mlp.experts.{e}.down_proj.weight"].chunk(2, 1)[1])


def test_manifest_and_file_mismatch_is_caught(tmp_path):
    cfg = tiny_moe_cfg()
    write(tmp_path / "a", cfg, random_state(cfg), ParallelConfig(tp=2, ep=2))
    os.remove(tmp_path / "a" / "experts-ep01-etp00.safetensors")
    with pytest.raises(CheckpointError, match="experts-ep01-etp00.safetensors: no such file"):
        ShardedCheckpoint(str(tmp_path / "a"))


def test_bad_layout_names_the_field(tmp_path):
    cfg = tiny_moe_cfg()
    os.makedirs(tmp_path / "a")
    with pytest.raises(Exception, match="parallel.ep"):
        ShardWriter(str(tmp_path / "a"), cfg, ParallelConfig(ep=3), {n: "BF16" for n in expected_names(cfg)})


def test_save_shards_atomic_and_never_overwrites(tmp_path):
    cfg = tiny_moe_cfg(router="mixtral", gate_network="linear")
    state = random_state(cfg, torch.float32)
    save_shards(str(tmp_path / "a"), cfg, state, ParallelConfig(tp=2, ep=4))
    got = load_shards(str(tmp_path / "a"), tp=(1, 2), ep=(3, 4))
    assert torch.equal(got["layers.1.mlp.experts.7.up_proj.weight"], state["layers.1.mlp.experts.7.up_proj.weight"])
    with pytest.raises(CheckpointError, match="not overwriting"):
        save_shards(str(tmp_path / "a"), cfg, state)
    bad = dict(state)
    del bad["layers.0.mlp.experts.3.down_proj.weight"]
    with pytest.raises(CheckpointError, match="lacks"):
        save_shards(str(tmp_path / "b"), cfg, bad)
    assert sorted(os.listdir(tmp_path)) == ["a"]
