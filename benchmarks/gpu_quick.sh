#!/usr/bin/env bash
# The short GPU run, at most five minutes, from the repository root on a CUDA machine without
# network (gpu_check.sh is the full suite):
#
#     bash benchmarks/gpu_quick.sh        # results in $OUT (default benchmarks/results/latest)
#
# Writes into $OUT: env.txt (GPU, driver, versions, install log); tests.log (the CUDA-only tests
# of the kernels' test files, without the autotuning ones); quick.json and quick.log
# (benchmarks/gpu_quick.py: every measurement, saved as it is made); summary.md
# (benchmarks/quick_summary.py); tuning.json (benchmarks/tuning.py: the table backend="auto"
# reads, for fastclip/tuning.json); warm.json and warm.log (a --tiny run of gpu_quick.py beside
# the tests, which compiles the kernels the measurements launch into Triton's on-disk cache).
#
# Budget, in seconds: BUDGET_S (285) in all, so that the run ends within five minutes; each step
# runs under a limit. Estimates, not measurements (the basis of gpu_quick.py's is in its
# docstring, from the 2026-11-27 H200 run's rates and fastclip.costs):
#
#   | step                        | limit                 | estimate | how                        |
#   |-----------------------------|-----------------------|---------:|----------------------------|
#   | install, facts              | -                     |       10 | pip install -e, one import |
#   | CUDA tests                  | TESTS_LIMIT_S 75 (+10)|       75 | 89 tests, most at N <=     |
#   |                             |                       |          | 4,096 with a float64 CPU   |
#   |                             |                       |          | reference (~1 s each): the |
#   |                             |                       |          | limit may stop the last    |
#   |                             |                       |          | file, test_siglip.py       |
#   | compiling run (--tiny)      | WARM_WAIT_S 10 more   |        0 | beside the tests: ~25      |
#   |                             |                       |          | kernels, ~3 s each (guess) |
#   | gpu_quick.py                | what is left - 10     |       88 | its parts' limits sum to   |
#   |                             | (~170)                |          | 224, its estimates to 87;  |
#   |                             |                       |          | +5 to start                |
#   | summary, tuning             | -                     |        2 |                            |
#   | total                       | 285                   |      175 |                            |
set -u
export PYTHONUNBUFFERED=1 FASTCLIP_AUTOTUNE=0
OUT=${OUT:-benchmarks/results/latest}
BUDGET_S=${BUDGET_S:-285}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-75}
WARM_WAIT_S=${WARM_WAIT_S:-10}
# Extra arguments for both gpu_quick.py runs: "--tiny" with TRITON_INTERPRET=1 rehearses the
# whole script on a CPU (its times mean nothing; tuning.py then declines to write a table).
QUICK_ARGS=${QUICK_ARGS:-}
TESTS=(tests/test_similarity.py tests/test_projection.py tests/test_precision.py
    tests/test_contrastive.py tests/test_siglip.py)
# The kernels the measurements launch, in the order they need them.
WARM_PARTS=contrastive,siglip,retrieval,projection,block-configs,tma,bandwidth
start=$SECONDS
mkdir -p "$OUT"
rm -f "$OUT"/{env.txt,tests.log,quick.json,quick.log,summary.md,tuning.json,warm.json,warm.log}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv
    python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, \
'CUDA', torch.version.cuda, 'triton', triton.__version__, '|', torch.cuda.get_device_name())"
    echo "--- pip install --no-deps --no-build-isolation --no-index -e ."
    python -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .
    echo "install exit: $?"
} > "$OUT/env.txt" 2>&1

python benchmarks/gpu_quick.py --tiny $QUICK_ARGS --parts "$WARM_PARTS" --out "$OUT/warm.json" \
    > "$OUT/warm.log" 2>&1 &
warm=$!

echo "=== CUDA tests (limit $TESTS_LIMIT_S s)"
PYTHONPATH=benchmarks timeout --signal=INT --kill-after=10 "$TESTS_LIMIT_S" \
    python -m pytest "${TESTS[@]}" -p cuda_only -k "not autotuned and not autotuning_call" \
    -q --durations=10 > "$OUT/tests.log" 2>&1
tests_rc=$?
[ "$tests_rc" = 124 ] && tests_rc="124, stopped at its $TESTS_LIMIT_S s limit"
tail -n 3 "$OUT/tests.log"

waited=0
while kill -0 "$warm" 2>/dev/null && [ "$waited" -lt "$WARM_WAIT_S" ]; do
    sleep 1
    waited=$((waited + 1))
done
warm_note="compiling run: finished"
if kill -0 "$warm" 2>/dev/null; then
    kill -TERM "$warm"  # a background job ignores SIGINT
    warm_note="compiling run: stopped $((SECONDS - start)) s in"
fi
wait "$warm"

left=$((BUDGET_S - (SECONDS - start) - 10))
echo "=== gpu_quick.py (budget $left s)"
timeout --signal=INT --kill-after=10 $((left + 20)) \
    python benchmarks/gpu_quick.py $QUICK_ARGS --out "$OUT/quick.json" --budget "$left" 2>&1 \
    | tee "$OUT/quick.log"
quick_rc=${PIPESTATUS[0]}

notes="tests: exit $tests_rc; $warm_note; gpu_quick.py: exit $quick_rc"
if [ -s "$OUT/quick.json" ]; then
    python benchmarks/quick_summary.py "$OUT/quick.json" --tests "$OUT/tests.log" \
        --note "$notes" --note "wall time: $((SECONDS - start)) s" --out "$OUT/summary.md"
    python benchmarks/tuning.py "$OUT/quick.json" --out "$OUT/tuning.json"
else
    printf '# fastclip quick GPU run: no results\n\n- %s\n' "$notes" > "$OUT/summary.md"
fi
cat "$OUT/summary.md"
