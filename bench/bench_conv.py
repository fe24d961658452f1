"""Benchmark of the convolution family (rim_fast/ops/conv.py) on the standard workloads' feature maps
(pytest-benchmark).

Tensors are the Hourglass's first-level activations, [B, nf=32, *size]: S1 [32, 32, 256], S2 [16, 32, 64x64],
S3 [4, 32, 16x16x16], L2 [32, 32, 256x256] (CUDA only). Ops:
  tanh       fwd: the activation; fwdbwd: and its gradient (tanh_backward from the output)
  conv       a 3x3 "same" convolution nf -> nf, fwd (no autograd)
  conv_tanh  the same convolution followed by tanh, fwd (no autograd: inference, where the fusion applies);
             fwdbwd: forward, then the gradients of the input and the weight (training)
  conv_transpose_tanh  an upsampling layer and its tanh: a stride-2 3x3 transposed convolution nf -> nf from the
             half-size map [B, nf, *size/2] to [B, nf, *size], then tanh, fwd (no autograd)
  conv_out   the thin output conv nf -> 1 (the Hourglass' merged output layer), fwd (no autograd: inference);
             fwdbwd: forward, then the gradients of the input and the weight
  conv_in    the thin input conv 2 -> nf and its tanh (a network's first layer), fwdbwd: forward, then the
             gradients of the input and the weight
  shift_sum  the thin output conv's last step, fwd: its 3^d taps' planes [1, 3^d, B, *size] summed shifted
             (csrc/shift.cpp); shift_stack: its adjoint, fwd: [1, B, *size] -> [1, 3^d, B, *size]
  conv_weight  3D only: the weight and bias gradient of the 3x3x3 conv nf -> nf from its input and output gradient,
             fwd; providers "channels_last" (oneDNN's convolution_backward) and "cpp" (Winograd:
             rim_fast::winograd_conv3d_weight, then winograd_weight's adjoint, which a RIM call runs once for its T
             steps, here at every call)
Providers: "reference" (the reference op, eager: torch.tanh, NCHW convolutions), "compiled" (torch.compile of the
reference, fullgraph, static shapes), and the implementations ``auto`` can pick on this device: "cpp" (tanh and the
shifted sums: the C++ CPU kernels), "channels_last" (CPU convolutions in oneDNN's preferred layout), "onednn_fused"
and "unfused" (conv_tanh and conv_transpose_tanh on the CPU), and for conv_tanh fwdbwd "function":
``_cpu._ConvTanh`` for this convolution too (the fused forward and a Python backward, which only the thin input
conv takes: with autograd ``onednn_fused`` runs the channels-last convolution and tanh in place); for conv_out and
conv_in, "channels_last" is the channels-last path with its thin-convolution code (``_cpu.THIN_OUT``,
``_cpu.THIN_IN``) and "onednn" the same with oneDNN for every convolution; for conv_out fwd, "matmul" is the
channels-last path with the matrix products where ``auto`` takes the depthwise convolution
(``_cpu.THIN_DEPTHWISE_DIMS``: 3D). In 3D, conv and conv_tanh on the CPU run their 3x3x3 convolutions forward by
Winograd (``_cpu.WINOGRAD``, csrc/winograd.h); "direct" is the same path with oneDNN's direct convolutions instead.
Every case is checked against the reference before it is timed (no time for a wrong case).

GB/s for tanh (e = 4 bytes, N elements): fwd 2 e N (read x, write y); fwdbwd 5 e N (and read grad, y; write
grad_x); for the shifted sums (K taps, N elements a plane) e (K + 1) N, what they read and write. GFLOP/s for
the convolutions: 2 N nf 3^d (multiply-adds of the 3x3(x3) kernel; N the input's elements).

    pytest bench/bench_conv.py [--benchmark-json out.json]     # RIM_FAST_BENCH_SMOKE=1: tiny, 1 round
    python -m bench.bench_conv                                  # the same as a table
The first line printed names the machine (device, CUDA, torch, triton, threads, git revision).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from bench.common import (MODEL, SMOKE, benchmark_case, machine_line, print_case, reference_result, synchronize,
                          workloads)
from rim_fast.ops import _cpp, _cpu, reference
from rim_fast.ops.conv import _conv_then_tanh, _conv_transpose_then_tanh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NF = MODEL["nf"]
CPU = DEVICE == "cpu"
OPS = (("tanh", "fwd"), ("tanh", "fwdbwd"), ("conv", "fwd"), ("conv_tanh", "fwd"), ("conv_tanh", "fwdbwd"),
       ("conv_transpose_tanh", "fwd"), ("conv_out", "fwd"), ("conv_out", "fwdbwd"), ("conv_in", "fwdbwd"),
       ("shift_sum", "fwd"), ("shift_stack", "fwd"), ("conv_weight", "fwd"))
#: the shifted sums of the thin convolutions (CPU only)
SHIFT = ("shift_sum", "shift_stack")
#: input and output channels of the thin convolutions
THIN = {"conv_out": (NF, 1), "conv_in": (2, NF)}
PROVIDERS = {
    "tanh": ("reference", "compiled") + (("cpp",) if CPU and _cpp.has_kernel("cpu") else ()),
    "conv": ("reference", "compiled") + (("channels_last", "direct") if CPU else ()),
    "conv_tanh": ("reference", "compiled") + (("onednn_fused", "function") if CPU and _cpu._fused_works() else ())
                 + (("unfused", "direct") if CPU else ()),
    "conv_transpose_tanh": ("reference", "compiled") + (("onednn_fused",) if CPU and _cpu._transpose_fused_works()
                                                        else ()) + (("unfused",) if CPU else ()),
    "conv_out": ("reference",) + (("channels_last", "matmul", "onednn") if CPU else ()),
    "conv_in": ("reference",) + (("channels_last", "onednn") if CPU else ()),
    **{op: ("reference", "cpp") if CPU and _cpp.has_kernel("cpu") else () for op in SHIFT},
    "conv_weight": ("reference",) + (("channels_last",) if CPU else ()) + (("cpp",) if CPU and _cpp.has_kernel("cpu")
                                                                          else ()),
}
#: conv_transpose_tanh's arguments after (x, weight, bias): stride 2, padding 1, output_padding 1, groups, dilation,
#: no crop (score_models' ConvTransposed*dSame of an Hourglass' decoder)
_UPSAMPLE = (2, 1, 1, 1, 1, None)
BYTES_PER_ELEMENT = {("tanh", "fwd"): 2, ("tanh", "fwdbwd"): 5}


def shapes() -> dict:
    """name -> activation shape [B, nf, *size] of each standard workload on this device."""
    return {name: (w["batch"], NF, *w["size"]) for name, w in workloads().items() if DEVICE in w["devices"]}


def _function(op: str, provider: str):
    if op in SHIFT:
        kernel = getattr(_cpp if provider == "cpp" else reference, op)
        sign = 1

        def fn(planes):
            return kernel(planes, (3,) * (planes.dim() - (3 if op == "shift_sum" else 2)), sign)
    elif op == "tanh":
        fn = _cpp.tanh if provider == "cpp" else reference.tanh
    elif op == "conv_weight":
        fn = {"channels_last": _weight_grad_onednn, "cpp": _weight_grad_winograd}.get(provider, _weight_grad_reference)
    elif op == "conv":
        impl = _cpu.conv if provider in ("channels_last", "direct") else reference.conv

        def fn(x, w, b):
            return impl(x, w, b, 1, "same", 1, 1)
    elif op == "conv_tanh":
        impl = {"onednn_fused": _cpu.conv_tanh, "direct": _cpu.conv_tanh, "unfused": _conv_then_tanh,
                "function": _conv_tanh_function}.get(provider, reference.conv_tanh)

        def fn(x, w, b):
            return impl(x, w, b, "same", 1, 1)
    elif op in THIN:
        impl = {"conv_out": (reference.conv, _cpu.conv), "conv_in": (reference.conv_tanh, _cpu.conv_tanh)}[op][
            provider != "reference"]
        args = (1, "same", 1, 1) if op == "conv_out" else ("same", 1, 1)

        def fn(x, w, b):
            return impl(x, w, b, *args)
    else:
        impl = {"onednn_fused": _cpu.conv_transpose_tanh, "unfused": _conv_transpose_then_tanh}.get(
            provider, reference.conv_transpose_tanh)

        def fn(x, w, b):
            return impl(x, w, b, *_UPSAMPLE)
    if provider == "compiled":
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


def _conv_tanh_function(x, w, b, padding, dilation, groups):
    # _ConvTanh for any convolution: oneDNN's fused forward, tanh's derivative and the convolution's backward in
    # Python (stride 1); padding and dilation as _cpu.conv_tanh turns them into lists
    one_d = x.dim() == 3
    xc, wc = _cpu._to_cl(x), _cpu._weight(w)
    pads = _cpu._pads(padding, wc, one_d, dilation)
    out = _cpu._ConvTanh.apply(xc, wc, b, pads, _cpu._list(dilation, one_d, xc.dim() - 2, 1), groups)
    return out.squeeze(2) if one_d else out


def _weight_grad_reference(x, g):
    # the NCDHW convolution's weight and bias gradient, as one flat tensor
    with torch.enable_grad():
        w = x.new_zeros(g.shape[1], x.shape[1], 3, 3, 3, requires_grad=True)
        b = x.new_zeros(g.shape[1], requires_grad=True)
        gw, gb = torch.autograd.grad(reference.conv(x, w, b, 1, "same"), (w, b), g)
    return torch.cat([gw.reshape(-1), gb])


def _weight_grad_onednn(x, g):
    xc, gc = _cpu._to_cl(x), _cpu._to_cl(g)
    w = x.new_empty(g.shape[1], x.shape[1], 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    _, gw, gb = torch.ops.aten.convolution_backward(gc, xc, w, [g.shape[1]], [1] * 3, [1] * 3, [1] * 3, False,
                                                    [0] * 3, 1, [False, True, True])
    return torch.cat([gw.reshape(-1), gb])


def _weight_grad_winograd(x, g):
    xc, gc = _cpu._to_cl(x), _cpu._to_cl(g)
    gw = reference.winograd_weight_grad(_cpp.winograd_conv3d_weight(xc, gc))
    return torch.cat([gw.reshape(-1), gc.sum((0, 2, 3, 4))])


def _input_shape(op, shape) -> tuple:
    # the upsampling layer reads the half-size map; the thin convolutions their own channels; the shifted sums the
    # thin output conv's planes
    if op in SHIFT:
        taps = (3 ** (len(shape) - 2),) if op == "shift_sum" else ()
        return (1, *taps, shape[0], *shape[2:])
    if op in THIN:
        return (shape[0], THIN[op][0], *shape[2:])
    return (*shape[:2], *[n // 2 for n in shape[2:]]) if op == "conv_transpose_tanh" else tuple(shape)


def _output_shape(op, shape) -> tuple:
    return (shape[0], THIN[op][1], *shape[2:]) if op in THIN else tuple(shape)


def _inputs(op, shape):
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(*_input_shape(op, shape), generator=g)).to(DEVICE)
    if op == "tanh" or op in SHIFT:
        return [x]
    if op == "conv_weight":
        return [x, torch.randn(*shape, generator=g).to(DEVICE)]
    dims = len(shape) - 2
    c_in, c_out = THIN.get(op, (NF, NF))
    w = (torch.randn(c_out, c_in, *[3] * dims, generator=g) / math.sqrt(c_in * 3 ** dims)).to(DEVICE)
    return [x, w, torch.randn(c_out, generator=g).to(DEVICE)]


def make_case(op: str, mode: str, provider: str, shape: tuple):
    """(callable to time) for one case; the callable synchronises the device and returns the outputs."""
    fn = _function(op, provider)
    inputs = _inputs(op, shape)
    # the thin convolutions and conv_tanh (training): their weight's gradient too
    wrt = inputs[:2] if op in THIN or op == "conv_tanh" else inputs[:1]
    if mode == "fwdbwd":
        for t in wrt:
            t.requires_grad_()
    cot = (torch.randn(_output_shape(op, shape), generator=torch.Generator().manual_seed(1)).to(DEVICE)
           if mode == "fwdbwd" else None)

    thin = (0, 0) if provider == "onednn" else (_cpu.THIN_OUT, _cpu.THIN_IN)
    depthwise = () if provider == "matmul" else _cpu.THIN_DEPTHWISE_DIMS

    winograd = _cpu.WINOGRAD and provider != "direct"

    def run():
        saved = _cpu.THIN_OUT, _cpu.THIN_IN, _cpu.THIN_DEPTHWISE_DIMS, _cpu.WINOGRAD
        # for forward and backward
        _cpu.THIN_OUT, _cpu.THIN_IN, _cpu.THIN_DEPTHWISE_DIMS, _cpu.WINOGRAD = (*thin, depthwise, winograd)
        try:
            with torch.set_grad_enabled(mode == "fwdbwd"):
                out = fn(*inputs)
                outs = (out,) + (torch.autograd.grad(out, wrt, cot) if mode == "fwdbwd" else ())
        finally:
            _cpu.THIN_OUT, _cpu.THIN_IN, _cpu.THIN_DEPTHWISE_DIMS, _cpu.WINOGRAD = saved
        synchronize(DEVICE)
        return outs
    return run


@functools.cache
def check_and_baseline(op, mode, shape):
    """The reference result and its median time for a case (measured once per run)."""
    return reference_result(make_case(op, mode, "reference", shape), DEVICE)


def correct(outs, expected) -> bool:
    # tanh within a few ulp; convolutions summed in another order (absolute at the output's scale: a weight
    # gradient sums B * S products)
    return len(outs) == len(expected) and all(
        torch.allclose(a.detach().double(), b.double(), rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
        for a, b in zip(outs, expected))


def throughput(op, mode, shape, seconds) -> dict:
    n = math.prod(_input_shape(op, shape))
    if op in SHIFT:
        taps = 3 ** (len(shape) - 2)
        plane = n // taps if op == "shift_sum" else n
        return {"GBps": 4 * (taps + 1) * plane / seconds / 1e9}
    if op == "tanh":
        return {"GBps": BYTES_PER_ELEMENT[(op, mode)] * 4 * n / seconds / 1e9}
    if op == "conv_weight":  # the direct convolution's multiply-adds, as for the others
        return {"GFLOPs": 2 * n * NF * 27 / seconds / 1e9}
    c_out = THIN[op][1] if op in THIN else NF
    passes = 3 if mode == "fwdbwd" else 1  # forward, input gradient, weight gradient
    return {"GFLOPs": passes * 2 * n * c_out * 3 ** (len(shape) - 2) / seconds / 1e9}


CASES = [pytest.param(name, op, mode, provider, id=f"{name}-{op}-{mode}-{provider}")
         for i, name in enumerate(shapes()) for op, mode in OPS for provider in PROVIDERS[op]
         # smoke mode (CI): compiling costs seconds per case and tells nothing there; one workload suffices
         if not (SMOKE and provider == "compiled" and i > 0) and not (provider == "function" and mode == "fwd")
         and not (provider == "matmul" and mode == "fwdbwd")
         # Winograd's convolutions are 3D: elsewhere "direct" is "channels_last"
         and not ((provider == "direct" or op == "conv_weight") and len(shapes()[name]) != 5)]


@pytest.mark.parametrize("name,op,mode,provider", CASES)
def test_conv_family(benchmark, name, op, mode, provider):
    shape = shapes()[name]
    expected, baseline = check_and_baseline(op, mode, shape)
    run = make_case(op, mode, provider, shape)
    median = benchmark_case(benchmark, run, correct(run(), expected), baseline, what=provider,
                            shape="x".join(map(str, shape)))
    benchmark.extra_info.update(throughput(op, mode, shape, median))


def main():
    print(machine_line())
    print(f"{'case':40s} {'median ms':>10s} {'IQR ms':>8s} {'GB/s|GFLOP/s':>13s} {'speedup':>8s}")
    for param in CASES:
        name, op, mode, provider = param.values
        shape = shapes()[name]
        expected, baseline = check_and_baseline(op, mode, shape)
        run = make_case(op, mode, provider, shape)
        print_case(param.id, 40, run, correct(run(), expected), baseline, DEVICE,
                   lambda median: next(iter(throughput(op, mode, shape, median).values())), rate_width=13)


if __name__ == "__main__":
    main()
