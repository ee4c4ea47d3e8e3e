"""megamoe-eval under torchrun (gloo, CPU): TP2 x EP2 on 4 ranks gives the numbers of one process, whatever layout
the checkpoint was written in (our shards at TP1 or at TP2xEP2, the Mixtral export); lm_eval-style scoring and
greedy generation at TP2xEP2 equal one process's too (tests/dist_scripts/eval_worker.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from eval_models import cached_tiny_models, engine_requests, ensure_world
from megamoe.eval.cli import eval_main
from megamoe.eval.load import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_scripts", "eval_worker.py")

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("world")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MEGAMOE_DIST_TIMEOUT="300")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={_port()}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return p.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ensure_world()
    return cached_tiny_models(tmp_path_factory)


def test_eval_tp2ep2_equals_one_process(models, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i, t in enumerate(["The quick brown fox jumps over the lazy dog again and again.",
                               "def square(x):\n    return x * x\n", "Another line of prose, a bit longer than one "
                               "sample of sixteen tokens, to make two samples.", "x = [i for i in range(10)]"]):
            f.write(json.dumps({"text": t, "domain": "prose" if i % 2 == 0 else "code"}) + "\n")
    args = ["--data", str(data), "--seq-len", "16", "--batch-size", "2", "--json"]
    assert eval_main(["--model", models["shards"], *args]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["tokens"] > 40
    out = _torchrun([WORKER, models["shards"], models["shards_tp2ep2"], models["mixtral"], str(data)])
    got = [json.loads(ln[len("RESULT "):]) for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert len(got) == 3, out[-2000:]
    for g in got:
        assert g["parallel"] == {"tp": 2, "ep": 2, "etp": 1, "world": 4}
        assert g["tokens_per_domain"] == one["tokens_per_domain"]
        for d, loss in one["loss"].items():
            assert g["loss"][d] == pytest.approx(loss, rel=1e-5), (g["model"], d)
    score = [json.loads(ln[len("SCORE "):]) for ln in out.splitlines() if ln.startswith("SCORE ")]
    assert len(score) == 1, out[-2000:]
    ref_scores, ref_gen = engine_requests(load_model(models["shards"]))
    assert score[0]["gen"] == ref_gen
    for (a, ga), (b, gb) in zip(score[0]["scores"], ref_scores):
        assert abs(a - b) < 1e-4 and ga == gb
