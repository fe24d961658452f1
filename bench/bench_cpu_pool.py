"""The CPU memory pool of a RIM call (``rim_fast.cpu_pool``): rim_fast's eager predict (or training step: loss_fn,
backward, Adam) with the pool on and off, alternated call by call in one process, with the minor page faults of
each call (``getrusage``), and torch_rim beside them. Run it in a fresh process: glibc's malloc trims its heap (and
the next call faults its pages in again) depending on what the process freed before, so the state of the heap is
part of what is measured.

    python -m bench.bench_cpu_pool                       # S1, S2, S3, 9 rounds
    python -m bench.bench_cpu_pool --workloads S2 --rounds 15
    python -m bench.bench_cpu_pool --mode train_step     # the training step: forward, backward, optimizer
    MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_MMAP_THRESHOLD_=1073741824 python -m bench.bench_cpu_pool
                                                         # glibc never trimming: the pool's own cost
    RIM_FAST_BENCH_SMOKE=1 python -m bench.bench_cpu_pool  # tiny, to check that it runs

The first line printed names the machine (bench.common.machine_line).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from bench import bench_rim
from bench.common import SMOKE, machine_line

VARIANTS = ("torch_rim", "pool_off", "pool_on")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run(workload: str, rounds: int, mode: str = "predict") -> dict:
    """{variant: (median ms, median faults per call)} for one workload, the variants alternated each round."""
    data = bench_rim.workload_data(workload)
    calls = {}
    for variant in VARIANTS:
        provider = "torch_rim" if variant == "torch_rim" else "rim_fast"
        rim = bench_rim.build(workload, provider)
        predict, loss = bench_rim._functions(rim, provider)
        optimizer = None if mode == "predict" else torch.optim.Adam(rim.model.parameters(), bench_rim.LEARNING_RATE)
        calls[variant] = bench_rim._step_fn(mode, provider, predict, loss, optimizer, data["y"], data["x_true"])
    times = {v: [] for v in VARIANTS}
    faults = {v: [] for v in VARIANTS}

    def call(variant):
        if variant == "pool_off":
            os.environ["RIM_FAST_CPU_POOL"] = "0"
        try:
            f0, t0 = _faults(), time.perf_counter()
            calls[variant]()
            return time.perf_counter() - t0, _faults() - f0
        finally:
            os.environ.pop("RIM_FAST_CPU_POOL", None)

    with torch.set_grad_enabled(mode == "train_step"):
        for variant in VARIANTS:
            call(variant)
        for _ in range(rounds):
            for variant in VARIANTS:
                t, f = call(variant)
                times[variant].append(t)
                faults[variant].append(f)
    return {v: (statistics.median(times[v]) * 1e3, statistics.median(faults[v])) for v in VARIANTS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="S1,S2,S3")
    parser.add_argument("--rounds", type=int, default=3 if SMOKE else 9)
    parser.add_argument("--mode", choices=bench_rim.MODES, default="predict")
    args = parser.parse_args(argv)
    print(machine_line())
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    print(f"{args.mode}, eager, CPU; glibc trim threshold: {trim or 'dynamic (default)'}; {args.rounds} rounds; "
          f"pool available: {__import__('rim_fast').cpu_pool.available()}")
    print("| workload | torch_rim ms | pool off ms | pool on ms | on / off | faults/call torch_rim | off | on |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workload in args.workloads.split(","):
        r = run(workload, args.rounds, args.mode)
        print(f"| {workload} | {r['torch_rim'][0]:.1f} | {r['pool_off'][0]:.1f} | {r['pool_on'][0]:.1f} | "
              f"{r['pool_off'][0] / r['pool_on'][0]:.2f}x | {r['torch_rim'][1]:.0f} | {r['pool_off'][1]:.0f} | "
              f"{r['pool_on'][1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
