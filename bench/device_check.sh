#!/usr/bin/env bash
# The one script to run on a GPU machine: rebuild the extension against the
# torch there, run the CUDA tests, then the benchmark grid against torch.nn
# (cuDNN) in one process (fused-rnn bench --preset full: LSTM and GRU, one
# layer, T=256, I=H, B 1/8/64/256, H 256/512/1024, float32 with TF32 off on
# both sides, bfloat16, float16, forward and forward+backward), a profile,
# and the table last. About 6 minutes on an H100. Results go to
# bench/results/<card>.json and, with the plot, trace and logs, to $OUT.
#   bash bench/device_check.sh [extra fused-rnn bench flags]
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" FUSED_RNN_CUDA=1 FUSED_RNN_NVCC_THREADS=4 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SECONDS=0
if ! python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: ${SECONDS}s"
SECONDS=0
python -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_ecosystem.py 2>&1 \
  | tee "$OUT/tests.log" | tail -25
echo "tests: ${SECONDS}s"
card=$(python -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
python -m fused_rnn explain --device cuda --cell LSTM --hidden-size 512 --batch 64 | tee "$OUT/explain.txt"
python -m fused_rnn profile --device cuda --cell LSTM --hidden-size 512 --batch 64 --seq-len 256 \
  --training --trace "$OUT/trace-$card.json" > "$OUT/profile.txt" 2>&1
tail -8 "$OUT/profile.txt"
SECONDS=0
python -m fused_rnn bench --preset full --device cuda --no-progress "$@" \
  --json "bench/results/$card.json" --csv "$OUT/$card.csv" --plot "$OUT/$card.png" \
  | tee "$OUT/bench.txt"
cp "bench/results/$card.json" "$OUT/"
echo "bench: ${SECONDS}s"
