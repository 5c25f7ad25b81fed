#!/usr/bin/env bash
# OSP pretraining of the 8B preset (Llama-3-8B shapes, seq 8192) under SLURM: 4 nodes x 8 GPUs as
# TP=2 (with sequence parallelism) x DP=16, selective activation recompute, Muon state sharded over DP.
# A thin wrapper: examples/pretrain_slurm.sh launches it; only the layout differs from the 1.4B run.
#   sbatch examples/pretrain_osp_8b_slurm.sh data.paths=[/data/corpus_text_document] data.tokenizer_model=/data/tok.model
# Arguments after the script override these settings (the last value of a field wins), e.g.
#   parallel.pipeline_parallel_size=2 (TP=2 x PP=2 x DP=8 on the same nodes), train.recompute=full.
# Submit from the repository root (sbatch runs a copy of this file; SLURM_SUBMIT_DIR finds the rest).
# At DP=16 the distributed optimizer relays gradients over DP on the way to each matrix's owner
# (optimizer.delivery=auto; =direct sends them straight: 4% fewer bytes, a 3.5x busier link in the plan).
# train.async_save=true writes the save_interval checkpoints in the background (README, "Checkpoints";
# not yet measured on GPUs, so it is not on here by default).
#SBATCH --job-name=osp-8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=TERM@120
# sbatch reads only this file's #SBATCH lines: those pretrain_slurm.sh's requeue needs are repeated here.
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# 512 sequences x 8192 tokens = 4.2M tokens per step; 238419 steps = 1T tokens.
exec bash examples/pretrain_slurm.sh \
  model.preset=osp-8b \
  parallel.tensor_parallel_size=2 \
  parallel.pipeline_parallel_size=1 \
  parallel.sequence_parallel=true \
  train.recompute=selective \
  optimizer.distributed_optimizer=true \
  optimizer.overlap_grad_reduce=true \
  optimizer.overlap_param_gather=true \
  train.micro_batch_size=1 \
  train.global_batch_size=512 \
  train.train_steps=238419 \
  "$@"
