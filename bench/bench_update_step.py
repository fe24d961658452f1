"""Benchmark of the RIM update-step ops, per RIM step of the standard workloads (pytest-benchmark).

Tensors are x-shaped, [B, 1, *size]: S1 [32, 1, 256], S2 [16, 1, 64x64], S3 [4, 1, 16x16x16], L2 [32, 1,
256x256] (CUDA only). Ops: "adam" and "rmsprop" (torch_rim's, v never updated) score preprocessing (no
gradient: the RIM runs it under no_grad), "update" x' = x + g, "update_loss" x' and the loss term
sum((x' - x_true)^2), forward ("fwd") and forward + the gradients of x and g ("fwdbwd").
Providers: "reference" (eager), "compiled" (torch.compile of the reference, fullgraph, static shapes) and
"cpp" (the C++/CUDA extension rim_fast._C, eager through rim_fast.ops._cpp).

GB/s is the effective bandwidth of the fused kernels' traffic, the same bytes for every provider, with
e = element size (4) and N = B * prod(size):
  adam       read score, m, v; write out, m', v'          6 e N
  rmsprop    read score, m, v; write out, m'              5 e N
  update     read x, g; write x'                          3 e N
  update_loss fwd      read x, g, x_true; write x'        4 e N  (+ one partial sum per block, negligible)
  update_loss fwdbwd   fwd + read grad_out, x', x_true; write grad_x (grad_g is the same tensor)   8 e N

    pytest bench/bench_update_step.py [--benchmark-json out.json]    # RIM_FAST_BENCH_SMOKE=1: tiny, 1 round
    python -m bench.bench_update_step                                 # the same as a table
The first line printed names the machine (device, CUDA, torch, triton, threads, git revision).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from bench.common import (SMOKE, benchmark_case, machine_line, print_case, reference_result, synchronize,
                          workloads)
from rim_fast.ops import _cpp, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = _cpp.missing() is None and _cpp.has_kernel(DEVICE)
PROVIDERS = ("reference", "compiled") + (("cpp",) if KERNELS else ())
OPS = (("adam", "fwd"), ("rmsprop", "fwd"), ("update", "fwd"), ("update_loss", "fwd"), ("update_loss", "fwdbwd"))
BYTES_PER_ELEMENT = {("adam", "fwd"): 6, ("rmsprop", "fwd"): 5, ("update", "fwd"): 3, ("update_loss", "fwd"): 4,
                     ("update_loss", "fwdbwd"): 8}
BETA_1, BETA_2, EPS, STEP = 0.9, 0.999, 1e-7, 3


def shapes() -> dict:
    """name -> x shape [B, 1, *size] of each standard workload on this device."""
    return {name: (w["batch"], 1, *w["size"]) for name, w in workloads().items() if DEVICE in w["devices"]}


def _function(op: str, provider: str):
    if op in ("adam", "rmsprop"):
        impl = _cpp.preprocess_score if provider == "cpp" else reference.preprocess_score

        def fn(score, m, v):
            return impl(score, m, v, STEP, op, BETA_1, BETA_2, EPS)
    elif op == "update":
        impl = _cpp.update_state if provider == "cpp" else reference.update_state

        def fn(x, g):
            return impl(x, g)[0]
    else:
        impl = _cpp.update_state if provider == "cpp" else reference.update_state

        def fn(x, g, x_true):
            return impl(x, g, x_true)
    if provider == "compiled":
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


def _inputs(op, shape):
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    if op in ("adam", "rmsprop"):
        return [rnd(), rnd(), rnd().abs() + 0.1]
    return [rnd(), rnd()] + ([rnd()] if op == "update_loss" else [])


def make_case(op: str, mode: str, provider: str, shape: tuple):
    """(callable to time) for one case; the callable synchronises the device and returns the outputs."""
    fn = _function(op, provider)
    inputs = _inputs(op, shape)
    if mode == "fwdbwd":
        inputs[0].requires_grad_()
        inputs[1].requires_grad_()

    def run():
        with torch.set_grad_enabled(mode == "fwdbwd"):
            outs = fn(*inputs)
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            if mode == "fwdbwd":
                outs = outs + torch.autograd.grad(outs, inputs[:2], [torch.ones_like(o) for o in outs])
        synchronize(DEVICE)
        return outs
    return run


@functools.cache
def check_and_baseline(op, mode, shape):
    """The reference result and its median time for a case (measured once per run)."""
    return reference_result(make_case(op, mode, "reference", shape), DEVICE)


def correct(outs, expected) -> bool:
    return len(outs) == len(expected) and all(
        torch.allclose(a.detach().double(), b.double(), rtol=1e-4, atol=1e-5) for a, b in zip(outs, expected))


def gbps(op, mode, shape, seconds) -> float:
    return BYTES_PER_ELEMENT[(op, mode)] * 4 * math.prod(shape) / seconds / 1e9


CASES = [pytest.param(name, op, mode, provider, id=f"{name}-{op}-{mode}-{provider}")
         for i, name in enumerate(shapes()) for op, mode in OPS for provider in PROVIDERS
         # smoke mode (CI): compiling costs seconds per case and tells nothing there; one workload suffices
         if not (SMOKE and provider == "compiled" and i > 0)]


@pytest.mark.parametrize("name,op,mode,provider", CASES)
def test_update_step(benchmark, name, op, mode, provider):
    shape = shapes()[name]
    expected, baseline = check_and_baseline(op, mode, shape)
    run = make_case(op, mode, provider, shape)
    median = benchmark_case(benchmark, run, correct(run(), expected), baseline, rounds=30, what=provider,
                            shape="x".join(map(str, shape)))
    benchmark.extra_info["GBps"] = gbps(op, mode, shape, median)


def main():
    print(machine_line())
    print(f"{'case':36s} {'median ms':>10s} {'IQR ms':>8s} {'GB/s':>8s} {'speedup':>8s}")
    for param in CASES:
        name, op, mode, provider = param.values
        shape = shapes()[name]
        expected, baseline = check_and_baseline(op, mode, shape)
        run = make_case(op, mode, provider, shape)
        print_case(param.id, 36, run, correct(run(), expected), baseline, DEVICE,
                   lambda median: gbps(op, mode, shape, median), rounds=30)


if __name__ == "__main__":
    main()
