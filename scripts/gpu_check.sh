#!/usr/bin/env bash
# One command for the GPU verification of megamoe (issue 19), from the repository root of a machine with an NVIDIA
# GPU and no internet:
#
#   bash scripts/gpu_check.sh                  # install what is missing from .whl/, build, test, benchmark, report
#   bash scripts/gpu_check.sh --prepare        # HERE (with PyPI): download the wheels the GPU machine lacks into .whl/
#   bash scripts/gpu_check.sh --dry-run        # on a CPU: every step's command line with tiny shapes, no report append
#   bash scripts/gpu_check.sh --append FILE    # append a section written elsewhere (the device's $OUT) to the docs
#
# Steps (each under its own `timeout`, so one hang costs only its own budget; total budget 8 minutes on H100/H200):
#   env        nvidia-smi, python, torch, CUDA; the commit (git, else .whl/COMMIT written by --prepare)
#   install    the Python packages megamoe needs that do not import, from .whl/*.whl (pip --no-index --target)
#   build      the C++ and CUDA extensions (pip install -e . --no-build-isolation; sm_90 on Hopper)
#   tests      pytest -m gpu over the kernel / expert tests (CUDA permute, Triton gating, grouped experts)
#   kernels    tools/bench_kernels.py --device cuda (permute/unpermute, fused gating vs megatron-core)
#   layer      tools/bench_moe_layer.py, LLaMA-MoE-3.5B layer shape and megatron-core's Mixtral proxy shape
#   train      tools/bench_train.py --shape llama-moe-3.5b --layers 4 --seq-len 4096 --batch 2 --no-reference
#   pipeline   tools/bench_train.py --pp 2: tokens/s and the pipeline bubble vs (p-1)/(m+p-1) (2 GPUs; else skipped)
#   report     a dated, commit-stamped section: <out>/section.md, appended to docs/benchmarks.md (not in --dry-run)
#
# What the lent H200 has (/work/.library/device/KINDS.md): Python 3.12, torch 2.11 (cu130), triton 3.6, transformers,
# pytest, hypothesis, safetensors, xxhash, nvcc 13; not megatron-core (megamoe needs 0.16.1) and not
# transformer-engine (whose PyTorch part is built from source, so it cannot travel as a wheel: megatron's
# TEGroupedMLP and our te backend are then skipped and named so in the report). --prepare downloads megatron-core
# for CPython 3.12 manylinux x86_64 (pip download --no-deps; its own needs, numpy/packaging/torch, are there).
# With the device tool: carry [".whl"]; $OUT gets section.md and the logs; locally
# `bash scripts/gpu_check.sh --append <files_at>/section.md`.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=run
OUTDIR=""
APPEND_FILE=""
PY="${PYTHON:-python3}"
WHEELS="$ROOT/.whl"
BUDGET="${GPU_CHECK_BUDGET:-480}"          # seconds for all steps together
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --append) MODE=append; APPEND_FILE="${2:?--append needs a file}"; shift ;;
    --out) OUTDIR="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUTDIR" ]; then OUTDIR="${OUT:-$ROOT/gpu_check_out}"; fi
DOCS="${GPU_CHECK_DOCS:-$ROOT/docs/benchmarks.md}"

# ---- --prepare: wheels for the GPU machine (Python 3.12, x86-64, manylinux) --------------------------------------
if [ "$MODE" = prepare ]; then
  mkdir -p "$WHEELS"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore 2>/dev/null || \
    echo '/.whl/' >> .git/info/exclude
  rm -f "$WHEELS"/*.whl
  for spec in "megatron-core==0.16.1"; do
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" "$spec" || exit 3
  done
  git rev-parse --short HEAD > "$WHEELS/COMMIT" 2>/dev/null || true
  ls -la "$WHEELS"
  du -sh "$WHEELS"
  echo "prepared $WHEELS (carry it: the device tool's carry [\".whl\"])"
  exit 0
fi

# ---- --append: a section produced on the GPU machine -----------------------------------------------------------
if [ "$MODE" = append ]; then
  [ -s "$APPEND_FILE" ] || { echo "gpu_check.sh: $APPEND_FILE is missing or empty" >&2; exit 2; }
  { echo; cat "$APPEND_FILE"; } >> "$DOCS"
  echo "appended $APPEND_FILE to $DOCS"
  exit 0
fi

mkdir -p "$OUTDIR"
STEPS="$OUTDIR/steps.tsv"
: > "$STEPS"
START=$(date +%s)
DRY=0; [ "$MODE" = dry ] && DRY=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

# step NAME TIMEOUT CMD...: runs CMD under `timeout`, output to $OUTDIR/NAME.log; records status and seconds
step() {
  local name="$1" limit="$2"; shift 2
  local log="$OUTDIR/$name.log" now left t0 rc status
  now=$(date +%s); left=$(( BUDGET - (now - START) ))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped (the ${BUDGET}s budget is spent)"
    printf '%s\tskipped (budget spent)\t0\t%s\n' "$name" "$log" >> "$STEPS"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  echo "\$ $*" > "$log"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" >> "$STEPS"
  echo "   $status, $(( $(date +%s) - t0 ))s; last lines:"
  tail -n 4 "$log" | sed 's/^/   | /'
  return 0
}

# ---- env ---------------------------------------------------------------------------------------------------------
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || cat "$WHEELS/COMMIT" 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then COMMIT="$COMMIT+local changes"; fi
env_info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for mod in ("triton", "megatron.core", "transformer_engine", "transformers"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: absent ({type(e).__name__})")
EOF
}
export PY WHEELS DRY
export -f env_info
step env 60 bash -c env_info
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device; on a CPU use --dry-run" >&2
  exit 4
fi

# ---- install -----------------------------------------------------------------------------------------------------
install_missing() {
  local missing=()
  for mod in megatron.core; do
    "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$mod")
  done
  if [ ${#missing[@]} -eq 0 ]; then echo "nothing to install: every module imports"; return 0; fi
  echo "missing: ${missing[*]}"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS (run --prepare where PyPI is reachable)"; return 3; }
  local cmd=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
             --target /tmp/megamoe-site "$WHEELS"/*.whl)
  if [ "$DRY" = 1 ]; then echo "dry run, would run: ${cmd[*]}"; return 0; fi
  "${cmd[@]}"
}
export -f install_missing
step install 60 bash -c install_missing
[ -d /tmp/megamoe-site ] && export PYTHONPATH="/tmp/megamoe-site${PYTHONPATH:+:$PYTHONPATH}"

# ---- build -------------------------------------------------------------------------------------------------------
build_ext() {
  local arch
  arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-16}"
  local cmd=("$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .)
  if [ "$DRY" = 1 ]; then
    echo "dry run, would run: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST ${cmd[*]}"
  else
    "${cmd[@]}" || return $?
  fi
  "$PY" - <<'EOF'
from megamoe.ops import _ext
import torch
print("C++ extension:", _ext.cpp_available() or _ext.load_error("_C"))
if torch.cuda.is_available():
    print("CUDA extension:", _ext.cuda_available() or _ext.load_error("_C_cuda"))
    assert _ext.cuda_available(), "the CUDA extension did not build or load"
assert _ext.cpp_available()
EOF
}
export -f build_ext
step build 150 bash -c build_ext

# ---- tests -------------------------------------------------------------------------------------------------------
TESTS=(tests/test_permute.py tests/test_gating.py tests/test_moe_backends.py tests/test_grouped_experts.py)
step tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}"

# ---- benchmarks --------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  DEV=(--device cpu)
  KSHAPE=(--T 256 --H 64 --E 8 --reps 1 --warmup 0)
  LSHAPE=(--hidden 64 --ffn 32 --tokens 64 --iters 1 --warmup 0)
  TSHAPE=(--shape small --layers 1 --seq-len 32 --batch 2 --warmup 0 --rounds 1)
else
  DEV=(--device cuda)
  KSHAPE=()
  LSHAPE=()
  TSHAPE=(--shape llama-moe-3.5b --layers 4 --seq-len 4096 --batch 2 --warmup 2 --rounds 5)
fi
step kernels 45 "$PY" tools/bench_kernels.py "${DEV[@]}" "${KSHAPE[@]}"
step layer_llama_moe_3.5b 45 "$PY" tools/bench_moe_layer.py "${DEV[@]}" --shape llama-moe-3.5b "${LSHAPE[@]}" \
  --json "$OUTDIR/layer_llama_moe_3.5b.json"
step layer_mixtral_proxy 60 "$PY" tools/bench_moe_layer.py "${DEV[@]}" --shape mixtral-proxy "${LSHAPE[@]}" \
  --json "$OUTDIR/layer_mixtral_proxy.json"
step train 90 "$PY" tools/bench_train.py "${DEV[@]}" "${TSHAPE[@]}" --no-reference --json "$OUTDIR/train.json"
# pipeline parallelism (issue 20): tokens/s and the bubble against the 1F1B formula (tools/bench_pipeline.py);
# NCCL wants one rank per GPU, so with fewer than 2 GPUs the step is recorded as skipped (not as a failure)
NGPU=$( { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' )
if [ "$DRY" = 1 ]; then
  step pipeline 120 "$PY" tools/bench_train.py --pp 2 --device cpu --layers 2 --seq-len 32 --micro-batches 2,4 \
    --warmup 0 --rounds 1 --json "$OUTDIR/pipeline.json"
elif [ "$NGPU" -ge 2 ]; then
  step pipeline 90 "$PY" tools/bench_train.py --pp 2 --device cuda --shape llama-moe-3.5b --layers 4 --seq-len 4096 \
    --micro-batch 1 --micro-batches 2,4,8 --json "$OUTDIR/pipeline.json"
else
  echo "== pipeline: skipped (needs 2 GPUs, found $NGPU)"
  printf '%s\t%s\t0\t%s\n' pipeline "skipped (needs 2 GPUs, found $NGPU)" "$OUTDIR/pipeline.log" >> "$STEPS"
fi

# ---- report ------------------------------------------------------------------------------------------------------
"$PY" - "$OUTDIR" "$COMMIT" "$DRY" "$(( $(date +%s) - START ))" <<'EOF'
import datetime, json, os, re, sys
out, commit, dry, total = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "steps.tsv")) if line.strip()]

def log(name):
    p = os.path.join(out, f"{name}.log")
    return open(p).read() if os.path.exists(p) else ""

def js(name):
    p = os.path.join(out, f"{name}.json")
    return json.load(open(p)) if os.path.exists(p) else None

def summary(name, text):
    if name == "env":
        return "; ".join(ln.strip() for ln in text.splitlines()[1:] if ln.strip())
    if name == "tests":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", text, re.M)
        return m[-1] if m else ""
    if name == "kernels":
        keep = [ln for ln in text.splitlines() if ln.startswith("|") and ("permute+unpermute" in ln or "fwd" in ln)]
        return "<br>".join(" ".join(ln.split()) for ln in keep[:4])
    if name.startswith("layer"):
        r = js(name)
        if not r:
            return ""
        mfu = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"
        return (f"H {r['hidden']}, {r['experts']}x{r['ffn']}, top-{r['top_k']}, {r['tokens_per_rank']} tok, {r['dtype']}: "
                f"megamoe ({r['megamoe_experts_backend']}) {r['megamoe_ms']:.2f} ms, {r['megamoe_tflops_per_device']:.1f} "
                f"TFLOP/s, MFU {mfu(r['megamoe_mfu'])}; megatron-core {r['megatron_experts']} {r['megatron_ms']:.2f} ms, "
                f"{r['megatron_tflops_per_device']:.1f} TFLOP/s, MFU {mfu(r['megatron_mfu'])}; "
                f"**{r['speedup_vs_megatron']:.2f}x**; outputs agree to {r['max_rel_output_diff']:.1e}")
    if name == "train":
        r = js(name)
        if not r:
            return ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        return (f"{r['shape']} x{r['layers']} layers, {r['batch']}x{r['seq_len']} tokens, {r['precision']}, experts "
                f"{r.get('experts_backend')}: TGS {r['megamoe_tokens_per_s']:,.0f}, step {r['megamoe_step_s'] * 1e3:.0f} ms,"
                f" MFU {mfu}")
    if name == "pipeline":
        r = js(name)
        if not r:
            return ""
        return f"pp {r['pp']}, {r['shape']} x{r['layers']}, {r['micro_batch']}x{r['seq_len']} per micro-batch: " + "; ".join(
            f"m {x['m']}: {x['tokens_per_s']:,.0f} tok/s, bubble {100 * x['bubble']:.1f}% (1F1B {100 * x['formula']:.1f}%)"
            for x in r["rows"])
    tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
    return tail[0][:200]

env = log("env").splitlines()
gpu = env[1].split(",")[0].strip() if len(env) > 1 else "?"
gpu = "no GPU" if gpu.startswith("no nvidia-smi") else gpu
when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
lines = [f"### GPU check {when}: {gpu}, commit `{commit}`" + (" (DRY RUN on a CPU: plumbing only, no figures)" if dry else ""),
         "", f"`bash scripts/gpu_check.sh{' --dry-run' if dry else ''}`, {total} s in all.", "",
         "| step | status | s | result |", "|---|---|---|---|"]
for name, status, secs, _ in rows:
    lines.append(f"| {name} | {status} | {secs} | {summary(name, log(name)).replace('|', '/')} |")
lines += ["", "<details><summary>logs (last lines of each step)</summary>", "", "```"]
for name, *_ in rows:
    body = [ln for ln in log(name).splitlines() if ln.strip()]
    lines += [f"== {name}"] + body[-25:]
lines += ["```", "", "</details>", ""]
open(os.path.join(out, "section.md"), "w").write("\n".join(lines))
print("\n".join(lines[:len(rows) + 6]))
EOF
if [ "$DRY" = 1 ]; then
  echo "dry run: the section is in $OUTDIR/section.md (not appended to docs/benchmarks.md)"
else
  { echo; cat "$OUTDIR/section.md"; } >> "$DOCS"
  cp "$DOCS" "$OUTDIR/benchmarks.md" 2>/dev/null || true
  echo "appended to $DOCS (and $OUTDIR/section.md)"
fi
FAILED=$(awk -F'\t' '$2 != "ok" && $2 !~ /^skipped \(needs/' "$STEPS" | wc -l)
echo "steps not ok: $FAILED"
[ "$FAILED" -eq 0 ]
