#!/usr/bin/env bash
# Registers, stack frame and spills of every kernel in the given .cu files,
# for one architecture (default sm_90), compiled here: no GPU needed. A
# persistent kernel with a stack frame keeps an array in local memory (an
# index the compiler could not resolve), which the H200 run of 2026-11-27
# showed as a 47% slower float32 B=8 step.
#
#   bash bench/ptxas_report.sh csrc/cuda/persistent_lstm_forward.cu [more.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${ARCH:-90}"
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
TORCH=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
PYINC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for cu in "$@"; do
  echo "== $cu (sm_$ARCH)"
  "$NVCC" -DFUSED_RNN_WITH_CUDA -Icsrc/include -I"$TORCH/include" \
    -I"$TORCH/include/torch/csrc/api/include" -I"$PYINC" -c "$cu" -o /dev/null \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -O3 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -gencode="arch=compute_$ARCH,code=sm_$ARCH" -std=c++20 -Xptxas -v 2>&1 \
    | grep -E "Compiling entry|Used [0-9]+ registers|stack frame" | paste - - - \
    | sed -E 's/.*entry function .(_Z[^ ]*). for .sm_[0-9a-z]*.*[^0-9]([0-9]+) bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads.*Used ([0-9]+) registers.*/\5 registers, stack \2, spills \3\/\4  \1/' \
    | c++filt | sed 's/fused_rnn:://g; s/cuda::persistent:://g'
done
