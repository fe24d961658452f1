"""One command for the end-to-end benchmark: pytest on bench/bench_rim.py, then bench.report.

    python -m bench.run --device cpu --preset short --out bench/results/cpu-short   # a few minutes on a CPU
    python -m bench.run --device cuda --out bench/results/h100                       # everything, on a GPU
    python -m bench.run --device cpu --smoke --out /tmp/bench-smoke                  # tiny sizes, 1 round, T=2
    python -m bench.run --device cuda --prewarm --out DIR     # untimed: references and Inductor's caches

Writes OUT/status.jsonl (the results: one JSON line per case, written as each case ends), OUT/report.md,
OUT/summary.json and OUT/speedups.png, and prints the markdown table. Arguments after ``--`` go to pytest
(e.g. ``-- -k "not compiled"``). Exit status: pytest's (130 when interrupted); the report is written whenever a
case finished. pytest-benchmark is not needed.

``--prewarm`` runs bench_rim.prewarm() in this process instead (see bench/bench_rim.py): it writes
OUT/prewarm.jsonl and the references under ``--refs`` (default OUT/refs); give the timed run the same ``--refs``.

Timing (bench/bench_rim.py): each provider of a (workload, mode) group is warmed up and checked, then the group's
providers take turns, one timed call each per round (A B C A B C ...), until every one has a minimum count and a
minimum time of timed calls (cpu: 5 calls and 2 s, at most 20 rounds; cuda: 20 calls and 0.5 s, at most 100);
``--rounds N`` gives exactly N rounds. A case whose IQR exceeds 10% of its median is marked noisy in the report.

Presets (options given explicitly override them):
  full   every workload of the device, both modes, every provider, the default warm-up and rounds
  short  S1, both modes, every provider, the default warm-up and rounds. On a CPU, compiling the unrolled T=10
         loop (about 0.5-2 min per compiled case) dominates: about 5 min of CPU time on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "full": {},
    "short": {"workloads": "S1"},
}
NAMES = {"providers": "PROVIDERS", "modes": "MODES", "workloads": "WORKLOADS", "groups": "GROUPS",
         "rounds": "ROUNDS", "warmup": "WARMUP", "T": "T"}


def main(argv=None) -> int:
    # SIGINT (a time box) must interrupt, even when a non-interactive shell started us in the background with SIGINT
    # ignored (bench/interruptible.py); pytest, started below, then gets the default disposition too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description="Run bench/bench_rim.py and write its report.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--smoke", action="store_true", help="RIM_FAST_BENCH_SMOKE=1: tiny sizes, 1 round, T=2")
    parser.add_argument("--providers", help="comma-separated subset of the providers")
    parser.add_argument("--modes", help="predict,train_step")
    parser.add_argument("--workloads", help="e.g. S1,S2")
    parser.add_argument("--groups", help="workload:mode,... exactly these groups, in this order")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--T", type=int, dest="T")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the run (CPU)")
    parser.add_argument("--refs", help="folder of the saved references (default: none; with --prewarm OUT/refs)")
    parser.add_argument("--prewarm", action="store_true", help="untimed: references and Inductor's caches")
    args = parser.parse_args(argv)

    settings = dict(PRESETS[args.preset])
    for key in NAMES:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    status = os.path.join(out, "prewarm.jsonl" if args.prewarm else "status.jsonl")
    if os.path.exists(status):
        os.remove(status)

    # a run started from inside a pytest-xdist worker (the smoke test under `pytest -n`) must not look like one
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["RIM_FAST_BENCH_PREWARM_LOG" if args.prewarm else "RIM_FAST_BENCH_STATUS"] = status
    refs = args.refs or (os.path.join(out, "refs") if args.prewarm else None)
    if refs:
        env["RIM_FAST_BENCH_REFS"] = os.path.abspath(refs)
    if args.device:
        env["RIM_FAST_BENCH_DEVICE"] = args.device
    if args.smoke:
        env["RIM_FAST_BENCH_SMOKE"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for key, value in settings.items():
        env[f"RIM_FAST_BENCH_{NAMES[key]}"] = str(value)
    print("  with", " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("RIM_FAST_BENCH_")),
          flush=True)

    if args.prewarm:
        return _prewarm(env)

    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "bench", "bench_rim.py"), "-q", "-rs",
           "-p", "no:cacheprovider", "-p", "no:benchmark", *extra]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # `timeout -s INT` (bench/gpu_check.sh) interrupts the whole process group: pytest stops in the group in
        # flight (bench_rim logs its cases as interrupted); every finished group is already in status.jsonl
        print("interrupted: waiting for pytest to stop", file=sys.stderr, flush=True)
        try:
            proc.wait(timeout=10)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        code = 130
    if not os.path.exists(status):
        print(f"no results written ({status}); pytest exited with {code}", file=sys.stderr)
        return code or 1
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if code == 130:
        # cut by a time box: the op counts (minutes of CPU tracing) would outlive the grace before SIGKILL, and the
        # report must still be written
        print("interrupted: the op counts are skipped", file=sys.stderr, flush=True)
    elif _run_device(status) == "cuda":
        # counted on the CPU whatever the device (CI's smoke run reports them), and they took ~2 minutes of the
        # first GPU check's bench stage; the GPU report has the profiler's CUDA kernels per step instead
        print("the op counts (bench.op_count, on the CPU) are left to CPU runs", flush=True)
    else:
        _write_op_counts(status, out)
    from bench.report import write
    summary = write(status, out)
    print()
    print(summary["markdown"])
    print(f"written: {out}/report.md, summary.json" + (", speedups.png" if summary.get("chart") else ""))
    return code


def _run_device(status: str):
    """The device the benchmark ran on, from its status file's run record (None where it has none)."""
    from bench.report import load
    return load(status)["settings"].get("device")


def _write_op_counts(status: str, out: str) -> None:
    """OUT/op_counts.json: ops per RIM step that would launch a GPU kernel (bench.op_count, counted on the CPU)
    for the run's Hourglass workloads, which the report shows beside the timings."""
    import json
    from bench.common import SMOKE_WORKLOADS, T as DEFAULT_T
    from bench.op_count import table
    with open(status) as f:
        names = {json.loads(line).get("workload") for line in f if line.strip()}
    workloads = [w for w in SMOKE_WORKLOADS if w in names]
    try:
        # at the workloads' T (10) whatever the run's (the smoke run's is 2): per-call work (merged weights) is
        # shared by T steps, and the targets are per step at T = 10
        rows = table(workloads, T=DEFAULT_T)
    except Exception as err:  # noqa: BLE001 - a measurement beside the benchmark, never its failure
        rows = [{"error": f"{type(err).__name__}: {err}"}]
    with open(os.path.join(out, "op_counts.json"), "w") as f:
        json.dump(rows, f, indent=1)


def _prewarm(env: dict) -> int:
    """bench_rim.prewarm() in this process (its module reads the environment when imported)."""
    os.environ.clear()
    os.environ.update(env)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        from bench import bench_rim
        return bench_rim.prewarm()
    except KeyboardInterrupt:
        print("prewarm interrupted", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
