#!/usr/bin/env bash
# The one command to run on a GPU machine (no network needed):
#   bench/gpu_check.sh OUTDIR          build the extension in place, run the whole test suite on CUDA, run the
#                                      GPU benchmarks, write OUTDIR/report.md and OUTDIR/report.json
#   bench/gpu_check.sh OUTDIR --dry    the same steps that need no GPU (CI runs this): build, a fast test
#                                      subset, the benchmarks in smoke mode, the report
# Each stage is time-boxed so the whole run stays within 10 minutes; a stage that runs out of time is interrupted
# (SIGINT) and still reports what finished (exit code 124 in stages.txt); the report is written whatever fails.
# Extra wheels (torch-rim for the parity tests, ...) are installed from ./.whl when that folder exists.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [--dry]}
MODE=${2:-full}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")"; do
    [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break
  done
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
START=$(date +%s)
status() { echo "$1=$2" >> "$OUT/stages.txt"; echo "== $1: $2 ($(( $(date +%s) - START )) s)"; }
: > "$OUT/stages.txt"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/rim_fast_site .whl/*.whl \
    && export PYTHONPATH=/tmp/rim_fast_site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import sys; sys.path.insert(0, '.'); from bench.common import machine_line; print(machine_line())" \
  | tee "$OUT/machine.txt"

# 1. build the extension in place (CUDA when nvcc is found)
( time timeout 240 $PY setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1
rc=$?; status build "$rc"
grep -m2 -E "nvcc .*sm_90" "$OUT/build.log" | cut -c1-300 || true
$PY -c "import rim_fast._C as c; print('extension:', c.__file__)" 2>&1 | tee -a "$OUT/build.log"

# 2. tests
if [ "$MODE" = "--dry" ]; then
  TESTS=(tests/test_ops_dispatch.py tests/test_update_step.py -k "not compile")
  TEST_LIMIT=300
else
  TESTS=(tests)
  TEST_LIMIT=330
  # the GPU machine has 16 cores and pytest-xdist: 6 workers of 2 threads each (the CPU half of the suite takes
  # about 4 min on one 2-core process)
  if $PY -c "import xdist" 2>/dev/null; then TESTS+=(-n "${RIM_FAST_TEST_WORKERS:-6}"); export OMP_NUM_THREADS=2; fi
fi
# SIGINT at the limit: pytest stops, still writes the junit report of what ran; SIGKILL 20 s later
timeout -s INT -k 20 "$TEST_LIMIT" $PY -m pytest "${TESTS[@]}" -q -rs -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
rc=$?; status tests "$rc"
tail -n 15 "$OUT/tests.log"

# 3. benchmarks
if [ "$MODE" = "--dry" ]; then
  export RIM_FAST_BENCH_SMOKE=1
  BENCH_LIMIT=240
else
  BENCH_LIMIT=$(( 560 - ($(date +%s) - START) ))
  [ "$BENCH_LIMIT" -lt 60 ] && BENCH_LIMIT=60
fi
unset OMP_NUM_THREADS
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
BENCH_START=$(date +%s)
# within 10 minutes: the gate kernels eager and graph-replayed (no per-case compiles), the update step, and
# the end-to-end predict of S1, S2, L2 for every provider (override with the RIM_FAST_BENCH_* variables)
if [ "$MODE" = "--dry" ]; then GATES_ENV=(); RIM_ENV=(RIM_FAST_BENCH_WORKLOADS=S1); else
  GATES_ENV=(RIM_FAST_BENCH_OPS=cell RIM_FAST_BENCH_PROVIDERS=reference,triton,reference_graph,triton_graph)
  RIM_ENV=(RIM_FAST_BENCH_WORKLOADS=${RIM_FAST_BENCH_WORKLOADS:-S1,S2,L2} RIM_FAST_BENCH_MODES=${RIM_FAST_BENCH_MODES:-predict}
           RIM_FAST_BENCH_ROUNDS=${RIM_FAST_BENCH_ROUNDS:-10})
fi
for b in gru_gates update_step; do
  left=$(( BENCH_LIMIT / 4 ))
  if [ "$b" = gru_gates ]; then envs=("${GATES_ENV[@]}"); else envs=(); fi
  env "${envs[@]}" timeout -s INT -k 20 "$left" $PY -m pytest "bench/bench_$b.py" -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_$b.json" > "$OUT/bench_$b.log" 2>&1
  status "bench_$b" "$?"
done
left=$(( BENCH_LIMIT - ($(date +%s) - BENCH_START) ))
[ "$left" -lt 30 ] && left=30
if [ -f bench/run.py ]; then
  env "${RIM_ENV[@]}" timeout -s INT -k 20 "$left" $PY -m bench.run --device "$DEVICE" --out "$OUT/rim" \
    > "$OUT/bench_rim.log" 2>&1
  status bench_rim "$?"
  tail -n 40 "$OUT/bench_rim.log"
fi

# 4. the report
$PY -m bench.gpu_report "$OUT" "$MODE"
status report "$?"
echo "total $(( $(date +%s) - START )) s"
# a failed stage fails the command (CI runs the dry mode), after the report is written
if grep -qv "=0$" "$OUT/stages.txt"; then
  echo "failed stages: $(grep -v '=0$' "$OUT/stages.txt" | tr '\n' ' ')"
  exit 1
fi
