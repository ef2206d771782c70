# Sourced by bench/run_s20_device.sh (not run by itself): the
# device machine's setup -- transformers 5.23.0 from .whl into /tmp/site, the environment for
# the Triton backend, $OUT, an elapsed-seconds helper -- and run_decode, one bench/decode.py
# gpu run under a time limit.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PRUNEPATH_REQUIRE_GPU_BACKENDS=triton PRUNEPATH_CACHE_DIR=/tmp/ppc \
  PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader

# run_decode NAME LIMIT [VAR=value ...]: bench/decode.py gpu $DA with those variables,
# at most LIMIT seconds (no new configuration in the last 30) -> $OUT/dec_NAME
run_decode() {
  local name=$1 limit=$2; shift 2
  echo "== $name $(el) s"
  env "$@" timeout "$limit" python3 bench/decode.py gpu $DA --deadline $((limit - 30)) \
    --out "$OUT/dec_$name" 2>&1 | grep -E "llama|dense|independent|smollm|router|!!" | tail -8
}
