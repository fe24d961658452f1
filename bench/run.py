"""One command for the end-to-end benchmark: pytest on bench/bench_rim.py, then bench.report.

    python -m bench.run --device cpu --preset short --out bench/results/cpu-short   # a few minutes on a CPU
    python -m bench.run --device cuda --out bench/results/h100                       # everything, on a GPU
    python -m bench.run --device cpu --smoke --out /tmp/bench-smoke                  # tiny sizes, 1 round, T=2

Writes OUT/results.json (pytest-benchmark), OUT/status.jsonl (one line per case), OUT/report.md,
OUT/summary.json and OUT/speedups.png, and prints the markdown table. Arguments after ``--`` go to pytest
(e.g. ``-- -k "not compiled"``). Exit status: pytest's (the report is written whenever results exist).

Presets (options given explicitly override them):
  full   every workload of the device, both modes, every provider; rounds: as many as fit in 60 s (cpu, 3 to
         5) or 10 s (cuda, 10 to 50) per case; warm-up calls: cpu 1, cuda 3
  short  S1, both modes, every provider, 3 rounds, no warm-up call besides the check call (compiled providers
         still compile in one untimed call first). On a CPU, compiling the unrolled T=10 loop (about 0.5-2 min
         per compiled case) dominates: about 5 min of CPU time on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "full": {},
    "short": {"workloads": "S1", "rounds": 3, "warmup": 0},
}


def main(argv=None) -> int:
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
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--T", type=int, dest="T")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the run (CPU)")
    args = parser.parse_args(argv)

    settings = dict(PRESETS[args.preset])
    for key in ("providers", "modes", "workloads", "rounds", "warmup", "T"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results, status = os.path.join(out, "results.json"), os.path.join(out, "status.jsonl")
    for path in (results, status):
        if os.path.exists(path):
            os.remove(path)

    # a run started from inside a pytest-xdist worker (the smoke test under `pytest -n`) must not look like one:
    # pytest-benchmark disables itself when PYTEST_XDIST_WORKER is set
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["RIM_FAST_BENCH_STATUS"] = status
    if args.device:
        env["RIM_FAST_BENCH_DEVICE"] = args.device
    if args.smoke:
        env["RIM_FAST_BENCH_SMOKE"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    names = {"providers": "PROVIDERS", "modes": "MODES", "workloads": "WORKLOADS", "rounds": "ROUNDS",
             "warmup": "WARMUP", "T": "T"}
    for key, value in settings.items():
        env[f"RIM_FAST_BENCH_{names[key]}"] = str(value)

    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "bench", "bench_rim.py"), "-q", "-rs",
           "-p", "no:cacheprovider", f"--benchmark-json={results}", "--benchmark-save-data",
           "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds", *extra]
    print("+", " ".join(cmd), flush=True)
    print("  with", " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("RIM_FAST_BENCH_")),
          flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # `timeout -s INT` (bench/gpu_check.sh) interrupts the whole process group: pytest stops after the case
        # in flight and still writes the results of the cases that finished; report those
        print("interrupted: waiting for pytest to write the finished cases", file=sys.stderr, flush=True)
        try:
            proc.wait(timeout=15)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        code = 130
    if not os.path.exists(results):
        print(f"no results written ({results}); pytest exited with {code}", file=sys.stderr)
        return code or 1
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.report import write
    summary = write(results, out, status if os.path.exists(status) else None)
    print()
    print(summary["markdown"])
    print(f"written: {out}/report.md, summary.json" + (", speedups.png" if summary.get("chart") else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
