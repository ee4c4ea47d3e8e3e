#!/usr/bin/env bash
# The README's first command: install megamoe (scripts/setup.sh), then run the whole journey on the embedded
# SmolLM2-135M: convert to LLaMA-MoE (the megamoe recipe: 128 experts, top-32, calibrated), short continual pre-training on the local corpus, export to
# the Hugging Face Mixtral layout, generate with transformers, per-domain perplexity before/after.
# Uses a GPU when present. Arguments go to megamoe-quickstart (e.g. --out DIR, --train-minutes 6); see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m megamoe.quickstart "$@"
