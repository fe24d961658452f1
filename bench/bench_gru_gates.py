"""Benchmark of the ConvGRU gate ops, per GRU cell of the standard workloads (pytest-benchmark).

The cell: Hourglass(nf=32, ch_mult=(2, 2), hidden_units=32) puts two GRUs with H = 16 at 1/4 of the input
resolution: S1 [32, 16, 64], S2 [16, 16, 16x16], S3 [4, 16, 4x4x4], L2 [32, 16, 64x64] (B, H, spatial).
Ops: "cell" = gru_gates_zr, the U_h convolution of r h (3^d kernel, "same"), gru_gates_h: the cell as the
GRU runs it once W x and U_{z,r} h are computed (the convolution keeps Inductor from fusing the two stages);
"gates" = gru_gates_zr then gru_gates_h with U_h (r h) given as an input (the gate ops alone);
"zero" = gru_gates_zero_state. Modes: "fwd", and "fwdbwd" (forward + the gradients of every input).
Providers: "reference" (eager), "compiled" (torch.compile of the reference), on CUDA also "triton" (the
fused kernels, eager), "triton_compiled" (torch.compile over the triton ops), and "reference_graph" /
"triton_graph" (the eager code captured in a CUDA graph and replayed: kernel time without the host's launch
overhead, which dominates every standard cell in eager mode), "compiled_graph" / "triton_compiled_graph"
(the compiled code captured likewise, as RIM.compile's reduce-overhead mode runs it), "reference_graph_cl" /
"triton_graph_cl" (the same graphs on channels-last inputs, as RIM_FAST_CUDA_LAYOUT=channels_last leaves them; the
kernels then write channels-last outputs and tile along the channels); the compiled providers run
for "cell" only (compiling costs seconds per case). The Triton interpreter is not a benchmark: on CPU
only the reference providers run. Each case is checked against the reference before it is timed.

GB/s is the effective bandwidth of the fused kernels' traffic, the same bytes for every provider (for "cell"
the convolution's traffic is not counted): fwd cell/gates 12 e B H N (zr: read wx[:, :2H], uzr, h, write z, rh = 7; h: read wx[:, 2H:], uh, z, h, write h' = 5),
bwd cell/gates 17 e B H N (zr bwd 9, h bwd 8), zero fwd 3, zero bwd 5 (e = element size, N = prod(spatial)).

    pytest bench/bench_gru_gates.py [--benchmark-json out.json]    # RIM_FAST_BENCH_SMOKE=1: tiny, 1 round
    python -m bench.bench_gru_gates                                 # the same as a table
The first line printed names the machine (device, CUDA, torch, triton, git revision).
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from bench.common import (SMOKE, benchmark_case, machine_line, print_case, reference_result, timed_call,
                          to_channels_last, workloads)
from rim_fast.ops import reference, _triton

# every case compiles the same `cell` code object again (other closures, shapes, grad mode)
for _name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, max(getattr(torch._dynamo.config, _name), 256))

H = 16  # hidden_units=32 split over the GRUBlock's two GRUs
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = _triton.missing() is None and DEVICE == "cuda" and not _triton.K.INTERPRETED
PROVIDERS = ("reference", "compiled") + (("triton", "triton_compiled") if KERNELS else ()) + (
    ("reference_graph", "compiled_graph") if DEVICE == "cuda" else ()) + (
    ("triton_graph", "triton_compiled_graph", "reference_graph_cl", "triton_graph_cl") if KERNELS else ())
# RIM_FAST_BENCH_PROVIDERS=a,b / RIM_FAST_BENCH_OPS=cell: run a subset
if os.environ.get("RIM_FAST_BENCH_PROVIDERS"):
    PROVIDERS = tuple(p for p in PROVIDERS if p in os.environ["RIM_FAST_BENCH_PROVIDERS"].split(","))
OPS = tuple(os.environ.get("RIM_FAST_BENCH_OPS", "cell,gates,zero").split(","))
BYTES_PER_ELEMENT = {("cell", "fwd"): 12, ("cell", "fwdbwd"): 12 + 17, ("gates", "fwd"): 12,
                     ("gates", "fwdbwd"): 12 + 17, ("zero", "fwd"): 3, ("zero", "fwdbwd"): 8}


def cell_shapes() -> dict:
    """name -> (B, spatial) of the bottleneck GRU cell of each standard workload on this device."""
    return {name: (w["batch"], tuple(s // 4 for s in w["size"])) for name, w in workloads().items()
            if DEVICE in w["devices"]}


def _inputs(B, S, op, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    if op == "cell":
        w_uh = 0.1 * rnd(H, H, *[3] * len(S))
        return [rnd(B, 3 * H, *S), rnd(B, 2 * H, *S), w_uh, rnd(B, H, *S), rnd(H), rnd(H), rnd(H)]
    if op == "gates":
        return [rnd(B, 3 * H, *S), rnd(B, 2 * H, *S), rnd(B, H, *S), rnd(B, H, *S), rnd(H), rnd(H), rnd(H)]
    return [rnd(B, 2 * H, *S), rnd(H), rnd(H)]


def _gates(gates_zr, gates_h):
    def gates(wx, uzr, uh, h, bias_z, bias_r, bias_h):
        z, rh = gates_zr(wx, uzr, h, bias_z, bias_r)
        return gates_h(wx, uh, z, h, bias_h), rh
    return gates


def _cell(gates_zr, gates_h):
    def cell(wx, uzr, w_uh, h, bias_z, bias_r, bias_h):
        z, rh = gates_zr(wx, uzr, h, bias_z, bias_r)
        return gates_h(wx, reference.conv(rh, w_uh, None), z, h, bias_h)
    return cell


def _function(op: str, provider: str):
    if op in ("cell", "gates"):
        make = _cell if op == "cell" else _gates
        fn = make(_triton.gru_gates_zr, _triton.gru_gates_h) if provider.startswith("triton") else \
            make(reference.gru_gates_zr, reference.gru_gates_h)
    else:
        fn = _triton.gru_gates_zero_state if provider.startswith("triton") else reference.gru_gates_zero_state
    if provider.endswith("compiled"):
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


def make_case(op: str, mode: str, provider: str, B: int, S: tuple):
    """The callable to time for one case (it synchronises the device and returns its results)."""
    layout_cl, provider = provider.endswith("_cl"), provider.removesuffix("_cl")
    fn = _function(op, provider.removesuffix("_graph"))
    inputs = _inputs(B, S, op)
    if layout_cl:
        inputs = [to_channels_last(t) for t in inputs]
    if mode == "fwdbwd":
        inputs = [t.requires_grad_() for t in inputs]

    def compute():
        with torch.set_grad_enabled(mode == "fwdbwd"):
            outs = fn(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            if mode == "fwdbwd":
                outs = outs + torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
        return outs

    return timed_call(compute, DEVICE, graph=provider.endswith("_graph"))


@functools.cache
def check_and_baseline(op, mode, B, S):
    """The reference result and its median time for a case (measured once per run)."""
    return reference_result(make_case(op, mode, "reference", B, S), DEVICE)


def correct(outs, expected, op) -> bool:
    # the cell's U_h convolution runs in TF32 on CUDA (cuDNN's default): algorithms differ in the 1e-3s
    rtol, atol = (1e-2, 1e-3) if op == "cell" and DEVICE == "cuda" else (1e-4, 1e-5)
    return all(torch.allclose(a.detach().float(), b.float(), rtol=rtol, atol=atol) for a, b in zip(outs, expected))


def gbps(op, mode, B, S, seconds) -> float:
    return BYTES_PER_ELEMENT[(op, mode)] * 4 * B * H * math.prod(S) / seconds / 1e9


def _wanted(name, op, provider) -> bool:
    # compiling costs seconds per case: compiled providers for the full cell only (in smoke mode, one workload)
    if "compiled" not in provider:
        return True
    return op == "cell" and (not SMOKE or name == next(iter(cell_shapes())))


CASES = [pytest.param(name, op, mode, provider, id=f"{name}-{op}-{mode}-{provider}")
         for name in cell_shapes() for op in OPS for mode in ("fwd", "fwdbwd")
         for provider in PROVIDERS if _wanted(name, op, provider)]


@pytest.mark.parametrize("name,op,mode,provider", CASES)
def test_gru_gates(benchmark, name, op, mode, provider):
    B, S = cell_shapes()[name]
    expected, baseline = check_and_baseline(op, mode, B, S)
    run = make_case(op, mode, provider, B, S)
    median = benchmark_case(benchmark, run, correct(run(), expected, op), baseline, what=provider,
                            B=B, H=H, spatial="x".join(map(str, S)))
    benchmark.extra_info["GBps"] = gbps(op, mode, B, S, median)


def main():
    print(machine_line())
    print(f"{'case':40s} {'median ms':>10s} {'IQR ms':>8s} {'GB/s':>8s} {'speedup':>8s}")
    for param in CASES:
        name, op, mode, provider = param.values
        B, S = cell_shapes()[name]
        expected, baseline = check_and_baseline(op, mode, B, S)
        run = make_case(op, mode, provider, B, S)
        print_case(param.id, 40, run, correct(run(), expected, op), baseline, DEVICE,
                   lambda median: gbps(op, mode, B, S, median))


if __name__ == "__main__":
    main()
