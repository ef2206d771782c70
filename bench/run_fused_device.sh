#!/usr/bin/env bash
# One device-machine call that decides the Triton routed FFN's T <= 2 mode (FFNConfig.fused,
# session 17: built and tested under the CPU interpreter, not yet timed on a GPU):
#
#   run(command="bash bench/run_fused_device.sh", carry=[".whl"], timeout_s=600)
#
# 1. GPU tests of the fused configs and of routing in the fused kernel (tests/test_triton.py).
# 2. T=1 sweep, Llama-3-8B FFN shape (4096 x 14336, E=64, packed W_down^T), at 0.5 / 0.75 / 0
#    sparsity: the current default, the compacted two-phase config and the fused variants
#    (bench/ops_gpu.py --sweep; names fused*, fused_sums_*) -> $OUT/sweep.json.
# 3. Routing + FFN at T = 1 and 2 as today's two ops, with the fused FFN, and as one fused kernel
#    that routes in its prologue (launch.router_routed_ffn) -> $OUT/route_ffn.json.
# 4. The fused variant with the least time at 0.5 + 0.75 -> $OUT/best_fused.json (its fields as
#    JSON, for PRUNEPATH_TRITON_FFN_T2); the decodes with it: bench/run_fused_decode_device.sh.
# Time limits per stage: TT (tests, 120 s), ST (sweep, 230), RT (routing, 60).
# .whl must hold transformers==5.23.0 (see bench/run_decode_device.sh).
set -uo pipefail
. bench/device_env.sh
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
echo "== tests $(el) s"
timeout "${TT:-120}" python3 -m pytest -q -x -n 8 tests/test_triton.py \
  tests/test_router_routed_ffn.py tests/test_decode.py \
  -k "${TK:-fused or up_programs_loop or router_routed_ffn}" \
  2>&1 | tail -4
echo "== sweep $(el) s"
VARIANTS=default,compact,fused,fused_n32,fused_p1,fused_p3,fused_p4,fused_k128,fused_k512,fused_d64
VARIANTS+=,fused_d256,fused_st2,fused_st4,fused_w8,fused_w8_p1,fused_n32_p1,fused_nopdl,fused_sums_n8
VARIANTS+=,fused_sums_n8_t1,fused_sums_n16,fused_sums_n4,fused_sums_n8_p4,fused_sums_n8_w8
timeout "${ST:-230}" python3 bench/ops_gpu.py --backends triton --shapes 4096x14336 --experts 64 \
  --tokens 1 --sparsities 0.5 --no-route --sweep --sweep-only --sweep-cases 1:0.5,1:0.75,1:0.0 \
  --sweep-variants "${SV:-$VARIANTS}" --json "$OUT/sweep.json" 2>&1 | grep -v Warning | tail -4
echo "== pick $(el) s"
BEST=$(python3 - "$OUT/sweep.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["sweep"]
times, cfgs = {}, {}
for run in runs:
    for r in run["results"]:
        if isinstance(r["ms"], float):
            times.setdefault(r["name"], []).append(r["ms"])
            cfgs[r["name"]] = r["cfg"]
for name, v in sorted(times.items(), key=lambda kv: sum(kv[1][:2])):
    print(f"{name:22s}", " ".join(f"{1e3 * t:6.1f}" for t in v), "us", file=sys.stderr)
fused = {k: v for k, v in times.items() if k.startswith("fused") and len(v) >= 2}
best = min(fused, key=lambda k: sum(fused[k][:2]))  # 0.5 + 0.75 sparsity
keep = ("fused", "block_t", "up_block_n", "up_block_k", "down_block_d", "up_programs",
        "num_stages", "num_warps", "pdl")
print(json.dumps({k: cfgs[best][k] for k in keep}))
PY
)
echo "best fused: $BEST"
echo "== routing in the fused kernel $(el) s"
PRUNEPATH_TRITON_FFN_T2="$BEST" timeout "${RT:-60}" python3 bench/ops_gpu.py --backends triton \
  --shapes 4096x14336 --experts 64 --tokens 1,2 --sparsities 0.5 --no-route --sweep-only \
  --route-ffn --json "$OUT/route_ffn.json" 2>&1 | grep '"budget"' | cut -c1-400
echo "$BEST" > "$OUT/best_fused.json"
echo "== end $(el) s"
