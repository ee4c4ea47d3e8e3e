"""lm-eval task files: the paper's suites (`suites/`, an include path for lm_eval) and the offline task builder.

    SUITES_DIR                     # megamoe/eval/tasks/suites: llama_moe_v1.yaml (11 tasks), llama_moe_v2.yaml (10)
    SUITES                         # {"llama_moe_v1": {task: shots}, "llama_moe_v2": {...}}
    from megamoe.eval.tasks.offline import build_offline_tasks    # the offline set (tests, quickstart)
"""

from __future__ import annotations

import os

SUITES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suites")

# the shot counts the suite files set (a test checks that the files say the same)
SUITES = {
    "llama_moe_v1": {"sciq": 0, "piqa": 0, "winogrande": 0, "arc_easy": 0, "arc_challenge": 25, "hellaswag": 10,
                     "logiqa": 0, "boolq": 32, "lambada_openai": 0, "nq_open": 32, "mmlu": 5},
    "llama_moe_v2": {"mmlu": 5, "gsm8k": 8, "humaneval": 0, "ifeval": 0, "boolq": 32, "sciq": 0, "piqa": 0,
                     "arc_challenge": 25, "truthfulqa_mc2": 0, "hellaswag": 10},
}

__all__ = ["SUITES_DIR", "SUITES"]
