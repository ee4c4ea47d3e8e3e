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
