#!/usr/bin/env bash
# Launch a megamoe job on a Slurm allocation (or any set of nodes): one torchrun agent per node, c10d rendezvous.
#
#   #SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8
#   srun scripts/slurm_launch.sh -m megamoe.train --config configs/run.yaml [--resume]
#
# Everything after the script name is passed to torchrun as the program and its arguments (a script path, or
# -m module). Read from the environment (the first one set wins):
#   nodes          NNODES, SLURM_NNODES, SLURM_JOB_NUM_NODES                       (default 1)
#   this node      NODE_RANK, SLURM_NODEID, SLURM_PROCID                          (default 0)
#   master host    MASTER_ADDR, else the first host of SLURM_JOB_NODELIST (scontrol show hostnames), else
#                  127.0.0.1 for a single node
#   master port    MASTER_PORT, else 29500 + SLURM_JOB_ID % 1000 (different jobs sharing a node do not collide)
#   processes      NPROC_PER_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE (e.g. "h100:8"), the GPUs
#                  nvidia-smi lists, else 1
#   restarts       MAX_RESTARTS (default 0): torchrun restarts every worker after a failure; with `--resume` in the
#                  program's arguments megamoe.train continues from the last complete checkpoint
#   rendezvous id  RDZV_ID, SLURM_JOB_ID                                          (default "megamoe")
#   timeouts       MEGAMOE_DIST_TIMEOUT (seconds, collectives; default 600), RDZV_TIMEOUT (seconds, default 900)
#   DRY_RUN=1      print the torchrun command instead of running it
set -euo pipefail

die() { echo "slurm_launch.sh: $*" >&2; exit 2; }
[ "$#" -ge 1 ] || die "usage: slurm_launch.sh <script.py | -m module> [args...]"

NNODES="${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}"
[[ "$NNODES" =~ ^[0-9]+$ && "$NNODES" -ge 1 ]] || die "NNODES/SLURM_NNODES: '$NNODES' is not a positive integer"
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK/SLURM_NODEID: '$NODE_RANK' is not in [0, $NNODES)"

if [ -z "${MASTER_ADDR:-}" ]; then
    if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    elif [ -n "${SLURM_JOB_NODELIST:-}" ] && [[ "$SLURM_JOB_NODELIST" != *[\[,]* ]]; then
        MASTER_ADDR="$SLURM_JOB_NODELIST"              # a single plain host name
    elif [ "$NNODES" -eq 1 ]; then
        MASTER_ADDR=127.0.0.1
    else
        die "MASTER_ADDR is not set and SLURM_JOB_NODELIST cannot be expanded (no scontrol): set MASTER_ADDR to the first node"
    fi
fi
[ -n "$MASTER_ADDR" ] || die "could not determine MASTER_ADDR"
if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT=$(( 29500 + ${SLURM_JOB_ID:-0} % 1000 ))
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        NPROC_PER_NODE="${SLURM_GPUS_PER_NODE##*:}"    # "h100:8" -> 8
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi -L | wc -l)"
    else
        NPROC_PER_NODE=1
    fi
fi
[[ "$NPROC_PER_NODE" =~ ^[0-9]+$ && "$NPROC_PER_NODE" -ge 1 ]] || die "NPROC_PER_NODE: '$NPROC_PER_NODE' is not a positive integer"

RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-megamoe}}"
CMD=(torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE"
     --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID"
     --rdzv-conf="timeout=${RDZV_TIMEOUT:-900}" --max-restarts="${MAX_RESTARTS:-0}" "$@")

echo "slurm_launch.sh: node $NODE_RANK/$NNODES, $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT (id $RDZV_ID)" >&2
if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
export MEGAMOE_DIST_TIMEOUT="${MEGAMOE_DIST_TIMEOUT:-600}"
exec "${CMD[@]}"
