"""scripts/gpu_check.sh's own plumbing on a CPU: the dry run goes through every step's real command line with tiny
shapes on the CPU and writes the report section (without touching docs/benchmarks.md); a spent time budget skips
steps and says so; --append appends a section; bad arguments are refused."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ["env", "install", "build", "tests", "kernels", "layer_llama_moe_3.5b", "layer_mixtral_proxy", "train",
         "pipeline"]


def _run(*args, env=None, timeout=900):
    e = dict(os.environ, **(env or {}))
    e.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _steps(out):
    return {r[0]: r[1] for r in (ln.split("\t") for ln in open(os.path.join(out, "steps.tsv")).read().splitlines())}


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    docs = os.path.join(ROOT, "docs", "benchmarks.md")
    before = open(docs).read()
    p = _run("--dry-run", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = _steps(tmp_path)
    assert list(steps) == STEPS and set(steps.values()) == {"ok"}, steps
    section = open(tmp_path / "section.md").read()
    assert section.startswith("### GPU check ") and "DRY RUN" in section and "commit `" in section
    for name in STEPS:
        assert f"| {name} | ok |" in section
    assert "megatron-core SequentialMLP" in section                                 # from the benchmarks' JSON
    assert re.search(r"megamoe \((grouped_mm|loop)\)", section) and re.search(r"experts (grouped_mm|loop):", section)
    for f in ("layer_llama_moe_3.5b.json", "layer_mixtral_proxy.json", "train.json"):
        assert (tmp_path / f).stat().st_size > 0
    assert open(docs).read() == before


def test_spent_budget_skips_the_steps(tmp_path):
    p = _run("--dry-run", "--out", str(tmp_path), env={"GPU_CHECK_BUDGET": "5"}, timeout=120)
    assert p.returncode == 1
    steps = _steps(tmp_path)
    assert list(steps) == STEPS and set(steps.values()) == {"skipped (budget spent)"}
    assert "| train | skipped (budget spent) |" in open(tmp_path / "section.md").read()


def test_append_and_bad_arguments(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    sec = tmp_path / "section.md"
    sec.write_text("### GPU check X\n")
    p = _run("--append", str(sec), env={"GPU_CHECK_DOCS": str(docs)}, timeout=60)
    assert p.returncode == 0 and docs.read_text() == "# Benchmarks\n\n### GPU check X\n"
    empty = tmp_path / "empty.md"
    empty.write_text("")
    p = _run("--append", str(empty), env={"GPU_CHECK_DOCS": str(docs)}, timeout=60)
    assert p.returncode == 2 and "missing or empty" in p.stderr
    p = _run("--bogus", timeout=60)
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr
