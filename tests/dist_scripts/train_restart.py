"""Worker for tests/test_parallel.py: the training entry point (megamoe.train.run) under torchrun, with one rank
dying on the first attempt.

    torchrun --nproc_per_node=2 --max-restarts=1 train_restart.py CONFIG OUT_DIR CRASH_STEP [--set k=v ...]

Attempt 0 (TORCHELASTIC_RESTART_COUNT=0): rank 1 exits with code 17 at the start of step CRASH_STEP (0-based), after
the checkpoint of an earlier step was written; torchrun stops rank 0 and restarts both. Attempt 1 resumes from the
latest checkpoint (checkpoint.resume) and finishes. Each attempt writes its metrics under OUT_DIR/attempt_N
(metrics.jsonl), the checkpoints go to OUT_DIR/checkpoints.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore")


def main():
    config, out, crash_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    overrides = [a for a in sys.argv[4:] if a != "--set"]
    from megamoe.console import setup_logging as _setup_logging
    from megamoe.training.trainer import run
    from megamoe.training.config import load_train_config
    _setup_logging()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_train_config(config, overrides + [f"out_dir={out}/attempt_{attempt}",
                                                 f"checkpoint.dir={out}/checkpoints"])
    cfg.checkpoint.resume = True

    def step_start(step, model):
        if attempt == 0 and rank == 1 and step == crash_step:
            print(f"train_restart: rank {rank} dies at step {step} (attempt {attempt})", flush=True)
            import multiprocessing
            for child in multiprocessing.active_children():   # dist_checkpointing's manager process
                child.terminate()
            os._exit(17)

    summary = run(cfg, callbacks={"step_start": step_start})
    if rank == 0:
        print(f"train_restart: attempt {attempt} started at step {summary['start_step']}, "
              f"ran to step {summary['steps']}", flush=True)


if __name__ == "__main__":
    main()
