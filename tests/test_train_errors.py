"""megamoe-train on bad data: one line naming the file and what is wrong, exit 2, no traceback (issue 14). Each case
used to end in a traceback: an IndexError in the embedding for ids past the vocabulary, a ValueError for an
index with a bad magic."""

import json
import os
import shutil

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, smollm2_dir):
    from megamoe.data import PreprocessConfig, load_tokenizer
    from megamoe.data.preprocess import preprocess
    d = tmp_path_factory.mktemp("ds")
    src = d / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document {i} about Python classes and functions " * 4})
                             for i in range(120)) + "\n")
    preprocess([str(src)], str(d / "web_text_document"), load_tokenizer(smollm2_dir),
               PreprocessConfig(workers=1, progress=False))
    return d


def _run(tmp_path, capsys, prefix, vocab):
    from megamoe.train import main
    cfg = {"out_dir": str(tmp_path / "run"),
           "model": {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                     "moe": {"num_experts": 4, "top_k": 2}},
           "data": {"prefixes": {"web": prefix}, "seq_len": 16},
           "train": {"steps": 2, "global_batch_tokens": 32, "micro_batch_size": 2},
           "eval": {"at_end": False, "plots": False}, "log": {"tensorboard": False}}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc = main(["--config", str(p)])
    return rc, capsys.readouterr().err


def test_token_ids_past_the_vocabulary(dataset, tmp_path, capsys):
    prefix = str(dataset / "web_text_document")
    rc, err = _run(tmp_path, capsys, prefix, vocab=1000)   # SmolLM2 ids go up to 49151
    assert rc == 2 and "Traceback" not in err
    assert f"{prefix}.bin (domain 'web'): token id" in err and "outside the model's vocabulary (vocab_size 1000)" in err


def test_index_with_a_bad_magic(dataset, tmp_path, capsys):
    bad = tmp_path / "bad_text_document"
    shutil.copyfile(dataset / "web_text_document.bin", f"{bad}.bin")
    raw = bytearray(open(dataset / "web_text_document.idx", "rb").read())
    raw[:4] = b"XXXX"
    open(f"{bad}.idx", "wb").write(raw)
    rc, err = _run(tmp_path, capsys, str(bad), vocab=49152)
    assert rc == 2 and "Traceback" not in err
    assert f"{bad}.idx: not a megatron indexed-dataset index (bad header)" in err
