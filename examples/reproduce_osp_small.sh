#!/usr/bin/env bash
# Small-scale reproduction of the OSP paper's ablation: Adam + RMSNorm, Muon, Muon + SSNorm and
# Muon + SSNorm + EmbProj (OSP) trained on the same tokens, then the 4-bit evaluation of all four
# (held-out perplexity at fp and W-A-KV fake quantization, excess kurtosis, plots).
#
#   bash examples/reproduce_osp_small.sh [--cpu] [section.field=value ...]   (overrides: all runs)
#
# GPU (default): a 26.6M-parameter model on character-level tokens (megatron_osp/configs/
# reproduce_small.yaml), sized so that tools/device_checks.sh fits it in one short device lease.
# --cpu (or CPU=1): the tiny preset (reproduce_small_cpu.yaml), a few minutes per run on 2 cores.
# Data: the documentation and (GPU) standard-library source that ship with Python, tokenized here
# at character level (SentencePiece BPE with vocab 350: ~90 characters + 256 byte pieces), unless
# DATA=<indexed prefix> TOKENIZER=<sentencepiece .model> VOCAB=<its size> point at your own.
# ALL_ROWS=1 adds the paper's other two rows: Muon-only (optimizer.name=muon_only: Muon for every
# parameter, no AdamW) and Muon + EmbProj.
# RUN_DIR (default runs/reproduce_small or runs/reproduce_small_cpu) holds everything (a rerun keeps its
# corpus, tokenizer and tokens; a tokenizer of another VOCAB there is refused);
# REPRO_CONFIG=<yaml> replaces the config. (RUN_DIR, DATA, TOKENIZER, REPRO_CONFIG given relative are from
# the current directory; the defaults are in the repository.) PARALLEL=1 trains the rows at the same time (each run's
# output in RUN_DIR/logs/NAME.log): on one GPU that small models leave mostly idle this finishes all
# rows in little more than the time of one, but each run's tokens/s is then a shared GPU's.
set -euo pipefail
# abs_paths, check_switches
source "$(dirname "$0")/_common.sh"
abs_paths RUN_DIR DATA TOKENIZER REPRO_CONFIG
cd "$(dirname "$0")/.."
CPU=${CPU:-0}
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
check_switches 1 CPU PARALLEL ALL_ROWS
if [[ "$CPU" == 1 ]]; then
  CONFIG=${REPRO_CONFIG:-megatron_osp/configs/reproduce_small_cpu.yaml}
  RUN_DIR=${RUN_DIR:-runs/reproduce_small_cpu}
  VOCAB=${VOCAB:-350}; CORPUS_FLAGS=(); WORKERS=2
  EVAL=(--device cpu --num-windows "${EVAL_WINDOWS:-32}" --calibration-windows 8)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
else
  CONFIG=${REPRO_CONFIG:-megatron_osp/configs/reproduce_small.yaml}
  RUN_DIR=${RUN_DIR:-runs/reproduce_small}
  VOCAB=${VOCAB:-350}; CORPUS_FLAGS=(--include-source); WORKERS=8
  EVAL=(--device cuda --num-windows "${EVAL_WINDOWS:-256}" --calibration-windows 32 --batch-size 16)
fi
mkdir -p "$RUN_DIR"
: > "$RUN_DIR/timings.txt"

if [[ -z "${DATA:-}" ]]; then
  echo "== data: built-in corpus -> SentencePiece BPE $VOCAB -> indexed"
  [[ -f "$RUN_DIR/corpus.jsonl" ]] || python tools/builtin_corpus.py --output "$RUN_DIR/corpus.jsonl" ${CORPUS_FLAGS[@]+"${CORPUS_FLAGS[@]}"}
  if [[ -f "$RUN_DIR/tokenizer.model" ]]; then  # kept from an earlier run: of this VOCAB, or refused
    have=$(python -c 'import sys, sentencepiece as s
print(s.SentencePieceProcessor(model_file=sys.argv[1]).vocab_size())' "$RUN_DIR/tokenizer.model")
    if [[ $have != "$VOCAB" ]]; then
      echo "error: $RUN_DIR/tokenizer.model (kept from an earlier run) has $have pieces, not VOCAB=$VOCAB:" \
        "remove it and $RUN_DIR/corpus_text_document.* to make them anew, or use another RUN_DIR" >&2
      exit 1
    fi
  fi
  [[ -f "$RUN_DIR/tokenizer.model" ]] || python tools/train_tokenizer.py --input "$RUN_DIR/corpus.jsonl" \
    --output-prefix "$RUN_DIR/tokenizer" --vocab-size "$VOCAB"
  [[ -f "$RUN_DIR/corpus_text_document.idx" ]] || python tools/preprocess_data.py --input "$RUN_DIR/corpus.jsonl" \
    --tokenizer-model "$RUN_DIR/tokenizer.model" --output-prefix "$RUN_DIR/corpus" --append-eod --workers $WORKERS
  DATA=$RUN_DIR/corpus_text_document
  TOKENIZER=$RUN_DIR/tokenizer.model
fi
: "${TOKENIZER:?set TOKENIZER to the SentencePiece model of DATA}"

COMMON=(--config "$CONFIG" "data.paths=[$DATA]" "data.tokenizer_model=$TOKENIZER" "model.vocab_size=$VOCAB")
# name | flags (the paper's ablation rows; README.md "Training on GPUs")
RUNS=(
  "adam|optimizer.name=adam model.normalization=rmsnorm model.embedding_projection=false"
  "muon|optimizer.name=muon model.normalization=rmsnorm model.embedding_projection=false"
  "muon_ssnorm|optimizer.name=muon model.normalization=ssnorm model.embedding_projection=false"
  "osp|optimizer.name=muon model.normalization=ssnorm model.embedding_projection=true"
)
LABELS=("Adam + RMSNorm" "Muon" "Muon + SSNorm" "Muon + SSNorm + EmbProj (OSP)")
if [[ "${ALL_ROWS:-0}" == 1 ]]; then
  RUNS+=("muon_only|optimizer.name=muon_only model.normalization=rmsnorm model.embedding_projection=false"
         "muon_embproj|optimizer.name=muon model.normalization=rmsnorm model.embedding_projection=true")
  LABELS+=("Muon-only (no AdamW)" "Muon + EmbProj")
fi
DIRS=()
PIDS=()
mkdir -p "$RUN_DIR/logs"
train_row() {  # name, flags...: one ablation row, timed
  local name=$1; shift
  local start; start=$(date +%s)
  python -m megatron_osp.training.pretrain "${COMMON[@]}" "train.run_dir=$RUN_DIR/$name" "$@" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
  echo "$name $(( $(date +%s) - start )) s" >> "$RUN_DIR/timings.txt"
}
OVERRIDES=("$@")
for entry in "${RUNS[@]}"; do
  name=${entry%%|*}; read -r -a flags <<< "${entry#*|}"
  echo "== train $name: ${flags[*]}"
  if [[ "${PARALLEL:-0}" == 1 ]]; then
    train_row "$name" "${flags[@]}" > "$RUN_DIR/logs/$name.log" 2>&1 &
    PIDS+=($!)
  else
    train_row "$name" "${flags[@]}"
  fi
  DIRS+=("$RUN_DIR/$name")
done
failed=0
for i in ${PIDS[@]+"${!PIDS[@]}"}; do
  if ! wait "${PIDS[$i]}"; then
    failed=1; echo "!! run ${DIRS[$i]} failed; the end of its log:"; tail -n 30 "$RUN_DIR/logs/$(basename "${DIRS[$i]}").log"
  fi
done
[[ $failed == 0 ]] || exit 1

echo "== 4-bit evaluation on the held-out (validation) documents"
python tools/evaluate_quantization.py "${DIRS[@]}" --labels "${LABELS[@]}" --data "$DATA" "${EVAL[@]}" \
  --output-dir "$RUN_DIR/quantization" ${EVAL_REPORT:---resume}
# --resume: a rerun (a device stage run again) keeps what was measured on the same checkpoints and
# tokens, and stops naming the difference otherwise: then EVAL_REPORT=--overwrite measures anew.
echo
python tools/compare_runs.py "${DIRS[@]}" --quantization "$RUN_DIR/quantization/quantization.json" \
  --output "$RUN_DIR/comparison.txt"
echo
echo "training wall times (s):"; cat "$RUN_DIR/timings.txt"
echo "report: $RUN_DIR/quantization/quantization.md, plots: $RUN_DIR/quantization/*.png"
