#!/usr/bin/env bash
# The one script to run on a GPU machine, in stages that fit the device
# budget (each call stays well under 6 minutes on an H100; a warm machine
# keeps the build between calls):
#
#   bash bench/device_check.sh build      rebuild the extension against the torch there
#   bash bench/device_check.sh test       the CUDA tests (both kernel paths), build first if needed
#   bash bench/device_check.sh sanitize   compute-sanitizer memcheck and racecheck, small shapes
#   bash bench/device_check.sh bench      fused-rnn bench --preset full vs torch.nn (cuDNN) in one
#                                         process (default kernel choice), a 2-layer bidirectional
#                                         LSTM, explain, profile
#   bash bench/device_check.sh general    the same grid with the general path forced (--kernel
#                                         general): the per-step path against cuDNN
#   bash bench/device_check.sh all        build, test, sanitize, bench (about 10 minutes)
#
# The grid: LSTM and GRU, one layer, T=256, I=H, B 1/8/64/256, H
# 256/512/1024, float32 with TF32 off on both sides, bfloat16, float16,
# forward (no_grad) and forward+backward. Results go to
# bench/results/<card>.json (and <card>-bidir.json) and, with the plot,
# trace and logs, to $OUT. A short summary is printed last, with each speed
# goal of issues 3 and 4 as PASS / MISS / NO DATA (bench/goals.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" FUSED_RNN_CUDA=1 FUSED_RNN_NVCC_THREADS=4 PYTHONUNBUFFERED=1
# Only the card's own architecture: a third of the default build's nvcc work
# (sm_80, sm_90 and PTX), which matters on a 15-minute device budget.
if [ -z "${FUSED_RNN_CUDA_ARCHS:-}" ]; then
  FUSED_RNN_CUDA_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  export FUSED_RNN_CUDA_ARCHS="${FUSED_RNN_CUDA_ARCHS:-8.0;9.0+PTX}"
fi
OUT="${OUT:-/tmp}"
stage="${1:-all}"
summary=()

build() {
  # The copied tree has fresh mtimes on every call: compare the sources'
  # content with that of the last build instead.
  local hash
  hash=$( (echo "$FUSED_RNN_CUDA_ARCHS"; cat setup.py; find csrc -type f | sort | xargs cat) | sha1sum | cut -c1-16)
  if [ "$stage" != build ] && [ "$(cat build/.source-hash 2>/dev/null)" = "$hash" ] \
     && python -c "import fused_rnn, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    summary+=("build: up to date"); return 0
  fi
  SECONDS=0
  if ! python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build: FAILED"; exit 1
  fi
  mkdir -p build && echo "$hash" > build/.source-hash
  summary+=("build: ${SECONDS}s")
}

tests() {
  SECONDS=0
  timeout 330 python -m pytest -q -p no:cacheprovider -x --durations=8 \
    tests/test_cuda_persistent.py tests/test_cuda.py tests/test_ecosystem.py 2>&1 \
    | tee "$OUT/tests.log" | tail -30
  summary+=("tests: $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -1) (${SECONDS}s)")
}

sanitize() {
  SECONDS=0
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    timeout 150 "$sanitizer" --tool "$tool" --error-exitcode 3 python bench/sanitize.py \
      >"$OUT/sanitize-$tool.log" 2>&1
    local rc=$?
    tail -4 "$OUT/sanitize-$tool.log"
    summary+=("sanitize $tool: exit $rc, $(grep -c 'Error\|Hazard' "$OUT/sanitize-$tool.log") reports")
  done
  summary+=("sanitize: ${SECONDS}s")
}

# Results written by this script on this machine (build/ survives between
# calls on a warm machine; the tracked bench/results files are copied in
# afresh from the working tree and may be a previous session's): only these
# feed the goal verdicts.
fresh=build/.fresh-results
unmark() { mkdir -p build; grep -vxF "$1" "$fresh" 2>/dev/null > "$fresh.tmp"; mv "$fresh.tmp" "$fresh"; }
mark() { unmark "$1"; echo "$1" >> "$fresh"; }
is_fresh() { grep -qxF "$1" "$fresh" 2>/dev/null; }

# fused-rnn bench "$@" writing JSON to $json, the table to $log; marks $json
# fresh when the run succeeded.
run_bench() {
  local json=$1 log=$2; shift 2
  unmark "$json"; rm -f "$json"
  python -m fused_rnn bench "$@" --json "$json" | tee "$log"
  if [ "${PIPESTATUS[0]}" -eq 0 ] && [ -f "$json" ]; then mark "$json"; cp "$json" "$OUT/"
  else summary+=("FAILED: fused-rnn bench $* (see $log)"); fi
}

card_name() {
  python -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())"
}

bench() {
  SECONDS=0
  local card
  card=$(card_name)
  python -m fused_rnn explain --device cuda --cell LSTM --hidden-size 512 --batch 8 | tee "$OUT/explain.txt"
  python -m fused_rnn profile --device cuda --cell LSTM --hidden-size 512 --batch 8 --seq-len 256 \
    --training --trace "$OUT/trace-$card.json" > "$OUT/profile.txt" 2>&1
  tail -8 "$OUT/profile.txt"
  run_bench "bench/results/$card-bidir.json" "$OUT/bench-bidir.txt" --device cuda --cell LSTM \
    --batch 64 --hidden-size 512 --seq-len 256 --layers 2 --bidirectional \
    --dtype float32 bfloat16 float16 --no-progress
  run_bench "bench/results/$card.json" "$OUT/bench.txt" --preset full --device cuda --no-progress \
    --csv "$OUT/$card.csv" --plot "$OUT/$card.png"
  summary+=("bench: ${SECONDS}s, bench/results/$card.json")
  goals "$card"
}

# The speed goals of issues 3 and 4 against the results of this machine.
goals() {
  local card=$1 args=()
  if ! is_fresh "bench/results/$card.json"; then
    summary+=("goals: no fresh bench/results/$card.json (run the bench stage)"); return
  fi
  is_fresh "bench/results/$card-bidir.json" && args+=(--bidir "bench/results/$card-bidir.json")
  is_fresh "bench/results/$card-general.json" && args+=(--general "bench/results/$card-general.json")
  python bench/goals.py "bench/results/$card.json" ${args[@]+"${args[@]}"} > "$OUT/goals.txt"
  while IFS= read -r line; do summary+=("goal $line"); done < "$OUT/goals.txt"
}

bench_general() {
  SECONDS=0
  local card
  card=$(card_name)
  run_bench "bench/results/$card-general.json" "$OUT/bench-general.txt" --preset full \
    --device cuda --kernel general --no-progress
  summary+=("bench general: ${SECONDS}s, bench/results/$card-general.json")
  goals "$card"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "$stage" in
  build) build ;;
  test) build; tests ;;
  sanitize) build; sanitize ;;
  bench) build; bench ;;
  general) build; bench_general ;;
  all) build; tests; sanitize; bench ;;
  *) echo "usage: bash bench/device_check.sh [build|test|sanitize|bench|general|all]"; exit 2 ;;
esac
echo
printf '%s\n' "${summary[@]}"
