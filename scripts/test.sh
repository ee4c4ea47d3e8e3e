#!/usr/bin/env bash
# The test command of the README: the whole CPU suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests "$@"
