"""megamoe-eval and megamoe.eval.load/perplexity: per-domain perplexity against a hand computation with transformers'
MixtralForCausalLM on the Mixtral export of the same model (an independent implementation), on JSONL and on a
preprocessed manifest; every layout loads to the same logits; bad input ends in one line and exit status 2."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval_models import cached_tiny_models, tiny_dense
from megamoe.data import DomainMixture, PreprocessConfig, load_tokenizer, preprocess_domains
from megamoe.eval.cli import eval_main
from megamoe.eval.load import detect_layout, load_model
from megamoe.eval.perplexity import domain_perplexity, jsonl_batches

pytestmark = pytest.mark.usefixtures("world")
transformers = pytest.importorskip("transformers")

TEXTS = {"prose": ["The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
                   "A second document: short.", "Third one, with numbers 1 2 3 and punctuation!"],
         "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return cached_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_mixtral(models):
    return transformers.AutoModelForCausalLM.from_pretrained(models["mixtral"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    p = tmp_path_factory.mktemp("evdata") / "mixed.jsonl"
    with open(p, "w") as f:
        for d, docs in TEXTS.items():
            for t in docs:
                f.write(json.dumps({"text": t, "domain": d}) + "\n")
    return str(p)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("evcorpus")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    for d in ("prose", "code"):
        os.makedirs(root / "raw" / d)
        for split, n in (("train", 30), ("valid", 6)):
            with open(root / "raw" / d / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    t = " ".join(rng.choice(words, 20)) if d == "prose" else f"x_{i} = {i} * {i + 1}\n" * 3
                    f.write(json.dumps({"text": t}) + "\n")
    preprocess_domains(str(root / "raw"), str(root / "tok"), load_tokenizer(models["shards"]),
                       PreprocessConfig(progress=False))
    return str(root / "tok" / "manifest.json")


def _hand_ppl(hf, windows):
    """sum of -log p(label) over the scored positions of [(tokens [S+1], n_scored)] / their number."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for toks, k in windows:
            ids = torch.as_tensor(toks, dtype=torch.long)[None]
            logp = F.log_softmax(hf(ids[:, :-1]).logits.float(), -1)[0]
            tot -= float(logp[torch.arange(k), ids[0, 1:k + 1]].sum())
            n += k
    return tot / n, n


def test_jsonl_perplexity_equals_hand_computation(models, hf_mixtral, jsonl, capsys):
    S = 16
    tok = transformers.AutoTokenizer.from_pretrained(models["mixtral"])
    want = {}
    for d, docs in TEXTS.items():
        stream = [t for doc in docs for t in tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        windows = [(stream[lo:lo + S + 1], len(stream[lo:lo + S + 1]) - 1) for lo in range(0, len(stream) - 1, S)]
        want[d] = _hand_ppl(hf_mixtral, windows)
    lm = load_model(models["shards"])
    got, routing = domain_perplexity(lm.model, jsonl_batches(jsonl, lm.tokenizer, S, 3)[0])
    for d in TEXTS:
        assert got[d]["tokens"] == want[d][1]
        assert got[d]["loss"] == pytest.approx(want[d][0], rel=1e-5)
        assert got[d]["ppl"] == pytest.approx(np.exp(want[d][0]), rel=1e-4)
        assert len(routing[d]) == 2 and all(abs(sum(r) - 1) < 1e-6 and len(r) == 4 for r in routing[d])
    # the command: the same numbers, from our shards and from the Mixtral export
    for m in ("shards", "mixtral"):
        assert eval_main(["--model", models[m], "--data", jsonl, "--seq-len", str(S), "--batch-size", "2",
                          "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tokens"] == sum(w[1] for w in want.values())
        for d in TEXTS:
            assert out["domains"][d] == pytest.approx(np.exp(want[d][0]), rel=1e-4)
            assert out["loss"][d] == pytest.approx(want[d][0], rel=1e-5)


def test_manifest_perplexity_equals_hand_computation(models, hf_mixtral, manifest, capsys):
    S = 16
    mix = DomainMixture.from_manifest(manifest, seq_len=S)
    want = {d: _hand_ppl(hf_mixtral, [(b[i].tolist(), S) for b in mix.validation_batches(d, 4, 2)
                                      for i in range(len(b))]) for d in mix.domains}
    assert eval_main(["--model", models["shards"], "--data", manifest, "--seq-len", str(S), "--batch-size", "4",
                      "--max-batches", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["domains"]) == {"prose", "code"} and out["layout"] == "megamoe"
    for d, (loss, n) in want.items():
        assert out["tokens_per_domain"][d] == n == 8 * S
        assert out["loss"][d] == pytest.approx(loss, rel=1e-5)
    assert eval_main(["--model", models["shards"], "--data", manifest, "--seq-len", str(S), "--max-batches", "1"]) == 0
    table = capsys.readouterr().out
    assert "prose" in table and "all (token-weighted)" in table


def test_every_layout_loads_to_the_same_model(models, hf_mixtral):
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_mixtral(ids).logits
        for m, layout in (("shards", "megamoe"), ("shards_tp2ep2", "megamoe"), ("mixtral", "mixtral")):
            lm = load_model(models[m])
            assert lm.layout == detect_layout(models[m]) == layout
            assert (lm.model(ids).logits - ref).abs().max() < 1e-5 * ref.abs().max()
        dense = transformers.AutoModelForCausalLM.from_pretrained(models["dense"], dtype=torch.float32).eval()
        lm = load_model(models["dense"])
        assert lm.layout == "llama" and lm.cfg.moe is None
        assert (lm.model(ids).logits - dense(ids).logits).abs().max() < 1e-5 * ref.abs().max()
    assert lm.tokenizer is not None and lm.eos_ids == [2]


def _bad(capsys, argv, *needles):
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if "megamoe-eval: error:" in ln]
    assert len(line) == 1, err
    for n in needles:
        assert n in line[0], line[0]


def test_bad_input_one_line_exit_2(models, jsonl, manifest, tmp_path, capsys):
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    _bad(capsys, ["--model", str(gpt), "--data", jsonl], "config.json", "model_type 'gpt2'")
    v2 = tmp_path / "v2"  # a llama-moe v2 directory (Mixtral-typed, v2 fields) whose config lacks attn_experts
    v2.mkdir()
    c = json.load(open(os.path.join(models["mixtral"], "config.json")))
    c.update(use_attn_moe=True, intermediate_size_residual=64)
    (v2 / "config.json").write_text(json.dumps(c))
    _bad(capsys, ["--model", str(v2), "--data", jsonl], "config.json", "llama-moe v2", "attn_experts")
    _bad(capsys, ["--model", str(tmp_path / "nothing"), "--data", jsonl], "no such file")
    _bad(capsys, ["--model", models["shards"], "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    _bad(capsys, ["--model", models["shards"], "--data", str(tmp_path / "broken.jsonl")], "broken.jsonl:2",
         "malformed JSON")
    # a dataset made with another tokenizer: SmolLM2 ids (up to 49151) into a model of 1000 tokens
    small = tiny_dense(str(tmp_path / "small"), vocab_size=1000)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(small, f))
    mix = DomainMixture.from_manifest(manifest, seq_len=16)
    top = max(int(b.max()) for b in mix.validation_batches("code", 1000))
    assert top >= 1000
    _bad(capsys, ["--model", small, "--data", manifest, "--seq-len", "16", "--domains", "code"],
         "code/valid_text_document", f"token id {top}", "another tokenizer")


def test_packed_masked_batches_score_only_the_masked_labels(models):
    """A packed row of two documents (position ids restarting, segment ids 1 and 2, as megamoe.data.SFTBatch) with a
    loss mask: the sum of -log p over the masked labels, from the model's own logits under the same positions and
    segments, over the mask's count."""
    lm = load_model(models["shards"])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 49152, (2, 13), generator=g)
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    seg = torch.tensor([[1] * 5 + [2] * 7, [1] * 12], dtype=torch.int32)
    mask = (torch.rand(2, 12, generator=g) < 0.5).float()
    mask[0, 4] = 0  # the label across the document boundary is never trained
    batch = SimpleNamespace(tokens=tokens, loss_mask=mask, position_ids=pos, segment_ids=seg)
    res, routing = domain_perplexity(lm.model, {"chat": [batch]})
    with torch.no_grad():
        logp = F.log_softmax(lm.model(tokens[:, :-1], position_ids=pos, segment_ids=seg).logits.float(), -1)
    nll = -logp.gather(2, tokens[:, 1:, None])[..., 0]
    want = float((nll * mask).sum() / mask.sum())
    assert res["chat"]["tokens"] == int(mask.sum())
    assert res["chat"]["loss"] == pytest.approx(want, rel=1e-5)
    assert all(abs(sum(r) - 1) < 1e-6 for r in routing["chat"])
