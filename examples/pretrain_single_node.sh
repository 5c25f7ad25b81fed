#!/usr/bin/env bash
# OSP pretraining on one GPU node with torchrun.
#   bash examples/pretrain_single_node.sh [section.field=value ...]
# Environment: NPROC (GPUs, default: all visible), CONFIG (default: the paper's 1.4B model).
# data.paths must point at indexed datasets made by tools/preprocess_data.py, e.g.
#   bash examples/pretrain_single_node.sh data.paths=[/data/fineweb_edu_text_document] \
#        data.tokenizer_model=/data/tokenizer.model parallel.tensor_parallel_size=2
# It runs in the current directory: relative paths (CONFIG, data.paths, train.run_dir, ...) are from
# there, and the default config's run_dir (runs/osp-1.4b) is made there.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
CONFIG=${CONFIG:-$REPO/megatron_osp/configs/osp_1.4b.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1
# On SIGTERM or the first Ctrl-C the run finishes its step and saves (Ctrl-C: then exits 130; a second
# Ctrl-C, which torchrun forwards as SIGTERM, aborts without saving); torchrun kills its workers 30 s
# after forwarding the signal unless told to wait longer.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
exec torchrun --standalone --nproc-per-node "$NPROC" \
  -m megatron_osp.training.pretrain --config "$CONFIG" "$@"
