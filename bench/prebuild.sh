#!/usr/bin/env bash
# Builds the extension HERE for the device machine, so that its budget is not
# spent compiling: against the device's torch release (default 2.11.0, the
# CUDA 13.0 build that the lent H100/H200 machines have), for its
# architecture only (default 9.0), from this working tree, into .prebuilt/
# (git-ignored). The extension is abi3 (py_limited_api), so a build with this
# machine's Python loads under the device's Python 3.12.
#
#   bash bench/prebuild.sh            then: run(command="bash bench/device_check.sh session",
#                                                carry=[".prebuilt"])
#
# device_check.sh uses it only when the device's torch is that release, the
# sources are the ones it was built from (a hash of setup.py and csrc/) and it
# loads; otherwise it builds there.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
ARCH="${FUSED_RNN_CUDA_ARCHS:-9.0}"
VENV="${VENV:-/tmp/fused-rnn-torch-$TORCH_VERSION}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" ninja setuptools wheel
fi
# the same as device_check.sh's src_hash
src_hash() { (cat setup.py; find csrc -type f | sort | xargs cat) | sha1sum | cut -c1-16; }
hash=$(src_hash)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The working tree as it is (tracked and untracked files git does not ignore).
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FUSED_RNN_CUDA=1 FUSED_RNN_CUDA_ARCHS="$ARCH"
export MAX_JOBS="${MAX_JOBS:-2}" PATH="/usr/lib/ccache:$PATH"
(cd "$work" && "$VENV/bin/python" setup.py -q build_ext --inplace > build.log 2>&1) \
  || { tail -40 "$work/build.log"; exit 1; }
mkdir -p .prebuilt
cp "$work/fused_rnn/_C.abi3.so" "$work/fused_rnn/_build_config.py" .prebuilt/
echo "$hash" > .prebuilt/source-hash
echo "$ARCH" > .prebuilt/arch
echo "sources $hash, sm_${ARCH/./}, built $(date -u +%FT%TZ)" > .prebuilt/source
cat .prebuilt/source; ls -l .prebuilt/_C.abi3.so
