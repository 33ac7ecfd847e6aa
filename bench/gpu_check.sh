#!/usr/bin/env bash
# The five-minute GPU check: every figure megaret needs a GPU for, from one bare GPU machine (Python
# 3.12, torch 2.11 + CUDA 13, triton 3.6, no package index), into one JSON file.
#
# 1. Here (PyPI reachable), once per checkout:   bash bench/gpu_wheels.sh      -> .gpu_wheels/ (~9 MiB)
# 2. The device `run` tool, from the checkout's root:
#      command:   bash bench/gpu_check.sh
#      carry:     [".gpu_wheels"]
#      timeout_s: 420        (the check stops itself by ~300 s; the rest is margin for a hung stage)
#      then, here:  mkdir -p .gpu_autotune && tar -xf FILES_AT/gpu_autotune.tar -C .gpu_autotune
#                   (fla's autotuning results, ~100 KiB; carry [".gpu_wheels", ".gpu_autotune"] next time)
#    Results: $OUT/gpu_check.json (+ $OUT/gpu_check.log, the whole output); `stage.key=value` lines and
#    a closing `check.<stage>=<status>` block in the output tail. To rerun only some stages (keep
#    install: a machine idle for 30 s is handed back bare): bash bench/gpu_check.sh --only "install train"
#
#   bash bench/gpu_check.sh [--json PATH] [--budget SECONDS] [--only "STAGE ..."]
#   bash bench/gpu_check.sh --cpu-smoke [--json PATH]     every stage at toy size on the CPU (CI runs it:
#                                                         tests/test_gpu_check.py)
#
# Stages (bench/gpu_check.py has the details), most valuable first, each under its own limit:
#   install     the wheels of .gpu_wheels/ (pip --no-index --no-deps; the machine's triton serves fla)
#   train       python -m megaret.train: 6 bf16 steps, 1.3B widths, 4 layers, NCCL, adapters off
#   imports     versions, card and bf16 peak, every import, one fla kernel call      \
#   decoding    per-token latency at 1k and 16k, batch 1 and 8                       | one Python
#   retention   fla vs torch retention, Dk 256 / Dv 512, bf16, T 2048 and 16384      | process
#   throughput  RetNet (fla) vs Transformer (SDPA) tokens/s and MFU, T 2048 and 8192 /
#   pytest      pytest -m gpu (the launched GPU smoke included; GPU_CHECK_PYTEST="FILE ..." picks files)
# Autotuning: fla's kernels benchmark up to 48 configs each on their first call (30-40 s per kernel on
# an H100). Triton keeps each winner in TRITON_CACHE_DIR as a small *.autotune.json keyed on triton's
# version, the target (sm_90 for H100 and H200 alike), the kernel's source and its tuning key; the
# check starts from the results carried in .gpu_autotune/ and returns them all in $OUT/gpu_autotune.tar,
# so only the first check on a bare machine pays for the benchmarking (its JSON says which it was).
# The JSON is rewritten after every stage, so a run cut off anywhere still reports what finished.
# A process that overruns its budget is killed (`timeout`) and its unfinished stages recorded `killed`;
# stages that would start past the overall budget are recorded `skipped`.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
SMOKE=""
BUDGET=285
JSON=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE="--smoke" ;;
        --json) JSON=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$JSON" ]; then
    if [ -n "${OUT:-}" ]; then JSON=$OUT/gpu_check.json; else JSON=$REPO/runs/gpu_check/gpu_check.json; fi
fi
mkdir -p "$(dirname "$JSON")"
PY=${PYTHON:-python3}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
[ -z "$ONLY" ] && rm -f "$JSON"

export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/megaret-gpu-check-triton}
mkdir -p "$TRITON_CACHE_DIR"

# restore_autotune / save_autotune: only the autotuning results travel (compiled kernels are ~100x larger)
restore_autotune() {
    local n
    [ -d .gpu_autotune ] && cp -r .gpu_autotune/. "$TRITON_CACHE_DIR"/
    n=$(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l)
    record autotune ok "$n carried autotuning results in $TRITON_CACHE_DIR"
}
save_autotune() {
    local n
    [ -n "${OUT:-}" ] || return 0
    n=$(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tee /tmp/megaret-autotune.list | wc -l)
    (cd "$TRITON_CACHE_DIR" && tar -cf "$OUT/gpu_autotune.tar" -T /tmp/megaret-autotune.list)
    echo "== gpu_check: $n autotuning results -> \$OUT/gpu_autotune.tar"
}

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
record() { "$PY" bench/gpu_check.py --json "$JSON" $SMOKE --record "$1" --status "$2" --note "$3" "${@:4}"; }

install_wheels() {
    local t0 log w
    local wheels=()
    t0=$(date +%s)
    if [ -n "$SMOKE" ]; then
        record install skipped "--cpu-smoke checks this environment's packages"
        return
    fi
    for w in .gpu_wheels/*.whl; do
        case "$w" in
            */typing_extensions-*|*/packaging-*|*'*'*) ;;  # installed below only where older; no match
            *) wheels+=("$w") ;;
        esac
    done
    if [ ${#wheels[@]} -eq 0 ]; then
        record install fail "no wheels in .gpu_wheels/: run 'bash bench/gpu_wheels.sh' on the development machine and carry .gpu_wheels"
        return
    fi
    log=$(mktemp)
    # --no-deps: the machine has torch, triton, numpy, ... (fla-core's triton>=3.3 is its 3.6). The two
    # shared libraries pydantic and megatron-core need newer are installed only where older.
    if timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --root-user-action=ignore "${wheels[@]}" >"$log" 2>&1 \
        && timeout 30 "$PY" -m pip install -q --no-index --no-compile --no-cache-dir --root-user-action=ignore \
            --find-links .gpu_wheels "typing_extensions>=4.16" "packaging>=24.2" >>"$log" 2>&1; then
        record install ok "${#wheels[@]} wheels (+ typing_extensions, packaging where older) in $(( $(date +%s) - t0 )) s"
    else
        cat "$log"
        record install fail "pip: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-300)"
    fi
    rm -f "$log"
}

# run_group "STAGES" CAP RESERVE: one Python process for STAGES, with a budget of at most CAP seconds
# and never eating into RESERVE seconds kept for the groups after it.
run_group() {
    local s left budget rc
    local stages=()
    for s in $1; do wanted "$s" && stages+=("$s"); done
    [ ${#stages[@]} -eq 0 ] && return
    left=$((DEADLINE - $(date +%s)))
    budget=$((left - $3 < $2 ? left - $3 : $2))
    if [ "$budget" -lt 15 ]; then
        for s in "${stages[@]}"; do record "$s" skipped "out of time: ${left} s of the ${BUDGET} s budget left"; done
        return
    fi
    echo "== gpu_check: ${stages[*]} (budget ${budget} s, $((DEADLINE - $(date +%s))) s left overall)"
    timeout -k 5 $((budget + 20)) "$PY" bench/gpu_check.py --json "$JSON" $SMOKE --budget "$budget" "${stages[@]}"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        for s in "${stages[@]}"; do
            record "$s" killed "its process ended with status $rc (124/137: the hard timeout of $((budget + 20)) s)" \
                --if-absent
        done
    fi
}

run_check() {
    echo "== gpu_check: $([ -n "$SMOKE" ] && echo "cpu smoke" || echo gpu) -> $JSON (budget ${BUDGET} s)"
    wanted install && install_wheels
    [ -z "$SMOKE" ] && restore_autotune
    # the trainer first: on a bare machine its first step compiles and autotunes fla's kernels
    # (measured on an H100: 6 steps fit 150 s), which the retention and throughput stages then reuse
    run_group "train" 150 100
    run_group "imports decoding retention throughput" 170 20
    run_group "pytest" 90 0
    [ -z "$SMOKE" ] && save_autotune
    "$PY" bench/gpu_check.py --json "$JSON" --summary --total-seconds $(( $(date +%s) - START ))
}

if [ -n "${OUT:-}" ] && [ -z "$SMOKE" ]; then  # the device run: the whole output comes back as a file too
    run_check 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
run_check
