#!/usr/bin/env bash
# Everything only a GPU can confirm, in one bounded run: the `cuda` tests, the benchmark, one report.
#
#   bash scripts/gpu_check.sh                            # on the GPU machine, from a fresh checkout
#   GPU_CHECK_OUT=/somewhere bash scripts/gpu_check.sh   # where the report and logs go (default runs/gpu_check)
#   GPU_CHECK_REHEARSE=1 bash scripts/gpu_check.sh       # every step on the CPU with tiny sizes (CI runs this)
#
# Steps, each timed and bounded with `timeout`; a failed step does not stop the ones after it:
#   env            creates or reuses the environment (scripts/env.sh); on a GPU machine whose python3 has a
#                  CUDA build of torch, that one instead of installing torch 2.14.1 from pip (see below)
#   cuda_tests     python -m pytest -m cuda tests (tests/test_cuda.py)
#   bench_train    ResNet-32 on a generated CIFAR-10 of the real size (50 000 / 10 000), 2 epochs, --amp and
#                  fp32, 1, 2 and 4 networks sharing the GPU (scripts/bench.py --what train)
#   bench_graft    ResNet-110: entropies, Grafter.graft, the file read alone, graft_layers (--what entropy graft)
#   bench_compile  one ResNet-32 training step: eager, torch.compile, its CUDA-graph mode (--what compile)
#   report         $GPU_CHECK_OUT/gpu_check.json and gpu_check.md (the tables for docs/performance.md), printed too
# The steps after env share a budget of GPU_CHECK_BUDGET_S seconds (default 420): no step runs past it.
# With torch already on the machine env takes a minute at most, so the whole check ends within 8 minutes.
# $GPU_CHECK_OUT holds only those two files and one log per step (8 files, no subfolders). The generated
# data, the rings' folders and the parts of the report go to $GPU_CHECK_WORK (default runs/gpu_check_work),
# kept, so a second run on the same machine does not write the 50 000 images again.
# Exit status: 0 when every step passed, 1 otherwise (after running all of them).
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE="${GPU_CHECK_REHEARSE:-0}"
OUT="${GPU_CHECK_OUT:-runs/gpu_check}"
WORK="${GPU_CHECK_WORK:-runs/gpu_check_work}"
# The step limits below are the GPU's; a rehearsal on a shared 2-core machine gets three times as long.
if [ "$REHEARSE" = 1 ]; then scale=3; else scale=1; fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-$((420 * scale))}"
ENV_LIMIT_S=900            # a bare machine with a registry installs torch: minutes, outside the budget
REPORT_S=30                # kept back from the budget for the report
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)" WORK="$(cd "$WORK" && pwd)"
# Nothing of an earlier run may pass for this one's.
rm -f "$OUT"/{env,cuda_tests,bench_train,bench_graft,bench_compile,report}.log "$OUT"/gpu_check.{json,md} \
    "$WORK"/bench_{train,graft,compile}.json "$WORK/cuda_tests.xml"
steps="$WORK/steps.tsv"
: > "$steps"
failed=0

say() { echo "[gpu_check] $*"; }

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in $OUT/NAME.log, at most LIMIT_S seconds and
# never past the budget's deadline; record "NAME<tab>status<tab>seconds<tab>limit" in $steps.
step() {
    local name="$1" limit="$2" log="$OUT/$1.log" left start seconds code status
    shift 2
    if [ -n "${deadline:-}" ]; then
        left=$((deadline - $(date +%s)))
        [ "$name" != report ] && left=$((left - REPORT_S))
        [ "$left" -lt "$limit" ] && limit="$left"
    fi
    if [ "$limit" -lt 5 ]; then
        say "$name: skipped, the ${BUDGET_S} s budget is spent" | tee "$log"
        printf '%s\tskipped\t0\t0\n' "$name" >> "$steps"
        failed=1
        return
    fi
    say "$name (at most $limit s) ..."
    start="$(date +%s.%N)"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    code=$?
    seconds="$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    case "$code" in
        0) status=ok ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $code)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" >> "$steps"
    say "$name: $status in $seconds s (log: $log)"
    if [ "$code" != 0 ]; then
        failed=1
        tail -n 12 "$log" | sed 's/^/    /'
    fi
}

# ---------------------------------------------------------------- the environment
# A GPU machine often comes with a CUDA build of torch in its python3 and no package registry. Then that
# python's virtual environment becomes the shared one (GRAFTING_VENV: env.sh only installs this checkout
# into .venv, no download); a python3 that is no virtual environment, or lacks pip, runs this checkout
# as it is (PYTHONPATH), as does any python3 with such a torch when the set-up fails.
machine_python="" machine_mode=""
if [ -z "${GRAFTING_VENV:-}" ] && [ "$REHEARSE" != 1 ] && [ ! -x "$HOME/.cache/filter-grafting/venv/bin/python" ]; then
    read -r machine_python machine_mode < <(timeout 120 python3 - <<'EOF' 2>/dev/null
import importlib.util, os, sys
if all(importlib.util.find_spec(name) for name in ("torch", "torchvision", "numpy", "tensorboard", "pytest")):
    import torch
    if torch.cuda.is_available():
        venv = sys.prefix != sys.base_prefix and os.access(os.path.join(sys.prefix, "bin", "python"), os.X_OK)
        tools = all(importlib.util.find_spec(name) for name in ("setuptools", "pip"))
        print(sys.executable, "venv" if venv and tools else "as-is")
EOF
)
fi
use_python_as_is() {  # this checkout, not installed, run by $machine_python as `python`
    # A wrapper, not a link: a virtual environment's python run through a link elsewhere loses its packages.
    mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexec "%s" "$@"\n' "$machine_python" > "$WORK/bin/python"
    chmod +x "$WORK/bin/python"
    export PATH="$WORK/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
check_env='import torch, grafting; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
if [ "$machine_mode" = as-is ]; then
    say "running this checkout with the machine's $machine_python as it is (PYTHONPATH)"
    use_python_as_is
    step env 60 python -c "$check_env"
else
    if [ "$machine_mode" = venv ]; then
        GRAFTING_VENV="$("$machine_python" -c 'import sys; print(sys.prefix)')"
        say "using the machine's torch environment $GRAFTING_VENV as the shared one (GRAFTING_VENV)"
        export GRAFTING_VENV PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # nothing to download
        ENV_LIMIT_S=60  # only this checkout to install
    fi
    step env "$ENV_LIMIT_S" bash -c "source scripts/env.sh && python -c '$check_env'"
    # shellcheck source=env.sh
    source scripts/env.sh >/dev/null 2>&1
    if ! python -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("grafting")))' \
            2>/dev/null; then
        if [ -n "$machine_python" ]; then
            say "the environment could not be set up: running this checkout with $machine_python as it is"
            use_python_as_is
        else
            say "the environment is not usable: the next steps will fail"
        fi
    fi
fi

deadline=$(( $(date +%s) + BUDGET_S ))

# ---------------------------------------------------------------- the steps
if [ "$REHEARSE" = 1 ]; then
    export GPU_CHECK_REHEARSE=1  # the cuda tests run on the CPU
    device=cpu
    train=(--model resnet20 --train-size 16 --test-size 16 --nets 2 --variants amp --ring-timeout 120
           -- --batch-size 16 --test-batch-size 16 --threads 1)
    graft=(--graft-model resnet20 --repeat 1)
    compiled=(--model resnet20 --compile-backend eager --compile-precision fp32 --compile-batch 4
              --compile-warmup 1 --compile-steps 1 --compile-modes eager reduce-overhead)
else
    device=cuda
    train=(--model resnet32 --train-size 50000 --test-size 10000 --nets 1 2 4 --variants amp fp32 --ring-timeout 100)
    graft=(--graft-model resnet110 --repeat 10)
    compiled=(--model resnet32 --compile-batch 128 --compile-warmup 3 --compile-steps 100)
fi
bench=(python scripts/bench.py --device "$device" --work "$WORK/bench")

step cuda_tests $((90 * scale)) python -m pytest -m cuda tests -q -rs -p no:cacheprovider \
    --basetemp "$WORK/pytest" --junitxml="$WORK/cuda_tests.xml"
step bench_train $((150 * scale)) "${bench[@]}" --what train --epochs 2 --json "$WORK/bench_train.json" "${train[@]}"
step bench_graft $((30 * scale)) "${bench[@]}" --what entropy graft --json "$WORK/bench_graft.json" "${graft[@]}"
step bench_compile $((120 * scale)) "${bench[@]}" --what compile --json "$WORK/bench_compile.json" "${compiled[@]}"
step report "$REPORT_S" python scripts/bench.py --device "$device" --report "$WORK/bench_train.json" \
    "$WORK/bench_graft.json" "$WORK/bench_compile.json" --steps "$steps" --junit "$WORK/cuda_tests.xml" \
    --json "$OUT/gpu_check.json" --markdown "$OUT/gpu_check.md"

[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
if [ "$failed" != 0 ]; then
    say "FAILED: see the steps above and the logs in $OUT"
    exit 1
fi
say "every step passed; report: $OUT/gpu_check.md and $OUT/gpu_check.json"
