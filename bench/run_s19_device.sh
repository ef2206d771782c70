#!/usr/bin/env bash
# Device-machine calls for session 19: routing in the two-phase FFN's up kernel
# (PRUNEPATH_TRITON_ROUTE_IN_UP=1, launch.router_routed_ffn with a two-phase config) and
# down phases without F-splits (FFNConfig.s = 1: no fp32 partials, no fold).
#
#   run(command="STAGE=ops bash bench/run_s19_device.sh", carry=[".whl"], timeout_s=600)
#   run(command="STAGE=decode T2='<fields>' bash bench/run_s19_device.sh", carry=[".whl"])
#
# STAGE=ops: GPU tests of the routing-in-the-FFN paths (kernels, op, decoder), then the T=1
#   sweep (Llama-3-8B FFN 4096 x 14336, E=64, packed W_down^T; 0.5 / 0.75 / 0 sparsity) of the
#   default and the s=1 / s=2 down variants -> $OUT/sweep.json, then routing + FFN at T = 1, 2:
#   router_route + routed_ffn vs routing in the up kernel -> $OUT/route_ffn.json.
# STAGE=decode: compiled B=1 Llama-3-8B decode (packed W_down, logit-controlled masks, 0.5 /
#   0.75): router_route + FFN (fuse_routing off) -> $OUT/dec_split, routing in the up kernel
#   (fuse_routing on, PRUNEPATH_TRITON_ROUTE_IN_UP=1) -> $OUT/dec_up; with T2 (FFNConfig fields
#   as JSON for PRUNEPATH_TRITON_FFN_T2) both again with that T <= 2 config -> dec_*_t2; with
#   B48=<seconds> compiled batch 8 and 4 at 50% (independent / smollm2 masks) -> dec_b48.
# STAGE=stream (not yet run): the GPU tests of ops.router_masked_dense_ffn and of a compiled
#   masked-dense decode step that routes on a side stream inside it, then compiled B=8 / 4 at
#   50% with PRUNEPATH_ROUTE_STREAM_IN_COMPILE off (-> dec_stream_off) and on (-> dec_stream_on).
# .whl must hold transformers==5.23.0 (see bench/run_decode_device.sh).
set -uo pipefail
. bench/device_env.sh
if [ "${STAGE:-ops}" = "stream" ]; then
  echo "== tests $(el) s"
  timeout "${TT:-120}" python3 -m pytest -q -n 4 -m gpu -p no:cacheprovider tests/test_masked_dense.py \
    2>&1 | tail -3
  DA="--models llama3-8b --batches 8,4 --sparsities 0.5 --modes compile --compile-batches 8,4"
  DA+=" --steps lean --variants= --no-profile --repeats 2"
  for on in 0 1; do
    run_decode "stream_$on" "${D1:-200}" PRUNEPATH_ROUTE_STREAM_IN_COMPILE=$on
  done
elif [ "${STAGE:-ops}" = "ops" ]; then
  echo "== tests $(el) s"
  timeout "${TT:-200}" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton.py \
    tests/test_router_routed_ffn.py tests/test_decode.py \
    -k "router_routed_ffn or fused_routing or routing_decodes" 2>&1 | tail -4
  echo "== sweep $(el) s"
  timeout "${ST:-200}" python3 bench/ops_gpu.py --backends triton --shapes 4096x14336 --experts 64 \
    --tokens 1 --sparsities 0.5 --no-route --sweep --sweep-only --sweep-cases 1:0.5,1:0.75,1:0.0 \
    --sweep-variants "${SV:-default,s1_d32_n128,s1_d32_n256,s1_d16_n256,s1_d16_n128,s2_d32_n128,s2_d64_n128,s4_d64}" \
    --json "$OUT/sweep.json" 2>&1 | grep -v Warning | tail -4
  echo "== route+ffn $(el) s"
  timeout "${RT:-120}" python3 bench/ops_gpu.py --backends triton --shapes 4096x14336 --experts 64 \
    --tokens 1,2 --sparsities 0.5 --no-route --route-ffn --json "$OUT/route_ffn.json" 2>&1 \
    | grep -E "^\{" | tail -6
else
  DA="--models llama3-8b --batches 1 --sparsities 0.5,0.75 --modes compile --compile-batches 1"
  DA+=" --steps lean --variants= --no-profile --repeats 2 --packed-down --mask-source logits"
  run_decode split "${D1:-170}" X=0
  EXTRA="--fuse-routing on" run_decode up "${D2:-170}" PRUNEPATH_TRITON_ROUTE_IN_UP=1
  if [ -n "${B48:-}" ]; then  # compiled batch 8 / 4 at 50%: the decoder times both FFN paths
    DA="--models llama3-8b --batches 8,4 --sparsities 0.5 --modes compile --compile-batches 8,4"
    DA+=" --steps lean --variants= --no-profile --repeats 2"
    run_decode b48 "$B48" X=0
  fi
  if [ -n "${T2:-}" ]; then
    run_decode split_t2 "${D3:-125}" PRUNEPATH_TRITON_FFN_T2="$T2"
    EXTRA="--fuse-routing on" run_decode up_t2 "${D4:-125}" PRUNEPATH_TRITON_ROUTE_IN_UP=1 \
      PRUNEPATH_TRITON_FFN_T2="$T2"
  fi
fi
echo "== end $(el) s"
