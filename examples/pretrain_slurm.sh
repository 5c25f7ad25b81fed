#!/usr/bin/env bash
# OSP pretraining on several GPU nodes under SLURM (one torchrun per node).
#   sbatch examples/pretrain_slurm.sh data.paths=[/data/smollm_text_document] data.tokenizer_model=/data/tok.model
#SBATCH --job-name=osp-1.4b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
# Requeue (REQUEUE=0: off): a job that ends with its run unfinished but further than it started (stopped
# by the time limit's SIGTERM above or a preemption, which save first, or ended by the hang watchdog
# after a save) puts itself back in the queue and the next one resumes from the newest checkpoint, at
# most MAX_REQUEUES times (SLURM_RESTART_COUNT); one that got nowhere (a refused config, a divergence, a
# crash at start-up) is not (python -m megatron_osp.training.run_state). The log is appended to.
# A user's interrupt is never requeued: `scancel --signal=INT JOBID` stops the run (use it for an
# interactive srun too: srun handles Ctrl-C itself and may end the step before a save; not tried on a
# cluster here). It stops the run like SIGTERM does (the step finishes, a checkpoint is saved) but
# marks it interrupted (<run_dir>/interrupted, which run_state reads; the next launch removes it); a
# second one aborts without saving. Exit codes cannot tell: torchrun exits 1 for either signal. sbatch this script
# again to continue. A plain `scancel` sends SIGTERM: the run saves and, like a preemption, requeues.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${CONFIG:-megatron_osp/configs/osp_1.4b.yaml}
# Checked before the run: REQUEUE=true used to turn requeueing off without a word, and MAX_REQUEUES=ten
# ended the job after the run with "unbound variable" instead of requeueing it.
if ! [[ ${REQUEUE:-1} =~ ^[01]$ ]]; then echo "error: REQUEUE=$REQUEUE: 1 (requeue; the default) or 0 (off)" >&2; exit 1; fi
if ! [[ ${MAX_REQUEUES:-10} =~ ^[0-9]+$ ]]; then echo "error: MAX_REQUEUES=$MAX_REQUEUES: a whole number" >&2; exit 1; fi
# ranks per node: GPUS_PER_NODE, else the GPUs SLURM gave this node (sbatch --gpus-per-node=N on the
# command line overrides the #SBATCH line above), else 8
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# sed reads every line: with `head -n 1`, scontrol can die of SIGPIPE on a long node list and
# pipefail then ends the job (exit 141)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1
# --signal=TERM@120 above: the run finishes its step and saves. torchrun, also sent SIGTERM, kills
# its workers 30 s later by default, which can cut that save short (and with save_interval=0 it is
# the job's only checkpoint): give them most of the 120 s before the time limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
mkdir -p logs
RUN_DIR=runs/$SLURM_JOB_NAME
for arg in "$@"; do [[ $arg == train.run_dir=* ]] && RUN_DIR=${arg#train.run_dir=}; done  # the last one wins
run_state() { PYTHONWARNINGS=ignore python -m megatron_osp.training.run_state "$RUN_DIR" "$@"; }
started_at=$(run_state --checkpoint-step 2> /dev/null || echo none)
rc=0
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
  -m megatron_osp.training.pretrain --config "$CONFIG" "train.run_dir=runs/$SLURM_JOB_NAME" "$@" || rc=$?
if [[ ${REQUEUE:-1} == 1 ]] && run_state --requeue-since "$started_at"; then
  if (( ${SLURM_RESTART_COUNT:-0} < ${MAX_REQUEUES:-10} )); then
    scontrol requeue "$SLURM_JOB_ID" && echo "requeued job $SLURM_JOB_ID (srun exit $rc)" && exit 0
  else
    echo "not requeued: already requeued ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=${MAX_REQUEUES:-10})"
  fi
fi
exit "$rc"
