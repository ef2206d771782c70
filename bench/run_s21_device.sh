#!/usr/bin/env bash
# Device-machine calls of session 21 (carry=[".whl"]):
#
#   run(command="STAGE=micro bash bench/run_s21_device.sh", carry=[".whl"], timeout_s=300)
#   run(command="STAGE=b8 TM=1 bash bench/run_s21_device.sh", carry=[".whl"], timeout_s=400)
#   run(command="STAGE=b1 TM=1 bash bench/run_s21_device.sh", carry=[".whl"], timeout_s=330)
#
# STAGE=micro: one FFN layer at Llama-3-8B's shape, T = 1/2/4/8 (bench/masked_dense_gpu.py):
#   dense vs masked-dense FFN with the routing as router kernels (router_route + masked_act)
#   or inside the activation kernel with the router's projection in the up GEMM
#   (ops.router_masked_dense_ffn, weights stacked or not) -> $OUT/md.json; then the GPU tests
#   of the kernels (tests/test_masked_dense.py on CUDA).
# STAGE=b8: the micro bench (no tests), then compiled B=8 Llama-3-8B at 50% on the masked-dense
#   path (forced), the random routers' own masks (--mask-source router), with the FFNs stacked
#   (Decoder(stack_ffn=True): one GEMM for W_gate, W_up and the router; the default on a GPU)
#   and not -> $OUT/dec_b8_stack, $OUT/dec_b8_nostack.
# STAGE=b1 (TM=1 skips the micro bench): compiled B=1 Llama-3-8B at 50 / 75% as session 20
#   (packed W_down, logit-controlled masks) with Decoder(stack_ffn=$STACK, default on)
#   -> $OUT/dec_b1_stack_on; then the GPU tests of test_masked_dense / test_stacked_ffn.
set -uo pipefail
. bench/device_env.sh
echo "== micro $(el) s"
timeout "${TM:-150}" python3 bench/masked_dense_gpu.py --tokens 1,2,4,8 --out "$OUT/md.json" 2>&1 | tail -8
if [ "${STAGE:-micro}" = "micro" ]; then
  echo "== tests $(el) s"
  timeout "${TT:-100}" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_masked_dense.py 2>&1 | tail -3
elif [ "$STAGE" = "b8" ]; then
  DA="--models llama3-8b --batches 8 --sparsities 0.5 --modes compile --compile-batches 8"
  DA+=" --steps lean --variants= --no-profile --repeats 2 --ffn-path dense --mask-source router"
  DA0="$DA"
  DA="$DA0 --stack-ffn on"; run_decode b8_stack "${D1:-150}"
  DA="$DA0 --stack-ffn off"; run_decode b8_nostack "${D1:-150}"
elif [ "$STAGE" = "b1" ]; then
  DA="--models llama3-8b --batches 1 --sparsities 0.5,0.75 --modes compile --compile-batches 1"
  DA+=" --steps lean --variants= --no-profile --repeats 2 --packed-down --mask-source logits"
  DA+=" --stack-ffn ${STACK:-on}"
  run_decode b1_stack_${STACK:-on} "${D1:-200}"
  echo "== tests $(el) s"
  timeout "${TT:-100}" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_masked_dense.py \
    tests/test_stacked_ffn.py 2>&1 | tail -2
fi
echo "== end $(el) s"
