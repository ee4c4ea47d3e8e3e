"""The fast conversion paths (issue #3): strided/threaded shard writes, gathered experts, the blocked low-precision
guard forward and the source checksum give the same bytes and logits as the plain torch references, and the
guard still refuses what it must."""

import json
import os
import struct
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from megamoe import interchange as convert
from megamoe.formats import checksum
from megamoe.interchange import forward
from megamoe.interchange import dense_to_moe as hf_to_moe_mod
from megamoe.interchange.guard import GuardError
from megamoe.formats.safetensors_io import StreamingWriter, write_tensor_at
from megamoe.formats.shards import ShardWriter, ShardedCheckpoint, load_shards
from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
from megamoe.construct.partition import Partition, split_random

transformers = pytest.importorskip("transformers")


def _tiny_llama(path, dtype=torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense16(tmp_path_factory):
    return _tiny_llama(str(tmp_path_factory.mktemp("dense16") / "llama"))


def test_strided_writes_are_bit_identical(tmp_path):
    """Column slices (rows contiguous) go out with gathered writes, other strides through a copy: same bytes as
    safetensors' save_file of the contiguous tensors."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(64, 40, generator=g).to(torch.bfloat16)
    cases = {"colhalf": full[:, 20:], "colblock": full[:, 3:17], "rows": full[5:9], "transposed": full.t(),
             "whole": full, "vec": torch.randn(7, generator=g), "scalar_rows": full[:, 7:8]}
    plan = [(n, {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype], list(t.shape)) for n, t in cases.items()]
    for threads in (False, True):
        p = tmp_path / f"w{threads}.safetensors"
        w = StreamingWriter(str(p), plan, metadata={"format": "pt"})
        if threads:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(2) as ex:
                futs = [w.write(n, t, ex.submit) for n, t in cases.items()]
                [f.result() for f in futs]
        else:
            for n, t in cases.items():
                w.write(n, t)
        w.close()
        got = load_file(str(p))
        for n, t in cases.items():
            assert torch.equal(got[n], t.contiguous()), n
    ref = tmp_path / "ref.safetensors"
    save_file({n: t.clone().contiguous() for n, t in cases.items()}, str(ref), metadata={"format": "pt"})
    want = load_file(str(ref))
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_pwritev_batches_beyond_iov_max(tmp_path):
    t = torch.arange(3000 * 6, dtype=torch.int16).view(3000, 6)[:, 1:4]  # 3000 rows > IOV_MAX
    fd = os.open(tmp_path / "raw", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert write_tensor_at(fd, 5, t) == t.numel() * 2
    finally:
        os.close(fd)
    raw = (tmp_path / "raw").read_bytes()
    assert raw[5:] == t.contiguous().numpy().tobytes()


def _moe_cfg():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2)).validate()
    return cfg


def test_threaded_shard_writer_matches_synchronous(tmp_path):
    from megamoe.formats.layout import expected_names, expected_shape
    cfg = _moe_cfg()
    g = torch.Generator().manual_seed(1)
    state = {n: torch.randn(expected_shape(cfg, n), generator=g).half() for n in expected_names(cfg)}
    par = ParallelConfig(tp=2, ep=2)
    outs = []
    for threads in (0, 2):
        d = tmp_path / f"t{threads}"
        d.mkdir()
        w = ShardWriter(str(d), cfg, par, {n: "F16" for n in state}, threads=threads)
        for n in w.names:
            w.write(n, state[n])
        w.close()
        outs.append(d)
    files = sorted(f for f in os.listdir(outs[0]) if f.endswith(".safetensors"))
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    got = load_shards(str(outs[1]))
    assert all(torch.equal(got[n], state[n]) for n in state)


def test_threaded_writer_error_surfaces_and_abort_is_clean(tmp_path, monkeypatch):
    from megamoe.formats import safetensors_io
    from megamoe.formats.layout import expected_names, expected_shape
    cfg = _moe_cfg()
    state = {n: torch.zeros(expected_shape(cfg, n)).half() for n in expected_names(cfg)}

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors_io, "write_tensor_at", boom)
    w = ShardWriter(str(tmp_path), cfg, ParallelConfig(tp=2, ep=2), {n: "F16" for n in state}, threads=1)
    with pytest.raises(OSError, match="disk full"):
        for n in w.names:
            w.write(n, state[n])
        w.close()
    w.abort()


def test_gathered_experts_equal_per_expert_index_select():
    g = torch.Generator().manual_seed(2)
    F_, H = 24, 8
    gate, up, down = (torch.randn(F_, H, generator=g).half(), torch.randn(F_, H, generator=g).half(),
                      torch.randn(H, F_, generator=g).half())
    parts = [split_random(F_, 4, seed=3),
             Partition(experts=[[0, 5, 7], [1, 2, 3, 5], [9, 4], [8, 10, 11]], residual=[12, 13, 20],
                       ffn_width=F_, method="test")]
    from megamoe.formats.buffers import Arena
    for part in parts:
        cut = hf_to_moe_mod._gather_experts(part, gate, up, down, Arena(), "0")
        blocks = [(f"experts.{e}", idx) for e, idx in enumerate(part.experts)]
        if part.residual:
            blocks.append(("shared", part.residual))
        for name, idx in blocks:
            ix = torch.as_tensor(idx, dtype=torch.long)
            assert torch.equal(cut[name]["gate_proj"], gate[ix])
            assert torch.equal(cut[name]["up_proj"], up[ix])
            assert torch.equal(cut[name]["down_proj"], down[:, ix])
    # fp32 and bf16 take the same route (int views of the element size)
    for dt in (torch.float32, torch.bfloat16):
        cut = hf_to_moe_mod._gather_experts(parts[0], gate.to(dt), up.to(dt), down.to(dt), Arena(), "1")
        ix = torch.as_tensor(parts[0].experts[1], dtype=torch.long)
        assert torch.equal(cut["experts.1"]["down_proj"], down.to(dt)[:, ix])


def test_blocked_linear_matches_fp32_linear(monkeypatch):
    monkeypatch.setattr(forward, "BLOCK_BYTES", 4 * 32 * 5)  # blocks of 5 rows: several blocks and a remainder
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, generator=g)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        w = torch.randn(23, 32, generator=g).to(dt)
        ref = F.linear(x, w.float())
        got = forward._lin(x, w)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        for dim in (0, 1):
            split = forward.SplitWeight(list(w.chunk(2 if dim == 1 else 3, dim=dim)), dim)
            got = forward._lin(x, split)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    table = torch.randn(10, 4, generator=g).half()
    ids = torch.tensor([[0, 9, 4], [5, 5, 1]])
    ref = F.embedding(ids, table.float())
    assert torch.equal(forward._embed(table, ids), ref)
    assert torch.equal(forward._embed(forward.SplitWeight(list(table.chunk(2)), 0), ids), ref)


def test_checksums_and_manifest(dense16, tmp_path):
    files = checksum.weight_files(dense16)
    assert files and all(os.path.isfile(f) for f in files)
    s = convert.hf_to_moe(dense16, str(tmp_path / "moe"), num_experts=4, tp=2, ep=2, progress=False)
    m = json.load(open(tmp_path / "moe" / "manifest.json"))
    alg, sums = checksum.manifest_checksums(m["source"])
    assert alg == ("xxh3_128" if checksum.available("xxh3_128") else "sha256")
    assert sums == {os.path.basename(f): checksum.file_digest(f, alg) for f in files}
    assert s["guard"][0].startswith("[ok  ]")
    convert.hf_to_moe(dense16, str(tmp_path / "moe256"), num_experts=4, checksum="sha256", progress=False)
    m = json.load(open(tmp_path / "moe256" / "manifest.json"))
    import hashlib
    want = {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
    assert checksum.manifest_checksums(m["source"]) == ("sha256", want)
    assert m["source"]["sha256"] == want  # the key earlier manifests used
    assert checksum.manifest_checksums({"sha256": want}) == ("sha256", want)  # an old manifest
    assert checksum.manifest_checksums(None) == (None, {})
    with pytest.raises(Exception, match="md5"):
        convert.hf_to_moe(dense16, str(tmp_path / "x"), num_experts=4, checksum="md5", progress=False)


def test_cli_starts_the_checksum_before_torch_and_uses_it(dense16, tmp_path, monkeypatch):
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(
        "checkpoint_convert_cli", os.path.join(os.path.dirname(__file__), "..", "tools", "checkpoint_convert.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    made = []
    real = checksum.BackgroundHasher

    class Spy(real):
        def __init__(self, *a, **k):
            made.append(self)
            super().__init__(*a, **k)

    monkeypatch.setattr(checksum, "BackgroundHasher", Spy)
    monkeypatch.setattr(hf_to_moe_mod, "BackgroundHasher", Spy)
    assert cli.main(["hf-to-moe", "--src", dense16, "--out", str(tmp_path / "moe"), "--experts", "4",
                     "--recipe", "llama-moe-v1", "--quiet"]) == 0
    assert len(made) == 1  # the early one, not a second hash inside hf_to_moe
    assert "torch" in sys.modules  # (the test process had it already; the CLI starts the hash before importing it)


def test_guard_checks_the_bytes_on_disk(dense16, tmp_path, monkeypatch):
    """An expert corrupted in the written file after the writer finished (not in memory) must be refused: the guard
    reads the shards back."""
    real = ShardWriter.close

    def close_then_corrupt(self):
        path = real(self)
        f = os.path.join(self.out_dir, "experts-ep01-etp00.safetensors")
        with open(f, "r+b") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            name = next(k for k in header if k.endswith("experts.3.down_proj.weight"))
            a, b = header[name]["data_offsets"]
            fh.seek(8 + n + a)
            data = np.frombuffer(fh.read(b - a), dtype=np.float16).copy()
            fh.seek(8 + n + a)
            fh.write((data * 3).tobytes())  # a wrong scale on one expert
        return path

    monkeypatch.setattr(ShardWriter, "close", close_then_corrupt)
    with pytest.raises(GuardError, match="construct identity"):
        convert.hf_to_moe(dense16, str(tmp_path / "moe"), num_experts=4, tp=2, ep=2, progress=False)
    assert os.listdir(tmp_path) == []


def test_guard_catches_permuted_expert_rows(dense16, tmp_path, monkeypatch):
    real = ShardWriter.write

    def permuted(self, name, tensor):
        if name == "layers.1.mlp.experts.0.up_proj.weight":
            tensor = tensor.flip(0)
        return real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", permuted)
    with pytest.raises(GuardError):
        convert.hf_to_moe(dense16, str(tmp_path / "moe"), num_experts=4, progress=False)
    assert os.listdir(tmp_path) == []


def test_fp16_conversion_is_bit_exact_and_matches_the_torch_reference(dense16, tmp_path):
    """The fast path writes exactly the tensors build_moe computes in plain torch."""
    from megamoe.formats.hf_llama import config_from_hf
    from megamoe.formats.layout import hf_llama_to_ours_name
    from megamoe.construct.build import build_moe
    out = str(tmp_path / "moe")
    convert.hf_to_moe(dense16, out, num_experts=4, tp=2, ep=2, seed=3, progress=False)
    dcfg = config_from_hf(json.load(open(os.path.join(dense16, "config.json"))))
    sd = load_file(os.path.join(dense16, "model.safetensors"))
    dstate = {hf_llama_to_ours_name(k): v for k, v in sd.items() if hf_llama_to_ours_name(k)}
    parts = {i: split_random(48, 4, seed=3 + i) for i in range(2)}
    cfg, state = build_moe(dcfg, dstate, parts, MoEConfig(num_experts=4, top_k=2, score_scale=2.0), seed=3)
    got = load_shards(out)
    assert ShardedCheckpoint(out).config.to_dict() == cfg.to_dict()
    for k in state:
        assert got[k].dtype == torch.float16, k
        if "router" in k:
            assert torch.equal(got[k], state[k].to(torch.float16)), k
        else:
            assert torch.equal(got[k], state[k]), k


def test_in_kernel_copy_of_source_bytes_and_its_fallback(tmp_path, monkeypatch):
    """Tagged source maps are copied file to file (copy_file_range); a closed reader falls back to the memory."""
    from megamoe.formats import safetensors_io
    from megamoe.formats.safetensors_io import SafetensorsReader, copy_range_at
    t = torch.arange(4096, dtype=torch.int16).view(64, 64)
    save_file({"x": t}, str(tmp_path / "src.safetensors"))
    r = SafetensorsReader(str(tmp_path / "src.safetensors"))
    m = r.map("x")
    start, n = r.file_range("x")
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(safetensors_io.os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    for i, reader in enumerate((r, None)):
        fd = os.open(tmp_path / f"out{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if reader is None:
                r.close()
                reader = r
            assert copy_range_at(fd, 3, reader, start + 64 * 2 * 10, m[10:20]) == 10 * 64 * 2
        finally:
            os.close(fd)
        assert (tmp_path / f"out{i}").read_bytes()[3:] == t[10:20].numpy().tobytes()
    assert len(calls) == 1  # the open reader went through the kernel copy, the closed one did not


def test_blocked_linear_row_split_between_threads_is_bit_identical(monkeypatch):
    """forward.threads(n) splits every matrix into block-aligned row ranges, one per thread: each output element
    comes from the same block product whatever n, so the guard's logits do not depend on the core count."""
    monkeypatch.setattr(forward, "BLOCK_BYTES", 4 * 32 * 5)  # blocks of 5 rows
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, generator=g)
    w = torch.randn(97, 32, generator=g).half()  # 20 blocks, the last of 2 rows
    ref = F.linear(x, w.float())
    one = forward._lin(x, w)
    assert (one - ref).abs().max() <= 1e-5 * ref.abs().max()
    seen = set()
    mm = torch.mm

    def spy(*a, **k):
        seen.add(threading.current_thread().name)
        return mm(*a, **k)

    monkeypatch.setattr(torch, "mm", spy)
    for n in (2, 3, 4, 7, 64):
        seen.clear()
        with forward.threads(n):
            got = forward._lin(x, w)
        assert torch.equal(got, one), n
        # the calling thread takes the first range, pool threads the others (a pool thread may take two)
        assert threading.current_thread().name in seen and any(t.startswith("megamoe-forward") for t in seen), seen
    with forward.threads(1):
        seen.clear()
        assert torch.equal(forward._lin(x, w), one)
        assert seen == {threading.current_thread().name}
    assert forward._POOL == [None, 1]  # closed blocks leave no pool behind
