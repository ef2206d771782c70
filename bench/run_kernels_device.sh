#!/bin/bash
# One device call for the Triton kernels (issue 7): env, GPU tests, then bench/ops_gpu.py.
#   STAGE=1 bash bench/run_kernels_device.sh   # tests + 4096x11008 E=64 table + sweep + route/profile
#   STAGE=2 bash bench/run_kernels_device.sh   # tests + the full table (+ 8192x28672 when time allows)
#   STAGE=sweep bash bench/run_kernels_device.sh  # tests + block-config sweeps only (T=1 E=64, T=64 E=128)
#   STAGE=t1 bash bench/run_kernels_device.sh     # tests + the T=1 and T=2 rows of every shape, bf16 and fp16
#   STAGE=compact bash bench/run_kernels_device.sh  # tests + chunked vs compacted small experts (4096x14336)
#   STAGE=route bash bench/run_kernels_device.sh    # tests + route times and T=1/4 rows at E=64..896 (4096x14336)
# Logs and JSON go to $OUT (else ./out). TEST_TIMEOUT / END (seconds) bound the steps.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PRUNEPATH_REQUIRE_GPU_BACKENDS=triton
cd "$(dirname "$0")/.."
T0=$(date +%s); left() { echo $(( ${END:-500} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -n 8 -p no:cacheprovider --tb=short \
  --maxfail=20 tests/test_triton.py tests/test_gpu_ops.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? at $(( $(date +%s) - T0 ))s"; grep -E "FAILED|Error|passed|failed" "$OUT/pytest.log" | tail -25
B="python3 bench/ops_gpu.py --backends triton"
if [ "${STAGE:-1}" = compact ]; then
  timeout $(left) $B --shapes 4096x14336 --experts 112,448,896 --tokens 1,4 --sparsities 0,0.5,0.7 \
    --json "$OUT/ops_gpu_small_experts.json" > "$OUT/bench_small.log" 2>&1
  [ $(left) -gt 60 ] && timeout $(left) $B --shapes 4096x14336 --experts 448,896 --sweep --sweep-only \
    --sweep-cases 1:0.5,4:0.0,16:0.0,64:0.0 --sweep-layouts packed,linear \
    --sweep-variants default,chunks --json "$OUT/sweep_compact.json" > "$OUT/bench_compact.log" 2>&1
elif [ "${STAGE:-1}" = route ]; then
  timeout $(left) $B --shapes 4096x14336 --experts 64,128,448,896 --tokens 1,4 --sparsities 0.5 \
    --json "$OUT/ops_gpu_route.json" > "$OUT/bench_route.log" 2>&1
elif [ "${STAGE:-1}" = sweep ]; then
  timeout $(left) $B --shapes 4096x11008 --experts 64 --sweep --sweep-only \
    --sweep-cases 1:0.5,1:0.7,1:0.9,1:0.0 --json "$OUT/sweep_t1.json" > "$OUT/bench_sweep1.log" 2>&1
  [ $(left) -gt 30 ] && timeout $(left) $B --shapes 4096x11008 --experts 128 --sweep --sweep-only \
    --sweep-cases 64:0.0,1:0.7 --json "$OUT/sweep_e128.json" > "$OUT/bench_sweep128.log" 2>&1
elif [ "${STAGE:-1}" = t1 ]; then
  timeout $(left) $B --shapes 4096x11008 --experts 64,128 --tokens 1,2 --sparsities 0,0.5,0.7,0.9 \
    --no-route --json "$OUT/ops_gpu_t1_11008.json" > "$OUT/bench_t1.log" 2>&1
  [ $(left) -gt 40 ] && timeout $(left) $B --shapes 4096x14336,8192x28672 --experts 64 --tokens 1 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_t1_big.json" > "$OUT/bench_t1big.log" 2>&1
  [ $(left) -gt 25 ] && timeout $(left) $B --dtypes fp16 --shapes 4096x11008 --experts 64 --tokens 1 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_t1_fp16.json" > "$OUT/bench_t1fp16.log" 2>&1
elif [ "${STAGE:-1}" = 1 ]; then
  timeout $(left) $B --shapes 4096x11008 --experts 64 --tokens 1,4,16,64 --sparsities 0,0.5,0.7,0.9 \
    --profile --sweep --json "$OUT/ops_gpu_s3_run1.json" > "$OUT/bench.log" 2>&1
else
  timeout $(left) $B --shapes 4096x11008 --experts 64,128 --tokens 1,4,16,64 --sparsities 0,0.5,0.7,0.9 \
    --profile --sweep --json "$OUT/ops_gpu_s3_bf16.json" > "$OUT/bench.log" 2>&1
  [ $(left) -gt 40 ] && timeout $(left) $B --shapes 8192x28672 --experts 64 --tokens 1,16 \
    --sparsities 0,0.5,0.7,0.9 --json "$OUT/ops_gpu_s3_8192.json" > "$OUT/bench8192.log" 2>&1
  [ $(left) -gt 40 ] && timeout $(left) $B --shapes 4096x14336 --experts 64 --tokens 1,4,16,64 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_s3_14336.json" > "$OUT/bench14336.log" 2>&1
  [ $(left) -gt 25 ] && timeout $(left) $B --dtypes fp16 --shapes 4096x11008 --experts 64 --tokens 1 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_s3_fp16.json" > "$OUT/benchfp16.log" 2>&1
fi
echo "bench done at $(( $(date +%s) - T0 ))s"
for f in "$OUT"/bench*.log; do echo "== $f"; grep -E "^sweep|^ *[0-9]+x|^d=|Error" "$f" | tail -40; done
