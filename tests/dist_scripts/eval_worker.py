"""torchrun --nproc_per_node=4 eval_worker.py SHARDS_TP1 SHARDS_TP2EP2 MIXTRAL_DIR DATA.jsonl

At TP2 x EP2: megamoe-eval on each model directory (rank 0 prints `RESULT {json}`), then the lm-eval engine
(Scorer.score over gathered vocabulary shards, greedy TextGenerator over the KV cache) on the TP2xEP2 shards
(`SCORE {"scores": ..., "gen": ...}`); the test compares both with one process."""

import contextlib
import io
import json
import os
import sys

import torch
import torch.distributed as dist

from megamoe.eval.cli import eval_main
from megamoe.eval.load import load_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared requests
from eval_models import engine_requests  # noqa: E402


def main():
    shards, shards2, mixtral, data = sys.argv[1:5]
    for m in (shards, shards2, mixtral):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = eval_main(["--model", m, "--data", data, "--seq-len", "16", "--batch-size", "2", "--json",
                            "--tp", "2", "--ep", "2"])
        assert rc == 0
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(json.loads(buf.getvalue())), flush=True)
    scores, gen = engine_requests(load_model(shards2))
    if dist.get_rank() == 0:
        print("SCORE " + json.dumps({"scores": scores, "gen": gen}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
