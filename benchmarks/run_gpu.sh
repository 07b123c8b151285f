#!/usr/bin/env bash
# On a GPU machine: build the extension for this GPU, run the GPU tests and the self-check,
# then benchmark the given ops. Logs and results go to OUT_DIR (default benchmarks/results).
#   benchmarks/run_gpu.sh [OUT_DIR] [OP ...]      e.g. benchmarks/run_gpu.sh /tmp/out paged_kv_write
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX must not take 75% of the GPU in each process
py=${PYTHON:-python3}

cap=$($py -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
echo "== build for sm_$cap"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} LEPTON_CUDA_ARCHS="${LEPTON_CUDA_ARCHS:-80;$cap}" \
  $py -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }

echo "== GPU tests"
# Most of their time is Triton compiling kernel variants: spread it over processes if we can.
parallel=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
$py -m pytest -m gpu -q -p no:cacheprovider $parallel 2>&1 | tee "$out/gpu-tests.log" | tail -15
tests=${PIPESTATUS[0]}

echo "== selfcheck"
$py -m lepton_kernels.cli selfcheck 2>&1 | tee "$out/selfcheck.log" | tail -15

for op in "$@"; do
  echo "== bench $op"
  $py -m lepton_kernels.cli bench "$op" --out "$out" 2>&1 | tail -60
done
exit $tests
