"""Shared benchmark helpers: the machine line, timing, and the one table of standard workloads."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch
import torch.nn.functional as F

#: RIM_FAST_BENCH_SMOKE=1: tiny sizes and one round, so CI exercises the benchmarks without timing them.
SMOKE = os.environ.get("RIM_FAST_BENCH_SMOKE") == "1"

#: The standard workloads: Hourglass(nf=32, ch_mult=(2, 2), hidden_units=32), C=1, T=10.
WORKLOADS = {
    "S1": dict(dims=1, size=(256,), batch=32, devices=("cpu", "cuda")),
    "S2": dict(dims=2, size=(64, 64), batch=16, devices=("cpu", "cuda")),
    "S3": dict(dims=3, size=(16, 16, 16), batch=4, devices=("cpu", "cuda")),
    "L2": dict(dims=2, size=(256, 256), batch=32, devices=("cuda",)),
}
MODEL = dict(nf=32, ch_mult=(2, 2), hidden_units=32)
T = 10
#: The order in which the end-to-end (workload, mode) groups run (bench/bench_rim.py): bench/gpu_check.sh cuts a run
#: at its time box, so the most telling cases come first. Groups not listed follow in table order.
PRIORITY = (("L2", "predict"), ("S2", "predict"), ("S2", "train_step"), ("S1", "predict"), ("S1", "train_step"),
            ("L2", "train_step"))
SMOKE_WORKLOADS = {
    "S1": dict(dims=1, size=(16,), batch=2, devices=("cpu", "cuda")),
    "S2": dict(dims=2, size=(8, 8), batch=2, devices=("cpu", "cuda")),
    "S3": dict(dims=3, size=(4, 4, 4), batch=1, devices=("cpu", "cuda")),
    "L2": dict(dims=2, size=(16, 16), batch=2, devices=("cuda",)),
}


def workloads() -> dict:
    return SMOKE_WORKLOADS if SMOKE else WORKLOADS


def git_revision() -> str:
    """The checkout's short revision (+dirty); RIM_FAST_REVISION where there is no git or no repository (a copy of
    the tree on a GPU machine)."""
    fallback = os.environ.get("RIM_FAST_REVISION", "unknown")
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git on the machine
        return fallback


def cpu_isa() -> str:
    """torch's CPU capability (the instruction set of its kernels and of rim_fast's Winograd convolutions), and the
    caps that make this CPU stand in for an older one (bench/results/cpu-avx2-*), where set."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    isa = get() if get is not None else "capability unknown"
    caps = [f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(name)]
    return f"{isa} ({', '.join(caps)})" if caps else isa


def machine_line() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cpu_isa()}"
    return (f"machine: {device} | torch {torch.__version__} | triton {triton_version} | "
            f"threads {torch.get_num_threads()} | python {platform.python_version()} | rev {git_revision()}")


def error_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (its first ``limit`` characters), for a result row or a report cell."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}"


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """t [B, C, *S] with its channels innermost in memory (channels-last; 1D and 3D alike), as the CUDA
    convolutions leave their outputs under RIM_FAST_CUDA_LAYOUT=channels_last; t as it is below 3 dims."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if t.dim() >= 3 else t


def capture(compute: Callable[[], object], warmup: int = 3) -> tuple:
    """(graph, its outputs): ``compute`` captured once in a CUDA graph after ``warmup`` calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            compute()
    torch.cuda.current_stream().wait_stream(stream)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        static = compute()
    return cuda_graph, static


def timed_call(compute: Callable[[], object], device, graph: bool = False) -> Callable[[], object]:
    """What the op benchmarks time: ``compute()`` then a device sync, or (``graph``, CUDA) ``compute`` captured once
    in a CUDA graph after 3 warm-up calls on a side stream and replayed (``capture``): kernel time without the
    host's launch overhead (what RIM.compile's reduce-overhead mode gets)."""
    if graph:
        cuda_graph, static = capture(compute)

        def replay():
            cuda_graph.replay()
            synchronize(device)
            return static
        return replay

    def run():
        outs = compute()
        synchronize(device)
        return outs
    return run


def measure(fn: Callable[[], object], device="cpu", warmup: int = 2, rounds: int = 10,
            min_seconds: float = 0.0) -> dict:
    """Run ``fn`` warmup times untimed (compile, autotune, graph capture), then time ``rounds`` calls (more
    until ``min_seconds``), synchronising the device around each. Returns median, IQR and all times (s)."""
    if SMOKE:
        warmup, rounds, min_seconds = 1, 1, 0.0
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < rounds or time.perf_counter() - start_all < min_seconds:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "rounds": len(times), "times": times}


def reference_result(run: Callable[[], tuple], device) -> tuple:
    """A per-op benchmark's reference for one case: its outputs (detached) and its median time. The benchmarks
    cache it per case (``functools.cache``), so that it is measured once per run."""
    return [o.detach() for o in run()], measure(run, device)["median"]


def benchmark_case(benchmark, run: Callable[[], object], ok: bool, baseline: float, rounds: int = 20,
                   what: str = "the case", **info) -> float:
    """The pytest-benchmark part of a per-op case: ``info`` and whether the result agreed (``ok``) into
    ``extra_info``; no timing (and no speedup) for a wrong result; ``rounds`` timed calls after 3 warm-ups (one of
    each in smoke mode); the median (s), whose speedup over the reference's ``baseline`` goes into ``extra_info``."""
    benchmark.extra_info.update(machine=machine_line(), correct=ok, **info)
    assert ok, f"{what} disagrees with the reference"
    benchmark.pedantic(run, warmup_rounds=1 if SMOKE else 3, rounds=1 if SMOKE else rounds, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["speedup_vs_reference"] = baseline / median
    return median


def print_case(case_id: str, width: int, run: Callable[[], object], ok: bool, baseline: float, device,
               rate: Callable[[float], float], rate_width: int = 8, rounds: int = 20) -> None:
    """A per-op benchmark's table row, as its ``main()`` prints it: median and IQR (ms), ``rate(median)`` (GB/s or
    GFLOP/s) and the speedup over the reference's ``baseline``; a wrong result is said, not timed."""
    if not ok:
        print(f"{case_id:{width}s} WRONG RESULT (not timed)")
        return
    t = measure(run, device, warmup=3, rounds=rounds)
    print(f"{case_id:{width}s} {t['median'] * 1e3:10.4f} {(t['q3'] - t['q1']) * 1e3:8.4f} "
          f"{rate(t['median']):{rate_width}.1f} {baseline / t['median']:7.2f}x")


def end_to_end_workloads() -> dict:
    """The workload table for end-to-end RIM benchmarks: ``workloads()`` with the backbone named (``arch``:
    Hourglass), plus U2, a Unet on S2's shape, and S1B1, S2B1, S3B1: S1-S3 on one sample (B = 1), as inference and
    single-volume training run them, only when named (``default``: False; ``bench.run --workloads S1B1,...``)."""
    table = {name: dict(spec, arch="Hourglass") for name, spec in workloads().items()}
    table["U2"] = dict(table["S2"], arch="Unet")
    for name in ("S1", "S2", "S3"):
        table[f"{name}B1"] = dict(table[name], batch=1, default=False)
    return table


def blur_kernel(dims: int) -> torch.Tensor:
    k1 = torch.tensor([0.25, 0.5, 0.25])
    k = k1
    for _ in range(dims - 1):
        k = k[..., None] * k1
    return k[None, None]  # [1, 1, 3, ..., 3]


def make_score_fn(dims: int, device):
    """A^T (y - A x) for A a zero-padded [1, 2, 1]/4 blur per axis (symmetric, so A^T = A); C = 1."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    kernel = blur_kernel(dims).to(device)

    def blur(x):
        return conv(x, kernel.to(x.dtype), padding=1)

    def score_fn(x, y):
        return blur(y - blur(x))
    return score_fn
