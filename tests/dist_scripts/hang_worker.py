"""Worker for tests/test_dist_timeout.py: the training command (megamoe.train.main, so its exit status is the one
users get) under torchrun, with one rank hanging instead of dying.

    torchrun --nproc_per_node=2 hang_worker.py CONFIG OUT_DIR STOP_STEP [--set k=v ...]

Rank 1 stops itself with SIGSTOP at the start of step STOP_STEP (0-based), after writing the wall-clock time to
OUT_DIR/stopped_at; rank 0 goes on into that step's gradient all-reduce, which no peer joins. With
MEGAMOE_DIST_TIMEOUT=T, rank 0 must give up after T seconds with a DistributedError (exit 4); torchrun then stops
the frozen rank (SIGTERM, then SIGKILL after its 30 s grace).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main():
    config, out, stop_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    overrides = [a for a in sys.argv[4:] if a != "--set"]
    import megamoe.train as entry
    from megamoe.training.trainer import run
    rank = int(os.environ.get("RANK", "0"))

    def step_start(step, model):
        if rank == 1 and step == stop_step:
            with open(os.path.join(out, "stopped_at"), "w") as f:
                f.write(repr(time.time()))
            print(f"hang_worker: rank 1 stops itself (SIGSTOP) at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    entry.run = lambda cfg: run(cfg, callbacks={"step_start": step_start})
    args = ["--config", config, "--set", f"out_dir={out}"]
    for o in overrides:
        args += ["--set", o]
    sys.exit(entry.main(args))


if __name__ == "__main__":
    main()
