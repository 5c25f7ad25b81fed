#!/usr/bin/env bash
# The CPU quickstart: corpus -> tokenizer -> .bin/.idx -> Adam+RMSNorm baseline and OSP on the same
# tokens -> 4-bit fake-quantization evaluation of both -> side-by-side loss, excess kurtosis and
# W4A4KV4 perplexity table. A few minutes on 2 cores, no download.
#   bash examples/quickstart_cpu.sh [section.field=value ...]   (overrides apply to both runs)
# RUN_DIR (default runs/quickstart in the repository; a relative one is from the current directory) holds
# everything it makes.
set -euo pipefail
# abs_paths, check_switches
source "$(dirname "$0")/_common.sh"
abs_paths RUN_DIR
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/quickstart}
CONFIG=megatron_osp/configs/quickstart_cpu.yaml
# Character-level tokens (the ~90 characters + 256 byte pieces + 3 specials): at this size Adam's
# outliers grow within 400 steps on characters but not on BPE 2048 (docs/results.md).
VOCAB=${VOCAB:-350}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$RUN_DIR"
# The Adam row's last digits depend on the CPU kernels' summation order (thread count, vector ISA);
# OSP's do not (docs/results.md): say which were used.
echo "== threads: OMP_NUM_THREADS=$OMP_NUM_THREADS, torch CPU kernels: $(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"

echo "== 1/6 corpus: documentation shipped with Python"
python tools/builtin_corpus.py --output "$RUN_DIR/corpus.jsonl"
echo "== 2/6 tokenizer: SentencePiece BPE, vocab $VOCAB (character level)"
python tools/train_tokenizer.py --input "$RUN_DIR/corpus.jsonl" --output-prefix "$RUN_DIR/tokenizer" --vocab-size $VOCAB \
  --overwrite  # a rerun makes the same one
echo "== 3/6 tokenize into Megatron's indexed format"
python tools/preprocess_data.py --input "$RUN_DIR/corpus.jsonl" --tokenizer-model "$RUN_DIR/tokenizer.model" \
  --output-prefix "$RUN_DIR/corpus" --append-eod --workers 2

COMMON=(--config "$CONFIG" "data.paths=[$RUN_DIR/corpus_text_document]"
        "data.tokenizer_model=$RUN_DIR/tokenizer.model" "model.vocab_size=$VOCAB")
echo "== 4/6 baseline: AdamW + RMSNorm"
python -m megatron_osp.training.pretrain "${COMMON[@]}" "train.run_dir=$RUN_DIR/adam" \
  optimizer.name=adam model.normalization=rmsnorm model.embedding_projection=false "$@"
echo "== 5/6 OSP: Muon + SSNorm + EmbProj"
python -m megatron_osp.training.pretrain "${COMMON[@]}" "train.run_dir=$RUN_DIR/osp" \
  optimizer.name=muon model.normalization=ssnorm model.embedding_projection=true "$@"

echo "== 6/6 4-bit evaluation: held-out perplexity at full precision and W-A-KV fake quantization"
# The held-out documents are the runs' validation split; a few sequences keep this under a minute.
# --overwrite: this script owns $RUN_DIR, and a rerun measures again (under a minute) whatever an
# earlier run or version left there. (--resume would keep an earlier report's finished settings.)
python tools/evaluate_quantization.py "$RUN_DIR/adam" "$RUN_DIR/osp" --data "$RUN_DIR/corpus_text_document" \
  --num-windows "${EVAL_WINDOWS:-16}" --calibration-windows 8 --output-dir "$RUN_DIR/quantization" --overwrite

echo
echo "== Adam baseline vs OSP, same model size and tokens"
python tools/compare_runs.py "$RUN_DIR/adam" "$RUN_DIR/osp" --quantization "$RUN_DIR/quantization/quantization.json" \
  --output "$RUN_DIR/comparison.txt"
