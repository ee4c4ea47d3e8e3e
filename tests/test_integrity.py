"""Integrity of what we write and read (issue 14): the safetensors reader validates headers as strictly as the
reference library (`safetensors.safe_open` is the independent reference for every case), and our shards carry a
checksum per stored tensor that every tool verifies."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from megamoe.errors import CheckpointError
from megamoe.formats.safetensors_io import SafetensorsReader

pytestmark = pytest.mark.usefixtures("world")

# ---------------------------------------------------------------------------------------------------------------
# the strict reader: every header the reference refuses, we refuse (naming the file and the tensor), and the
# reference's accepted corner cases stay accepted

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
D16 = bytes(range(16))


def _file(path, header=None, data=b"", raw=None, pad=True):
    h = raw if raw is not None else json.dumps(header).encode()
    if pad:
        h += b" " * ((-len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def _reference_refuses(path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001 - any refusal
        return True
    return False


REFUSED = {  # case: (header or raw bytes, data, what our message must name)
    "alias": ({"a": A, "b": dict(A)}, D16[:8], r"tensor 'b'.*overlaps"),
    "overlap": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, "b": B}, D16, r"tensor 'b'.*overlaps"),
    "gap": ({"a": A, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, D16 + bytes(4),
            r"tensor 'b'.*gap"),
    "not_from_zero": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, D16[:12], r"tensor 'a'.*gap"),
    "end_before_begin": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"",
                         r"tensor 'a'.*ends before it begins"),
    "trailing_bytes": ({"a": A, "b": B}, D16 + b"xx", "trailing bytes"),
    "truncated": ({"a": A, "b": B}, D16[:12], "truncated"),
    "shape_vs_bytes": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, D16[:8], r"tensor 'a'.*needs 12"),
    "metadata_not_string": ({"__metadata__": {"x": 1}, "a": A}, D16[:8], "__metadata__"),
    "metadata_not_map": ({"__metadata__": ["x"], "a": A}, D16[:8], "__metadata__"),
    "negative_dim": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, D16[:8], r"tensor 'a'.*shape"),
    "float_dim": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, D16[:8], r"tensor 'a'.*shape"),
    "bool_dim": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, D16[:8], r"tensor 'a'.*shape"),
    "unknown_dtype": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, D16[:8], r"tensor 'a'.*dtype"),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, D16[:8],
                      r"tensor 'a'.*data_offsets"),
    "missing_field": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, D16[:8], r"tensor 'a'.*malformed"),
    "not_an_object": ([1], b"", "not a JSON object"),
    "shape_overflow": ({"a": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 8]}}, D16[:8],
                       r"tensor 'a'"),
    "not_utf8": (json.dumps({"a": A}).encode("utf-16"), D16[:8], "not UTF-8"),
    "nan": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":NaN}', D16[:8], "not valid JSON"),
    "text_after_json": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\0\0\0\0\0\0\0\0', D16[:8],
                        "not valid JSON"),
    "same_name_other_bytes": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                              b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', D16, "more than once"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_reader_refuses_what_the_reference_refuses(tmp_path, case):
    """Guards against headers our reader used to accept though `safetensors` refuses them: one tensor aliasing or
    overlapping another's bytes, gaps, a data section not fully covered, non-string metadata, non-integer shapes,
    UTF-16 headers. Each file is refused by safe_open and by us, with the file (and tensor) named."""
    header, data, message = REFUSED[case]
    raw = header if isinstance(header, bytes) else None
    p = _file(tmp_path / f"{case}.safetensors", None if raw else header, data, raw=raw, pad=case != "text_after_json")
    assert _reference_refuses(p), f"{case}: the reference accepts this file; the case is wrong"
    with pytest.raises(CheckpointError, match=rf"{case}\.safetensors: .*{message}"):
        SafetensorsReader(p)


ACCEPTED = {
    "two_tensors": ({"a": A, "b": B}, D16),
    "metadata_null": ({"__metadata__": None, "a": A}, D16[:8]),
    "extra_field": ({"a": dict(A, comment=1)}, D16[:8]),
    "no_tensors": ({}, b""),
    "zero_size_tensor": ({"a": A, "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}}, D16[:8]),
    "offsets_out_of_name_order": ({"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, D16),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_reader_accepts_what_the_reference_accepts(tmp_path, case):
    """The strict checks must not refuse valid files: the same tensors as safe_open reads."""
    header, data = ACCEPTED[case]
    p = _file(tmp_path / f"{case}.safetensors", header, data)
    with safe_open(p, "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    r = SafetensorsReader(p)
    assert sorted(r.keys()) == sorted(ref)
    assert all(torch.equal(r.get(k), ref[k]) for k in ref)
    r.close()


def test_aliased_source_tensor_is_refused_by_the_conversion(tmp_path):
    """Guards against the silent case of the issue: a dense HF checkpoint whose header points up_proj at gate_proj's
    bytes converted with the guard "ok" (both sides of the guard read the same aliased weights). Now hf-to-moe
    refuses it before any work, naming the file and the tensor; safe_open refuses it too."""
    from test_interchange import tiny_llama

    from megamoe.interchange import hf_to_moe
    src = tmp_path / "llama"
    tiny_llama(str(src))
    p = src / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    gate, up = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    header[up]["data_offsets"] = list(header[gate]["data_offsets"])
    _file(p, header, raw[8 + n:])
    assert _reference_refuses(str(p))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*layers\.1\.mlp\.(gate|up)_proj.*overlaps"):
        hf_to_moe(str(src), str(tmp_path / "moe"), num_experts=4, top_k=2, progress=False)
    assert not (tmp_path / "moe").exists()


# ---------------------------------------------------------------------------------------------------------------
# checksums per stored tensor part

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A dense tiny LLaMA converted to 4 experts in a TP2/EP2 layout (column-split down_proj parts go out row by
    row, uncast source tensors by copy_file_range: both hashing paths), and a TP1 copy of the same model."""
    from test_e2e_train import tiny_llama_dir

    from megamoe.interchange import hf_to_moe
    base = tmp_path_factory.mktemp("integrity")
    dense = tiny_llama_dir(base / "dense")
    kw = dict(num_experts=4, top_k=2, gate_network="linear", score_scale=2.0, progress=False)  # fits Mixtral
    hf_to_moe(dense, str(base / "moe_tp2ep2"), tp=2, ep=2, **kw)
    hf_to_moe(dense, str(base / "moe"), **kw)
    return base


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _flip(path, name, nbytes=4096, start=0):
    """XOR `nbytes` bytes of tensor `name` in safetensors file `path` (from byte `start` of its data)."""
    r = SafetensorsReader(str(path))
    off, length = r.file_range(name)
    r.close()
    n = min(nbytes, length - start)
    with open(path, "r+b") as f:
        f.seek(off + start)
        b = f.read(n)
        f.seek(off + start)
        f.write(bytes(x ^ 0xFF for x in b))
    return n


def test_manifest_checksums_are_the_stored_bytes(converted):
    """The digests the writer computed while the bytes went out (writer thread, copy_file_range and row-gathered
    writes) equal xxh3_128 of each part's bytes in the file, located independently with the reference library's
    header (safe_open metadata offsets)."""
    import xxhash
    d = converted / "moe_tp2ep2"
    m = json.loads((d / "manifest.json").read_text())
    assert m["checksum"]["algorithm"] == "xxh3_128"
    for f in m["files"]:
        raw = (d / f).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            entry = m["tensors"][name]
            want = entry["checksums"][entry["parts"].index(f)]
            assert xxhash.xxh3_128(raw[8 + n + b:8 + n + e]).hexdigest() == want, (f, name)


EXPERT = "layers.1.mlp.experts.0.down_proj.weight"


def test_flipped_expert_bytes_are_refused_by_every_tool(converted, tmp_path):
    """Guards against the issue's case: 4 KB of flipped expert weights passed inspect, reshard, moe-to-hf and the
    trainer's init loader (training started). Each now refuses with CheckpointError naming the file and the tensor,
    and leaves no output behind."""
    from megamoe.formats.shards import load_shards
    from megamoe.interchange import inspect, moe_to_hf, reshard_checked
    from megamoe.training.config import TrainConfig
    from megamoe.training.trainer import run
    ck = _copy(converted / "moe", tmp_path / "moe")
    assert _flip(os.path.join(ck, "experts-ep00-etp00.safetensors"), EXPERT) == 4096
    named = rf"experts-ep00-etp00\.safetensors: tensor '{EXPERT}' does not match its checksum"
    with pytest.raises(CheckpointError, match=named):
        inspect(ck)
    with pytest.raises(CheckpointError, match=named):
        reshard_checked(ck, str(tmp_path / "re"), ep=2, progress=False)
    with pytest.raises(CheckpointError, match=named):
        moe_to_hf(ck, str(tmp_path / "hf"), fmt="mixtral", progress=False)
    with pytest.raises(CheckpointError, match=named):
        load_shards(ck, ep=(0, 2))
    import yaml
    d = yaml.safe_load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.yaml")))
    d.pop("model")
    d.update(out_dir=str(tmp_path / "run"), init={"source": "megamoe", "path": ck})
    d["train"]["steps"] = 1
    d["eval"] = {"interval": 0, "at_end": False, "batches": 1, "batch_size": 2, "plots": False}
    with pytest.raises(CheckpointError, match=named):
        run(TrainConfig.from_dict(d))
    assert not any((tmp_path / x).exists() for x in ("re", "hf"))
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_a_rank_slice_verifies_the_whole_part(converted, tmp_path):
    """A TP rank reading half of a part stored whole (a TP1 checkpoint loaded at TP2) still detects a flip in the
    other half: each part a rank reads from is verified whole."""
    from megamoe.formats.shards import load_shards
    ck = _copy(converted / "moe", tmp_path / "moe")
    name = "layers.0.attn.q_proj.weight"  # split on dim 0 under TP
    r = SafetensorsReader(os.path.join(ck, "model-tp00-of-01.safetensors"))
    half = r.nbytes(name) // 2
    r.close()
    _flip(os.path.join(ck, "model-tp00-of-01.safetensors"), name, 64, start=half + 8)
    with pytest.raises(CheckpointError, match=rf"model-tp00-of-01\.safetensors: tensor '{name}'"):
        load_shards(ck, tp=(0, 2))


def test_old_manifest_without_checksums_loads_unverified(converted, tmp_path, caplog):
    """A checkpoint written before checksums existed still loads and converts; one log line says it is
    unverified, and inspect reports it."""
    from megamoe.formats.shards import load_shards
    from megamoe.interchange import inspect
    ck = _copy(converted / "moe", tmp_path / "old")
    mp = os.path.join(ck, "manifest.json")
    m = json.load(open(mp))
    m.pop("checksum")
    for e in m["tensors"].values():
        e.pop("checksums")
    json.dump(m, open(mp, "w"))
    ref = load_shards(str(converted / "moe"))
    with caplog.at_level("WARNING", logger="megamoe.formats"):
        got = load_shards(ck)
        load_shards(ck)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    lines = [r.getMessage() for r in caplog.records if "without tensor checksums" in r.getMessage()]
    assert len(lines) == 1 and ck in lines[0]
    assert inspect(ck)["checksums"].startswith("none")
    assert inspect(str(converted / "moe"))["checksums"].startswith("ok (")


def test_reshard_and_trainer_exports_carry_checksums(converted, tmp_path):
    """reshard writes fresh digests for its new parts (verified on the next read) and save_shards (the trainer's
    final model) writes them too."""
    from megamoe.formats.shards import ShardedCheckpoint, load_shards, save_shards
    from megamoe.interchange import reshard_checked
    out = tmp_path / "ep2"
    reshard_checked(str(converted / "moe"), str(out), ep=2, progress=False)
    ck = ShardedCheckpoint(str(out))
    assert ck.verify()["status"] == "ok" and ck.manifest["checksum"]["algorithm"] == "xxh3_128"
    cfg = ck.config
    ck.close()
    save_shards(str(tmp_path / "saved"), cfg, load_shards(str(out)))
    assert ShardedCheckpoint(str(tmp_path / "saved")).verify()["parts"] > 0
