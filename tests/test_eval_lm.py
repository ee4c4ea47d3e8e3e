"""The lm-eval backend's engine (megamoe.eval.scorer / textgen / sampling) and the backend itself.

Without lm_eval: hand-made requests against transformers' MixtralForCausalLM on the Mixtral export of the same model
(log-likelihoods, greedy flags, truncation, rolling windows), generation against transformers' generate and
megamoe.model.generate (greedy and sampled, KV cache and full forwards), megamoe-generate.
With lm_eval (`pip install 'megamoe[lm-eval]'`; skipped otherwise): `--model megamoe` against lm_eval's own `hf` backend
on the offline tasks (same metrics, every log-likelihood to 1e-4, the same generated strings), plain `lm_eval`
registration through the import hook, the task suites resolving in lm_eval's task registry, unknown task names.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from eval_models import cached_tiny_models, ensure_world
from megamoe.eval.cli import generate_main
from megamoe.eval.load import load_model
from megamoe.eval.sampling import Sampler
from megamoe.eval.scorer import Scorer, rolling_windows
from megamoe.eval.textgen import TextGenerator
from megamoe.model.generate import generate as model_generate

pytestmark = pytest.mark.usefixtures("world")
transformers = pytest.importorskip("transformers")

try:
    import lm_eval  # noqa: F401
    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-evaluation-harness is not installed "
                                   "(pip install 'megamoe[lm-eval]'); the engine is tested without it above")

PAIRS = [("The capital of France is", " Paris"), ("Question: what is 2 + 2?\nAnswer: ", "4"),
         ("def add(a, b):\n    return", " a + b"), ("", "An empty context scores from the prefix token."),
         ("Licensed under the Apache", " License, Version 2.0")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return cached_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def hf(models):
    return transformers.AutoModelForCausalLM.from_pretrained(models["mixtral"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(models):
    return transformers.AutoTokenizer.from_pretrained(models["mixtral"])


@pytest.fixture(scope="module")
def lm(models):
    ensure_world()
    return load_model(models["shards"])


def _hand_score(hf, ctx, cont, max_length=None):
    """log p(cont | ctx) and greedy flag, from transformers' logits, summed by hand."""
    seq = ctx + cont
    if max_length is not None:
        seq = seq[-(max_length + 1):]
    with torch.no_grad():
        logp = F.log_softmax(hf(torch.tensor([seq[:-1]])).logits.float(), -1)[0]
    rows = logp[len(seq) - 1 - len(cont):]
    tgt = torch.tensor(cont)
    return float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


def test_loglikelihoods_equal_transformers_summed_by_hand(lm, hf, tok):
    sc = Scorer(lm, batch_size=3)
    reqs = [sc.encode_pair(c, x) for c, x in PAIRS]
    # lm_eval's split: trailing space of the context moves to the continuation; empty context -> BOS
    assert reqs[1][1] == tok.encode(" 4")[-len(reqs[1][1]):] and reqs[1][0] == tok.encode(PAIRS[1][0].rstrip())
    assert reqs[3][0] == [tok.bos_token_id]
    reqs.append((reqs[0][0], [int(hf(torch.tensor([reqs[0][0]])).logits[0, -1].argmax())]))  # a greedy one
    got = sc.score(reqs)
    assert got == Scorer(lm, batch_size=1).score(reqs) or all(
        abs(a[0] - b[0]) < 1e-4 and a[1] == b[1] for a, b in zip(got, Scorer(lm, batch_size=1).score(reqs)))
    for (ctx, cont), (s, greedy) in zip(reqs, got):
        ref, ref_greedy = _hand_score(hf, ctx, cont)
        assert abs(s - ref) < 1e-4 and greedy == ref_greedy
    assert got[-1][1] is True
    # truncation from the left to max_length + 1 tokens
    short = Scorer(lm, batch_size=2, max_length=6)
    for (ctx, cont), (s, greedy) in zip(reqs[:3], short.score(reqs[:3])):
        ref, ref_greedy = _hand_score(hf, ctx, cont, max_length=6)
        assert abs(s - ref) < 1e-4 and greedy == ref_greedy


def test_rolling_loglikelihood(lm, hf, tok):
    text = "Rolling windows predict every token of a document exactly once, each with the context before it."
    toks = tok.encode(text)
    with torch.no_grad():  # one window: log p of every token given BOS and the tokens before it
        ids = torch.tensor([[tok.bos_token_id] + toks])
        logp = F.log_softmax(hf(ids[:, :-1]).logits.float(), -1)[0]
    full = float(logp.gather(1, ids[0, 1:, None]).sum())
    assert abs(Scorer(lm, max_length=64).rolling(toks) - full) < 1e-3
    L = 7  # several windows: each predicts up to L tokens with the L - w + 1 tokens before them as context
    w = rolling_windows(toks, tok.bos_token_id, L)
    assert [t for _, c in w for t in c] == toks and all(len(a) + len(b) - 1 <= L for a, b in w)
    assert w[0][0] == [tok.bos_token_id] and all(len(a) == 1 for a, b in w[1:-1])
    ref = sum(_hand_score(hf, a, b)[0] for a, b in w)
    assert abs(Scorer(lm, batch_size=4, max_length=L).rolling(toks) - ref) < 1e-3
    if HAVE_LM_EVAL:
        from lm_eval import utils
        theirs = [utils.make_disjoint_window(x) for x in
                  utils.get_rolling_token_windows(toks, tok.bos_token_id, L, context_len=1)]
        assert [tuple(map(list, x)) for x in theirs] == w


def test_greedy_generation_equals_transformers_and_the_cache_equals_full_forwards(lm, hf, tok):
    prompt = tok.encode("Once upon a time")
    n = 12
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=2)[0, len(prompt):]
    ref = [t for t in ref.tolist()]
    ref = ref[:ref.index(2)] if 2 in ref else ref
    cached = TextGenerator(lm, Sampler(), use_cache=True).generate_ids(prompt, n)
    full = TextGenerator(lm, Sampler(), use_cache=False).generate_ids(prompt, n)
    assert cached == full == ref
    theirs = model_generate(lm.model, [prompt], n, eos_token_id=lm.eos_ids).new_tokens[0]
    assert cached == [t for t in theirs if t not in lm.eos_ids]


def test_sampled_generation_is_seeded_and_the_cache_changes_nothing(lm, tok):
    prompt = tok.encode("In the beginning")
    kw = dict(greedy=False, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    a = TextGenerator(lm, Sampler(**kw), use_cache=True).generate_ids(prompt, 10)
    b = TextGenerator(lm, Sampler(**kw), use_cache=False).generate_ids(prompt, 10)
    c = model_generate(lm.model, [prompt], 10, do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=7,
                       eos_token_id=lm.eos_ids).new_tokens[0]
    assert a == b == [t for t in c if t not in lm.eos_ids]
    assert a != TextGenerator(lm, Sampler(**{**kw, "seed": 8})).generate_ids(prompt, 10)


def test_batched_generation_equals_one_by_one(lm, tok):
    """Prompts of different lengths left-padded into one batch over the KV cache decode as each would alone, stop
    strings and EOS per row."""
    prompts = [tok.encode(t) for t in ("Once upon a time", "def f(x):\n    return", "A",
                                       "The quick brown fox jumps over the lazy dog and")]
    gen = TextGenerator(lm, Sampler())
    alone = [gen.generate_ids(p, 10) for p in prompts]
    assert gen.generate_batch(prompts, 10) == alone
    stop = [tok.decode(alone[0][3:5])]
    assert gen.generate_batch(prompts, 10, stop=stop) == [gen.generate_ids(p, 10, stop=stop) for p in prompts]


def test_sampler_keeps_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    assert int(Sampler()(logits)[0]) == 0
    s = Sampler(greedy=False, top_k=4, top_p=0.9, seed=0)
    q = torch.softmax(logits[0, :4], -1)            # top-4 renormalised, then the nucleus: keep a token while the
    before = q.cumsum(0) - q                        # mass of the better ones is still below top_p
    allowed = {i for i in range(4) if float(before[i]) < 0.9}
    assert allowed == {0, 1, 2}
    drawn = {int(s(logits)[0]) for _ in range(300)}
    assert drawn == allowed
    with pytest.raises(Exception, match="top-p"):
        Sampler(greedy=False, top_p=0.0)


def test_stop_strings_cut_the_text(lm, tok):
    gen = TextGenerator(lm, Sampler())
    prompt = tok.encode("Once upon a time")
    new = gen.generate_ids(prompt, 12)
    text = tok.decode(new)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop and stop in text
    cut = gen.generate_ids(prompt, 12, stop=[stop])
    assert len(cut) < len(new) and new[:len(cut)] == cut
    assert gen.decode(cut, [stop]) == text.split(stop)[0]


def test_megamoe_generate_command(models, lm, tok, capsys):
    assert generate_main(["--model", models["shards"], "--prompt", "Once upon a time", "Hello",
                          "--max-new-tokens", "6", "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    gen = TextGenerator(lm, Sampler())
    assert [o["completion"] for o in out] == gen.generate(["Once upon a time", "Hello"], 6)
    assert "chat template: off (auto: the model is not an instruct model by name)" in cap.err
    assert generate_main(["--model", models["mixtral"], "--prompt", "Hi", "--chat", "--max-new-tokens", "4",
                          "--json"]) == 0
    cap = capsys.readouterr()
    assert "chat template: on (--chat)" in cap.err
    assert json.loads(cap.out)[0]["completion"] == gen.generate(["Hi"], 4, chat=True)[0]
    assert gen.prompt_ids("Hi", chat=True)[:1] == tok.encode("<|im_start|>")
    for bad, needle in ((["--greedy", "--temperature", "0.7"], "--greedy"), (["--top-p", "1.5"], "--top-p"),
                        (["--max-new-tokens", "0"], "--max-new-tokens")):
        assert generate_main(["--model", models["shards"], "--prompt", "x", *bad]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


# ---- with lm_eval ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offline_tasks(tmp_path_factory):
    from megamoe.eval.tasks.offline import build_offline_tasks
    d = tmp_path_factory.mktemp("offline_tasks")
    return build_offline_tasks(str(d), sizes={"megamoe_docstring_mc": 8, "megamoe_lastword": 8,
                                              "megamoe_nextline": 4, "megamoe_rolling": 3})


def test_offline_tasks_are_deterministic(offline_tasks, tmp_path):
    from megamoe.eval.tasks.offline import build_offline_tasks
    again = build_offline_tasks(str(tmp_path), sizes={t: v["items"] for t, v in offline_tasks["tasks"].items()})
    assert {t: v["sha256"] for t, v in again["tasks"].items()} == {t: v["sha256"] for t, v in
                                                                    offline_tasks["tasks"].items()}
    mc = [json.loads(ln) for ln in open(offline_tasks["tasks"]["megamoe_docstring_mc"]["data"])]
    assert all(len(set(x["choices"])) == 4 and 0 <= x["answer"] < 4 for x in mc)


def _run_tasks(model, args, tm, tasks):
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=tm, batch_size=4,
                                   device="cpu", log_samples=True, bootstrap_iters=0)


@needs_lm_eval
def test_backend_equals_lm_eval_hf_backend_on_the_offline_tasks(models, offline_tasks, monkeypatch):
    import megamoe.eval.lm_eval_backend  # noqa: F401  registers "megamoe"
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=offline_tasks["dir"], include_defaults=False)
    ref = _run_tasks("hf", f"pretrained={models['mixtral']},dtype=float32", tm, ["megamoe_offline"])
    ours = _run_tasks("megamoe", f"path={models['shards']}", tm, ["megamoe_offline"])
    for task, metrics in ref["results"].items():
        for k, v in metrics.items():
            if isinstance(v, float) and "stderr" not in k:
                assert ours["results"][task][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (task, k)
    n = 0
    for task, samples in ref["samples"].items():
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        for s in samples:
            for a, b in zip(s["resps"], mine[s["doc_id"]]["resps"]):
                a, b = a[0], b[0]
                n += 1
                if isinstance(a, (list, tuple)):   # (loglikelihood, is_greedy)
                    assert abs(a[0] - b[0]) < 1e-4 and a[1] == b[1], (task, a, b)
                elif isinstance(a, float):          # a rolling sum over a whole document
                    assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (task, a, b)
                else:                               # generated text
                    assert a == b, (task, a, b)
    assert n > 40


@needs_lm_eval
def test_plain_lm_eval_finds_megamoe_through_the_hook():
    code = ("import sys, megamoe.eval.lm_eval_hook\n"
            "assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('hf').__name__, get_model('megamoe').__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["HFLM", "MegamoeLM"]


@pytest.mark.slow  # indexes lm_eval's ~15k task names (~15 s on an idle 2-core machine, more when busy)
@needs_lm_eval
def test_suites_resolve_in_lm_eval_and_set_the_shot_counts(offline_tasks, tmp_path):
    """Every task of both suites is a name lm_eval knows; the v1 suite builds (datasets stubbed: no download) into
    its 11 tasks, MMLU's 57 subtasks 5-shot, with the paper's shot counts. An unknown name is a clear error."""
    import lm_eval.tasks._factory as factory
    from lm_eval.tasks import TaskManager

    from megamoe.errors import InputError
    from megamoe.eval.lm_eval_backend import task_manager
    from megamoe.eval.tasks import SUITES, SUITES_DIR
    tm = TaskManager(include_path=[SUITES_DIR, offline_tasks["dir"]])
    for suite, shots in SUITES.items():
        assert tm.match_tasks([suite]) == [suite]
        assert all(tm.match_tasks([t]) == [t] for t in shots), suite
    built = []

    class Stub:
        def __init__(self, config):
            built.append((config["task"], config.get("num_fewshot")))

        def __getattr__(self, k):
            return lambda *a, **kw: None

    orig = factory.ConfigurableTask
    factory.ConfigurableTask = Stub
    try:
        tm._factory.build(tm.task_index["llama_moe_v1"], registry=tm.task_index)
    finally:
        factory.ConfigurableTask = orig
    mmlu = {n for t, n in built if t.startswith("mmlu_")}
    rest = {t: n for t, n in built if not t.startswith("mmlu_")}
    assert mmlu == {5} and len([t for t, _ in built if t.startswith("mmlu_")]) == 57
    assert rest == {t: n for t, n in SUITES["llama_moe_v1"].items() if t != "mmlu"}
    with pytest.raises(InputError, match=r"'megamoe_docstring_mcq' \(did you mean megamoe_docstring_mc"):
        task_manager(offline_tasks["dir"], ["megamoe_docstring_mcq"], tm=tm)
    assert task_manager(offline_tasks["dir"], ["megamoe_offline"]).match_tasks(["megamoe_offline"])


def _train_cfg(tmp_path, models, **eval_over):
    import yaml

    from megamoe.training.config import TrainConfig
    d = yaml.safe_load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                         "tiny.yaml")))
    d.pop("model")
    d.update(out_dir=str(tmp_path / "run"), init={"source": "megamoe", "path": models["shards"]})
    d["train"].update(steps=2)
    d["eval"] = {"interval": 0, "at_end": True, "batches": 1, "batch_size": 4, "plots": False, **eval_over}
    d["checkpoint"] = {"interval": 0, "save_at_end": False}
    return TrainConfig.from_dict(d)


def test_trainer_lm_eval_tasks_config_errors_name_the_field(models, tmp_path):
    from megamoe.errors import ConfigError
    from megamoe.training.trainer import run
    cfg = _train_cfg(tmp_path, models, lm_eval_tasks=["megamoe_no_such_task"], lm_eval_include_path=str(tmp_path))
    with pytest.raises(ConfigError, match="eval.lm_eval_tasks: " + (
            "lm_eval does not know the task" if HAVE_LM_EVAL else "lm-evaluation-harness is not installed")):
        run(cfg)


@needs_lm_eval
def test_trainer_logs_lm_eval_tasks_at_its_evaluations(models, offline_tasks, tmp_path, monkeypatch):
    """eval.lm_eval_tasks: the task's metrics are in the eval record, and equal what the backend gives on the
    exported final model."""
    from megamoe.eval.lm_eval_backend import evaluate_tasks
    from megamoe.training.trainer import run
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = _train_cfg(tmp_path, models, lm_eval_tasks=["megamoe_docstring_mc"], lm_eval_limit=4,
                     lm_eval_include_path=offline_tasks["dir"])
    summary = run(cfg)
    rows = [json.loads(x) for x in open(summary["metrics"])]
    ev = [r for r in rows if r["kind"] == "eval"]
    assert len(ev) == 1 and {"eval/lm/megamoe_docstring_mc/acc", "eval/lm/megamoe_docstring_mc/acc_norm"} <= set(ev[0])
    final = load_model(summary["final_model"], tokenizer=models["shards"])  # the trainer's export has no tokenizer
    direct = evaluate_tasks(final, ["megamoe_docstring_mc"],
                            include_path=offline_tasks["dir"], limit=4)
    assert ev[0]["eval/lm/megamoe_docstring_mc/acc"] == direct["megamoe_docstring_mc"]["acc"]


@pytest.mark.slow  # lm_eval's command line indexes its ~15k task names at every start
@needs_lm_eval
def test_megamoe_lm_eval_command(models, offline_tasks, monkeypatch, capsys):
    from megamoe.eval.cli import lm_eval_main
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["--model", "megamoe", "--model_args", f"path={models['shards']}", "--include_path", offline_tasks["dir"],
            "--limit", "2", "--device", "cpu", "--batch_size", "2"]
    assert lm_eval_main(args + ["--tasks", "megamoe_docstring_mc"]) == 0
    assert "megamoe_docstring_mc" in capsys.readouterr().out
    assert lm_eval_main(args + ["--tasks", "megamoe_no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "megamoe-lm-eval: error: --tasks: Tasks not found: megamoe_no_such_task" in err and "Traceback" not in err
