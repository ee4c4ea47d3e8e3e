"""Tensor / sequence / expert / expert-tensor / data parallelism on torchrun (gloo, CPU), each layout against a
single-process run of the same model on the same global batch (tests/dist_scripts/parallel_worker.py).

Launches (each runs many checks; a check prints "OK ..." or "FAIL ..."):
  reference   1 process: weights, 4 batches, per-step losses (lm + balance + z), grad norms, step-1 gradients
  2 ranks     (as two torchrun agents, "nodes", on 127.0.0.1 with c10d rendezvous) dispatcher edge cases (a rank receiving / sending no tokens), DP2 (+ distributed optimizer), TP2 without
              and with SP, EP2, TP2xEP2 without and with SP, TP2 with expert-TP 2 (SP): losses, grad norms, every
              parameter's gradient
  4 ranks     TP2xEP2xDP2 with SP and the distributed optimizer: save after step 2; load into EP4, TP1xEP1 (DP4) and
              EP2xETP2: step 3's loss (weights) and step 4's loss (optimizer state) equal the uninterrupted run
  1 process   the same checkpoint loaded at TP1xEP1 in a world of one
  failures    a rank that exits makes torchrun stop the job and name it; --max-restarts resumes from the checkpoint
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_scripts", "parallel_worker.py")
RESTART = os.path.join(HERE, "dist_scripts", "train_restart.py")
ROOT = os.path.dirname(HERE)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MEGAMOE_DIST_TIMEOUT="120")
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def _run(cmd, timeout, cwd=None):
    """Output goes to a file, not a pipe: a process orphaned by a killed worker (e.g. a multiprocessing manager)
    must not keep the test waiting for end-of-file."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out:
        try:
            p = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=_env(),
                               cwd=cwd)
        except subprocess.TimeoutExpired:
            out.seek(0)
            pytest.fail(f"{' '.join(cmd[:6])} ... timed out after {timeout}s:\n{out.read()[-3000:]}")
        out.seek(0)
        return subprocess.CompletedProcess(cmd, p.returncode, out.read(), "")


def _torchrun(nproc, args, timeout=240, extra=()):
    return _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={_port()}", *extra] + args, timeout)


def _checks(proc) -> list[str]:
    out = proc.stdout + proc.stderr
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert proc.returncode == 0 and not fails, "\n".join(fails) or out[-4000:]
    return [ln for ln in out.splitlines() if ln.startswith("OK ")]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("parallel_ref"))
    p = _run([sys.executable, WORKER, "reference", d], 180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return d


LAYOUTS_2 = ["dp2", "tp2", "tp2sp", "ep2", "tp2ep2", "tp2ep2sp", "tp2etp2sp"]


@pytest.fixture(scope="module")
def two_node_layouts(ref):
    """One launch for all 2-rank layouts, as two torchrun agents (two "nodes") rendezvousing over c10d on
    127.0.0.1 with one process each: the multi-node launch path and the layouts in a single launch."""
    port = _port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=megamoe-loopback"]
    layouts = "dispatcher," + ",".join(LAYOUTS_2)
    import tempfile
    files = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [subprocess.Popen(cmd + [f"--node-rank={i}", WORKER, "layouts", ref, layouts], env=_env(),
                              stdout=files[i], stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for f in files:
        f.seek(0)
        outs.append(f.read())
        f.close()
    return [p.returncode for p in procs], outs


def test_two_node_launch_on_loopback(two_node_layouts):
    rcs, outs = two_node_layouts
    assert rcs == [0, 0], "\n-----\n".join(o[-3000:] for o in outs)
    text = "\n".join(outs)
    assert "FAIL" not in text and text.count("\nOK ") > 100


def test_layouts_match_single_process(two_node_layouts):
    rcs, outs = two_node_layouts
    text = "\n".join(outs)
    fails = [ln for ln in text.splitlines() if ln.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    assert rcs == [0, 0], "\n-----\n".join(o[-3000:] for o in outs)
    for case in ("rank 1 experts get no tokens", "rank 1 sends no tokens", "uneven"):
        assert f"dispatcher ({case}): input and weight grads" in text
    for layout in ("ep2", "tp2etp2sp"):  # router weights applied in the experts, carried through all-to-all / all-gather
        assert f"OK dispatcher probs in experts ({layout}): input and router-weight grads" in text
    for layout in LAYOUTS_2:
        for m in ("mixtral", "llamamoe"):
            assert f"OK {layout}/{m} gradients of all" in text, f"{layout}/{m}: gradient check did not run"
            assert f"OK {layout}/{m} step 4 loss" in text and f"OK {layout}/{m} step 4 grad norm" in text
    for layout in ("dp2", "ep2"):      # the distributed optimizer too
        assert f"OK {layout}+distopt/mixtral step 4 loss" in text


def test_reshard_tp2ep2_to_ep4_tp1ep1(ref):
    """TP1xEP1 is loaded on 4 ranks (DP4), and in a world of one (`parallel_worker.py load_single`)."""
    ok = "\n".join(_checks(_torchrun(4, [WORKER, "reshard", ref], timeout=280)))
    assert "OK ep2etp2/llamamoe gradients of all" in ok and "OK ep2etp2/llamamoe step 4 grad norm" in ok
    for layout in ("ep4", "dp4", "ep2etp2"):
        for i, what in ((3, "weights"), (4, "optimizer state")):
            assert f"OK {layout} after loading tp2ep2sp_dp2: step {i} loss ({what})" in ok
    single = _run([sys.executable, WORKER, "load_single", ref], 180)
    assert single.returncode == 0 and single.stdout.count("OK single process") == 2, \
        single.stdout[-3000:] + single.stderr[-3000:]


def test_dead_rank_stops_the_job_and_names_it(tmp_path):
    t0 = time.time()
    p = _torchrun(2, [WORKER, "die", "200"], timeout=150)
    elapsed = time.time() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-2000:]
    assert elapsed < 120, f"the job took {elapsed:.0f}s to stop"
    root = out[out.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root) and re.search(r"exitcode\s*:\s*17", root), root


def test_torchrun_restart_resumes_from_last_checkpoint(tmp_path):
    """megamoe.train under torchrun --max-restarts=1: rank 1 dies at step 3 (checkpoint at step 2); the restarted
    job resumes from step 2 and its step-3 loss equals the one the first attempt logged."""
    out = str(tmp_path / "run")
    p = _torchrun(2, [RESTART, os.path.join(ROOT, "configs", "tiny.yaml"), out, "3",
                      "--set", "train.steps=4", "--set", "eval.at_end=false", "--set", "eval.interval=0",
                      "--set", "checkpoint.interval=2", "--set", "checkpoint.save_at_end=false",
                      "--set", "log.progress=false", "--set", "log.interval=1", "--set", "train.micro_batch_size=4"],
                  timeout=280, extra=["--max-restarts=1"])
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-4000:]
    assert "rank 1 dies at step 3 (attempt 0)" in text
    assert "attempt 1 started at step 2, ran to step 4" in text

    def losses(attempt):
        with open(os.path.join(out, f"attempt_{attempt}", "metrics.jsonl")) as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"}
    first, second = losses(0), losses(1)
    assert sorted(first) == [1, 2, 3] and sorted(second) == [3, 4]
    assert second[3] == pytest.approx(first[3], rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# bad layouts: a clear error naming the field, before any work

def _moe_cfg(**kw):
    from megamoe.config import ModelConfig, MoEConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                moe=MoEConfig(num_experts=4, top_k=2, router="mixtral", gate_network="linear"))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("layout, world, model_kw, message", [
    (dict(ep=3), 3, {}, r"parallel\.ep: 3 does not divide moe\.num_experts \(4\)"),
    (dict(tp=8), 8, {}, r"parallel\.tp: 8 does not divide num_heads \(4\)"),
    (dict(tp=4), 4, {}, r"parallel\.tp: 4 does not divide num_kv_heads \(2\)"),
    (dict(tp=2), 3, {}, r"parallel\.tp: 2 does not divide the world size 3"),
    (dict(ep=4), 2, {}, r"parallel\.ep: ep\*etp = 4 does not divide the world size 2"),
    (dict(ep=2, etp=2), 2, {}, r"parallel\.ep: ep\*etp = 4 does not divide the world size 2"),
    (dict(etp=2), 2, dict(moe=None, intermediate_size=64), None),       # dense model: etp irrelevant, valid
    (dict(sequence_parallel=True), 2, {}, r"parallel\.sequence_parallel: needs tp > 1"),
    (dict(tp=0), 2, {}, r"parallel\.tp: 0 must be >= 1"),
])
def test_bad_layouts_fail_with_the_field_named(layout, world, model_kw, message):
    from megamoe.config import ConfigError, ParallelConfig
    pcfg, cfg = ParallelConfig(**layout), _moe_cfg(**model_kw)
    if message is None:
        pcfg.validate(cfg, world)
        return
    with pytest.raises(ConfigError, match=message):
        pcfg.validate(cfg, world)


def test_bad_layout_fails_in_initialize_before_groups_exist():
    """parallel.initialize validates against the real world size before creating any megatron group."""
    from megatron.core import parallel_state as ps

    from megamoe import parallel
    from megamoe.config import ConfigError, ParallelConfig
    parallel.destroy(keep_process_group=True)
    with pytest.raises(ConfigError, match=r"parallel\.tp: 2 does not divide the world size 1"):
        parallel.initialize(ParallelConfig(tp=2, sequence_parallel=True), _moe_cfg())
    assert not ps.model_parallel_is_initialized()
    parallel.initialize(ParallelConfig())     # leave a world of one for the other tests


def test_dispatcher_rejects_a_layout_its_experts_do_not_match():
    from megamoe import parallel
    from megamoe.config import ParallelConfig
    from megamoe.moe.dispatcher import AllToAllDispatcher
    parallel.initialize(ParallelConfig())
    with pytest.raises(ValueError, match=r"local experts \[2, 3\] are not the block \[0, 1, 2, 3\]"):
        AllToAllDispatcher(4, [2, 3])


# ---------------------------------------------------------------------------------------------------------------
# the Slurm launcher (DRY_RUN prints the torchrun command; a fake scontrol expands the node list)

SLURM = os.path.join(ROOT, "scripts", "slurm_launch.sh")


def _slurm(tmp_path, env, *args):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    (fake / "scontrol").chmod(0o755)
    e = {"PATH": f"{fake}:/usr/bin:/bin", "DRY_RUN": "1", **env}
    return subprocess.run(["bash", SLURM, *args], capture_output=True, text=True, env=e, timeout=30)


def test_slurm_launcher_reads_slurm_variables(tmp_path):
    p = _slurm(tmp_path, {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
                          "SLURM_JOB_ID": "4242", "SLURM_GPUS_PER_NODE": "h100:8", "MAX_RESTARTS": "3"},
               "-m", "megamoe.train", "--config", "run.yaml", "--resume")
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.split()
    for want in ("--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=gpu-a17:29742", "--rdzv-id=4242", "--max-restarts=3"):
        assert want in cmd, (want, cmd)
    assert cmd[-5:] == ["-m", "megamoe.train", "--config", "run.yaml", "--resume"]
    p = _slurm(tmp_path, {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "6000", "NNODES": "1", "NPROC_PER_NODE": "4"},
               "train.py")
    assert "--rdzv-endpoint=10.0.0.5:6000" in p.stdout and "--nproc-per-node=4" in p.stdout


@pytest.mark.parametrize("env, message", [
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "2", "MASTER_ADDR": "h"}, "NODE_RANK/SLURM_NODEID: '2' is not in"),
    ({"SLURM_NNODES": "two"}, "NNODES/SLURM_NNODES: 'two' is not a positive integer"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]", "PATH": "/usr/bin:/bin"},
     "MASTER_ADDR is not set"),
])
def test_slurm_launcher_bad_environment(tmp_path, env, message):
    p = _slurm(tmp_path, env, "train.py")
    assert p.returncode == 2 and message in p.stderr, p.stderr
