"""megamoe.eval: measure and use a model where it lies, our shards (any TP/EP layout) or an HF directory.

| module | job |
|---|---|
| `load.py` | any model directory -> our LlamaMoEModel in memory (this rank's slice), its tokenizer |
| `perplexity.py` | per-domain perplexity (token-weighted, balance loss excluded), megatron datasets or JSONL |
| `scorer.py` | log-likelihoods of continuations and rolling log-likelihoods (the lm-eval backend's engine) |
| `sampling.py` | the next token: greedy, temperature, top-k, top-p |
| `textgen.py` | prompts in, text out: chat template, token loop, stop strings |
| `lm_eval_backend.py` | `lm_eval --model megamoe`: the lm-evaluation-harness model class, in-process task runs |
| `tasks/` | task-suite YAMLs (the paper's and v2's) and the offline task builder |
| `cli.py` | `megamoe-eval`, `megamoe-generate`, `megamoe-lm-eval`, `megamoe-eval-tasks` |

Guide: docs/evaluation.md.
"""
