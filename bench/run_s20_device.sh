#!/usr/bin/env bash
# Device-machine calls of session 20 (carry=[".whl"]; an H100 came for them):
#
#   run(command="STAGE=b1 bash bench/run_s20_device.sh", carry=[".whl"], timeout_s=440)
#   run(command="STAGE=b8 bash bench/run_s20_device.sh", carry=[".whl"], timeout_s=300)
#
# STAGE=b1: compiled B=1 Llama-3-8B decode at 50 / 75% (packed W_down, logit-controlled masks)
#   -> $OUT/dec_b1, then the GPU tests of the Triton kernels (tests/test_triton.py runs on the GPU
#   whenever there is one) and of router_routed_ffn / fuse_routing / the masked-dense decoder.
# STAGE=b8: compiled B=8 Llama-3-8B at 50% on the masked-dense path (forced; independent and
#   smollm2 masks) -> $OUT/dec_b8, then the kernels of that compiled step (torch profiler)
#   -> $OUT/prof_b8.json.
# (Session 20 ran b8 with PRUNEPATH_ROUTE_STREAM_IN_COMPILE=0 and =1: the side-stream op it
# switched gained nothing, 6.864 vs 6.866 ms, and was removed.)
# .whl must hold transformers==5.23.0 (see bench/run_decode_device.sh).
set -uo pipefail
. bench/device_env.sh
if [ "${STAGE:-b1}" = "b8" ]; then
  DA="--models llama3-8b --batches 8 --sparsities 0.5 --modes compile --compile-batches 8"
  DA+=" --steps lean --variants= --no-profile --repeats 2 --ffn-path dense"
  run_decode b8 "${D1:-120}" X=0
  echo "== profile $(el) s"
  timeout "${PT:-90}" python3 bench/profile_step_gpu.py --mode compile --step lean --batch 8 \
    --ffn-path dense --sparsities 0,0.5 --steps 10 --json "$OUT/prof_b8.json" 2>&1 \
    | grep -E "^== " | tail -4
else
  DA="--models llama3-8b --batches 1 --sparsities 0.5,0.75 --modes compile --compile-batches 1"
  DA+=" --steps lean --variants= --no-profile --repeats 2 --packed-down --mask-source logits"
  run_decode b1 "${D1:-200}" X=0
  echo "== tests $(el) s"
  timeout "${TT:-100}" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton.py 2>&1 | tail -2
  timeout "${TG:-110}" python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider \
    tests/test_router_routed_ffn.py tests/test_decode.py -k "router_routed or fused_routing or masked" \
    2>&1 | tail -2
fi
echo "== end $(el) s"
