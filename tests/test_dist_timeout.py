"""A rank that hangs (not dies) stops the job within the configured collective timeout, MEGAMOE_DIST_TIMEOUT
(issue 14; docs/parallel.md "Failures and restarts")."""

import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from megamoe.errors import ConfigError, DistributedError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HANG = os.path.join(HERE, "dist_scripts", "hang_worker.py")
TORCHRUN_GRACE_S = 30  # torchrun's agent: SIGTERM to the other workers, SIGKILL after 30 s (elastic/multiprocessing)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_process_group_gets_the_timeout(tmp_path):
    """Guards against megatron's groups keeping their 30-minute default while only the world group got
    MEGAMOE_DIST_TIMEOUT: after parallel.initialize every process group (world, megatron's model/data/expert
    groups and their gloo twins) has the configured timeout."""
    code = textwrap.dedent("""
        import datetime, torch, torch.distributed as dist
        from megamoe import parallel
        from megamoe.config import ParallelConfig
        parallel.initialize(ParallelConfig())
        bad = []
        pgs = list(dist.distributed_c10d._world.pg_map)
        for pg in pgs:
            t = pg._get_backend(torch.device("cpu")).options._timeout
            if t != datetime.timedelta(seconds=7):
                bad.append((dist.distributed_c10d._world.pg_group_ranks.get(pg), str(t)))
        print("GROUPS", len(pgs), "BAD", bad)
    """)
    env = dict(os.environ, MEGAMOE_DIST_TIMEOUT="7", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    m = re.search(r"GROUPS (\d+) BAD (.*)", p.stdout)
    assert m, p.stdout[-2000:] + p.stderr[-3000:]
    assert int(m.group(1)) > 5 and m.group(2) == "[]", m.group(0)


def test_timeout_setting_is_checked(monkeypatch):
    from megamoe.parallel import timeout_seconds
    monkeypatch.setenv("MEGAMOE_DIST_TIMEOUT", "30")
    assert timeout_seconds() == 30
    for bad in ("0", "-5", "soon", "inf", "nan"):
        monkeypatch.setenv("MEGAMOE_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="MEGAMOE_DIST_TIMEOUT"):
            timeout_seconds()
    monkeypatch.delenv("MEGAMOE_DIST_TIMEOUT")
    assert timeout_seconds() == 600


def test_collective_failures_become_distributed_errors(monkeypatch):
    """The waiting rank's gloo/NCCL failure becomes a DistributedError (exit 4) that says what happened; any other
    exception passes unchanged."""
    from megamoe.parallel import as_distributed_error, collective_errors
    monkeypatch.setenv("MEGAMOE_DIST_TIMEOUT", "30")
    t = as_distributed_error(RuntimeError("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                                          "waiting 30000ms for recv operation to complete"))
    assert isinstance(t, DistributedError) and t.exit_code == 4
    assert "within MEGAMOE_DIST_TIMEOUT=30 s" in str(t) and "hung" in str(t)
    d = as_distributed_error(RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                                          "[127.0.0.1]:1234: Connection reset by peer"))
    assert isinstance(d, DistributedError) and "died" in str(d)
    assert as_distributed_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    with pytest.raises(ValueError):
        with collective_errors():
            raise ValueError("not distributed")


@pytest.mark.slow  # ~90 s: torchrun start-up, the 20 s timeout, then torchrun's own 30 s grace for the frozen rank
def test_hung_rank_stops_the_job_within_the_timeout(tmp_path):
    """Guards against a SIGSTOPped rank keeping a 2-rank job alive: today megatron's groups keep a 30-minute
    timeout, so the other rank waits in the gradient all-reduce far past MEGAMOE_DIST_TIMEOUT. Now rank 0 gives up
    after the timeout with a DistributedError (one line, exit 4) and torchrun stops the frozen rank: SIGTERM, which
    a stopped process cannot act on, then SIGKILL after torchrun's 30 s grace; torchrun itself exits 1 and its
    summary lists rank 0 with exit code 4. The whole job ends within timeout + grace (+ slack)."""
    T = 20
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, MEGAMOE_DIST_TIMEOUT=str(T), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}", HANG,
           os.path.join(ROOT, "configs", "tiny.yaml"), str(out), "2",
           "--set", "train.steps=6", "--set", "eval.at_end=false", "--set", "eval.interval=0",
           "--set", "checkpoint.interval=0", "--set", "checkpoint.save_at_end=false", "--set", "log.progress=false",
           "--set", "log.tensorboard=false"]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe (an orphaned helper must not hold it open)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=T + TORCHRUN_GRACE_S + 180)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(p.pid, 9)  # the session this test started: torchrun and its workers
            except ProcessLookupError:
                pass
        end = time.time()
        log.seek(0)
        text = log.read()
    assert rc is not None, "the job with a frozen rank did not stop:\n" + text[-3000:]
    stopped = float((out / "stopped_at").read_text())
    elapsed = end - stopped
    assert "rank 1 stops itself (SIGSTOP) at step 2" in text
    assert re.search(rf"megamoe-train: error: rank 0: a collective got no answer from a peer rank within "
                     rf"MEGAMOE_DIST_TIMEOUT={T} s", text), text[-3000:]
    assert rc == 1, text[-3000:]  # torchrun's status when a worker failed
    root = text[text.index("Root Cause") if "Root Cause" in text else 0:]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*4", root), root[-2000:]
    assert T <= elapsed < T + TORCHRUN_GRACE_S + 20, f"the job stopped {elapsed:.0f} s after the rank froze"
