#!/usr/bin/env bash
# The GPU checks the open issues ask for, as one prepared command for the `device` tool, whose lease
# is 15 minutes of device time per task (machine start included) and 10 minutes per command.
#
#   here, once:      bash tools/device_checks.sh prepare    (wheels into .whl/, data into .device_data/)
#   on the device:   run(command="bash tools/device_checks.sh", carry=[".whl", ".device_data"], timeout_s=580)
#   one stage only:  bash tools/device_checks.sh bench    (or: step, repro)
#
# prepare (here, on the CPU machine): megatron-core & co. as Python 3.12 wheels
#          (../shared/tools/device-wheels.sh) and the reproduction's data, tokenized here so that the
#          GPU's minutes go to training: the built-in corpus with the standard library's source,
#          character-level SentencePiece (vocab 350), Megatron .bin/.idx (9.87M tokens, 20 MB; 7 s).
# Stages on the device, each under its own time limit so that one that hangs or fails leaves the
# others' results:
#   setup  install the carried wheels into /tmp/site, build the C++ extensions in place, record the
#          machine (env.txt)
#   bench  tools/bench_muon.py --gpu on the 1.4B model's shapes: Newton-Schulz throughput against a
#          large bf16 matmul of the same run, optimizer step vs AdamW and Megatron-Core's Muon (issue 3)
#   step   tools/bench_step.py --zero: a training step of the 1.4B model (osp-1.4b, seq 2048) on the
#          one GPU, Adam + RMSNorm vs OSP vs OSP with the distributed optimizer, tokens/s over 20
#          steps after 5 warm-up ones at the largest micro-batch the planner fits, one micro-batch per
#          step (the optimizer's worst case); the optimizer step is timed apart, and the tool projects
#          to osp_1.4b.yaml's 1,024 sequences per step (issue 17, item 3). STEP_ARGS="--accumulate 4
#          --steps 5" measures a step of 4 micro-batches, to check the projection.
#   fwdbwd tools/bench_fwd_bwd.py --profile: forward + backward of the 1.4B model per arm (adam,
#          ssnorm only, embproj only, osp, and ssnorm/osp with model.ssnorm_kernel=fused) and the
#          norms alone (torch RMSNorm, SSNorm, FusedSSNorm): where OSP's forward + backward is slower
#          than Adam's (~2 min); STEP_ARGS=--eager-ssnorm adds an osp-eager arm to the step stage
#   repro  examples/reproduce_osp_small.sh with REPRO_CONFIG (default reproduce_small.yaml): the
#          paper's four ablation rows trained at the same time on the one GPU (PARALLEL=1), then the
#          4-bit evaluation (issue 6)
# The three stages do not fit one 10-minute command together (bench ~3, step ~3, repro ~5.5 min):
# run "bench step" in one call and "repro" in another where the lease allows.
# Everything lands in $OUT (the device tool brings back at most 8 files): env.txt, bench_muon.txt,
# bench_step.txt/.json, repro.txt and repro.tar.gz (summaries, kurtosis, metrics, the quantization report).
# REPRO_ARGS="section.field=value ..." overrides the reproduction's config (e.g. a shorter rerun).
# Without a GPU, DEVICE_CHECKS_CPU=1 runs the same stages at smoke-test size (plumbing check).
set -uo pipefail
# abs_paths, check_switches
source "$(dirname "$0")/../examples/_common.sh"
abs_paths OUT REPRO_DIR EO_SRC
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_checks}
mkdir -p "$OUT"
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(bench repro)
CPU=${DEVICE_CHECKS_CPU:-0}
check_switches 2 DEVICE_CHECKS_CPU STEP_ZERO PARALLEL  # DEVICE_CHECKS_CPU=true used to run the GPU stages
BENCH_LIMIT=${BENCH_LIMIT:-170}
REPRO_LIMIT=${REPRO_LIMIT:-320}
STEP_LIMIT=${STEP_LIMIT:-200}
DEVICE_DATA=.device_data
export PYTHONUNBUFFERED=1

log() { echo "[$(date +%H:%M:%S)] $*"; }

prepare() {
  if [[ -x ../shared/tools/device-wheels.sh ]]; then bash ../shared/tools/device-wheels.sh || return 1; fi
  emerging_optimizers_wheel || return 1
  mkdir -p "$DEVICE_DATA"
  grep -qx "/$DEVICE_DATA/" .git/info/exclude 2> /dev/null || echo "/$DEVICE_DATA/" >> .git/info/exclude
  local vocab=${VOCAB:-350}
  python3 tools/builtin_corpus.py --include-source --output "$DEVICE_DATA/corpus.jsonl" &&
  python3 tools/train_tokenizer.py --input "$DEVICE_DATA/corpus.jsonl" --output-prefix "$DEVICE_DATA/tokenizer" \
    --vocab-size "$vocab" --overwrite &&
  python3 tools/preprocess_data.py --input "$DEVICE_DATA/corpus.jsonl" --tokenizer-model "$DEVICE_DATA/tokenizer.model" \
    --output-prefix "$DEVICE_DATA/corpus" --append-eod --workers 2 || return 1
  rm "$DEVICE_DATA/corpus.jsonl"  # not needed there; keeps the carried tree small
  echo "$vocab" > "$DEVICE_DATA/vocab"
  du -sh "$DEVICE_DATA" .whl 2> /dev/null
}

# Megatron-Core 0.16.1's Muon (TensorParallelMuon) is written against emerging-optimizers 0.1.0:
# it passes use_nesterov= and calls newton_schulz_tp(..., mode=), which 0.2.0 and later renamed or
# dropped (0.3.0 fails at construction: "missing ... 'nesterov'"). So the carried wheel is 0.1.0:
# from the index when it has it, else built from a checkout of the v0.1.0 tag (pure Python) named by
# EO_SRC, e.g. git clone -b v0.1.0 https://github.com/NVIDIA-NeMo/Emerging-Optimizers.
emerging_optimizers_wheel() {
  local want=0.1.0
  compgen -G ".whl/emerging_optimizers-$want-*.whl" > /dev/null && return 0
  local tmp
  tmp=$(mktemp -d)
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp" \
      "emerging-optimizers==$want" 2> /dev/null; then
    if [[ -z "${EO_SRC:-}" ]]; then
      echo "emerging-optimizers $want: not in the package index; set EO_SRC to a checkout of its v$want tag" \
        "(without it, bench prints why Megatron-Core's Muon is skipped)" >&2
      rm -rf "$tmp"; return 0
    fi
    python3 -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "$EO_SRC" || { rm -rf "$tmp"; return 1; }
  fi
  if ! compgen -G "$tmp/emerging_optimizers-$want-*.whl" > /dev/null; then
    echo "emerging-optimizers: the wheel made from ${EO_SRC:-the index} is not version $want" >&2
    rm -rf "$tmp"; return 1
  fi
  mkdir -p .whl && rm -f .whl/emerging_optimizers-*.whl && mv "$tmp"/emerging_optimizers-*.whl .whl/
  rm -rf "$tmp"
}

setup() {
  export PYTHONPATH=$PWD
  if ! python3 -c "import megatron.core" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  # The example scripts call `python`; some images only have python3.
  if ! command -v python > /dev/null; then
    mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python && export PATH=/tmp/bin:$PATH
  fi
  if ! python3 -c "import megatron_osp.data._index_builders, megatron_osp.data._word_cache" 2> /dev/null; then
    python3 setup.py -q build_ext --inplace -j "$(nproc)" > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; return 1; }
  fi
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2> /dev/null || echo "no nvidia-smi"
    python3 - << 'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("megatron.core", "triton", "emerging_optimizers", "transformer_engine", "apex"):
    try:
        m = __import__(name, fromlist=["_"]); print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "not importable:", type(e).__name__)
EOF
    git log -1 --format='commit %H %s' 2> /dev/null || true
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

bench() {
  local flags=(--gpu)
  [[ "$CPU" == 1 ]] && flags+=(--quick)
  # BENCH_ARGS: e.g. "--step-only --profile --baseline-muon FILE" (the optimizer step alone, profiled,
  # next to an earlier muon.py)
  read -r -a extra <<< "${BENCH_ARGS:-}"
  timeout --signal=TERM --kill-after=10 "$BENCH_LIMIT" python3 tools/bench_muon.py "${flags[@]}" ${extra[@]+"${extra[@]}"} 2>&1 |
    tee "$OUT/bench_muon.txt"
}

step() {
  local flags=(--json "$OUT/bench_step.json")
  # STEP_ZERO=0 leaves out the osp-zero arm (a shorter call, e.g. with --accumulate 8)
  [[ "${STEP_ZERO:-1}" == 1 ]] && flags+=(--zero)
  [[ "$CPU" == 1 ]] && flags+=(--quick)
  # STEP_ARGS: e.g. "--layers 12" or "--recompute selective" for a resized rerun
  read -r -a extra <<< "${STEP_ARGS:-}"
  timeout --signal=TERM --kill-after=10 "$STEP_LIMIT" python3 tools/bench_step.py "${flags[@]}" ${extra[@]+"${extra[@]}"} 2>&1 |
    tee "$OUT/bench_step.txt"
}

fwdbwd() {
  local flags=(--profile)
  [[ "$CPU" == 1 ]] && flags+=(--quick --iters 2)
  timeout --signal=TERM --kill-after=10 "${FWDBWD_LIMIT:-200}" python3 tools/bench_fwd_bwd.py "${flags[@]}" 2>&1 |
    tee "$OUT/bench_fwd_bwd.txt"
}

repro() {
  local run_dir=${REPRO_DIR:-/tmp/repro}
  local args=()
  if [[ "$CPU" == 1 ]]; then
    args=(--cpu train.train_steps=4 train.warmup_steps=1 train.log_interval=2 train.kurtosis_interval=2 train.eval_batches=1
          train.kurtosis_batches=1 train.save_interval=0 train.progress_bar=false)
    export EVAL_WINDOWS=4
  else
    read -r -a args <<< "train.progress_bar=false ${REPRO_ARGS:-}"  # REPRO_ARGS: overrides for a resized rerun
    export EVAL_WINDOWS=${EVAL_WINDOWS:-128} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
    if [[ -f "$DEVICE_DATA/corpus_text_document.idx" ]]; then  # made by the prepare stage
      export DATA=$DEVICE_DATA/corpus_text_document TOKENIZER=$DEVICE_DATA/tokenizer.model VOCAB=$(cat "$DEVICE_DATA/vocab")
    fi
  fi
  PARALLEL=${PARALLEL:-1} RUN_DIR=$run_dir timeout --signal=TERM --kill-after=20 "$REPRO_LIMIT" \
    bash examples/reproduce_osp_small.sh ${args[@]+"${args[@]}"} 2>&1 | tee "$OUT/repro.txt"
  local rc=${PIPESTATUS[0]}
  # Small files only (no checkpoints, no corpus): what the results and the docs are written from.
  (cd "$run_dir" && find . \( -name 'summary.json' -o -name 'kurtosis.json' -o -name 'metrics.jsonl' \
      -o -name 'config.yaml' -o -path './logs/*' -o -path './quantization/*' -o -name 'comparison.txt' \
      -o -name 'timings.txt' \) -type f -print0 | tar -czf "$OUT/repro.tar.gz" --null -T -) || true
  return "$rc"
}

if [[ "${STAGES[*]}" == prepare ]]; then prepare; exit $?; fi
log "setup"
setup || { log "setup failed"; exit 1; }
status=0
for stage in "${STAGES[@]}"; do
  case "$stage" in
    bench|step|fwdbwd|repro) log "$stage"; "$stage"; rc=$?; log "$stage exit $rc"; [[ $rc == 0 ]] || status=1 ;;
    *) echo "unknown stage '$stage' (stages: prepare alone, or any of bench, step, fwdbwd, repro)" >&2; exit 2 ;;
  esac
done
exit $status
