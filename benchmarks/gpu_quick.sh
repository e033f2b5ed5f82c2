#!/usr/bin/env bash
# The short GPU run, at most five minutes, from the repository root on a CUDA machine without
# network (gpu_check.sh is the full suite):
#
#     bash benchmarks/gpu_quick.sh        # results in $OUT (default benchmarks/results/latest)
#
# Writes these 7 files into $OUT, nothing else and no folder, whatever is stopped or killed:
# env.txt (GPU, driver, versions, the install and its import check); tests.log (the CUDA-only
# tests of the kernels' test files, those of the paths no GPU has run first, without the
# autotuning ones); warm.log (a --tiny run of the runner beside the tests, which compiles the
# kernels the measurements launch into Triton's on-disk cache, shared by every process);
# quick.json and quick.log (benchmarks/run.py, the benchmarks' runner, within this script's
# budget: every measurement, saved as it is made); summary.md (benchmarks/render.py, the
# benchmarks' renderer: every part's status, and its tables); tuning.json (benchmarks/tuning.py:
# the table backend="auto" reads, for fastclip/tuning.json).
#
# First the install is checked: one Python that imports what the run needs. If it fails,
# summary.md says so in one line and the script stops there (exit 1).
#
# Then each part that never ran on a GPU runs in a runner process of its own, under a hard
# limit (timeout: SIGINT, then SIGKILL 5 s later): a blocking CUDA call that SIGALRM cannot
# interrupt, or a sticky CUDA error that poisons a process, costs that part alone. The parts
# earlier runs measured share one process. Every process adds its parts to one quick.json
# (--merge); render.py gives each part that its process left unfinished the status that
# explains it (stopped, killed, not reached, skipped), in the JSON too.
#
# Budget, in seconds: BUDGET_S (285) in all, so that the run ends within five minutes. Each step
# runs under its limit, capped by what is left of BUDGET_S less RESERVE_S and the SIGKILL's grace,
# so the script reaches its summary and cleanup within BUDGET_S even if every step hangs; a
# process with less than MIN_PROCESS_S left is skipped. A process's limit is its parts' limits
# (run.py's table, and the basis of their estimates) plus STARTUP_S for Python, torch and
# CUDA to start. Estimates, not measurements:
#
#   | step                        | limit                   | estimate | how                      |
#   |-----------------------------|-------------------------|---------:|--------------------------|
#   | facts, install, import      | 10, 60, 60 (rarely hit) |       10 | pip install -e; one      |
#   | check                       |                         |          | Python importing the run |
#   | CUDA tests                  | TESTS_LIMIT_S 60        |       60 | 118 tests, most at N <=  |
#   |                             |                         |          | 4,096 with a float64 CPU |
#   |                             |                         |          | reference, ~0.8 s each   |
#   |                             |                         |          | (the last run: 89 in     |
#   |                             |                         |          | 75 s): the limit stops   |
#   |                             |                         |          | the last ~40, of paths   |
#   |                             |                         |          | earlier runs passed      |
#   | compiling run (--tiny)      | WARM_WAIT_S 5 more      |        5 | beside the tests: ~25    |
#   |                             |                         |          | kernels, ~3 s each (g)   |
#   | process: cublas             | 10 + 4                  |        7 | part estimate + 4 to     |
#   | process: contrastive        | 28 + 4                  |       12 | start each process       |
#   | process: siglip             | 28 + 4                  |       13 |                          |
#   | process: confident          | 10 + 4                  |        6 |                          |
#   | process: graphs             | 6 + 4                   |        6 |                          |
#   | process: large              | 25 + 4                  |       29 |                          |
#   | process: block-configs      | 15 + 4                  |        8 |                          |
#   | process: tma                | 10 + 4                  |        8 |                          |
#   | process: bandwidth,         | 6 + 10 + 6 + 22 + 4     |       32 |                          |
#   | retrieval, projection,      |                         |          |                          |
#   | compile                     |                         |          |                          |
#   | summary, tuning, cleanup    | RESERVE_S 5             |        1 |                          |
#   | total                       | 292 (setup at its       |      197 |                          |
#   |                             | estimate)               |          |                          |
#
# A CPU rehearses the whole script (tests/test_gpu_quick.py does, in CI): TRITON_INTERPRET=1
# QUICK_ARGS=--tiny SKIP_INSTALL=1 (the package already installed); its times mean nothing and
# tuning.py declines to write a table. QUICK_PROCESSES replaces the list of processes below
# ("parts:limit ..."), TESTS_LIMIT_S=0 skips the tests, WARM_PARTS= the compiling run.
set -u
export PYTHONUNBUFFERED=1 FASTCLIP_AUTOTUNE=0 PYTHONPATH=benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/results/latest}
BUDGET_S=${BUDGET_S:-285}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-60}
WARM_WAIT_S=${WARM_WAIT_S:-5}
STARTUP_S=${STARTUP_S:-4}  # Python, torch and CUDA starting, per process (Triton caches on disk)
KILL_AFTER_S=5  # SIGKILL this long after a limit's SIGINT
RESERVE_S=5  # kept for the summary (3 s at most), tuning.json (2) and the cleanup
MIN_PROCESS_S=$((STARTUP_S + 3))  # 3: the runner's shortest part
# Extra arguments for every runner process ("--tiny" rehearses on a CPU).
QUICK_ARGS=${QUICK_ARGS:-}
# The paths no GPU has run first (the persistent kernels, the bounded-block backward, TMA, host
# syncs), then the others.
TESTS=()
for file in tests/test_persistent.py tests/test_losses.py tests/test_contrastive.py tests/test_siglip.py \
    tests/test_host_sync.py tests/test_precision.py tests/test_similarity.py tests/test_projection.py; do
    [ -f "$file" ] && TESTS+=("$file")
done
# The kernels the measurements launch, in the order they need them.
WARM_PARTS=${WARM_PARTS-contrastive,siglip,block-configs,tma,retrieval,projection,bandwidth}
# Runner processes, in order: comma-separated parts and the process's limit (the parts' limits
# in run.py plus STARTUP_S). Every part that never ran on a GPU has its own.
PROCESSES=(
    cublas:14
    contrastive:32
    siglip:32
    confident:14
    graphs:10
    large:29
    block-configs:19
    tma:14
    bandwidth,retrieval,projection,compile:48
)
[ -n "${QUICK_PROCESSES:-}" ] && read -ra PROCESSES <<< "$QUICK_PROCESSES"

start=$SECONDS
mkdir -p "$OUT"
FILES=(env.txt tests.log warm.log quick.json quick.log summary.md tuning.json)
for file in "${FILES[@]}"; do rm -f "$OUT/$file"; done
rm -f "$OUT"/*.partial
WORK=$(mktemp -d)  # the compiling run's JSON and the import check's output: not for $OUT
cleanup() {
    rm -f "$OUT"/*.partial
    rm -rf "$WORK"
}
trap cleanup EXIT

# Seconds a step may run: its limit ($1), or what is left of the budget less the reserve and a
# SIGKILL's grace if that is less; 0 when nothing is left.
cap() {
    local left=$((BUDGET_S - RESERVE_S - KILL_AFTER_S - (SECONDS - start)))
    local limit=$(($1 < left ? $1 : left))
    echo $((limit > 0 ? limit : 0))
}

# $1 (a limit in seconds) and a command: run it under that limit.
limited() {
    local limit=$1
    shift
    [ "$limit" -gt 0 ] || return 124
    timeout --signal=INT --kill-after="$KILL_AFTER_S" "$limit" "$@"
}

# ---- facts, install, import check ------------------------------------------------------------
{
    date -u
    if command -v nvidia-smi > /dev/null; then
        limited "$(cap 10)" nvidia-smi --format=csv \
            --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem
    else
        echo "nvidia-smi: not found"
    fi
    if [ "${SKIP_INSTALL:-0}" = 1 ]; then
        echo "--- install skipped (SKIP_INSTALL=1)"
    else
        echo "--- pip install --no-deps --no-build-isolation --no-index -e ."
        limited "$(cap 60)" python -m pip install --no-deps --no-build-isolation --no-index \
            --disable-pip-version-check -e .
        echo "install exit: $?"
    fi
    echo "--- import check"
} > "$OUT/env.txt" 2>&1

CHECK="import sys, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(sys.version)
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, gpu)
import pytest, fastclip, fastclip.costs, fastclip.backends, fastclip.reference
import fastclip.kernels.contrastive, fastclip.kernels.siglip, fastclip.kernels.similarity
import fastclip.kernels.projection, run, render, tuning, cuda_only
print('fastclip', fastclip.__file__)"
limited "$(cap 60)" python -c "$CHECK" > "$WORK/check.log" 2>&1
check_rc=$?
cat "$WORK/check.log" >> "$OUT/env.txt"
if [ "$check_rc" != 0 ]; then
    why=$(grep -v '^[[:space:]]*$' "$WORK/check.log" | tail -n 1)
    [ "$check_rc" = 124 ] && why="timed out"
    {
        printf '# fastclip quick GPU run: not run\n\n'
        printf -- '- The install check failed (exit %s): %s\n' "$check_rc" "$why"
        printf -- '- See env.txt. Nothing else ran.\n'
    } > "$OUT/summary.md"
    cat "$OUT/summary.md"
    exit 1
fi
tail -n 2 "$WORK/check.log"

# ---- CUDA tests, and the compiling run beside them --------------------------------------------
warm=
if [ -n "$WARM_PARTS" ]; then
    python benchmarks/run.py --tiny $QUICK_ARGS --parts "$WARM_PARTS" \
        --out "$WORK/warm.json" > "$OUT/warm.log" 2>&1 &
    warm=$!
fi

limit=$(cap "$TESTS_LIMIT_S")
if [ "${#TESTS[@]}" = 0 ] || [ "$limit" = 0 ]; then
    tests_note="not run"
    echo "CUDA tests not run" > "$OUT/tests.log"
else
    echo "=== CUDA tests (limit $limit s): ${TESTS[*]}"
    limited "$limit" python -m pytest "${TESTS[@]}" -p cuda_only \
        -k "not autotuned and not autotuning_call" -q --durations=10 > "$OUT/tests.log" 2>&1
    tests_rc=$?
    case $tests_rc in
        0) tests_note="exit 0" ;;
        5) tests_note="exit 5: no CUDA test collected" ;;
        124 | 137) tests_note="exit $tests_rc: stopped at the $limit s limit" ;;
        *) tests_note="exit $tests_rc" ;;
    esac
    tail -n 3 "$OUT/tests.log"
fi

warm_note="compiling run: not run"
if [ -n "$warm" ]; then
    waited=0
    wait_s=$(cap "$WARM_WAIT_S")
    while kill -0 "$warm" 2> /dev/null && [ "$waited" -lt "$wait_s" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    warm_note="compiling run: finished"
    if kill -0 "$warm" 2> /dev/null; then
        kill -TERM "$warm"  # a background job ignores SIGINT
        for _ in 1 2 3; do kill -0 "$warm" 2> /dev/null && sleep 1; done
        kill -KILL "$warm" 2> /dev/null
        warm_note="compiling run: stopped $((SECONDS - start)) s in"
    fi
    wait "$warm" 2> /dev/null
fi

# ---- the runner, one process per group of parts ------------------------------------------------
processes=()  # render.py's --process arguments: parts, exit status, limit
for entry in "${PROCESSES[@]}"; do
    parts=${entry%:*}
    limit=$(cap "${entry##*:}")
    if [ "$limit" -lt "$MIN_PROCESS_S" ]; then
        echo "=== process: $parts skipped, $limit s of the budget left" | tee -a "$OUT/quick.log"
        processes+=(--process "$parts" skipped "${entry##*:}")
        continue
    fi
    echo "=== process: $parts (limit $limit s)" | tee -a "$OUT/quick.log"
    limited "$limit" python benchmarks/run.py $QUICK_ARGS --parts "$parts" --merge \
        --out "$OUT/quick.json" --budget $((limit - STARTUP_S)) 2>&1 | tee -a "$OUT/quick.log"
    processes+=(--process "$parts" "${PIPESTATUS[0]}" "$limit")
done

# ---- summary, tuning table, cleanup -------------------------------------------------------------
notes=(--note "test step: $tests_note; $warm_note" --note "wall time: $((SECONDS - start)) s")
timeout 3 python benchmarks/render.py "$OUT/quick.json" --tests "$OUT/tests.log" --no-plot \
    ${processes[@]+"${processes[@]}"} "${notes[@]}" --out "$OUT"
summary_rc=$?
if [ "$summary_rc" != 0 ]; then
    printf '# fastclip quick GPU run: the summary failed (exit %s)\n\n- CUDA tests: %s; %s\n' \
        "$summary_rc" "$tests_note" "$warm_note" > "$OUT/summary.md"
fi
if [ -s "$OUT/quick.json" ]; then
    timeout 2 python benchmarks/tuning.py "$OUT/quick.json" --out "$OUT/tuning.json"
fi
cat "$OUT/summary.md"
exit "$summary_rc"
