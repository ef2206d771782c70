#!/usr/bin/env bash
# One device-machine call for the end-to-end decode work: build, GPU tests, benchmark.
#
#   run(command="bash bench/run_decode_device.sh --quick", carry=[".whl"], timeout_s=540)
#
# Arguments go to `bench/decode.py gpu` (e.g. --quick, --models llama3-8b --batches 1,8).
# Environment: BUILD=0 skips building prunepath._C (the "auto" backend then uses Triton);
# TESTS=0 skips pytest. Logs and JSON land in $OUT (default /tmp/out); a table prints last.
# .whl must hold transformers==5.23.0 (the version the code is developed against):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.23.0
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
if [ "${BUILD:-1}" = "1" ]; then
  start=$(date +%s)
  # in place (the tree is on PYTHONPATH); -e would also work: pip install --no-build-isolation --no-deps -e .
  MAX_JOBS=16 timeout 300 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
    && echo "build ok in $(( $(date +%s) - start ))s" || { echo "BUILD FAILED (see build.log)"; tail -20 "$OUT/build.log"; }
  python3 -c "import prunepath.ops as o; print('backends on cuda:', o.available_backends('cuda'))"
fi
if [ "${TESTS:-1}" = "1" ]; then
  timeout 180 python3 -m pytest -q -m "gpu and not slow" tests/test_decode.py -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest_decode.log" | tail -15
fi
python3 bench/decode.py gpu --out "$OUT" "$@" 2>&1 | grep -v "^USDT\|profiler_st" | tee "$OUT/bench_decode.log"
