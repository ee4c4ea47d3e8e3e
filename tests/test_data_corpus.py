"""The local corpus: >= 3 real domains from Python's installation, deterministic, held-out files; and the whole
path corpus -> preprocess_data (2 workers) -> DomainMixture on real text, checked against the JSONL itself."""

import json
import os

import pytest

from megamoe.data import corpus as corpus_mod
from megamoe.data.corpus import GUARANTEED_DOMAINS, build_local_corpus


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    info = build_local_corpus(str(out), max_mb=0.15, seed=5, domains=list(GUARANTEED_DOMAINS), log=_quiet)
    return out, info


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_guaranteed_domains_with_train_and_valid(small_corpus):
    out, info = small_corpus
    assert sorted(info["domains"]) == sorted(GUARANTEED_DOMAINS) and len(info["domains"]) >= 3
    for dom in GUARANTEED_DOMAINS:
        train, valid = _lines(out / dom / "train.jsonl"), _lines(out / dom / "valid.jsonl")
        assert train and valid
        assert {r["domain"] for r in train + valid} == {dom}
        assert not {r["id"] for r in train} & {r["id"] for r in valid}  # held out means disjoint
        assert all(r["text"].strip() for r in train + valid)
        size = sum(len(json.dumps(r, ensure_ascii=False).encode()) + 1 for r in train)
        assert size == info["domains"][dom]["train_bytes"]
        # the cap holds, except that one document always goes in
        assert size <= 0.15 * (1 << 20) * 1.2 or len(train) == 1
    code = _lines(out / "code" / "train.jsonl")
    assert any("def " in r["text"] or "import " in r["text"] for r in code)


def test_deterministic_and_seed_dependent(small_corpus, tmp_path):
    out, _ = small_corpus
    again = tmp_path / "again"
    build_local_corpus(str(again), max_mb=0.15, seed=5, domains=list(GUARANTEED_DOMAINS), log=_quiet)
    for dom in GUARANTEED_DOMAINS:
        for f in ("train.jsonl", "valid.jsonl"):
            assert (out / dom / f).read_bytes() == (again / dom / f).read_bytes()
    other = tmp_path / "other"
    build_local_corpus(str(other), max_mb=0.15, seed=6, domains=["reference"], log=_quiet)
    assert (other / "reference" / "train.jsonl").read_bytes() != (out / "reference" / "train.jsonl").read_bytes()


def test_missing_optional_domain_is_skipped_but_named_one_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(corpus_mod.DOMAIN_SOURCES, "manpages", lambda: [])
    monkeypatch.setitem(corpus_mod.DOMAIN_SOURCES, "legal", lambda: [])
    notes = []
    info = build_local_corpus(str(tmp_path / "c"), max_mb=0.1, seed=1, log=notes.append)
    assert sorted(info["domains"]) == sorted(GUARANTEED_DOMAINS)
    assert any("skipping domain 'manpages'" in n for n in notes)
    assert not os.path.exists(tmp_path / "c" / "manpages")
    with pytest.raises(RuntimeError, match="domain 'legal'"):
        build_local_corpus(str(tmp_path / "d"), max_mb=0.1, domains=["legal"], log=_quiet)
    with pytest.raises(ValueError, match="unknown domain"):
        build_local_corpus(str(tmp_path / "e"), domains=["poetry"], log=_quiet)


def test_end_to_end_real_text_through_the_mixture(small_corpus, tmp_path):
    """preprocess_domains (2 workers) -> manifest -> DomainMixture: decoded samples are text of their domain."""
    from megamoe.formats.embedded import materialize_smollm2
    from megamoe.data import DomainMixture, PreprocessConfig, load_tokenizer, preprocess_domains

    out, _ = small_corpus
    tok = load_tokenizer(materialize_smollm2())
    man = preprocess_domains(str(out), str(tmp_path / "tok"), tok, PreprocessConfig(workers=2, progress=False))
    assert sorted(man["domains"]) == sorted(GUARANTEED_DOMAINS)
    mix = DomainMixture.from_manifest(str(tmp_path / "tok" / "manifest.json"), weights="uniform", seq_len=64,
                                      seed=3)
    texts = {d: "".join(r["text"] for r in _lines(out / d / "train.jsonl")) for d in mix.domains}
    x, dom = mix.next_batch(12)
    for row, j in zip(x.tolist(), dom.tolist()):
        # the longest run of the sample without an end-of-document token decodes to text of its own domain
        runs, cur = [], []
        for t in row:
            if t == tok.eod:
                runs.append(cur)
                cur = []
            else:
                cur.append(t)
        runs.append(cur)
        piece = tok._tok.decode(max(runs, key=len)[1:-1])  # drop edge tokens (may be cut mid-character)
        assert piece[:40] in texts[mix.domains[j]], (mix.domains[j], piece[:80])
    v = next(mix.validation_batches("reference", 2))
    assert v.shape[1] == 65
