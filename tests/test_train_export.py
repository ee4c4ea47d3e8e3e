"""A model-parallel run's last checkpoint, resumed in a world of one, writes the final model for export, and the
resharded model evaluates exactly as the parallel run did."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.distributed
def test_ep2_run_exports_through_a_world_of_one_resume(tmp_path):
    out = str(tmp_path / "run")
    cfg = os.path.join(ROOT, "configs", "tiny.yaml")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megamoe.train",
                        "--config", cfg, "--set", f"out_dir={out}", "--set", "parallel.ep=2",
                        "--set", "train.steps=6", "--set", "eval.interval=6"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.load(open(os.path.join(out, "summary.json")))
    assert first["final_model"] is None and "--resume" in r.stderr
    r = subprocess.run([sys.executable, "-m", "megamoe.train", "--config", os.path.join(out, "config.yaml"),
                        "--resume", "--set", "parallel.ep=1"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.load(open(os.path.join(out, "summary.json")))
    assert second["final_model"] and os.path.isfile(os.path.join(second["final_model"], "manifest.json"))
    assert first["eval"]
    for domain, res in first["eval"].items():  # same weights after resharding EP2 -> EP1
        assert abs(res["loss"] - second["eval"][domain]["loss"]) < 1e-5, (domain, res, second["eval"][domain])


@pytest.mark.distributed
def test_bf16_ep2_run_tracks_fp32(tmp_path):
    """bf16 (the default on GPUs and on CPUs with native bf16) under expert parallelism over gloo: the run completes
    and its evaluation matches the same EP2 run in fp32 (same seeds, data and router noise) to bf16 accuracy. The fp32
    parallel paths equal a single process: tests/test_parallel.py."""
    cfg = os.path.join(ROOT, "configs", "tiny.yaml")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    evals = []
    for prec in ("bf16", "fp32"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megamoe.train",
                            "--config", cfg, "--set", f"out_dir={tmp_path / prec}", "--set", "parallel.ep=2",
                            "--set", "train.steps=4", "--set", "eval.interval=4", "--set", f"train.precision={prec}",
                            "--set", "checkpoint.save_at_end=false"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"precision {prec}" in r.stderr
        evals.append(json.load(open(tmp_path / prec / "summary.json"))["eval"])
    assert evals[0] and evals[0].keys() == evals[1].keys()
    for domain in evals[0]:
        a, b = evals[0][domain]["loss"], evals[1][domain]["loss"]
        assert abs(a - b) < 1e-2 * b, (domain, a, b)
