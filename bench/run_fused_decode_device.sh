#!/usr/bin/env bash
# One device-machine call: compiled B=1 Llama-3-8B decode with the routed FFN's T <= 2 modes,
# after bench/run_fused_device.sh picked the best one-launch variant:
#
#   run(command="BEST='<best_fused.json>' bash bench/run_fused_decode_device.sh",
#       carry=[".whl"], timeout_s=600)
#
# BEST: FFNConfig fields as JSON (run_fused_device.sh's $OUT/best_fused.json; default: the
# base fused config). Every run sets the routers' logits so the real routing picks k of 64
# experts (bench/decode.py --mask-source logits: LogitInjector; no mask-replacing kernel),
# W_down packed, 0.5 and 0.75 sparsity, then:
#   1. split:  router_route + routed_ffn, today's T <= 2 config        -> $OUT/dec_split
#   2. fused:  router_route + the one-launch routed FFN (BEST)         -> $OUT/dec_fused
#   3. fusedroute: the routing inside the one-launch kernel (BEST,
#      Decoder(fuse_routing=True): prunepath.ops.router_routed_ffn)   -> $OUT/dec_fusedroute
# each with its own dense row (same process). Limits: D1, D2, D3 seconds (175 each).
# .whl must hold transformers==5.23.0 (see bench/run_decode_device.sh).
set -uo pipefail
. bench/device_env.sh
BEST=${BEST:-'{"fused": true, "up_block_n": 16, "up_programs": 0}'}
echo "best fused: $BEST"
DA="--models llama3-8b --batches 1 --sparsities 0.5,0.75 --modes compile --compile-batches 1"
DA+=" --steps lean --variants= --no-profile --repeats 2 --packed-down --mask-source logits"
run_decode split "${D1:-175}" X=0
run_decode fused "${D2:-175}" PRUNEPATH_TRITON_FFN_T2="$BEST"
EXTRA="--fuse-routing on" run_decode fusedroute "${D3:-175}" PRUNEPATH_TRITON_FFN_T2="$BEST"
echo "== end $(el) s"
