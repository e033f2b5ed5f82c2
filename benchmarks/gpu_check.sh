#!/usr/bin/env bash
# The test suite and the benchmarks on a CUDA machine without network, from the repository root
# (gpu_quick.sh is the five-minute run: fixed tiles, each implementation stage by stage):
#
#     bash benchmarks/gpu_check.sh        # results in $OUT (default benchmarks/results/latest)
#
# Writes env.txt (GPU, driver, versions, install log), tests.log, bench.log, bench.json (every
# benchmark part merged, in the results format of benchmarks/results.py), summary.md and
# bench.png (benchmarks/render.py): six files. Wheels carried in wheels/
# (benchmarks/fetch_wheels.sh: tokenizers, tqdm, Pillow, webdataset, which the machine lacks) are installed first;
# without them the tests that need them skip.
#
# Budget, 10.5 minutes: each step runs under a time limit (seconds, overridable by the variables
# below) and the limits sum to 610 s, plus ~20 s for the install and the rendering. Measured on an
# H200 (benchmarks/results/2026-11-27-h200-partial): 32 loss-grid cases (one fastclip provider
# and eager), autotuning included, took 95 s.
#   tests 160 (the suite grew by the model, training and fine-tuning tests: an estimate);
#   losses, fastclip (blocks, blocks-mm, fused) + eager 200: twice the cases of that run, and
#   three implementations to tune (an estimate), each full step's gradients checked once per
#   shape; by default the targets' widths only (InfoNCE D=512, SigLIP D=768; BENCH_FILTER=""
#   runs both widths of both losses, about twice as long);
#   losses, torch.compile 50, the same cases (two references, each compiled twice: the first
#   shape, then with dynamic shapes);
#   InfoNCE at N = 2^20 90, blocks and blocks-mm (each tuned at N = 65536 first, whose bucket it
#   shares; a memory run and a timed one, ~12 s each by fastclip.costs);
#   similarity and top-k 50;
#   normalized projection 60: by default N = 32768 only (768->512 and 1024->768, fastclip, eager
#   and torch.compile, forward, backward and full: 18 cases); PROJECTION_FILTER="" runs
#   N = 8192 to 131072 as well, about twice as long.
# The benchmarks run in parts because pytest-benchmark writes its JSON only when a run ends: a
# part stopped at its limit loses only its own results. A failing step is recorded in
# summary.md, not fatal.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/latest}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-160}
GRID_LIMIT_S=${GRID_LIMIT_S:-200}
COMPILE_LIMIT_S=${COMPILE_LIMIT_S:-50}
LARGE_LIMIT_S=${LARGE_LIMIT_S:-90}
RETRIEVAL_LIMIT_S=${RETRIEVAL_LIMIT_S:-50}
PROJECTION_LIMIT_S=${PROJECTION_LIMIT_S:-60}
PROJECTION_FILTER=${PROJECTION_FILTER-N32768}
BENCH_FILTER=${BENCH_FILTER-contrastive-D512 or siglip-D768}
mkdir -p "$OUT"
rm -f "$OUT"/bench.json "$OUT"/part-*.json "$OUT/bench.log"

{
    date -u
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, \
'CUDA', torch.version.cuda, 'triton', triton.__version__, '|', torch.cuda.get_device_name())"
    python -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|matplotlib|numpy) '
    echo "--- pip install --no-deps --no-build-isolation -e ."
    python -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .
    echo "install exit: $?"
    if compgen -G "wheels/*.whl" > /dev/null; then
        echo "--- carried wheels"
        python -m pip install --no-deps --no-index --disable-pip-version-check wheels/*.whl
        echo "wheels exit: $?"
    fi
} > "$OUT/env.txt" 2>&1

notes=()
# step NAME LIMIT_S LOG COMMAND...: run COMMAND under a time limit, its output appended to LOG.
# SIGINT first, so that pytest still prints its summary. Adds "NAME: exit, seconds" to notes.
step() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc
    shift 3
    echo "=== $name (limit $limit s): $*" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && rc="124, stopped at its $limit s limit"
    notes+=("$name: exit $rc, $((SECONDS - start)) s")
}

: > "$OUT/tests.log"
step tests "$TESTS_LIMIT_S" "$OUT/tests.log" python -m pytest tests -q
notes[-1]+=" — $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 1 | tr -d '=')"

bench() {  # bench NAME LIMIT_S LABEL PYTEST_ARGS...: one part of the benchmarks, into NAME.json
    local name=$1 limit=$2 label=$3
    shift 3
    step "benchmarks, $label" "$limit" "$OUT/bench.log" python -m pytest "$@" \
        --benchmark-only -q --benchmark-json="$OUT/part-$name.json"
}
grid="test_gpu and not large${BENCH_FILTER:+ and ($BENCH_FILTER)}"
losses=(benchmarks/bench_contrastive.py benchmarks/bench_siglip.py)
bench losses "$GRID_LIMIT_S" "losses: fastclip and eager" "${losses[@]}" -k "$grid and not compile"
bench compile "$COMPILE_LIMIT_S" "losses: torch.compile" "${losses[@]}" -k "$grid and compile"
bench large "$LARGE_LIMIT_S" "InfoNCE at N = 2^20" benchmarks/bench_contrastive.py -k large_batch
bench retrieval "$RETRIEVAL_LIMIT_S" "similarity and top-k" benchmarks/bench_retrieval.py
bench projection "$PROJECTION_LIMIT_S" "normalized projection" benchmarks/bench_projection.py \
    -k "test_gpu${PROJECTION_FILTER:+ and ($PROJECTION_FILTER)}"

results=()
for f in "$OUT"/part-*.json; do
    if [ -s "$f" ]; then results+=("$f"); else rm -f "$f"; fi  # empty: the run saved nothing
done
args=()
for note in "${notes[@]}"; do args+=(--note "$note"); done
if [ "${#results[@]}" -gt 0 ]; then  # one bench.json: the machine returns few files
    python benchmarks/render.py "${results[@]}" --out "$OUT" --merge "$OUT/bench.json" "${args[@]}"
    rm -f "${results[@]}"
else
    printf '# fastclip benchmarks: no results\n\n' > "$OUT/summary.md"
    printf -- '- %s\n' "${notes[@]}" >> "$OUT/summary.md"
fi
cat "$OUT/summary.md"
