"""The embedded chat corpus: deterministic, held-out questions disjoint from training, well-formed, correct math;
and the whole chat data path on it (build -> preprocess --format chat -> SFTMixture.from_manifest) with the trained
labels decoded back to the corpus' assistant texts."""

import inspect
import itertools
import json
import re
import sys

import numpy as np
import pytest

from megamoe.data import chat_corpus
from megamoe.data.chat import parse_record
from megamoe.data.chat_corpus import build_chat_corpus, man_items
from megamoe.data.preprocess import PreprocessConfig, preprocess_domains
from megamoe.data.sft import SFTMixture

SIZES = {"general": 120, "math": 120}


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    info = build_chat_corpus(str(out), sizes=SIZES, seed=5, log=lambda s: None)
    return out, info


def test_two_builds_are_byte_identical_and_seed_matters(corpus, tmp_path):
    out, info = corpus
    again = tmp_path / "again"
    assert build_chat_corpus(str(again), sizes=SIZES, seed=5, log=lambda s: None) == info
    for d in ("general", "math"):
        for split in ("train", "valid"):
            assert (out / d / f"{split}.jsonl").read_bytes() == (again / d / f"{split}.jsonl").read_bytes()
    assert (out / "corpus.json").read_bytes() == (again / "corpus.json").read_bytes()
    other = tmp_path / "other"
    build_chat_corpus(str(other), sizes=SIZES, seed=6, domains=["math"], log=lambda s: None)
    assert (other / "math" / "train.jsonl").read_bytes() != (out / "math" / "train.jsonl").read_bytes()
    assert not (other / "general").exists()


def test_splits_disjoint_sized_and_well_formed(corpus):
    out, info = corpus
    for d, n in SIZES.items():
        train, valid = _lines(out / d / "train.jsonl"), _lines(out / d / "valid.jsonl")
        assert len(train) == n and len(valid) == max(8, round(n * 0.1))
        assert info["domains"][d]["train_conversations"] == n
        first_q = [{r["messages"][[m["role"] for m in r["messages"]].index("user")]["content"] for r in rows}
                   for rows in (train, valid)]
        assert not first_q[0] & first_q[1], "a held-out question appears in training"
        assert not {r["id"] for r in train} & {r["id"] for r in valid}
        assert len({r["id"] for r in train}) == len(train)
        for r in train + valid:
            msgs = parse_record(r)  # every record passes the chat checks
            assert r["domain"] == d and msgs[-1]["role"] == "assistant"
        turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in train]
        assert 0 < sum(t > 1 for t in turns) < len(turns)  # some multi-turn, most single-turn
        assert any(r["messages"][0]["role"] == "system" for r in train)


def test_general_answers_are_docstrings(corpus):
    """Each Python item's summary is the first paragraph of the live object's docstring (`inspect.getdoc` on modules
    this process has already imported, for objects defined in Python in that module: an independent reading of the
    builder's `ast` one), and each corpus answer about a Python item contains that summary."""
    items = list(itertools.islice(chat_corpus.python_items(5), 600))
    checked = 0
    for it in items:
        mod = sys.modules.get(it["module"])
        if mod is None:
            continue
        obj = mod
        try:
            for a in it["name"][len(it["module"]) + 1:].split("."):
                obj = getattr(obj, a)
            same_file = inspect.getsourcefile(obj) == inspect.getsourcefile(mod)
        except (AttributeError, TypeError):
            continue
        if not same_file:  # replaced by a C implementation at import time, or re-exported
            continue
        assert " ".join(inspect.getdoc(obj).split("\n\n")[0].split()) == it["summary"], it["name"]
        checked += 1
    assert checked >= 20, checked
    out, _ = corpus
    summaries = {it["id"]: it["summary"] for it in items}
    for r in _lines(out / "general" / "train.jsonl"):
        if r["id"] in summaries:
            assert summaries[r["id"]] in r["messages"][[m["role"] for m in r["messages"]].index("assistant")][
                "content"]


def test_math_answers_are_right(corpus):
    out, _ = corpus
    n = 0
    for r in _lines(out / "math" / "train.jsonl") + _lines(out / "math" / "valid.jsonl"):
        q = next(m["content"] for m in r["messages"] if m["role"] == "user")
        a = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        m = re.fullmatch(r"What is (\d+) \+ (\d+)\?|Compute (\d+) - (\d+)\.|What is (\d+) × (\d+)\?", q)
        if m:
            g = [int(x) if x else None for x in m.groups()]
            want = g[0] + g[1] if g[0] is not None else g[2] - g[3] if g[2] is not None else g[4] * g[5]
            assert a.endswith(f"The answer is {want}."), (q, a)
            n += 1
        m = re.fullmatch(r"What is (\d+) divided by (\d+), with remainder\?", q)
        if m:
            x, y = map(int, m.groups())
            assert a.endswith(f"The answer is {x // y} remainder {x % y}."), (q, a)
            n += 1
        m = re.fullmatch(r"What is (\d+)% of (\d+)\?", q)
        if m:
            p, base = map(int, m.groups())
            assert a.endswith(f"The answer is {p * base // 100}.") and p * base % 100 == 0, (q, a)
            n += 1
    assert n > 30


def test_without_man_pages_general_still_builds(tmp_path, monkeypatch):
    assert list(man_items(1, root=str(tmp_path / "no_man"))) == []
    monkeypatch.setattr(chat_corpus, "man_items", lambda seed: iter(()))
    notes = []
    info = build_chat_corpus(str(tmp_path / "c"), sizes={"general": 30}, domains=["general"], log=notes.append)
    assert info["domains"]["general"]["train_conversations"] == 30
    assert "command" not in info["domains"]["general"]["sources"]
    assert any("no man pages" in s for s in notes)


def test_end_to_end_trained_labels_are_the_assistant_texts(corpus, tmp_path, smollm2_dir):
    """build -> preprocess --per-domain --format chat -> SFTMixture.from_manifest (stage 2: math 0.7, general 0.3):
    every run of trained labels decodes to one assistant message of the corpus + <|im_end|>."""
    from transformers import AutoTokenizer

    out, _ = corpus
    man = preprocess_domains(str(out), str(tmp_path / "tok"), smollm2_dir,
                             PreprocessConfig(format="chat", progress=False))
    assert man["domains"]["math"]["train_documents"] == SIZES["math"]
    replies = {m["content"] + "<|im_end|>" for d in SIZES for s in ("train", "valid")
               for r in _lines(out / d / f"{s}.jsonl") for m in r["messages"] if m["role"] == "assistant"}
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    stage1 = SFTMixture.from_manifest(str(tmp_path / "tok" / "manifest.json"), domains=["general"], seq_len=256)
    stage2 = SFTMixture.from_manifest(str(tmp_path / "tok" / "manifest.json"), weights={"math": 0.7, "general": 0.3},
                                      seq_len=256)
    assert stage1.domains == ["general"] and stage2.domains == ["general", "math"] and stage2.pad_id == hf.pad_token_id
    runs = 0
    for mix in (stage1, stage2):
        for b in [mix.next_batch(4) for _ in range(3)] + list(mix.validation_batches("general", 4, 1)):
            labels, lm, seg = b.labels.numpy(), b.loss_mask.numpy(), b.segment_ids.numpy()
            for r in range(labels.shape[0]):
                edges = np.flatnonzero(np.diff(np.concatenate([[0], lm[r], [0]])))
                for s, e in zip(edges[::2], edges[1::2]):
                    text = hf.decode(labels[r, s:e].tolist())
                    truncated = e == labels.shape[1] and not text.endswith("<|im_end|>")
                    assert text in replies or (truncated and any(x.startswith(text) for x in replies)), text
                    assert len(set(seg[r, s:e].tolist())) == 1
                    runs += 1
    assert runs > 20
