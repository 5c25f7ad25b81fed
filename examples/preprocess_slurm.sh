#!/usr/bin/env bash
# Tokenize a corpus on many nodes: a SLURM job array of preprocessing tasks, then one merge job.
#
#   TASKS=16 CPUS_PER_TASK=32 bash examples/preprocess_slurm.sh \
#       --input 'corpus/*.jsonl.zst' --tokenizer-model tok/tok.model --output-prefix data/corpus --append-eod
#
# Every argument goes to tools/preprocess_data.py as it is (quote globs: the tool expands them, the
# same way on every node). Run it on a login node in the directory relative paths are meant from.
#  1. It first checks the options and prints the split (tools/preprocess_data.py --plan): a bad
#     option, a missing file or tokenizer is an error here, before anything is queued.
#  2. It submits `sbatch --array=0-(TASKS-1)`: task I runs
#     `preprocess_data.py ... --num-tasks TASKS` with SLURM_ARRAY_TASK_ID as its --task-index, takes a
#     contiguous run of the input files balanced by bytes, and publishes PREFIX_taskIIIIIofNNNNN_* .
#  3. It submits `sbatch --dependency=afterok:<array job>` running
#     `tools/merge_datasets.py --tasks PREFIX --num-tasks TASKS [--max-shard-tokens N]`, which checks
#     that every task finished and all come from this run (same inputs, tokenizer, keys), then
#     publishes PREFIX_<key>_document (or its _00000, ... shards with --max-shard-tokens),
#     byte-identical to one `preprocess_data.py` run with these arguments over all the files. The
#     task outputs are kept (remove PREFIX_task* once the merge is done).
# If a task fails, SLURM never starts the merge. Fix the cause and resubmit just the failed tasks with
# the same arguments: `ARRAY=3,7 TASKS=16 bash examples/preprocess_slurm.sh ...` (ids are task
# indices); a merge job follows them. A merge run by hand names any task still missing.
#
# Settings (environment): TASKS (default 8), CPUS_PER_TASK (16; also --workers unless given),
# ARRAY (which task indices to submit, default 0-(TASKS-1); checked to be in 0..TASKS-1 first),
# PYTHON (python), LOG_DIR (logs), SBATCH_ARGS (more sbatch options, word-split). sbatch itself reads
# SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ... With TASKS=1 one ordinary run is submitted and no merge.
set -euo pipefail

if [[ "${1:-}" == --run-task || "${1:-}" == --run-merge ]]; then  # inside a job
  mode=$1
  shift
  cd "${SLURM_SUBMIT_DIR:-.}"
  if [[ $mode == --run-task ]]; then
    echo "task ${SLURM_ARRAY_TASK_ID:-?} of $OSP_TASKS on $(hostname)"
    exec "$OSP_PYTHON" "$OSP_REPO/tools/preprocess_data.py" --no-progress "$@"
  fi
  exec "$OSP_PYTHON" "$OSP_REPO/tools/merge_datasets.py" "$@"
fi

TASKS=${TASKS:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-16}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-logs}
if ! [[ $TASKS =~ ^[1-9][0-9]*$ ]]; then
  echo "error: TASKS=$TASKS: a whole number >= 1" >&2
  exit 1
fi
ARRAY=${ARRAY:-0-$((TASKS - 1))}
# ARRAY's task indices must be tasks of TASKS (a task out of range would fail only in its job)
bad_array() {
  echo "error: ARRAY=$ARRAY: task indices in 0..$((TASKS - 1)) as N, N-M or N-M:S, comma-separated, optionally %K" >&2
  exit 1
}
[[ $ARRAY =~ ^[0-9][0-9,:%-]*$ && $ARRAY != *, ]] || bad_array
IFS=, read -r -a array_parts <<<"${ARRAY%\%*}"
for part in "${array_parts[@]}"; do
  [[ $part =~ ^([0-9]+)(-([0-9]+)(:[1-9][0-9]*)?)?$ ]] || bad_array
  lo=$((10#${BASH_REMATCH[1]})) hi=$((10#${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}))
  ((lo <= hi && hi < TASKS)) || bad_array
done
[[ $ARRAY != *%* || ${ARRAY##*%} =~ ^[1-9][0-9]*$ ]] || bad_array
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/examples/preprocess_slurm.sh"

prefix="" workers="" shard=() overwrite=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output-prefix) prefix=${args[i + 1]:-} ;;
    --output-prefix=*) prefix=${args[i]#*=} ;;
    --workers | --workers=*) workers=given ;;
    --max-shard-tokens) shard=(--max-shard-tokens "${args[i + 1]:-}") ;;
    --max-shard-tokens=*) shard=("${args[i]}") ;;
    --overwrite) overwrite=(--overwrite) ;;  # the merge publishes the final prefix: it needs it too
    --num-tasks* | --task-index*) echo "error: ${args[i]}: set TASKS (and ARRAY) instead" >&2; exit 1 ;;
  esac
done
if [[ -z $prefix ]]; then
  echo "error: give --output-prefix (and the other tools/preprocess_data.py options)" >&2
  exit 1
fi
[[ -n $workers ]] || args+=(--workers "$CPUS_PER_TASK")

# 1. Check everything the tasks need, here, before queueing (prints each task's files and bytes).
"$PYTHON" "$REPO/tools/preprocess_data.py" ${args[@]+"${args[@]}"} --num-tasks "$TASKS" --plan

mkdir -p "$LOG_DIR"
export OSP_REPO=$REPO OSP_PYTHON=$PYTHON OSP_TASKS=$TASKS
read -r -a extra <<<"${SBATCH_ARGS:-}"
name=prep-$(basename "$prefix")

# 2. The tasks. 3. The merge, only once every task of this submission succeeded.
if ((TASKS == 1)); then
  job=$(sbatch --parsable --job-name="$name" --cpus-per-task="$CPUS_PER_TASK" --export=ALL \
    --output="$LOG_DIR/%x-%j.out" ${extra[@]+"${extra[@]}"} "$SELF" --run-task ${args[@]+"${args[@]}"} --num-tasks 1)
  echo "submitted job $job: one run, writes ${prefix}_<key>_document"
  exit 0
fi
array=$(sbatch --parsable --array="$ARRAY" --job-name="$name" --cpus-per-task="$CPUS_PER_TASK" --export=ALL \
  --output="$LOG_DIR/%x-%A_%a.out" ${extra[@]+"${extra[@]}"} "$SELF" --run-task ${args[@]+"${args[@]}"} --num-tasks "$TASKS")
array=${array%%;*}  # --parsable prints "jobid[;cluster]"
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --job-name="$name-merge" \
  --cpus-per-task=1 --export=ALL --output="$LOG_DIR/%x-%j.out" ${extra[@]+"${extra[@]}"} \
  "$SELF" --run-merge --tasks "$prefix" --num-tasks "$TASKS" ${shard[@]+"${shard[@]}"} \
  ${overwrite[@]+"${overwrite[@]}"})
merge=${merge%%;*}
echo "submitted array job $array (tasks $ARRAY of $TASKS) and merge job $merge (after all of them succeed)"
echo "result: ${prefix}_<key>_document; logs in $LOG_DIR/"
