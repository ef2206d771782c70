#!/usr/bin/env bash
# Device-machine calls for session 20 (one call each, carry=[".whl"], timeout_s=600):
#
#   run(command="STAGE=stream bash bench/run_s20_device.sh", carry=[".whl"])
#   run(command="STAGE=check bash bench/run_s20_device.sh", carry=[".whl"])
#
# STAGE=stream: the GPU tests of ops.router_masked_dense_ffn and of a compiled masked-dense
#   decode step that routes on a side stream inside it, then compiled B=8 / 4 Llama-3-8B at
#   50% with PRUNEPATH_ROUTE_STREAM_IN_COMPILE off (-> $OUT/dec_stream_0) and on (-> dec_stream_1).
# STAGE=check: the GPU tests of the Triton kernels, ops and decoder after session 20's removal
#   of the routing-in-the-FFN kernels, then compiled B=1 Llama-3-8B decode at 50 / 75%
#   (packed W_down, logit-controlled masks) -> $OUT/dec_b1.
# .whl must hold transformers==5.23.0 (see bench/run_decode_device.sh).
set -uo pipefail
. bench/device_env.sh
if [ "${STAGE:-check}" = "stream" ]; then
  echo "== tests $(el) s"
  timeout "${TT:-120}" python3 -m pytest -q -n 4 -m gpu -p no:cacheprovider tests/test_masked_dense.py \
    2>&1 | tail -3
  DA="--models llama3-8b --batches 8,4 --sparsities 0.5 --modes compile --compile-batches 8,4"
  DA+=" --steps lean --variants= --no-profile --repeats 2"
  for on in 0 1; do
    run_decode "stream_$on" "${D1:-200}" PRUNEPATH_ROUTE_STREAM_IN_COMPILE=$on
  done
else
  echo "== tests $(el) s"
  # tests/test_triton.py runs on the GPU whenever there is one (not gpu-marked)
  timeout "${TT:-150}" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton.py 2>&1 | tail -2
  timeout "${TG:-200}" python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider tests/test_router_routed_ffn.py \
    tests/test_decode.py tests/test_masked_dense.py 2>&1 | tail -3
  DA="--models llama3-8b --batches 1 --sparsities 0.5,0.75 --modes compile --compile-batches 1"
  DA+=" --steps lean --variants= --no-profile --repeats 2 --packed-down --mask-source logits"
  run_decode b1 "${D1:-170}" X=0
fi
echo "== end $(el) s"
