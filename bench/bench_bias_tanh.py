"""Benchmark of bias + tanh after a convolution (rim_fast/ops/conv.py ``bias_tanh``; pytest-benchmark).

Tensors are the Hourglass's first-level activations, the output of a 3x3 convolution run without its bias:
[B, nf=32, *size], S1 [32, 32, 256], S2 [16, 32, 64x64], S3 [4, 32, 16x16x16], L2 [32, 32, 256x256] (CUDA only),
contiguous (cuDNN's NCHW output) and channels-last. Modes: "fwd" (no autograd) and "fwdbwd" (and the gradients of
the activation and the bias under one cotangent). Providers: "reference" (eager ``torch.tanh(x + b)``: two aten
kernels forward, tanh_backward and the bias reduction backward), "compiled" (torch.compile of the reference,
fullgraph, static shapes: Inductor's own fusion), on CUDA also "triton" (the kernel, eager) and "reference_graph" /
"triton_graph" (the eager code captured in a CUDA graph and replayed: kernel time without the host's launch
overhead, as rim_fast's CUDA graphs run it). The Triton interpreter is not a benchmark: on CPU only the reference
providers run. Every case is checked against the reference before it is timed (no time for a wrong case).

GB/s is the traffic of the fused kernel, the same bytes for every provider (e = 4 bytes, N elements): fwd 2 e N
(read x, write y); fwdbwd 2 e N + 4 e N (read grad and y, write grad_x; the bias reduction reads grad_x). The
eager reference moves 4 e N forward (x + b: read, write; tanh: read, write), so a memory-bound GPU should show
the kernel ~2x faster forward at L2, and about the same backward (both make one pass and one reduction).

    pytest bench/bench_bias_tanh.py [--benchmark-json out.json]    # RIM_FAST_BENCH_SMOKE=1: tiny, 1 round
    python -m bench.bench_bias_tanh                                 # the same as a table
The first line printed names the machine (device, CUDA, torch, triton, git revision).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from bench.common import (MODEL, SMOKE, benchmark_case, machine_line, print_case, reference_result, timed_call,
                          workloads)
from rim_fast.ops import _triton, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NF = MODEL["nf"]
KERNELS = _triton.missing() is None and DEVICE == "cuda" and not _triton.K.INTERPRETED
PROVIDERS = ("reference", "compiled") + (("triton",) if KERNELS else ()) + (
    ("reference_graph",) if DEVICE == "cuda" else ()) + (("triton_graph",) if KERNELS else ())
LAYOUTS = ("contig", "channels_last")
BYTES_PER_ELEMENT = {"fwd": 2, "fwdbwd": 6}


def shapes() -> dict:
    """name -> activation shape [B, nf, *size] of each standard workload on this device."""
    return {name: (w["batch"], NF, *w["size"]) for name, w in workloads().items() if DEVICE in w["devices"]}


def _function(provider: str):
    fn = _triton.bias_tanh if provider.startswith("triton") else reference.bias_tanh
    if provider.startswith("compiled"):
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


def _inputs(shape, layout):
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(*shape, generator=g)).to(DEVICE)
    if layout == "channels_last":
        order = (0, *range(2, x.dim()), 1)
        x = x.permute(order).contiguous().permute(*[order.index(i) for i in range(x.dim())])
    return [x, torch.randn(shape[1], generator=g).to(DEVICE)]


def make_case(mode: str, provider: str, shape: tuple, layout: str):
    """The callable to time for one case (it synchronises the device and returns its results)."""
    fn = _function(provider.removesuffix("_graph"))
    inputs = _inputs(shape, layout)
    if mode == "fwdbwd":
        inputs = [t.requires_grad_() for t in inputs]
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def compute():
        with torch.set_grad_enabled(mode == "fwdbwd"):
            out = fn(*inputs)
            return (out,) + (torch.autograd.grad(out, inputs, cot) if mode == "fwdbwd" else ())

    return timed_call(compute, DEVICE, graph=provider.endswith("_graph"))


@functools.cache
def check_and_baseline(mode, shape, layout):
    """The reference result and its median time for a case (measured once per run)."""
    return reference_result(make_case(mode, "reference", shape, layout), DEVICE)


def correct(outs, expected) -> bool:
    # tanh within a few ulp; the bias gradient summed in another order
    return len(outs) == len(expected) and all(
        torch.allclose(a.detach().double(), b.double(), rtol=1e-5, atol=1e-5) for a, b in zip(outs, expected))


def gbps(mode, shape, seconds) -> float:
    return BYTES_PER_ELEMENT[mode] * 4 * math.prod(shape) / seconds / 1e9


CASES = [pytest.param(name, mode, layout, provider, id=f"{name}-{mode}-{layout}-{provider}")
         for i, name in enumerate(shapes()) for mode in ("fwd", "fwdbwd") for layout in LAYOUTS
         for provider in PROVIDERS
         # smoke mode (CI): compiling costs seconds per case and tells nothing there; one workload suffices
         if not (SMOKE and provider == "compiled" and i > 0)]


@pytest.mark.parametrize("name,mode,layout,provider", CASES)
def test_bias_tanh(benchmark, name, mode, layout, provider):
    shape = shapes()[name]
    expected, baseline = check_and_baseline(mode, shape, layout)
    run = make_case(mode, provider, shape, layout)
    median = benchmark_case(benchmark, run, correct(run(), expected), baseline, what=provider,
                            shape="x".join(map(str, shape)), layout=layout)
    benchmark.extra_info["GBps"] = gbps(mode, shape, median)


def main():
    print(machine_line())
    print(f"{'case':44s} {'median ms':>10s} {'IQR ms':>8s} {'GB/s':>8s} {'speedup':>8s}")
    for param in CASES:
        name, mode, layout, provider = param.values
        shape = shapes()[name]
        expected, baseline = check_and_baseline(mode, shape, layout)
        run = make_case(mode, provider, shape, layout)
        print_case(param.id, 44, run, correct(run(), expected), baseline, DEVICE,
                   lambda median: gbps(mode, shape, median))


if __name__ == "__main__":
    main()
