#!/usr/bin/env bash
# The CPU quickstart: corpus -> tokenizer -> .bin/.idx -> Adam+RMSNorm baseline and OSP on the same
# tokens -> side-by-side loss and excess-kurtosis table. A few minutes on 2 cores, no download.
#   bash examples/quickstart_cpu.sh [section.field=value ...]   (overrides apply to both runs)
# RUN_DIR (default runs/quickstart) holds everything it makes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/quickstart}
CONFIG=megatron_osp/configs/quickstart_cpu.yaml
VOCAB=2048
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$RUN_DIR"

echo "== 1/5 corpus: documentation shipped with Python"
python tools/builtin_corpus.py --output "$RUN_DIR/corpus.jsonl"
echo "== 2/5 tokenizer: SentencePiece BPE, vocab $VOCAB"
python tools/train_tokenizer.py --input "$RUN_DIR/corpus.jsonl" --output-prefix "$RUN_DIR/tokenizer" --vocab-size $VOCAB
echo "== 3/5 tokenize into Megatron's indexed format"
python tools/preprocess_data.py --input "$RUN_DIR/corpus.jsonl" --tokenizer-model "$RUN_DIR/tokenizer.model" \
  --output-prefix "$RUN_DIR/corpus" --append-eod --workers 2

COMMON=(--config "$CONFIG" "data.paths=[$RUN_DIR/corpus_text_document]"
        "data.tokenizer_model=$RUN_DIR/tokenizer.model" "model.vocab_size=$VOCAB")
echo "== 4/5 baseline: AdamW + RMSNorm"
python -m megatron_osp.training.pretrain "${COMMON[@]}" "train.run_dir=$RUN_DIR/adam" \
  optimizer.name=adam model.normalization=rmsnorm model.embedding_projection=false "$@"
echo "== 5/5 OSP: Muon + SSNorm + EmbProj"
python -m megatron_osp.training.pretrain "${COMMON[@]}" "train.run_dir=$RUN_DIR/osp" \
  optimizer.name=muon model.normalization=ssnorm model.embedding_projection=true "$@"

echo
echo "== Adam baseline vs OSP, same model size and tokens"
python tools/compare_runs.py "$RUN_DIR/adam" "$RUN_DIR/osp" --output "$RUN_DIR/comparison.txt"
