"""The command-line interfaces: argument parsing and what the commands print; the work itself lives in the
library packages they call. One module per command (console scripts in pyproject.toml; tools/*.py run the same
`main` from a checkout).

| module | command | job |
|---|---|---|
| `convert.py` | `megamoe-convert` | hf-to-moe, moe-to-hf (+ model card, --push-to-hub), reshard, inspect, embedded (megamoe.interchange) |
| `preprocess.py` | `megamoe-preprocess` | JSONL -> megatron .bin/.idx, text or chat, one dataset or one per domain (megamoe.data.preprocess) |
| `corpus.py` | `megamoe-corpus local|chat` | the local pre-training corpus and the embedded chat corpus (megamoe.data) |
| `plot.py` | `megamoe-plot` | a run's routing, loss and token-loss plots (megamoe.training.plots) |
| `exit.py` | | how a command ends: one line and the documented exit status (megamoe/errors.py), no traceback for input or output problems |
| `args.py` | | argparse types shared by every command (positive integers, index lists, ...): a bad value is an argparse error naming the flag, exit 2 |

Every command takes `--log-level` (megamoe.console.add_log_level). The other commands: `megamoe-train`
(megamoe/train.py), `megamoe-quickstart` (megamoe/quickstart.py), `megamoe-eval`/`-generate`/`-lm-eval`/`-eval-tasks`
(megamoe/eval/cli.py), `megamoe-construct` (megamoe/construct/__main__.py).
"""
