#!/bin/bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, run bench/ops_gpu.py.
#
#   bash bench/run_gpu_checks.sh check   # env, build (sm_90a only), GPU tests, --quick bench
#   bash bench/run_gpu_checks.sh full    # env, build, full benchmark table (issue 7)
#
# Logs and JSON go to $OUT (the device tool's folder), else ./out. On an H100 (2026-11-23)
# `check` took 210 s of command time: build 70 s, tests 105 s (-n 8), quick bench 25 s.
# TEST_TIMEOUT / BENCH_END (seconds) bound the test and bench steps; SWEEP=1 adds the
# Triton block-config sweep to `check`.
set -u
MODE=${1:-check}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export PRUNEPATH_NVCC_GENCODE=${PRUNEPATH_NVCC_GENCODE:-"-gencode=arch=compute_90a,code=sm_90a"}
cd "$(dirname "$0")/.."
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 ))s"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$? after $(el)"
grep -E "error" "$OUT/build.log" | head -20
python3 -c "import prunepath.ops as o; print('GPU backends:', o.available_backends('cuda'))"
if [ "$MODE" = check ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -v -n 8 -p no:cacheprovider --tb=short \
    --maxfail=40 tests/test_gpu_ops.py tests/test_triton.py tests/test_autotune.py \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$? after $(el)"
  grep -cE " PASSED " "$OUT/pytest.log"
  grep -E " FAILED |^E  |passed|failed" "$OUT/pytest.log" | head -40
  timeout $(( ${BENCH_END:-575} - ($(date +%s) - T0) )) python3 bench/ops_gpu.py --quick \
    ${SWEEP:+--sweep} --json "$OUT/ops_gpu_quick.json" > "$OUT/bench.log" 2>&1
else
  timeout $(( 580 - ($(date +%s) - T0) )) python3 bench/ops_gpu.py --dtypes bf16 \
    --json "$OUT/ops_gpu.json" > "$OUT/bench.log" 2>&1
fi
echo "bench rc=$? after $(el)"
grep -vE '^\{' "$OUT/bench.log" | tail -60
