#!/usr/bin/env bash
# One device-machine call for the end-to-end decode work: build, GPU tests, benchmark.
#
#   run(command="bash bench/run_decode_device.sh", carry=[".whl"], timeout_s=540)
#
# Stops itself before END seconds (default 500) so partial results come back: each bench
# process gets a --deadline (no new configuration after it) and a `timeout` behind that;
# bench/decode.py rewrites its JSON after every row.
# Order: Llama-3-8B shape (batch 1/2/4/8: dense vs 50/70/75/90% FFN sparsity, batch 1 also
# without statistics / without router projection), then Llama-2-7B with the time left.
# Environment: BUILD=0 skips building prunepath._C (the "auto" backend then uses Triton);
# TESTS=0 skips pytest (TEST_MARK: pytest -m expression, default "gpu and not slow";
# TEST_TIMEOUT seconds, default 150; TEST_FILES, default the decode + fused-router tests;
# PYTEST_ARGS, e.g. "-n 8"); MODELS (default "llama3-8b llama2-7b"); BENCH_ARGS:
# extra arguments for `bench/decode.py gpu` (e.g. "--quick", "--modes graph,compile");
# REPEATS (default 2).
# Output ($OUT, default /tmp/out; at most 8 files come back): setup.log (GPU, versions,
# build, backends), pytest.log, <model>.log, <model>/gpu.json, autotune.json.
# .whl must hold transformers==5.23.0 (the version the code is developed against; the
# device image has 5.17, whose StaticCache API differs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.23.0
set -uo pipefail
OUT=${OUT:-/tmp/out}
END=${END:-500}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export PRUNEPATH_CACHE_DIR=/tmp/prunepath_cache
# Hopper only: half the build time of the default (sm_90a + sm_80 + PTX)
export PRUNEPATH_NVCC_GENCODE=${PRUNEPATH_NVCC_GENCODE:-"-gencode=arch=compute_90a,code=sm_90a"}
# the image's default CXX wrapper builds extensions that segfault when a TORCH_CHECK message
# formats a number: use the system g++ (found by the CPU kernels engineer)
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, torch.version.cuda, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "CXX=${CXX:-default} nvcc: $(nvcc --version | tail -1)"
} > "$OUT/setup.log" 2>&1
cat "$OUT/setup.log"
if [ "${BUILD:-1}" = "1" ]; then
  start=$(date +%s)
  # in place (the tree is on PYTHONPATH)
  if timeout 240 python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1; then
    echo "build ok in $(( $(date +%s) - start ))s" | tee -a "$OUT/setup.log"
  else
    echo "BUILD FAILED after $(( $(date +%s) - start ))s" | tee -a "$OUT/setup.log"
    grep -iE "error" /tmp/build.log | head -30 | tee -a "$OUT/setup.log"
    tail -30 /tmp/build.log >> "$OUT/setup.log"
  fi
fi
python3 -c "import prunepath.ops as o; print('backends on cuda:', o.available_backends('cuda'))" \
  2>&1 | tee -a "$OUT/setup.log"
if [ "${TESTS:-1}" = "1" ]; then
  # GPU decode tests (CUDA graphs; the compiled step too when TEST_MARK includes slow ones)
  # and the fused-router GPU tests
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q ${PYTEST_ARGS:-} -m "${TEST_MARK:-gpu and not slow}" \
    ${TEST_FILES:-tests/test_decode.py tests/test_fused_router.py} -p no:cacheprovider \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$? at $(el)s"
  grep -E "passed|failed|Error|error" "$OUT/pytest.log" | tail -15
fi
for model in ${MODELS:-llama3-8b llama2-7b}; do
  left=$(( END - $(el) ))
  if [ "$left" -lt 90 ]; then echo "[$model skipped: ${left}s left]"; continue; fi
  echo "== $model: ${left}s left at $(el)s"
  timeout $(( left - 5 )) python3 bench/decode.py gpu --models "$model" --out "$OUT/$model" \
    --repeats "${REPEATS:-2}" --deadline $(( left - 45 )) ${BENCH_ARGS:-} 2>&1 \
    | grep -v "^USDT\|profiler_st" > "$OUT/$model.log"
  echo "bench $model rc=$? at $(el)s"
  grep -vE "^\s*$" "$OUT/$model.log" | grep -E "B=|!!|deadline|Error" | tail -40
done
cp "$PRUNEPATH_CACHE_DIR/autotune.json" "$OUT/autotune.json" 2>/dev/null
echo "done at $(el)s"
