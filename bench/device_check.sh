#!/usr/bin/env bash
# The one script to run on a GPU machine (see README): rebuild the extension
# against the torch there, run the CUDA tests, then the benchmark grid
# against torch.nn (cuDNN) in one process; the table prints last. About 6
# minutes on an H100. Results: bench/results/<card>.json, copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" FUSED_RNN_CUDA=1 FUSED_RNN_NVCC_THREADS=4 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
SECONDS=0
if ! python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: ${SECONDS}s"
SECONDS=0
python -m pytest -q -p no:cacheprovider -x tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -25
echo "tests: ${SECONDS}s"
SECONDS=0
python bench/gpu_bench.py "$@" 2>"$OUT/bench_progress.log"
echo "bench: ${SECONDS}s"
