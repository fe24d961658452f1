#!/usr/bin/env bash
# The GPU acceptance run: one command, at most 7 minutes (420 s of stage time boxes), on a GPU machine without
# network. Run it in the repository root:
#   bench/gpu_check.sh OUTDIR [--groups W:MODE,...] [--providers P,...] [--no-tests]
#       preflight, build, the CUDA tests, the end-to-end GPU benchmarks (largest first), the report
#   bench/gpu_check.sh OUTDIR --dry    the same on the CPU (CI runs it): no GPU or .whl needed, the CUDA-marked
#                                      tests (on the CPU: the gate kernels under the Triton interpreter), the
#                                      benchmarks in smoke mode (tiny sizes), the report
#   bench/gpu_check.sh --plan [--dry]  print the stages' time boxes and what they are expected to do, and exit
# OUTDIR receives report.md, report.json, logs.tgz (every log and raw result) and, with matplotlib, speedups.png:
# at most 8 files, no folders. The work files live in a temporary folder (printed) that logs.tgz packs.
# --groups: the benchmark groups to run, in order (default: bench.common.PRIORITY); --providers (full mode): the eager
# pass's providers (default torch_rim,rim_fast,rim_fast_nographs,rim_fast_graphed; add rim_fast_cl,rim_fast_graphed_cl for
# the channels-last twins); --no-tests: skip the test stage (a second run, after a first one whose tests passed: its
# box goes to the benchmarks).
#
# Stages and their time boxes (full mode), from these estimates for the GPU machine (one H200, 16 cores, torch 2.11,
# Triton 3.6, nvcc 13.0, Python 3.12). A stage that reaches its box gets SIGINT (exit code 124 in the report) and
# still reports what finished; SIGKILL follows after a grace. The boxes sum to 420 s:
#   preflight  30  ~10 s: import torch and the test wheels (~5 s) beside `pytest -m cuda --collect-only` (7-15 s
#                  on our 2-core CPU), nvcc --version. Stops the run at once with a one-line reason.
#   build     120  python setup.py build_ext --inplace (ninja, MAX_JOBS=nproc; one arch: the visible GPU's). The .cu
#                  file is the long pole: ~80 s on our 2 cores, one nvcc process whatever the cores, so ~40-90 s
#                  there. A second run on the same machine: ninja has nothing to do (~10 s).
#   tests     150  pytest -m cuda on 8 xdist workers: 457 tests on the GPU machine at 786da15 (counted with CUDA faked:
#                  323 update step, 106 gate kernels, 22 RIM parity, 5 fit, 1 reduce-overhead compile; the preflight
#                  prints today's count). Most take well under a second; the long poles compile a tiny RIM (T<=3)
#                  with CUDA graphs, 20-60 s each: ~60-120 s.
#   conv_ab    45  (taken from the benchmarks' share, never leaving them under 120 s) bench/conv_ab.py: convolution
#                  variants on S2, L2 and S1 shapes in CUDA graphs (layout, bias fold, stride-2 padding), ~20 s
#   bench     100  + whatever the stages above leave unused (expected 80-190 s more: 180-290 s in all); ends
#                  REPORT+SLACK before 420 s. Two passes: first the eager providers (torch_rim, rim_fast,
#                  rim_fast_nographs, rim_fast_graphed: the step as fit(cuda_graphs=True) records it; the graphed
#                  ones record each graph in both layouts and keep the faster, the report's layout table gives
#                  both replay times, so the channels-last twins rim_fast_cl and rim_fast_graphed_cl are left to
#                  a second run's --providers) on S2, S1 and L2 predict, then S2, S1 and L2 train_step, leaving at
#                  least 90 s (the first GPU run's pass took 105 s of benchmarks, and 118 s more of CPU op counts,
#                  which CPU runs give now); then ("bench_compiled") torch_rim, rim_fast, rim_fast_graphed (train
#                  steps), rim_fast_compiled and torch_rim_compiled on S2, S1, L2 predict and S2 train_step. In a
#                  group each provider is built, warmed up and checked, then their timed calls
#                  interleaved round by round (at least 20 calls and 0.5 s each, at most 100 rounds), and one
#                  profiled call each; a group's cases end together, so a cut loses the group in flight. A compile
#                  of the unrolled T=10 loop costs 30-90 s cold; from Inductor's caches (the prewarm's) a compiled
#                  case costs ~15-30 s (Dynamo's trace, cache loads, CUDA-graph capture, its timed calls), an eager
#                  one ~5-15 s (Triton's first launches), so a group ~40-80 s warm, ~100-250 s cold (the first run's
#                  64 s did S2 and S1 predict). Expected in the compiled pass: S2 and S1 predict, perhaps L2
#                  predict; with cold caches S2 predict alone. The cut groups: a second run with --no-tests
#                  --groups (what the first did not reach; --providers adds the channels-last twins), on the same
#                  machine: ninja and Inductor's caches are warm then.
#   report     10  the report and the tarball (~1 s; rim_fast.info already ran beside the tests)
#   slack      10  the bench stage's exit after its SIGINT (the group in flight logs its cases as interrupted and
#                  exits at once; SIGKILL at 10 s)
# Concurrent, with no box of its own: the prewarm (bench.run --prewarm, nice 19, without the extension, which is
# being built) from the end of the preflight to the end of the tests (~100-240 s): the float64 references of the
# check (L2: ~1-2 s predict, ~3-6 s train_step, estimated in bench/bench_rim.py), saved for the bench stage, then
# one call of each compiled case in the bench's order, filling Inductor's on-disk caches (on our CPU: 38-58 s cold,
# 1.6-3.4 s cached; Inductor's caching of the user-defined Triton kernels in rim_fast's graph is untested on a GPU).
# Stopped (SIGINT) when the tests end, so the benchmarks have the GPU alone.
set -uo pipefail

OUT="" MODE=full PLAN=0 GROUPS_ARG="" PROVIDERS_ARG="" TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) MODE=dry ;;
    --plan) PLAN=1 ;;
    --no-tests) TESTS=0 ;;
    --groups) GROUPS_ARG=${2:?--groups needs W:MODE,...}; shift ;;
    --groups=*) GROUPS_ARG=${1#--groups=} ;;
    --providers) PROVIDERS_ARG=${2:?--providers needs P,...}; shift ;;
    --providers=*) PROVIDERS_ARG=${1#--providers=} ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done

if [ "$MODE" = full ]; then
  # the preflight's test collection loads torch, torch_rim and the tests from a cold disk beside CUDA's start-up
  BOXES=(55 120 125 100 10 10)
  CONV_AB_BOX=45
else
  # dry (CI, 2 cores): expected ~5 min in all; the boxes are safety nets. The build is skipped when the in-place
  # extension is newer than setup.py and csrc/ (CI's `make test` built it); a rebuild for the default archs takes
  # minutes on 2 cores. The tests took 160-185 s at 9e0daa8 (the stand-in's training-step graph tests run the
  # Triton gates through the interpreter, beside the prewarm): a 180 s box cut them once; 360 s leaves 2x.
  BOXES=(60 300 360 240 30 10)
  CONV_AB_BOX=120
fi
# RIM_FAST_GPU_CHECK_BOXES="preflight build tests bench report slack" (seconds) overrides them, e.g. to rehearse a cut
read -r PREFLIGHT_BOX BUILD_BOX TESTS_BOX BENCH_BOX REPORT_BOX SLACK <<< "${RIM_FAST_GPU_CHECK_BOXES:-${BOXES[*]}}"
if [ "$TESTS" = 0 ]; then BENCH_BOX=$((BENCH_BOX + TESTS_BOX)) TESTS_BOX=0; fi
BUDGET=$((PREFLIGHT_BOX + BUILD_BOX + TESTS_BOX + BENCH_BOX + REPORT_BOX + SLACK))

plan() {
  echo "rim_fast GPU check plan ($MODE mode): stage time boxes in seconds"
  printf '%-10s %5s  %s\n' stage box "what"
  printf '%-10s %5s  %s\n' preflight "$PREFLIGHT_BOX" "GPU, nvcc (real path, CUDA major = torch's), Python.h, the test wheels import, pytest -m cuda collects"
  printf '%-10s %5s  %s\n' build "$BUILD_BOX" "python setup.py build_ext --inplace (the visible GPU's arch)$([ "$MODE" = dry ] && echo '; skipped when up to date')"
  printf '%-10s %5s  %s\n' tests "$TESTS_BOX" "$([ "$TESTS" = 0 ] && echo 'skipped (--no-tests)' || echo 'pytest -m cuda (xdist when present)')"
  printf '%-10s %5s  %s\n' conv_ab "<=$CONV_AB_BOX" "convolution A/B (bench/conv_ab.py), from the bench's share (not in the total)"
  printf '%-10s %5s  %s\n' bench "$BENCH_BOX" "+ what the stages above leave; end-to-end cases in priority order, eager providers, then the compiled ones$([ "$MODE" = dry ] && echo ' (smoke, CPU)')"
  printf '%-10s %5s  %s\n' report "$REPORT_BOX" "report.md, report.json, logs.tgz"
  printf '%-10s %5s  %s\n' slack "$SLACK" "the bench stage's exit after its SIGINT"
  printf '%-10s %5s\n' total "$((PREFLIGHT_BOX + BUILD_BOX + TESTS_BOX + BENCH_BOX + REPORT_BOX + SLACK))"
  echo "concurrent, no box: prewarm (references, Inductor caches) from the preflight's end to the tests' end"
}
if [ "$PLAN" = 1 ]; then plan; exit 0; fi
for g in ${GROUPS_ARG//,/ }; do
  [[ "$g" =~ ^(S1|S2|S3|L2|U2):(predict|train_step)$ ]] || { echo "--groups: $g is not WORKLOAD:MODE" >&2; exit 2; }
done
for p in ${PROVIDERS_ARG//,/ }; do
  [[ "$p" =~ ^(torch_rim|rim_fast_reference|rim_fast|rim_fast_nographs|rim_fast_cl|rim_fast_graphed|rim_fast_graphed_cl)$ ]] ||
    { echo "--providers: $p is not an eager provider of bench/bench_rim.py" >&2; exit 2; }
done
[ -n "$OUT" ] || { echo "usage: bench/gpu_check.sh OUTDIR [--dry] [--groups W:MODE,...] [--providers P,...] [--no-tests] | --plan [--dry]" >&2; exit 2; }

PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/report.md "$OUT"/report.json "$OUT"/logs.tgz "$OUT"/speedups.png
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rim_fast_gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
START=$SECONDS
DEADLINE=$((START + PREFLIGHT_BOX + BUILD_BOX + TESTS_BOX + BENCH_BOX))
PREWARM_PID=""
plan | tee "$WORK/plan.txt"
echo "work folder: $WORK"
: > "$WORK/stages.tsv"
: > "$WORK/removed_empty_so.txt"
touch "$WORK/started"

# run_stage NAME BOX GRACE LOG CMD...: the command under `timeout -s INT` (the whole process group gets SIGINT at
# BOX seconds, SIGKILL GRACE seconds later); one line "name exit seconds box" in stages.tsv
run_stage() {
  local name=$1 box=$2 grace=$3 log=$4 t0=$SECONDS rc
  shift 4
  if [ "$box" -lt 1 ]; then
    echo "== $name: no time left"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "$box" >> "$WORK/stages.tsv"
    return 124
  fi
  timeout -s INT -k "$grace" "$box" "$@" > "$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$box" >> "$WORK/stages.tsv"
  echo "== $name: exit $rc after $((SECONDS - t0)) s (box $box s; $((SECONDS - START)) s since the start)"
  return $rc
}
skip_stage() {  # NAME BOX WHY: a stage that does not run (exit code "-" in stages.tsv)
  printf '%s\t-\t0\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/stages.tsv"
  echo "== $1: not run ($3)"
}

report() {
  timeout -s INT -k 5 "$REPORT_BOX" $PY -m bench.gpu_report "$WORK" "$OUT" --mode "$MODE" --budget "$BUDGET" \
    --elapsed "$((SECONDS - START))" > "$WORK/report.log" 2>&1
  local rc=$?
  cat "$WORK/report.log"
  echo "total $((SECONDS - START)) s; written: $(ls "$OUT" | tr '\n' ' ')"
  return $rc
}

stop_prewarm() {
  [ -n "$PREWARM_PID" ] || return 0
  if kill -0 "$PREWARM_PID" 2>/dev/null; then
    kill -INT -- "-$PREWARM_PID" 2>/dev/null || kill -INT "$PREWARM_PID" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$PREWARM_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$PREWARM_PID" 2>/dev/null || kill -KILL "$PREWARM_PID" 2>/dev/null
  fi
  wait "$PREWARM_PID" 2>/dev/null
  echo "== prewarm: stopped $((SECONDS - START)) s since the start ($(cat "$WORK/prewarm/prewarm.jsonl" 2>/dev/null | grep -c '"status": "ok"') jobs done; $(remove_empty_so) empty .so removed)"
  PREWARM_PID=""
}
# A C++ compilation cut by a stop leaves an empty .so in Inductor's cache (seen on the CPU), which a later load of
# the same kernel fails on (this run's, or the next one's): remove those made since the start. Triton's writes and
# Inductor's other ones are atomic. Prints how many.
remove_empty_so() {
  local cache=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un 2>/dev/null || echo unknown)}
  find "$cache" -name '*.so' -size 0 -newer "$WORK/started" -print -delete 2>/dev/null >> "$WORK/removed_empty_so.txt"
  wc -l < "$WORK/removed_empty_so.txt"
}
trap 'stop_prewarm' EXIT

# 1. preflight
if [ "$MODE" = full ] && [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # setup.py builds for the visible GPU when this is unset; an image's list (often 5+ archs) would multiply the build
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST from the environment: unset, the build targets the visible GPU" \
    | tee "$WORK/arch_list.txt"
  unset TORCH_CUDA_ARCH_LIST
fi
run_stage preflight "$PREFLIGHT_BOX" 5 "$WORK/preflight.log" \
  $PY -m bench.gpu_preflight --mode "$MODE" --work "$WORK" --budget "$((PREFLIGHT_BOX - 3))"
PREFLIGHT_RC=$?
tail -n 1 "$WORK/preflight.log"
if [ "$PREFLIGHT_RC" != 0 ]; then
  skip_stage build "$BUILD_BOX" "preflight failed"
  skip_stage tests "$TESTS_BOX" "preflight failed"
  skip_stage conv_ab 0 "preflight failed"
  skip_stage bench "$BENCH_BOX" "preflight failed"
  skip_stage bench_compiled 0 "preflight failed"
  timeout -k 5 20 $PY -m rim_fast.info > "$WORK/info.txt" 2> "$WORK/info.err"; echo $? > "$WORK/info.rc"
  report
  exit 1
fi
# CUDA_HOME (the toolkit found by its real path) and PYTHONPATH (the unpacked wheels)
. "$WORK/preflight.env"

# the benchmarks in two passes: the eager providers first (the goals of the drop-in import; a few seconds a group),
# then the compiled ones beside torch_rim and rim_fast (a cold compile costs 30-90 s and a group's cases end
# together: in one pass, a slow compile would cost the eager timings of its group)
if [ "$MODE" = full ]; then
  GROUPS_ALL=${GROUPS_ARG:-S2:predict,S1:predict,L2:predict,S2:train_step,S1:train_step,L2:train_step}
  EAGER_PROVIDERS=${PROVIDERS_ARG:-torch_rim,rim_fast,rim_fast_nographs,rim_fast_graphed}
  BENCH_ARGS=(--device cuda --providers "$EAGER_PROVIDERS" --groups "$GROUPS_ALL")
  # rim_fast_graphed (train steps only) beside torch_rim_compiled: a goal compares the two
  COMPILED_ARGS=(--device cuda --providers torch_rim,rim_fast,rim_fast_graphed,rim_fast_compiled,torch_rim_compiled
                 --groups "${GROUPS_ARG:-S2:predict,S1:predict,L2:predict,S2:train_step}")
  PREWARM_ARGS=(--device cuda --providers "$EAGER_PROVIDERS,rim_fast_compiled,torch_rim_compiled"
                --groups "$GROUPS_ALL")
  COMPILED_MIN=90
else
  # smoke sizes on the CPU, L2 included; one compiled case (a CPU compile costs 20-60 s on 2 cores)
  # rim_fast_graphed through the CPU stand-in recorder (its plumbing; train_step groups only)
  GROUPS_ALL=${GROUPS_ARG:-L2:predict,S2:predict,S2:train_step,S1:predict,S1:train_step,L2:train_step}
  BENCH_ARGS=(--device cpu --smoke --threads 2 --providers torch_rim,rim_fast,rim_fast_graphed --groups "$GROUPS_ALL")
  COMPILED_ARGS=(--device cpu --smoke --threads 2 --providers torch_rim,rim_fast,rim_fast_compiled
                 --groups "${GROUPS_ARG:-L2:predict}")
  PREWARM_ARGS=(--device cpu --smoke --threads 2 --providers torch_rim,rim_fast,rim_fast_graphed,rim_fast_compiled
                --groups "$GROUPS_ALL")
  COMPILED_MIN=90
fi

# the prewarm, beside the build and the tests: its own process group (setsid), lowest priority, no extension.
# On the CPU it compiles in-process: Inductor's compile workers ignore SIGINT, so the C++ compilers they start would
# be SIGKILLed in the middle of writing a cache file when the prewarm stops (Triton's cache writes are atomic).
mkdir -p "$WORK/prewarm"
if command -v setsid >/dev/null; then SETSID=(setsid); else SETSID=(); fi
[ "$MODE" = dry ] && PREWARM_ENV=(TORCHINDUCTOR_COMPILE_THREADS=1) || PREWARM_ENV=()
env RIM_FAST_NO_EXT=1 ${PREWARM_ENV[@]+"${PREWARM_ENV[@]}"} ${SETSID[@]+"${SETSID[@]}"} nice -n 19 $PY -m bench.run "${PREWARM_ARGS[@]}" --prewarm \
  --out "$WORK/prewarm" --refs "$WORK/refs" > "$WORK/prewarm/prewarm.log" 2>&1 &
PREWARM_PID=$!

# 2. build (dry: only when the in-place extension is older than its sources)
SO=$(ls rim_fast/_C*.so 2>/dev/null | head -n 1)
if [ "$MODE" = dry ] && [ -n "$SO" ] && [ -z "$(find setup.py csrc -newer "$SO" 2>/dev/null | head -n 1)" ]; then
  echo "$SO is newer than setup.py and csrc/: not rebuilt" > "$WORK/build.log"
  printf '%s\t%s\t%s\t%s\t%s\n' build 0 0 "$BUILD_BOX" "up to date: not rebuilt" >> "$WORK/stages.tsv"
  echo "== build: up to date ($SO)"
else
  # a failed compile fails the stage (setup.py would otherwise fall back to the references with a warning)
  RIM_FAST_REQUIRE_EXT=$([ "$MODE" = full ] && echo 1 || echo "${RIM_FAST_REQUIRE_EXT:-0}") \
    run_stage build "$BUILD_BOX" 10 "$WORK/build.log" $PY setup.py build_ext --inplace
  grep -m3 -E "^rim_fast:|nvcc .*-gencode" "$WORK/build.log" | cut -c1-240
fi

# rim_fast.info beside the tests (it describes the extension just built); the report starts with its output
( timeout -k 5 30 $PY -m rim_fast.info > "$WORK/info.txt" 2> "$WORK/info.err"; echo $? > "$WORK/info.rc" ) &
INFO_PID=$!

# 3. the CUDA tests
if [ "$TESTS" = 0 ]; then
  skip_stage tests 0 "--no-tests"
else
  TEST_ARGS=(tests -m cuda -q -rsfE -p no:cacheprovider --durations=15 --junitxml="$WORK/tests.xml")
  if [ "$MODE" = full ] && $PY -c "import xdist" 2>/dev/null; then
    TEST_ARGS+=(-n "${RIM_FAST_TEST_WORKERS:-8}")
    if $PY -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null; then
      TEST_ARGS+=(--dist worksteal)
    fi
  fi
  # 8 workers x 2 threads on 16 cores; each worker's Inductor compiles with 2 processes
  OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=2 \
    run_stage tests "$TESTS_BOX" 15 "$WORK/tests.log" $PY -m bench.interruptible pytest "${TEST_ARGS[@]}"
  tail -n 3 "$WORK/tests.log"
fi
stop_prewarm
wait "$INFO_PID" 2>/dev/null

# 3b. the convolution A/B (layout, bias fold, stride-2 padding; ~20 s on the GPU), from the benchmarks' share
if [ "$MODE" = full ]; then AB_ARGS=(--device cuda); else AB_ARGS=(--device cpu --workloads S2); fi
AB_BOX=$((DEADLINE - SECONDS - COMPILED_MIN - 120))
[ "$AB_BOX" -gt "$CONV_AB_BOX" ] && AB_BOX=$CONV_AB_BOX
if [ "$AB_BOX" -lt 10 ]; then
  skip_stage conv_ab "$AB_BOX" "no time left beside the benchmarks"
else
  run_stage conv_ab "$AB_BOX" 5 "$WORK/conv_ab.log" $PY -m bench.conv_ab "${AB_ARGS[@]}" --json "$WORK/conv_ab.json"
fi

# 4. the end-to-end benchmarks: the rest of the budget, the eager pass first, then the compiled one
BENCH_LIMIT=$((DEADLINE - SECONDS - COMPILED_MIN))
run_stage bench "$BENCH_LIMIT" 10 "$WORK/bench.log" \
  $PY -m bench.run "${BENCH_ARGS[@]}" --refs "$WORK/refs" --out "$WORK/bench"
grep -E "^\| (L2|S1|S2|S3|U2) " "$WORK/bench.log" | cut -c1-160
run_stage bench_compiled "$((DEADLINE - SECONDS))" 10 "$WORK/bench_compiled.log" \
  $PY -m bench.run "${COMPILED_ARGS[@]}" --refs "$WORK/refs" --out "$WORK/bench_compiled"
grep -E "^\| (L2|S1|S2|S3|U2) " "$WORK/bench_compiled.log" | cut -c1-160
echo "$(remove_empty_so) empty .so removed from Inductor's cache in all"

# 5. the report; a failed stage fails the command (CI runs the dry mode), after the report is written
report
REPORT_RC=$?
FAILED=$(awk -F'\t' '$2 != "0" && $2 != "-" {printf "%s=%s ", $1, $2}' "$WORK/stages.tsv")
if [ -n "$FAILED" ] || [ "$REPORT_RC" != 0 ]; then
  echo "failed stages: $FAILED$([ "$REPORT_RC" != 0 ] && echo "report=$REPORT_RC")"
  exit 1
fi
