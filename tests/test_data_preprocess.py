"""Preprocessing: what we write is what megatron-core's IndexedDataset reads; bad input is reported and leaves
nothing behind.

References: megatron-core's `IndexedDataset` (reader) and `IndexedDatasetBuilder` (writer, byte-for-byte), the HF
tokenizer called directly, sentencepiece called directly.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from megamoe.data.indexed import IndexedWriter
from megamoe.data.preprocess import PreprocessConfig, PreprocessError, is_validation_file, preprocess
from megamoe.data.tokenizers import TextTokenizer, load_tokenizer, token_dtype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir():
    from megamoe.formats.embedded import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def texts():
    """Real documents (Python's help() topics), plus unicode and a one-character document."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:40]]
    return docs + ["héllo wörld — ünïcode ✓ 日本語", "x", "line one\nline two\r\n\ttabbed"]


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": {"n": len(t)}}) + "\n")


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


# ----------------------------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_writer_matches_megatron_builder_bytes(tmp_path, dtype):
    """Our writer and megatron-core's IndexedDatasetBuilder produce byte-identical files; megatron reads ours."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    high = 60000 if dtype == np.uint16 else 2**31 - 1
    docs = [rng.integers(0, high, size=n) for n in [1, 7, 300, 2, 4096, 13]]
    ours = str(tmp_path / "ours")
    with IndexedWriter(ours, dtype) as w:
        for d in docs[:3]:
            w.add_document(d)
        w.add_documents(np.concatenate(docs[3:]), [len(d) for d in docs[3:]])
        w.publish()
    ref = str(tmp_path / "ref")
    b = IndexedDatasetBuilder(ref + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(np.asarray(d, dtype=dtype), [len(d)])
    b.finalize(ref + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read(), ext
    ds = _read(ours)
    assert len(ds) == len(docs)
    assert ds[0].dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "ref.bin", "ref.idx"]


# (workers, max_threads): one thread; two native tokenizer threads in one process; two processes
LAYOUTS = [(1, 4), (2, 4), (2, 1)]


@pytest.mark.parametrize("workers,max_threads", LAYOUTS)
def test_hf_roundtrip_many_files_and_chunks(tmp_path, hf_dir, hf_tok, texts, workers, max_threads):
    """JSONL over two files and a directory, cut into many small chunks, read back through megatron's reader,
    equals the HF tokenizer's own ids + EOS (and BOS first when asked), in input order."""
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(hf_dir)
    (tmp_path / "dir").mkdir()
    _write_jsonl(tmp_path / "a.jsonl", texts[:15], key="content")
    _write_jsonl(tmp_path / "dir" / "b.jsonl", texts[15:30], key="content")
    _write_jsonl(tmp_path / "dir" / "c.jsonl", texts[30:], key="content")
    prefix = str(tmp_path / "out" / "ds")
    cfg = PreprocessConfig(json_key="content", workers=workers, max_threads=max_threads, chunk_bytes=3000,
                           prepend_bos=True, progress=False)
    s = preprocess([str(tmp_path / "a.jsonl"), str(tmp_path / "dir")], prefix, hf_tok, cfg)
    assert s.layout == ("1 process, 1 tokenizer thread" if workers == 1 else
                        "1 process, 2 tokenizer threads" if max_threads > 1 else "2 processes"), s.layout
    ds = _read(prefix)
    assert s.documents == len(texts) == len(ds)
    assert s.tokens == int(ds.sequence_lengths.sum())
    assert ds[0].dtype == np.uint16  # vocab 49152 < 65500
    for i, t in enumerate(texts):
        expect = [ref_tok.bos_token_id] + ref_tok(t, add_special_tokens=False)["input_ids"] + [ref_tok.eos_token_id]
        assert ds[i].tolist() == expect, i
    assert s.skipped_total == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx"]


def test_workers_give_identical_files(tmp_path, hf_tok, texts):
    """Every layout (threads, processes, both sides of the max_threads boundary) writes the same bytes."""
    _write_jsonl(tmp_path / "in.jsonl", texts * 3)
    outs = []
    for w, mt in LAYOUTS + [(3, 2), (3, 4)]:
        p = str(tmp_path / f"w{w}_{mt}")
        preprocess([str(tmp_path / "in.jsonl")], p, hf_tok,
                   PreprocessConfig(workers=w, max_threads=mt, chunk_bytes=5000, progress=False))
        outs.append([open(p + e, "rb").read() for e in (".bin", ".idx")])
    assert all(o == outs[0] for o in outs[1:])


def test_layout_and_tokenizer_without_threads_gets_processes(hf_tok, texts):
    assert PreprocessConfig(workers=2).layout(hf_tok) == (1, 2)
    assert PreprocessConfig(workers=2, max_threads=1).layout(hf_tok) == (2, 1)
    assert PreprocessConfig(workers=8).layout(hf_tok) == (8, 1)  # above max_threads: Megatron-style processes
    assert PreprocessConfig(workers=2).layout(_BigVocab()) == (2, 1)  # encode_batch(texts) only
    # the native threads give the same ids as one thread
    assert hf_tok.encode_batch(texts, threads=2) == hf_tok.encode_batch(texts)


def test_sentencepiece_roundtrip(tmp_path, texts):
    import sentencepiece as spm

    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", character_coverage=1.0, num_threads=1,
                                   minloglevel=2, bos_id=1, eos_id=2, unk_id=0)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400 and tok.eod == 2
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    _write_jsonl(tmp_path / "in.jsonl", texts)
    for workers in (1, 2):  # one thread; two sentencepiece threads
        prefix = str(tmp_path / f"sp_ds{workers}")
        s = preprocess([str(tmp_path / "in.jsonl")], prefix, tok, PreprocessConfig(workers=workers, progress=False))
        assert s.layout.endswith(f"{workers} tokenizer thread" + ("s" if workers > 1 else ""))
        ds = _read(prefix)
        assert len(ds) == len(texts)
        for i, t in enumerate(texts):
            assert ds[i].tolist() == ref.encode(t) + [2]


class _BigVocab(TextTokenizer):
    """A byte-level tokenizer with ids above 65535, to exercise the int32 path end to end."""

    kind = "test-bigvocab"

    def __init__(self):
        super().__init__("bigvocab", 70_256, eod=70_255, bos=None, pad=None)

    def encode_batch(self, texts):
        return [[70_000 + b for b in t.encode("utf-8")] for t in texts]


def test_int32_when_vocab_exceeds_uint16(tmp_path, texts):
    tok = _BigVocab()
    assert token_dtype(tok.vocab_size) == np.int32 and token_dtype(65499) == np.uint16
    _write_jsonl(tmp_path / "in.jsonl", texts)
    prefix = str(tmp_path / "big")
    preprocess([str(tmp_path / "in.jsonl")], prefix, tok, PreprocessConfig(workers=2, progress=False))
    ds = _read(prefix)
    assert ds[0].dtype == np.int32
    for i, t in enumerate(texts):
        assert ds[i].tolist() == [70_000 + b for b in t.encode("utf-8")] + [70_255]


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
GOOD = json.dumps({"text": "a good document"}).encode()
BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated',
    "missing key": json.dumps({"content": "wrong key"}).encode(),
    "invalid UTF-8": b'{"text": "caf\xe9 latin-1"}',
    "empty document": json.dumps({"text": "   \n "}).encode(),
    "blank line": b"",
    "not a string": json.dumps({"text": 42}).encode(),
    "not a JSON object": b'["a", "list"]',
}


def _bad_file(path, bad: bytes, n_good_before=5, n_good_after=3):
    lines = [GOOD] * n_good_before + [bad] + [GOOD] * n_good_after
    path.write_bytes(b"\n".join(lines) + b"\n")
    return n_good_before + 1  # 1-based line number of the bad line


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
@pytest.mark.parametrize("workers,max_threads", LAYOUTS)
def test_bad_input_fail_names_file_line_and_leaves_nothing(tmp_path, hf_tok, reason, workers, max_threads):
    src = tmp_path / "in"
    src.mkdir()
    (src / "0_ok.jsonl").write_bytes(GOOD + b"\n" + GOOD + b"\n")
    line = _bad_file(src / "1_bad.jsonl", BAD_LINES[reason], n_good_before=40)
    out = tmp_path / "out"
    cfg = PreprocessConfig(on_error="fail", workers=workers, max_threads=max_threads, chunk_bytes=200,
                           progress=False)
    with pytest.raises(PreprocessError) as ei:
        preprocess([str(src)], str(out / "ds"), hf_tok, cfg)
    msg = str(ei.value)
    assert f"{src / '1_bad.jsonl'}:{line}: {reason}" in msg, msg
    assert not out.exists() or os.listdir(out) == [], os.listdir(out)


def test_bad_input_skip_counts_reports_and_keeps_good(tmp_path, hf_tok):
    lines, expect_lines = [], {}
    for i, (reason, bad) in enumerate(sorted(BAD_LINES.items())):
        lines += [GOOD, GOOD, bad]
        expect_lines[reason] = len(lines)
    lines.append(GOOD)
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    prefix = str(tmp_path / "ds")
    s = preprocess([str(f)], prefix, hf_tok, PreprocessConfig(workers=2, chunk_bytes=100, progress=False))
    assert dict(s.skipped) == {r: 1 for r in BAD_LINES}
    for reason, ln in expect_lines.items():
        assert s.examples[reason][0].startswith(f"{f}:{ln}: {reason}"), (reason, s.examples[reason])
    ds = _read(prefix)
    n_good = 2 * len(BAD_LINES) + 1
    assert s.documents == len(ds) == n_good
    good_ids = hf_tok.encode("a good document") + [hf_tok.eod]
    assert all(ds[i].tolist() == good_ids for i in range(n_good))
    text = s.format()
    assert "skipped 7 line(s)" in text and "missing key: 1" in text


def test_all_lines_bad_is_an_error(tmp_path, hf_tok):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(BAD_LINES["missing key"] + b"\n")
    with pytest.raises(PreprocessError, match="no documents to write"):
        preprocess([str(f)], str(tmp_path / "ds"), hf_tok, PreprocessConfig(progress=False))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


class _Interrupting(TextTokenizer):
    """Encodes a few batches, then raises KeyboardInterrupt (a user's Ctrl-C mid-run)."""

    def __init__(self, inner, after):
        super().__init__(inner.path, inner.vocab_size, inner.eod, inner.bos, inner.pad)
        self.inner, self.left = inner, after

    def encode_batch(self, texts):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return self.inner.encode_batch(texts)


def test_interrupted_run_keeps_existing_dataset_and_leaves_no_partial(tmp_path, hf_tok, texts):
    _write_jsonl(tmp_path / "in.jsonl", texts)
    prefix = str(tmp_path / "out" / "ds")
    preprocess([str(tmp_path / "in.jsonl")], prefix, hf_tok, PreprocessConfig(progress=False))
    before = [open(prefix + e, "rb").read() for e in (".bin", ".idx")]
    # without --overwrite an existing dataset is refused, untouched
    with pytest.raises(FileExistsError, match="overwrite"):
        preprocess([str(tmp_path / "in.jsonl")], prefix, hf_tok, PreprocessConfig(progress=False))
    # an interrupted overwrite leaves the old dataset as it was and no temporary files
    cfg = PreprocessConfig(progress=False, overwrite=True, batch_docs=4, chunk_bytes=2000)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(tmp_path / "in.jsonl")], prefix, _Interrupting(hf_tok, after=3), cfg)
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx"]
    assert [open(prefix + e, "rb").read() for e in (".bin", ".idx")] == before
    # and a fresh interrupted run leaves no dataset at all
    fresh = str(tmp_path / "fresh" / "ds")
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(tmp_path / "in.jsonl")], fresh, _Interrupting(hf_tok, after=3), cfg)
    assert os.listdir(tmp_path / "fresh") == []


def test_missing_inputs_and_bad_tokenizer_are_named(tmp_path, hf_tok):
    with pytest.raises(PreprocessError, match="nope.jsonl: no such file"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "ds"), hf_tok, PreprocessConfig(progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match="empty: directory holds no"):
        preprocess([str(tmp_path / "empty")], str(tmp_path / "ds"), hf_tok, PreprocessConfig(progress=False))
    with pytest.raises(FileNotFoundError, match="missing.model: tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a loadable sentencepiece"):
        load_tokenizer(str(tmp_path / "junk.model"))


def test_validation_file_names():
    assert all(map(is_validation_file, ["valid.jsonl", "val_00.jsonl", "c4-validation.jsonl.gz", "x/dev.json"]))
    assert not any(map(is_validation_file, ["train.jsonl", "interval.jsonl", "chunk_0001.jsonl", "devops.jsonl"]))


def test_cli_per_domain_and_fail_exit_code(tmp_path, hf_dir, capsys):
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root = tmp_path / "corpus"
    for dom, word in (("web", "cats"), ("code", "def f(): pass")):
        (root / dom).mkdir(parents=True)
        _write_jsonl(root / dom / "train.jsonl", [f"{word} {i}" for i in range(20)])
        _write_jsonl(root / dom / "valid.jsonl", [f"{word} v{i}" for i in range(3)])
    out = tmp_path / "tok"
    assert cli.main(["--per-domain", str(root), "--output-dir", str(out), "--tokenizer", hf_dir,
                     "--workers", "1", "--quiet"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(man["domains"]) == ["code", "web"]
    assert man["domains"]["web"]["train_documents"] == 20 and man["domains"]["web"]["valid_documents"] == 3
    assert len(_read(str(out / "code" / "valid_text_document"))) == 3
    (root / "web" / "train.jsonl").write_bytes(GOOD + b"\n" + b"{oops\n")
    rc = cli.main(["--input", str(root / "web" / "train.jsonl"), "--output-prefix", str(tmp_path / "x"),
                   "--tokenizer", hf_dir, "--on-error", "fail", "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{root / 'web' / 'train.jsonl'}:2: malformed JSON" in err
    assert not any(p.name.startswith("x_text_document") for p in tmp_path.iterdir())


def test_gzip_input_equals_plain_and_zst_needs_its_package(tmp_path, hf_tok, texts):
    import gzip

    _write_jsonl(tmp_path / "plain.jsonl", texts)
    with gzip.open(tmp_path / "packed.jsonl.gz", "wb") as f:
        f.write((tmp_path / "plain.jsonl").read_bytes())
    cfg = PreprocessConfig(workers=2, progress=False)
    preprocess([str(tmp_path / "plain.jsonl")], str(tmp_path / "a"), hf_tok, cfg)
    preprocess([str(tmp_path / "packed.jsonl.gz")], str(tmp_path / "b"), hf_tok, cfg)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    try:
        import zstandard  # noqa: F401
    except ImportError:
        (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(PreprocessError, match=r"x.jsonl.zst: reading .zst needs the 'zstandard' package"):
            preprocess([str(tmp_path / "x.jsonl.zst")], str(tmp_path / "c"), hf_tok, PreprocessConfig(progress=False))
        assert not (tmp_path / "c.bin").exists()


def test_utf8_bom_and_crlf_are_accepted(tmp_path, hf_tok):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    s = preprocess([str(tmp_path / "bom.jsonl")], str(tmp_path / "ds"), hf_tok, PreprocessConfig(progress=False))
    ds = _read(str(tmp_path / "ds"))
    assert s.skipped_total == 0
    assert [ds[i].tolist() for i in range(2)] == [hf_tok.encode(t) + [hf_tok.eod] for t in ("first", "second")]


class _DiesInWorker(TextTokenizer):
    """Kills its worker process (as the OOM killer would) on the first batch tokenized outside the parent."""

    def __init__(self, inner):
        super().__init__(inner.path, inner.vocab_size, inner.eod, inner.bos, inner.pad)
        self.inner, self.parent = inner, os.getpid()

    def encode_batch(self, texts):
        if os.getpid() != self.parent:
            os._exit(9)
        return self.inner.encode_batch(texts)


def test_killed_worker_is_an_error_not_a_hang(tmp_path, hf_tok, texts):
    _write_jsonl(tmp_path / "in.jsonl", texts)
    with pytest.raises(PreprocessError, match=r"a worker process died while tokenizing .*in.jsonl, near bytes"):
        preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out" / "ds"), _DiesInWorker(hf_tok),
                   PreprocessConfig(workers=2, max_threads=1, chunk_bytes=4000, progress=False))
    assert os.listdir(tmp_path / "out") == []


def test_lone_surrogate_line_is_skipped_not_fatal(tmp_path, hf_dir, capsys):
    """A JSON line with a lone surrogate escape ("\\ud800") is valid JSON but not UTF-8 text: it used to crash the
    whole run inside the tokenizer even with --on-error skip. Now it is one skipped line named file:line."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("pp_cli", os.path.join(REPO, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = tmp_path / "in.jsonl"
    good = [json.dumps({"text": f"line number {i} of the file"}) for i in range(6)]
    src.write_text("\n".join(good[:3] + ['{"text": "bad \\ud800 here"}', '{"text": "pair \\ud83d\\ude00 ok"}']
                             + good[3:]) + "\n")
    rc = cli.main(["--input", str(src), "--output-prefix", str(tmp_path / "x"), "--tokenizer", hf_dir,
                   "--on-error", "skip", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"{src}:4: lone surrogate" in out.out + out.err
    from megamoe.data.indexed import IndexedReader
    assert len(IndexedReader(str(tmp_path / "x_text_document"))) == 7   # 6 good lines + the valid surrogate pair
    rc = cli.main(["--input", str(src), "--output-prefix", str(tmp_path / "y"), "--tokenizer", hf_dir,
                   "--on-error", "fail", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}:4: lone surrogate" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_input_is_a_clear_error(tmp_path, hf_dir, capsys, kind):
    """A truncated .jsonl.gz used to end in EOFError's traceback."""
    import gzip
    import importlib.util
    spec = importlib.util.spec_from_file_location("pp_cli", os.path.join(REPO, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    text = ("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(300)) + "\n").encode()
    if kind == "gz":
        data = gzip.compress(text)
    else:
        zstd = pytest.importorskip("zstandard")
        data = zstd.ZstdCompressor().compress(text)
    src = tmp_path / f"in.jsonl.{kind}"
    src.write_bytes(data[: len(data) // 2])
    rc = cli.main(["--input", str(src), "--output-prefix", str(tmp_path / "x"), "--tokenizer", hf_dir, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}: not a complete" in err and "truncated or corrupt" in err and "Traceback" not in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("x")]
