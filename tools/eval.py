#!/usr/bin/env python3
"""Per-domain perplexity of a model: the `megamoe-eval` command (megamoe/eval/cli.py) from a checkout.

  tools/eval.py --model ckpt/moe --data tok/manifest.json             # our shards (any TP/EP layout) or an HF dir
  tools/eval.py --model hf/mixtral --data valid.jsonl --json          # JSONL, tokenized with the model's tokenizer
  torchrun --nproc_per_node=4 tools/eval.py --model ckpt/moe --data tok/manifest.json --tp 2 --ep 2

Exit status: 0 success, 2 bad input (one line naming the file, layout, flag or dataset). See docs/evaluation.md.
"""

import sys

from megamoe.eval.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
