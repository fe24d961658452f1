"""The convolution family (rim_fast/ops/conv.py): the CPU channels-last convolutions, the C++ tanh kernel
(csrc/tanh.*) and conv + tanh against their references: forward, every gradient, the error budget of conftest,
layouts, NaN-poisoned outputs, opcheck."""
import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rim_fast import _ext, ops
from rim_fast.ops import _cpp, _cpu, reference

from conftest import BUDGET_FACTOR, BUDGET_SLACK, assert_error_budget, tol


def conv_tol(dtype):
    # another summation order over C_in * k^N (up to 81 here) terms of O(1) products: absolute error
    # ~ eps * sqrt(terms) * |terms|, so the float32 bound is absolute at the output's scale
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else tol(dtype)

CASES = [
    pytest.param(1, (1,), 3, 1, id="1D-L1-k3"),
    pytest.param(1, (17,), 3, 2, id="1D-L17-k3-s2"),
    pytest.param(1, (16,), 4, 2, id="1D-L16-k4-s2"),
    pytest.param(2, (7, 9), 3, 1, id="2D-7x9-k3"),
    pytest.param(2, (8, 5), 5, 2, id="2D-8x5-k5-s2"),
    pytest.param(3, (3, 4, 5), 3, 1, id="3D-3x4x5-k3"),
    pytest.param(3, (4, 4, 4), 3, 2, id="3D-4x4x4-k3-s2"),
]


@pytest.mark.parametrize("dims,size,k,stride", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_channels_last_convs_match_reference(dims, size, k, stride, dtype):
    x = torch.randn(2, 3, *size, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 3, *([k] * dims), dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True)
    if stride == 1:
        args = (w, b, 1, "same", 1, 1)
        ref, new = reference.conv(x, *args), _cpu.conv(x, *args)
    else:
        args = (w, b, k, stride, 1, 1, True)
        ref, new = reference.conv_same(x, *args), _cpu.conv_same(x, *args)
    assert new.shape == ref.shape
    torch.testing.assert_close(new, ref, **conv_tol(dtype))
    cot = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (x, w, b), cot)
    g_new = torch.autograd.grad(new, (x, w, b), cot)
    assert len(g_new) == len(g_ref)
    for a, c in zip(g_new, g_ref):
        torch.testing.assert_close(a, c, **conv_tol(dtype))

    wt = torch.randn(3, 4, *([k] * dims), dtype=dtype, requires_grad=True)
    bt = torch.randn(4, dtype=dtype, requires_grad=True)
    for bias in (None, bt):
        ref_t = reference.conv_transpose(x, wt, bias, 2, (k - 1) // 2, 1, 1, 1)
        new_t = _cpu.conv_transpose(x, wt, bias, 2, (k - 1) // 2, 1, 1, 1)
        torch.testing.assert_close(new_t, ref_t, **conv_tol(dtype))
        wrt = (x, wt) if bias is None else (x, wt, bias)
        cot = torch.randn_like(ref_t)
        for a, c in zip(torch.autograd.grad(new_t, wrt, cot), torch.autograd.grad(ref_t, wrt, cot), strict=True):
            torch.testing.assert_close(a, c, **conv_tol(dtype))


class _ConvCalls(TorchDispatchMode):
    """The arguments of every ``aten.convolution`` (forward) and ``aten.convolution_backward`` call."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward.append(args)
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward.append(args)
        return func(*args, **(kwargs or {}))

    def batches(self) -> tuple:
        # the batch size of each forward and each backward call (the input is argument 0, and 1 in backward)
        return [a[0].shape[0] for a in self.forward], [a[1].shape[0] for a in self.backward]

    def biases(self) -> list:
        # the bias argument of each forward call: None where the bias is added after it
        return [a[2] for a in self.forward]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_transposed_conv_adds_a_trained_bias_after_onednn(dims):
    # oneDNN's transposed-convolution backward computes the bias gradient slowly (``_cpu._late_bias``): a bias that
    # needs a gradient is added after the convolution; without autograd it stays inside the primitive
    x = torch.randn(2, 6, *([5] * dims))
    w = torch.randn(6, 4, *([3] * dims), requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    for grad, inside in ((True, False), (False, True)):
        with torch.set_grad_enabled(grad), _ConvCalls() as mode:
            out = _cpu.conv_transpose(x, w, b, 2, 1, 1, 1, 1)
        assert len(mode.biases()) == 1 and (mode.biases()[0] is not None) == inside
        torch.testing.assert_close(out, reference.conv_transpose(x, w, b, 2, 1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    out = _cpu.conv_transpose(x, w, b, 2, 1, 1, 1, 1)
    (gb,) = torch.autograd.grad(out, (b,), torch.ones_like(out))
    torch.testing.assert_close(gb, torch.full_like(b, out[:, 0].numel()))
    with torch.autocast("cpu", dtype=torch.bfloat16), _ConvCalls() as mode:
        _cpu.conv_transpose(x, w, b, 2, 1, 1, 1, 1)
    assert mode.biases()[0] is not None  # under autocast the bias stays inside (no extra bfloat16 rounding)
    # CPU tensors only (cuDNN, which the CUDA channels-last layout runs through this path, is not oneDNN)
    assert _cpu._late_bias(x, b) and not _cpu._late_bias(x.to("meta"), b.to("meta"))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_weights_laid_out_once_per_call(dims):
    """Inside a RIM call (layers.derived's per-call cache) each weight is converted to channels-last once, not by
    aten in every step's forward and backward: the steps' convolutions read one copy (fewer weight copies,
    counted with the profiler), and every gradient matches the reference's over two steps."""
    from torch.profiler import profile
    from rim_fast.layers.derived import per_call_cache
    size = (6, 5, 4)[:dims]
    x = torch.randn(2, 3, *size, requires_grad=True)
    # weights at the scale of an initialised layer's (1 / fan-in): activations stay O(1) through the steps
    w = (torch.randn(3, 3, *([3] * dims)) / 3 ** (dims + 1)).requires_grad_()
    wt = (torch.randn(3, 3, *([3] * dims)) / 3 ** (dims + 1)).requires_grad_()
    b = torch.randn(3, requires_grad=True)

    def steps(conv, conv_tanh, conv_transpose, crop):
        y = x
        for _ in range(2):
            y = conv_tanh(conv(y, w, b, 1, "same", 1, 1), w, b, "same", 1, 1)
            y = crop(conv_transpose(y, wt, None, 2, 1, 1, 1, 1))[..., ::2] if dims == 1 else \
                conv(conv_transpose(y, wt, None, 1, 1, 0, 1, 1), w, None, 1, "same", 1, 1)
        return y

    def crop(t):
        return t[..., :size[-1] * 2]

    ref = steps(reference.conv, reference.conv_tanh, reference.conv_transpose, crop)
    cot = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (x, w, wt, b), cot)

    def weight_copies(cached):
        with profile(record_shapes=True) as prof:
            with per_call_cache() if cached else contextlib.nullcontext():
                if cached:
                    assert _cpu._weight(w) is _cpu._weight(w) and _cpu._weight(w).is_contiguous(
                        memory_format=_cpu._CL[dims + 2 if dims > 1 else 4])
                out = steps(_cpu.conv, _cpu.conv_tanh, _cpu.conv_transpose, crop)
                grads = torch.autograd.grad(out, (x, w, wt, b), cot)
        copies = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                     if e.key in ("aten::copy_", "aten::clone") and e.input_shapes and
                     list(e.input_shapes[0]) == list(w.shape))
        return out, grads, copies

    out, grads, copies = weight_copies(cached=True)
    torch.testing.assert_close(out, ref, **conv_tol(torch.float32))
    for g, g_r in zip(grads, g_ref):
        torch.testing.assert_close(g, g_r, **conv_tol(torch.float32))
    if dims > 1:  # 1D weights go through unsqueeze(2): [C, C, 1, k] copies are not counted by shape
        assert copies < weight_copies(cached=False)[2]


# ---- thin convolutions: few output channels (matrix product, shifted sums) and few input channels (input grad)

THIN_CASES = [
    pytest.param(1, (9,), 3, id="1D-L9-k3"),
    pytest.param(1, (4,), 5, id="1D-L4-k5"),  # the kernel wider than the signal
    pytest.param(2, (7, 6), 3, id="2D-7x6-k3"),
    pytest.param(2, (3, 8), 5, id="2D-3x8-k5"),
    pytest.param(2, (6, 5), 1, id="2D-6x5-k1"),
    pytest.param(3, (3, 4, 5), 3, id="3D-3x4x5-k3"),
    pytest.param(3, (2, 3, 2), 3, id="3D-2x3x2-k3"),
]


def _nodes(out) -> list:
    # the names of the autograd nodes that made ``out`` (1D: a squeeze of the [B, C, 1, L] result)
    node, names = out.grad_fn, []
    while node is not None:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    return names


def _close_with_double_backward(out, ref, inputs, dtype):
    """``out`` and every gradient and gradient of a gradient (double backward) match the reference's, for one
    random cotangent, which is returned."""
    torch.testing.assert_close(out, ref, **conv_tol(dtype))
    cot = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, cot, create_graph=True)
    grads_ref = torch.autograd.grad(ref, inputs, cot, create_graph=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **conv_tol(dtype))
    kw = dict(allow_unused=True, materialize_grads=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in grads), inputs, **kw)
    second_ref = torch.autograd.grad(sum((g * g).sum() for g in grads_ref), inputs, **kw)
    for g, g_ref in zip(second, second_ref):
        # relative to the tensor's scale too, as the reference's own error is: sums of large terms of both signs
        # (float32 ~1e-3 at a scale of 1e3 for unscaled random weights, either library; AVX2's oneDNN and MKL sum in
        # another order than AVX-512's)
        base = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else tol(dtype)
        scale = g_ref.abs().max().item() if g_ref.numel() else 0.0
        torch.testing.assert_close(g, g_ref, rtol=base["rtol"],
                                   atol=max(base["atol"], 100 * torch.finfo(dtype).eps * scale))
    return cot


@pytest.mark.parametrize("dims,size,k", THIN_CASES)
@pytest.mark.parametrize("c_out", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_thin_output_conv_matches_reference(dims, size, k, c_out, bias, dtype, monkeypatch):
    """_ThinOutConv (the merged output conv, nf -> C): forward, every gradient and double backward; two output
    channels too (auto takes one only)."""
    monkeypatch.setattr(_cpu, "THIN_OUT", 2)
    x = torch.randn(2, 5, *size, dtype=dtype, requires_grad=True)
    w = (torch.randn(c_out, 5, *([k] * dims), dtype=dtype) / (5 * k ** dims) ** 0.5).requires_grad_()
    b = torch.randn(c_out, dtype=dtype, requires_grad=True) if bias else None
    out = _cpu.conv(x, w, b, 1, "same", 1, 1)
    assert "_ThinOutConvBackward" in _nodes(out)
    assert out.shape == (2, c_out, *size)
    if dims > 1:
        assert out.is_contiguous(memory_format=_cpu._CL[dims + 2])
    inputs = (x, w) + ((b,) if bias else ())
    _close_with_double_backward(out, reference.conv(x, w, b, 1, "same", 1, 1), inputs, dtype)


@pytest.mark.parametrize("dims,size,k", THIN_CASES)
@pytest.mark.parametrize("c_out", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_thin_output_conv_without_autograd(dims, size, k, c_out, bias, monkeypatch):
    """Without autograd a float32 thin conv runs as a depthwise convolution and a sum over the input channels in
    3D (``THIN_DEPTHWISE_DIMS``), as the matrix products elsewhere; within the error budget of the float32
    reference against float64, laid out channels-last."""
    monkeypatch.setattr(_cpu, "THIN_OUT", 2)
    calls = []
    depthwise = _cpu._thin_out_depthwise
    monkeypatch.setattr(_cpu, "_thin_out_depthwise", lambda *a: calls.append(1) or depthwise(*a))
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    w = torch.randn(c_out, 5, *([k] * dims), dtype=torch.float64) / (5 * k ** dims) ** 0.5
    b = torch.randn(c_out, dtype=torch.float64) if bias else None

    def run(dtype):
        cast = [None if t is None else t.to(dtype) for t in (x, w, b)]
        return reference.conv(*cast, 1, "same", 1, 1)

    with torch.no_grad():
        out = _cpu.conv(x.float(), w.float(), None if b is None else b.float(), 1, "same", 1, 1)
    assert calls == ([1] if dims == 3 else [])
    assert out.shape == (3, c_out, *size) and out.dtype == torch.float32
    if dims > 1:
        assert out.is_contiguous(memory_format=_cpu._CL[dims + 2])
    assert_error_budget([out], [run(torch.float32)], [run(torch.float64)], torch.float32, ["out"])
    # with autograd, or in float64, the matrix products (their backward is 3x faster than the depthwise one's)
    x.requires_grad_()
    _cpu.conv(x.float(), w.float(), None, 1, "same", 1, 1)
    with torch.no_grad():
        _cpu.conv(x, w, b, 1, "same", 1, 1)
    assert calls == ([1] if dims == 3 else [])


@pytest.mark.parametrize("dims,size,k", THIN_CASES)
@pytest.mark.parametrize("c_in", [1, 2])
def test_thin_input_conv_gradient_matches_reference(dims, size, k, c_in, monkeypatch):
    """The input conv's input gradient (2C -> nf, conv + tanh with autograd) as a matrix product and shifted
    sums, for kernels of at least 9 taps (oneDNN's own below): every gradient and double backward."""
    if not _cpu._fused_works():
        pytest.skip("this torch has no working mkldnn._convolution_pointwise")
    calls = []
    thin_grad = _cpu._thin_in_input_grad
    monkeypatch.setattr(_cpu, "_thin_in_input_grad", lambda *a: calls.append(1) or thin_grad(*a))
    x = torch.randn(2, c_in, *size, requires_grad=True)
    w = (torch.randn(6, c_in, *([k] * dims)) / (c_in * k ** dims) ** 0.5).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    out = _cpu.conv_tanh(x, w, b, "same", 1, 1)
    # _ConvTanh's backward where the thin path applies, else autograd's own nodes (conv, then tanh in place)
    assert ("_ConvTanhBackward" in _nodes(out)) == (k ** dims >= 9)
    _close_with_double_backward(out, reference.conv_tanh(x, w, b, "same", 1, 1), (x, w, b), torch.float32)
    assert len(calls) == (2 if k ** dims >= 9 else 0)  # the gradient, then again inside the double backward
    # an input without a gradient: no thin input gradient to compute, autograd's own nodes
    out = _cpu.conv_tanh(x.detach(), w, b, "same", 1, 1)
    assert "_ConvTanhBackward" not in _nodes(out) and "TanhBackward0" in _nodes(out)
    gw, = torch.autograd.grad(out, (w,), torch.ones_like(out))
    gw_ref, = torch.autograd.grad(reference.conv_tanh(x.detach(), w, b, "same", 1, 1), (w,), torch.ones_like(out))
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_thin_paths_only_where_they_apply():
    """Stride 1, no dilation or groups, odd kernels with their symmetric "same" padding, float32/float64, eagerly;
    everything else, and more channels, runs oneDNN's convolution."""
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(1, 4, 3, 3)
    xc, wc = _cpu._to_cl(x), _cpu._to_cl(w)
    assert _cpu._thin_ok(xc, wc, [1, 1], 1, 1, 1)
    assert not _cpu._thin_ok(xc, wc, [1, 1], 2, 1, 1)  # stride
    assert not _cpu._thin_ok(xc, wc, [2, 2], 1, 2, 1)  # dilation
    assert not _cpu._thin_ok(xc, wc, [0, 0], 1, 1, 1)  # "valid"
    assert not _cpu._thin_ok(xc, _cpu._to_cl(torch.randn(1, 4, 2, 2)), [0, 0], 1, 1, 1)  # even kernel
    assert not _cpu._thin_ok(xc.bfloat16(), wc.bfloat16(), [1, 1], 1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _cpu._thin_ok(xc, wc, [1, 1], 1, 1, 1)
    x.requires_grad_()
    assert "_ThinOutConvBackward" in _nodes(_cpu.conv(x, w, None, 1, "same", 1, 1))
    wide = torch.randn(_cpu.THIN_OUT + 1, 4, 3, 3)
    assert "_ThinOutConvBackward" not in _nodes(_cpu.conv(x, wide, None, 1, "same", 1, 1))
    assert "_ThinOutConvBackward" not in _nodes(_cpu.conv(x, w, None, 1, 0, 1, 1))


def test_one_d_outputs_chain_without_copies():
    x = torch.randn(2, 4, 16)
    w = torch.randn(4, 4, 3)
    y = _cpu.conv(x, w, None)
    # the squeezed [B, C, 1, L] channels-last output is taken as is by the next conv
    assert _cpu._to_cl(y).data_ptr() == y.data_ptr()
    torch.testing.assert_close(_cpu.conv(y, w, None), reference.conv(reference.conv(x, w, None), w, None),
                               **tol(torch.float32))


# ---- oneDNN only where it pays; 3D convolutions of one sample as two depth halves -----------------------------

@pytest.mark.parametrize("shape,pays", [
    ((1, 32, 640), False), ((1, 32, 641), True),  # 1D and 2D: 20,480 elements (aten's own rule)
    ((1, 32, 16, 40), False), ((1, 32, 16, 41), True),
    ((1, 32, 4, 4, 8), False), ((1, 32, 4, 4, 9), True),  # 3D: 4,096
    ((2, 2, 4), True), ((2, 1, 2, 2, 2), True),  # a batch of two or more: always (aten takes oneDNN there too)
], ids=["1D-small", "1D-large", "2D-small", "2D-large", "3D-small", "3D-large", "1D-batch", "3D-batch"])
def test_onednn_only_where_it_pays(shape, pays):
    """``auto`` runs one sample's small convolutions in aten's native kernels as the reference does (oneDNN's
    primitives cost 50-70 us a call however small), larger ones and batches in channels-last oneDNN; the results
    match the reference's either way, and ``RIM_FAST_BACKEND=kernels`` still takes the channels-last path."""
    dims = len(shape) - 2
    x = torch.randn(shape, requires_grad=True)
    w = (torch.randn(4, shape[1], *([3] * dims)) / (shape[1] * 3 ** dims) ** 0.5).requires_grad_()  # outputs O(1)
    b = torch.randn(4, requires_grad=True)
    assert _cpu.onednn_pays(x) is pays
    fused = "onednn_fused" if _cpu._fused_works() else "unfused"
    for grad in (False, True):
        with torch.set_grad_enabled(grad), ops.trace() as conv_calls:
            out = ops.conv(x, w, b)
        with torch.set_grad_enabled(grad), ops.trace() as tanh_calls:
            out_tanh = ops.conv_tanh(x, w, b)
        assert conv_calls[("conv", "channels_last" if pays else "reference")] == 1
        assert tanh_calls[("conv_tanh", fused if pays else "reference")] == 1
        torch.testing.assert_close(out, reference.conv(x, w, b), **conv_tol(torch.float32))
        torch.testing.assert_close(out_tanh, reference.conv_tanh(x, w, b, "same", 1, 1), **conv_tol(torch.float32))
    with ops.use_backend("kernels"), ops.trace() as calls:
        ops.conv(x, w, b)
    assert calls[("conv", "channels_last")] == 1
    # auto, where true, implies usable (the dispatcher then does not ask usable again: auto_implies_usable)
    from rim_fast.ops._dispatch import OPS
    for op, args in (("conv", (x, w, b, 1, "same", 1, 1)), ("conv_tanh", (x, w, b, "same", 1, 1))):
        for impl in OPS[op].impls:
            if impl.auto_implies_usable and impl.auto(*args):
                assert impl.missing() is None and impl.usable(*args), (op, impl.name)


DEPTH_SPLIT_CASES = [  # (depth, height/width, kernel, stride, padding); stride > 1 as conv_same runs it (valid)
    pytest.param(16, (16, 16), 3, 1, "same", id="16^3-k3"),
    pytest.param(7, (9, 10), 3, 1, "same", id="7x9x10-k3-odd-depth"),
    pytest.param(17, (9, 8), 3, 2, 0, id="17x9x8-k3-s2"),
    pytest.param(16, (16, 16), 3, 2, 0, id="16^3-k3-s2"),
    pytest.param(8, (8, 8), 1, 1, "same", id="8^3-k1"),
    pytest.param(12, (6, 6), 3, 3, 0, id="12x6x6-k3-s3"),
    pytest.param(9, (7, 7), 5, 1, "same", id="9x7x7-k5"),
    pytest.param(2, (20, 20), 3, 1, "same", id="2x20x20-k3-thin-depth"),
]


def _split_inputs(depth, size, k, dtype):
    x = torch.randn(1, 12, depth, *size, dtype=torch.float64)
    # weights at the scale of an initialised layer (outputs O(1))
    w = torch.randn(10, 12, k, k, k, dtype=torch.float64) / (12 * k ** 3) ** 0.5
    b = torch.randn(10, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("depth,size,k,stride,padding", DEPTH_SPLIT_CASES)
def test_depth_split_matches_reference(depth, size, k, stride, padding):
    """The depth halves' arithmetic (``_cpu._depth_split``, in float64): the reference's output, every gradient and
    the gradients of the gradients."""
    x, w, b = _split_inputs(depth, size, k, torch.float64)
    xc = _cpu._to_cl(x)
    out = _cpu._depth_split(xc, w, b, stride, _cpu._pads(padding, w, False, 1))
    _close_with_double_backward(out, reference.conv(x, w, b, stride, padding), (x, w, b), torch.float64)


@pytest.mark.parametrize("depth,size,k,stride,padding", DEPTH_SPLIT_CASES)
def test_depth_split_within_the_error_budget(depth, size, k, stride, padding):
    """A float32 3D convolution of one sample that aten would give its native kernels runs as a batch of two depth
    halves (aten then takes oneDNN), forward and backward; output and every gradient within the error budget."""
    x, w, b = _split_inputs(depth, size, k, torch.float32)
    assert _cpu._depth_split_ok(_cpu._to_cl(x), w, stride, 1, 1)
    batches = _ConvCalls()
    with batches:
        out = _cpu.conv(x, w, b, stride, padding)
        cot = torch.randn_like(out)
        fast = [out.detach(), *torch.autograd.grad(out, (x, w, b), cot)]
    assert batches.batches() == ([2], [2])
    assert out.is_contiguous(memory_format=torch.channels_last_3d)

    def run(dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        ref = reference.conv(*inputs, stride, padding)
        return [ref.detach(), *torch.autograd.grad(ref, inputs, cot.to(dtype))]

    assert_error_budget(fast, run(torch.float32), run(torch.float64), torch.float32, ["out", "grad x", "grad w",
                                                                                      "grad b"])


def test_depth_split_only_where_it_applies():
    """One float32 or bfloat16 CPU sample (oneDNN's types), at most 20,480 elements in N * C * D * H (beyond, aten
    takes oneDNN itself), above ``onednn_pays``'s size; no dilation, no groups; eagerly."""
    w = torch.randn(8, 12, 3, 3, 3)
    xc = _cpu._to_cl(torch.randn(1, 12, 8, 8, 8))
    assert _cpu._depth_split_ok(xc, w, 1, 1, 1)
    assert not _cpu._depth_split_ok(_cpu._to_cl(torch.randn(2, 12, 8, 8, 8)), w, 1, 1, 1)  # a batch
    assert not _cpu._depth_split_ok(_cpu._to_cl(torch.randn(1, 12, 4, 4, 4)), w, 1, 1, 1)  # small: native
    assert not _cpu._depth_split_ok(_cpu._to_cl(torch.randn(1, 12, 40, 43, 2)), w, 1, 1, 1)  # aten's oneDNN
    assert not _cpu._depth_split_ok(xc, w, 1, 2, 1)  # dilation
    assert not _cpu._depth_split_ok(xc, torch.randn(8, 6, 3, 3, 3), 1, 1, 2)  # groups
    assert not _cpu._depth_split_ok(_cpu._to_cl(torch.randn(1, 12, 8, 8)), w[..., 0], 1, 1, 1)  # 2D
    assert not _cpu._depth_split_ok(xc.double(), w.double(), 1, 1, 1)  # float64: native kernels either way
    # CPU tensors only (the CUDA channels-last layout runs ``_cpu.conv`` on CUDA tensors: cuDNN needs no split)
    assert not _cpu._depth_split_ok(xc.to("meta"), w.to("meta"), 1, 1, 1)


def test_conv_tanh_with_autograd_takes_the_depth_split():
    """The training path of conv + tanh (aten's convolution, then tanh in place) on one 3D sample: batches of two,
    the output and every gradient within the error budget."""
    x, w, b = _split_inputs(8, (8, 8), 3, torch.float32)
    batches = _ConvCalls()
    with batches:
        out = ops.conv_tanh(x, w, b)
        cot = torch.randn_like(out)
        fast = [out.detach(), *torch.autograd.grad(out, (x, w, b), cot)]
    assert batches.batches() == ([2], [2])

    def run(dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        ref = reference.conv_tanh(*inputs, "same", 1, 1)
        return [ref.detach(), *torch.autograd.grad(ref, inputs, cot.to(dtype))]

    assert_error_budget(fast, run(torch.float32), run(torch.float64), torch.float32, ["out", "grad x", "grad w",
                                                                                      "grad b"])


# ---- shifted sums: the C++ CPU kernels of the thin convolutions ---------------------------------------------

# (kernel, spatial sizes): 1D as the CPU path runs it ([N, 1, L] with a 1 x k kernel), a plain 1D one, 2D and 3D;
# odd kernels of 1 to 5 taps per axis, sizes below the kernel, a single element
SHIFT_CASES = [((1, 3), (1, 9)), ((3,), (7,)), ((5,), (3,)), ((3, 3), (5, 6)), ((3, 5), (4, 7)),
               ((3, 3, 3), (3, 4, 5)), ((5, 1, 3), (6, 2, 4)), ((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (16, 16, 16))]


@pytest.fixture
def shift_ext(ext):
    if not _cpp.has_kernel("cpu"):
        pytest.skip("rim_fast._C has no CPU kernels")
    return ext


@pytest.fixture(params=["avx512", "avx2", "plain"])
def cpu_isa_ext(shift_ext, request):
    """The extension with its CPU loops (csrc/cpu_isa.h: the Winograd kernels, tanh, the shifted sums) for AVX-512,
    for AVX2 or in plain loops (the path of other CPUs), outputs NaN-poisoned; skipped where the CPU lacks the
    instruction set."""
    shift_ext._set_cpu_isa(request.param)
    try:
        if shift_ext._cpu_isa() != request.param:
            pytest.skip(f"this CPU cannot run the {request.param} loops")
        yield shift_ext
    finally:
        shift_ext._set_cpu_isa(_cpu.CPU_ISA or "plain")


@pytest.mark.parametrize("kernel,size", SHIFT_CASES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("sign", [1, -1])
def test_shift_kernels_match_reference(cpu_isa_ext, kernel, size, dtype, sign):
    """Outputs NaN-poisoned before the kernels write them; shift_stack moves values (exact), shift_sum adds the
    taps in another order than the reference (within the error budget against float64)."""
    taps = math.prod(kernel)
    x = torch.randn(2, 3, *size, dtype=dtype)
    stacked = torch.ops.rim_fast.shift_stack(x, list(kernel), sign)
    assert stacked.shape == (2, taps, 3, *size) and stacked.is_contiguous()
    assert torch.equal(stacked, reference.shift_stack(x, kernel, sign))
    planes = torch.randn(2, taps, 3, *size, dtype=dtype)
    out = torch.ops.rim_fast.shift_sum(planes, list(kernel), sign)
    assert out.shape == (2, 3, *size) and out.is_contiguous()
    ref = reference.shift_sum(planes, kernel, sign)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    else:
        assert_error_budget([out], [ref], [reference.shift_sum(planes.double(), kernel, sign)], dtype, ["shift_sum"])
    # each other's adjoint: <shift_sum(P), G> = <P, shift_stack(G)>
    g = torch.randn_like(out, dtype=torch.float64)
    p64 = planes.double()
    lhs = (torch.ops.rim_fast.shift_sum(p64, list(kernel), sign) * g).sum()
    rhs = (p64 * torch.ops.rim_fast.shift_stack(g, list(kernel), sign)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_shift_kernels_read_any_layout(shift_ext):
    # the thin paths pass views (a channels-last gradient moved to [C, N, *S]); the kernels make them contiguous
    x = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last).movedim(1, 0)
    torch.testing.assert_close(torch.ops.rim_fast.shift_stack(x, [3, 3], 1), reference.shift_stack(x, (3, 3), 1),
                               rtol=0, atol=0)
    planes = torch.randn(2, 9, 3, 6, 5).transpose(3, 4)  # [C, K, N, 5, 6], not contiguous
    torch.testing.assert_close(torch.ops.rim_fast.shift_sum(planes, [3, 3], -1),
                               reference.shift_sum(planes, (3, 3), -1), rtol=1e-5, atol=1e-5)


def test_shift_kernels_non_finite_values_and_empty_tensors(cpu_isa_ext):
    """shift_sum adds each tap's plane in one loop and restores the columns that loop wraps into the next row: an
    inf or NaN there must not leak into a neighbour (a restore, not a subtraction). Empty tensors give empty
    outputs."""
    for value in (float("inf"), float("nan")):
        for column in (0, 4):  # each row's first and last column: the ones a shift of +1 / -1 wraps
            planes = torch.zeros(1, 9, 2, 4, 5)
            planes[0, :, 1, 2, column] = value
            for sign in (1, -1):
                out = torch.ops.rim_fast.shift_sum(planes, [3, 3], sign)
                ref = reference.shift_sum(planes, (3, 3), sign)
                assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
                stacked = torch.ops.rim_fast.shift_stack(planes[:, 0], [3, 3], sign)
                assert torch.equal(stacked.isnan(), reference.shift_stack(planes[:, 0], (3, 3), sign).isnan())
    for shape in ((1, 9, 0, 4, 5), (0, 9, 2, 4, 5), (1, 9, 2, 0, 5)):
        planes = torch.randn(shape)
        assert torch.ops.rim_fast.shift_sum(planes, [3, 3], 1).shape == (shape[0], *shape[2:])
        assert torch.ops.rim_fast.shift_stack(planes[:, 0], [3, 3], 1).shape == shape


def test_shift_kernels_gradients(shift_ext):
    """Each op's gradient is the other op (registered autograd), twice differentiable."""
    planes = torch.randn(2, 9, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    for sign in (1, -1):
        assert torch.autograd.gradcheck(lambda p: torch.ops.rim_fast.shift_sum(p, [3, 3], sign), (planes,))
        assert torch.autograd.gradgradcheck(lambda p: torch.ops.rim_fast.shift_sum(p, [3, 3], sign), (planes,))
        assert torch.autograd.gradcheck(lambda t: torch.ops.rim_fast.shift_stack(t, [3, 3], sign), (x,))
        assert torch.autograd.gradgradcheck(lambda t: torch.ops.rim_fast.shift_stack(t, [3, 3], sign), (x,))
        # and the references themselves
        assert torch.autograd.gradcheck(lambda p: reference.shift_sum(p, (3, 3), sign), (planes,))
        assert torch.autograd.gradcheck(lambda t: reference.shift_stack(t, (3, 3), sign), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_shift_opcheck(shift_ext, dtype):
    planes = torch.randn(1, 27, 2, 3, 4, 5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.rim_fast.shift_sum.default, (planes, [3, 3, 3], 1))
    x = torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.rim_fast.shift_stack.default, (x, [1, 3], -1))


def test_shift_kernels_skipped_write_is_caught(shift_ext):
    planes, x = torch.randn(1, 9, 2, 4, 5), torch.randn(1, 2, 4, 5)
    for out in (torch.ops.rim_fast.shift_sum(planes, [3, 3], 1), torch.ops.rim_fast.shift_stack(x, [3, 3], 1)):
        assert not out.isnan().any()
    shift_ext._set_test_hooks(True, True)
    for out in (torch.ops.rim_fast.shift_sum(planes, [3, 3], 1), torch.ops.rim_fast.shift_stack(x, [3, 3], 1)):
        flat = out.reshape(-1)
        assert flat[-1].isnan() and not flat[:-1].isnan().any()


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.rim_fast.shift_sum(torch.randn(1, 9, 2, 4, 5), [3, 3], 2), "sign must be 1 or -1"),
    (lambda: torch.ops.rim_fast.shift_sum(torch.randn(1, 9, 2, 4, 5), [2, 3], 1), "kernel sizes must be odd"),
    (lambda: torch.ops.rim_fast.shift_sum(torch.randn(1, 8, 2, 4, 5), [3, 3], 1), "prod(kernel) = 9 taps"),
    (lambda: torch.ops.rim_fast.shift_sum(torch.randn(1, 9, 2, 4, 5), [3], 1), "one size per spatial dim"),
    (lambda: torch.ops.rim_fast.shift_stack(torch.randn(2, 3), [3], 1), "1 to 3 spatial dims"),
    (lambda: torch.ops.rim_fast.shift_stack(torch.randn(1, 2, 4, 5).half(), [3, 3], 1), "float32 or float64"),
])
def test_shift_kernels_user_errors(shift_ext, call, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()


# ---- tanh: the C++ CPU kernel ------------------------------------------------------------------------------

@pytest.fixture
def ext():
    """The extension, with its outputs NaN-poisoned (csrc/outputs.h) for the test."""
    module = _ext.module()
    if module is None:
        pytest.skip(f"rim_fast._C is not loaded: {_ext.missing()}")
    module._set_test_hooks(True, False)
    yield module
    module._set_test_hooks(False, False)


def _tanh_grid():
    """Dense over the range where tanh is not +-1 in float32, and logarithmic down to the smallest values."""
    x = torch.cat([torch.linspace(0, 10, 400_001), torch.logspace(-30, 1, 20_001), torch.tensor([8.999, 9.0, 9.001])])
    return torch.cat([x, -x])


def test_tanh_kernel_within_the_error_budget(cpu_isa_ext):
    x = _tanh_grid()
    exact = torch.tanh(x.double())
    fast, ref = _cpp.tanh(x), torch.tanh(x)
    assert_error_budget([fast], [ref], [exact], torch.float32, ["tanh"])
    # element by element too, relative to each value: the accuracy near 0 is what training needs
    nonzero = exact != 0
    rel = lambda y: ((y.double() - exact).abs()[nonzero] / exact.abs()[nonzero]).max().item()  # noqa: E731
    assert rel(fast) <= BUDGET_FACTOR * rel(ref) + BUDGET_SLACK[torch.float32], (rel(fast), rel(ref))
    assert rel(fast) < 4e-7  # 3 ulp (csrc/tanh.h)
    small = nonzero & (x.abs() < 1)
    assert ((fast.double() - exact).abs()[small] / exact.abs()[small]).max() < 1e-7  # 1.5 ulp below |x| = 1


def test_tanh_kernel_special_values(cpu_isa_ext):
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-38, -1e-45, 9.0, -9.0, 30.0, -1e30])
    y = _cpp.tanh(x)
    assert y[:2].tolist() == [0.0, 0.0] and torch.signbit(y[1]) and not torch.signbit(y[0])
    assert y[2].isnan()
    assert y[3:].tolist() == pytest.approx(torch.tanh(x[3:]).tolist(), rel=1e-7, abs=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "1D", "transposed",
                                    "sliced", "empty"])
def test_tanh_kernel_layouts(ext, layout):
    """The output keeps a dense input's layout (no copy in either direction); other inputs work too."""
    base = {"contiguous": torch.randn(2, 3, 4, 5), "1D": torch.randn(3, 5, 7), "empty": torch.randn(2, 0, 4),
            "channels_last": torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
            "channels_last_3d": torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
            "transposed": torch.randn(5, 6).t(), "sliced": torch.randn(4, 6, 5)[:, ::2]}[layout]
    y = _cpp.tanh(base)
    assert y.shape == base.shape
    if layout not in ("sliced", "empty"):  # dense: the kernel writes x's memory order
        assert y.stride() == base.stride()
    torch.testing.assert_close(y, torch.tanh(base), rtol=4e-7, atol=1e-30)


def test_tanh_kernel_bfloat16(cpu_isa_ext):
    x = torch.randn(3, 8, 33) * 3
    xb = x.bfloat16()
    exact = torch.tanh(xb.double())
    assert_error_budget([_cpp.tanh(xb)], [torch.tanh(xb)], [exact], torch.bfloat16, ["tanh bf16"])
    assert _cpp.tanh(xb).dtype == torch.bfloat16


def test_tanh_kernel_gradient(ext):
    x = (torch.randn(4, 7, 9) * 2).requires_grad_()
    cot = torch.randn(4, 7, 9)
    g_fast, = torch.autograd.grad(_cpp.tanh(x), x, cot)
    g_ref, = torch.autograd.grad(torch.tanh(x), x, cot)
    x64 = x.detach().double().requires_grad_()
    g_exact, = torch.autograd.grad(torch.tanh(x64), x64, cot.double())
    assert_error_budget([g_fast], [g_ref], [g_exact], torch.float32, ["grad tanh"])
    x64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.tanh, (x64,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tanh_opcheck(ext, dtype):
    x = torch.randn(2, 3, 4, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.rim_fast.tanh.default, (x.requires_grad_(dtype == torch.float32),))


def test_tanh_kernel_skipped_write_is_caught(ext):
    x = torch.randn(2, 3, 40)
    assert not _cpp.tanh(x).isnan().any()
    ext._set_test_hooks(True, True)
    y = _cpp.tanh(x).reshape(-1)
    assert y[-1].isnan() and not y[:-1].isnan().any()


def test_tanh_dispatch():
    """auto runs the kernel on CPU float32/bfloat16 tensors (float32 not where MKL's AVX-512 tanh serves
    torch.tanh), the reference (torch.tanh) for float64, on other devices and under torch.compile."""
    x = torch.randn(2, 3, 4)
    with ops.trace() as calls:
        ops.tanh(x)
        ops.tanh(x.bfloat16())
        ops.tanh(x.double())
    if _ext.module() is None:
        assert calls == {("tanh", "reference"): 3}
    elif _cpp.MKL_TANH_FASTER:
        assert calls == {("tanh", "cpp"): 1, ("tanh", "reference"): 2}
    else:
        assert calls == {("tanh", "cpp"): 2, ("tanh", "reference"): 1}
    compiled = torch.compile(ops.tanh, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.tanh(x))


@pytest.mark.parametrize("vendor,capability,mkl,instructions,expected", [
    ("GenuineIntel", "AVX512", True, None, True),
    ("GenuineIntel", "AVX512", True, "AVX512_E1", True),
    ("GenuineIntel", "AVX512", True, "AVX2", False),  # MKL capped below AVX-512
    ("GenuineIntel", "AVX2", True, None, False),
    ("AuthenticAMD", "AVX512", True, None, False),  # MKL's generic paths on AMD
    ("GenuineIntel", "AVX512", False, None, False),  # torch without MKL
    ("unknown", "unknown", True, None, False),
])
def test_mkl_tanh_rule(vendor, capability, mkl, instructions, expected):
    assert _cpp.mkl_tanh_is_faster(vendor, capability, mkl, instructions) is expected


@pytest.mark.parametrize("dims,size,k", [(1, (9,), 3), (2, (7, 6), 3), (3, (3, 4, 5), 3), (2, (8, 8), 1)],
                         ids=["1D", "2D", "3D", "2D-k1"])
def test_conv_tanh_fused_and_unfused_match_reference(dims, size, k):
    x = torch.randn(2, 3, *size)
    w = torch.randn(4, 3, *([k] * dims))
    b = torch.randn(4)
    expected = reference.conv_tanh(x, w, b, "same", 1, 1)
    with torch.no_grad():
        assert _cpu.conv_tanh_usable(x, w, b, "same", 1, 1) == _cpu._fused_works()
        if _cpu._fused_works():
            torch.testing.assert_close(_cpu.conv_tanh(x, w, b, "same", 1, 1), expected, rtol=1e-5, atol=1e-6)
        with ops.trace() as calls:
            ops.conv_tanh(x, w, b, padding="same", dilation=1, groups=1)
    assert calls[("conv_tanh", "onednn_fused" if _cpu._fused_works() else "unfused")] == 1
    # with autograd, eagerly: 3 input channels take no thin path, so the channels-last convolution and tanh in
    # place, with autograd's own nodes; every gradient, and the gradients of the gradients (double backward), match
    # the reference's
    for t in (x, w, b):
        t.requires_grad_(True)
    assert _cpu.conv_tanh_usable(x, w, b, "same", 1, 1) == _cpu._fused_works()
    with ops.trace() as calls:
        out = ops.conv_tanh(x, w, b, padding="same", dilation=1, groups=1)
    assert calls[("conv_tanh", "onednn_fused" if _cpu._fused_works() else "unfused")] == 1
    assert "TanhBackward0" in _nodes(out) and "_ConvTanhBackward" not in _nodes(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    cotangent = _close_with_double_backward(out, reference.conv_tanh(x, w, b, "same", 1, 1), (x, w, b),
                                            torch.float32)
    # only the inputs that need a gradient get one (x without: no grad_input computed)
    x.requires_grad_(False)
    gw, = torch.autograd.grad(ops.conv_tanh(x, w, None, padding="same", dilation=1, groups=1), (w,), cotangent)
    gw_ref, = torch.autograd.grad(reference.conv_tanh(x, w, None, "same", 1, 1), (w,), cotangent)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_conv_tanh_with_autograd_is_not_fused_under_compile():
    """Under torch.compile Inductor differentiates the reference: the fused primitive is not taken with
    autograd (it is without)."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    seen = {}

    def fn(x, w):
        seen["grad"] = _cpu.conv_tanh_usable(x, w, None, "same", 1, 1)
        return ops.conv_tanh(x, w, None, padding="same", dilation=1, groups=1)

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w)
    assert seen["grad"] is False
    g, = torch.autograd.grad(out.sum(), w)
    g_ref, = torch.autograd.grad(reference.conv_tanh(x, w, None, "same", 1, 1).sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_conv_tanh_even_kernel_is_not_fused():
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        assert not _cpu.conv_tanh_usable(x, w, None, "same", 1, 1)


def test_layer_hooks_see_the_conv_output():
    """A same-conv followed by tanh runs as one op only when no forward hook watches the layer."""
    import rim_fast
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    x = torch.randn(2, 1, 16)
    h = torch.zeros(2, 6, 4)
    seen = []
    with torch.no_grad():
        with ops.trace() as calls:
            net(x, None, x, h)
        assert calls[("conv_tanh", "onednn_fused" if _cpu._fused_works() else "unfused")] > 0
        handle = net.input_layer.register_forward_hook(lambda m, i, o: seen.append(o))
        out = net(x, None, x, h)
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 4, 16)
    # the hooked layer's output is the conv's, before the activation
    torch.testing.assert_close(seen[0], reference.conv(torch.cat([x, x], 1), net.input_layer.weight,
                                                       net.input_layer.bias), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(out[0], net(x, None, x, h)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mkl_tanh_faster", [True, False], ids=["mkl-tanh", "cpp-tanh"])
def test_conv_tanh_under_torch_func_transforms(mkl_tanh_faster, monkeypatch):
    """torch.func.grad and vmap through a network whose conv + tanh would be fused: the unfused pair and the
    reference convolutions run there (the fused primitive has no batching rule, ``_ConvTanh`` no functorch support,
    vmap cannot ask for a channels-last layout); gradients match autograd's, per-sample outputs the batch's. Also
    where the C++ tanh serves eager calls (CPUs where MKL's tanh is not faster: AMD's, or MKL capped below AVX-512),
    which has no batching rule either: torch.tanh runs under the transforms."""
    import rim_fast
    monkeypatch.setattr(_cpp, "MKL_TANH_FASTER", mkl_tanh_faster)
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6)
    x, h = torch.randn(2, 1, 8, 8), torch.zeros(2, 6, 2, 2)
    params = dict(net.named_parameters())

    def loss(p, x):
        g, _ = functional_call(net, p, (x, None, x, h))
        return (g ** 2).sum()

    with ops.trace() as calls:
        by_func = grad(loss)(params, x)
    assert calls[("conv_tanh", "onednn_fused")] == 0 and calls[("conv_tanh", "unfused")] > 0
    by_autograd = torch.autograd.grad(loss(params, x), list(params.values()))
    for a, b in zip(by_func.values(), by_autograd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    per_sample = vmap(lambda xi: functional_call(net, params, (xi[None], None, xi[None], h[:1]))[0][0])(x)
    with torch.no_grad():
        torch.testing.assert_close(per_sample, net(x, None, x, h)[0], rtol=1e-4, atol=1e-5)


# ---- 3x3x3 convolutions by Winograd's F(2x2x2, 3x3x3): the C++ CPU kernel ------------------------------------

# (N, C_in, C_out, D, H, W): odd and even sizes, sizes below a tile and below the kernel, every channel count
WINOGRAD_CASES = [(2, 16, 32, 5, 7, 6), (1, 32, 32, 16, 16, 16), (3, 64, 16, 1, 2, 3), (4, 128, 16, 4, 4, 4),
                  (2, 32, 64, 9, 8, 1), (1, 16, 128, 3, 1, 5), (5, 16, 16, 2, 3, 2)]


@pytest.fixture
def winograd_path(shift_ext):
    """The extension, where the CPU convolutions take the Winograd kernels (CPUs with AVX-512 or AVX2)."""
    if _cpu.WINOGRAD_ISA is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: the CPU convolutions keep oneDNN's direct kernels")
    return shift_ext


def _winograd_inputs(n, c_in, c_out, d, h, w, dtype=torch.float64):
    x = torch.randn(n, c_in, d, h, w, dtype=dtype)
    weight = torch.randn(c_out, c_in, 3, 3, 3, dtype=dtype) / (27 * c_in) ** 0.5
    return x, weight, torch.randn(c_out, dtype=dtype)


@pytest.mark.parametrize("shape", [(32, 32), (16, 128), (64, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_winograd_weight_transformed_in_float64(shape):
    """The transformed weight the convolutions use (``_cpu._transformed``): the reference's G w G^T computed in
    float64 and rounded once (a float32 transform rounds at every stage); differentiable, with the reference's
    adjoint as its gradient."""
    w = torch.randn(*shape, 3, 3, 3)
    exact = reference.winograd_weight(w.double())
    u = _cpu._transformed(w)
    assert u.dtype == torch.float32 and u.shape == (64, shape[1], shape[0]) and u.is_contiguous()
    torch.testing.assert_close(u, exact.float(), rtol=0, atol=0)
    assert (reference.winograd_weight(w).double() - exact).abs().max() > (u.double() - exact).abs().max()
    w64 = w.double().requires_grad_()
    du = torch.randn(64, shape[1], shape[0], dtype=torch.float64)
    grad, = torch.autograd.grad(_cpu._transformed(w64), w64, du)
    torch.testing.assert_close(grad, reference.winograd_weight_grad(du), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_winograd_reference_is_the_convolution(case):
    # the algorithm itself, in float64: exact up to rounding
    x, w, b = _winograd_inputs(*case)
    out = reference.winograd_conv3d(x, reference.winograd_weight(w), b)
    torch.testing.assert_close(out, torch.nn.functional.conv3d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_winograd_kernel_matches_reference(cpu_isa_ext, case, layout, with_bias):
    """Output NaN-poisoned before the kernel writes it (``ext``); channels-last; against the reference's float32
    run (another summation order) and, for the error budget, the direct convolution in float64 and float32."""
    x64, w64, b64 = _winograd_inputs(*case)
    x, w, b = x64.float(), w64.float(), b64.float() if with_bias else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    u = reference.winograd_weight(w)
    out = torch.ops.rim_fast.winograd_conv3d(x, u, b)
    assert out.shape == (case[0], case[2], *case[3:]) and out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, reference.winograd_conv3d(x, u, b), rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.conv3d(x64, w64, b64 if with_bias else None, padding=1)
    direct = torch.nn.functional.conv3d(x, w, b, padding=1)
    assert_error_budget([out], [direct], [exact], torch.float32, ["winograd_conv3d"], f"winograd {case}")


def test_winograd_kernel_skipped_write_is_caught(cpu_isa_ext):
    x, w, b = (t.float() for t in _winograd_inputs(2, 16, 32, 5, 7, 6))
    cpu_isa_ext._set_test_hooks(True, True)
    out = torch.ops.rim_fast.winograd_conv3d(x, reference.winograd_weight(w), b)
    flat = out.permute(0, 2, 3, 4, 1).reshape(-1)  # memory order (channels-last)
    assert flat[-1].isnan() and not flat[:-1].isnan().any()


def test_winograd_kernel_special_values_and_empty(shift_ext):
    x, w, b = (t.float() for t in _winograd_inputs(1, 16, 16, 4, 5, 6))
    x[0, 3, 1, 2, 3] = float("inf")
    x[0, 5, 3, 4, 5] = float("nan")
    u = reference.winograd_weight(w)
    out = torch.ops.rim_fast.winograd_conv3d(x, u, b)
    # a non-finite input reaches the outputs of its tiles (Winograd mixes a tile's inputs), never those of other
    # tiles: the outputs whose 3x3x3 window (and tile) holds no such input stay finite and correct
    direct = torch.nn.functional.conv3d(x, w, b, padding=1)
    far = direct.isfinite()
    far[:, :, 0:4, 0:4, 0:6] = False  # the tiles around the two inputs
    torch.testing.assert_close(out[far], direct[far], rtol=1e-5, atol=1e-5)
    assert not out[:, :, 1:3, 2:4, 2:4].isfinite().all()
    empty = torch.ops.rim_fast.winograd_conv3d(torch.randn(0, 16, 3, 3, 3), u, b)
    assert empty.shape == (0, 16, 3, 3, 3)


def test_winograd_opcheck(shift_ext):
    x, w, b = (t.float() for t in _winograd_inputs(2, 16, 32, 3, 4, 5))
    u = reference.winograd_weight(w)
    torch.library.opcheck(torch.ops.rim_fast.winograd_conv3d.default, (x, u, b))
    torch.library.opcheck(torch.ops.rim_fast.winograd_conv3d.default, (x, u, None))
    # with autograd: the raw op differentiates through the reference (x, u and the bias)
    torch.library.opcheck(torch.ops.rim_fast.winograd_conv3d.default,
                          (x.requires_grad_(), u.requires_grad_(), b.requires_grad_()))


def test_winograd_op_gradients(shift_ext):
    x, w, b = _winograd_inputs(1, 16, 16, 2, 3, 2)
    u = reference.winograd_weight(w.float()).double()
    x.requires_grad_(), u.requires_grad_(), b.requires_grad_()
    # float64 through the op's gradient (its CPU kernel is float32): the gradient against the reference's
    grads = torch.autograd.grad(torch.ops.rim_fast.winograd_conv3d(x.float(), u.float(), b.float()).double().sum(),
                                (x, u, b))
    expected = torch.autograd.grad(reference.winograd_conv3d(x, u, b).sum(), (x, u, b))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _weight_grad_exact(x64, g64, c_out):
    w = torch.zeros(c_out, x64.shape[1], 3, 3, 3, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad(torch.nn.functional.conv3d(x64, w, padding=1), w, g64)[0]


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_winograd_weight_reference_is_the_weight_gradient(case):
    # float64: the transformed gradient, turned into the weight's by winograd_weight's adjoint, is conv3d's
    n, c_in, c_out, *size = case
    x, _, _ = _winograd_inputs(*case)
    g = torch.randn(n, c_out, *size, dtype=torch.float64)
    du = reference.winograd_conv3d_weight(x, g)
    torch.testing.assert_close(reference.winograd_weight_grad(du), _weight_grad_exact(x, g, c_out), rtol=1e-12,
                               atol=1e-12)
    # and winograd_weight_grad is winograd_weight's adjoint: <G w G^T, du> = <w, G^T du G>
    w = torch.randn(c_out, c_in, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close((reference.winograd_weight(w) * du).sum(),
                               (w * reference.winograd_weight_grad(du)).sum())


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_winograd_weight_kernel_matches_reference(cpu_isa_ext, case, layout):
    """Output NaN-poisoned first (``ext``); against the reference's float32 run and, for the error budget, the
    weight gradient through winograd_weight's adjoint against oneDNN's in float32 and conv3d's in float64."""
    n, c_in, c_out, *size = case
    x64, _, _ = _winograd_inputs(*case)
    g64 = torch.randn(n, c_out, *size, dtype=torch.float64)
    x, g = x64.float(), g64.float()
    if layout == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, g))
    du = torch.ops.rim_fast.winograd_conv3d_weight(x, g)
    assert du.shape == (64, c_in, c_out) and du.is_contiguous()
    expected = reference.winograd_conv3d_weight(x, g)  # sums over every tile: absolute at their scale
    torch.testing.assert_close(du, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    w32 = torch.zeros(c_out, c_in, 3, 3, 3, requires_grad=True)
    direct = torch.autograd.grad(torch.nn.functional.conv3d(x, w32, padding=1), w32, g)[0]
    assert_error_budget([reference.winograd_weight_grad(du.double()).float()], [direct],
                        [_weight_grad_exact(x64, g64, c_out)], torch.float32, ["grad_w"], f"winograd weight {case}")


def test_winograd_weight_kernel_skipped_write_and_empty(cpu_isa_ext):
    x, g = torch.randn(2, 16, 3, 4, 5), torch.randn(2, 32, 3, 4, 5)
    cpu_isa_ext._set_test_hooks(True, True)
    flat = torch.ops.rim_fast.winograd_conv3d_weight(x, g).reshape(-1)
    assert flat[-1].isnan() and not flat[:-1].isnan().any()
    cpu_isa_ext._set_test_hooks(True, False)
    # no tiles: a zero gradient, every element written
    assert torch.equal(torch.ops.rim_fast.winograd_conv3d_weight(x[:0], g[:0]), torch.zeros(64, 16, 32))


def test_winograd_weight_opcheck(shift_ext):
    x, g = torch.randn(2, 16, 3, 4, 5), torch.randn(2, 32, 3, 4, 5)
    torch.library.opcheck(torch.ops.rim_fast.winograd_conv3d_weight.default, (x, g))
    # with autograd: through the reference (bilinear in x and the output gradient)
    torch.library.opcheck(torch.ops.rim_fast.winograd_conv3d_weight.default, (x.requires_grad_(), g.requires_grad_()))


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.rim_fast.winograd_conv3d(torch.randn(1, 16, 4, 4, 4).double(), torch.randn(64, 16, 16),
                                                None), "x and u must be float32"),
    (lambda: torch.ops.rim_fast.winograd_conv3d(torch.randn(1, 16, 4, 4), torch.randn(64, 16, 16), None),
     "x must be [N, C_in, D, H, W]"),
    (lambda: torch.ops.rim_fast.winograd_conv3d(torch.randn(1, 16, 4, 4, 4), torch.randn(27, 16, 16), None),
     "u must be [64, C_in, C_out]"),
    (lambda: torch.ops.rim_fast.winograd_conv3d(torch.randn(1, 24, 4, 4, 4), torch.randn(64, 24, 16), None),
     "C_in (x.shape[1]) must be 16, 32, 64 or 128, got 24"),
    (lambda: torch.ops.rim_fast.winograd_conv3d(torch.randn(1, 16, 4, 4, 4), torch.randn(64, 16, 48), None),
     "C_out (u.shape[2]) must be 16, 32, 64 or 128, got 48"),
    (lambda: torch.ops.rim_fast.winograd_conv3d(torch.randn(1, 16, 4, 4, 4), torch.randn(64, 16, 16),
                                                torch.randn(15)), "bias must be a float32 CPU tensor of shape [16]"),
    (lambda: torch.ops.rim_fast.winograd_conv3d_weight(torch.randn(1, 16, 4, 4, 4), torch.randn(1, 16, 4, 4, 3)),
     "grad must be [N, C_out, D, H, W] with x's N, D, H, W"),
    (lambda: torch.ops.rim_fast.winograd_conv3d_weight(torch.randn(1, 16, 4, 4, 4), torch.randn(1, 8, 4, 4, 4)),
     "C_out (grad.shape[1]) must be 16, 32, 64 or 128, got 8"),
    (lambda: torch.ops.rim_fast.winograd_conv3d_weight(torch.randn(1, 16, 4, 4, 4).double(),
                                                       torch.randn(1, 16, 4, 4, 4)), "x and grad must be float32"),
])
def test_winograd_kernel_user_errors(shift_ext, call, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()


class _OpCalls(TorchDispatchMode):
    """Counts the ops that run under it, by name (``rim_fast.winograd_conv3d.default``, ...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fn", ["conv", "conv_tanh"])
@pytest.mark.parametrize("size", [(2, 5, 6, 7), (4, 4, 4, 4), (2, 16, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_winograd_convolutions_match_reference(winograd_path, fn, size):
    """``_cpu.conv`` / ``conv_tanh`` of a 3x3x3 "same" convolution run the Winograd kernel forward and for the
    input gradient, oneDNN's backward for the weight and bias: output and every gradient against the reference
    (NCDHW, aten's direct convolution), within the error budget against float64.
    """
    n, *spatial = size
    x64, w64, b64 = _winograd_inputs(n, 32, 16, *spatial)
    grad64 = torch.randn(n, 16, *spatial, dtype=torch.float64)
    ref_fn = {"conv": lambda x, w, b: reference.conv(x, w, b, 1, "same"),
              "conv_tanh": lambda x, w, b: reference.conv_tanh(x, w, b, "same", 1, 1)}[fn]
    fast_fn = {"conv": lambda x, w, b: _cpu.conv(x, w, b, 1, "same"),
               "conv_tanh": lambda x, w, b: _cpu.conv_tanh(x, w, b, "same", 1, 1)}[fn]

    def run(f, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
        with _OpCalls() as calls:
            out = f(*leaves)
            grads = torch.autograd.grad(out, leaves, grad64.to(dtype))
        return [out, *grads], calls.names

    fast, names = run(fast_fn, torch.float32)
    # forward and input gradient by Winograd, the weight's by oneDNN (its backward for the weight and bias only)
    assert names.count("rim_fast.winograd_conv3d.default") == 2 and "aten.convolution.default" not in names
    assert names.count("aten.convolution_backward.default") == 1
    ref, _ = run(ref_fn, torch.float32)
    exact, _ = run(ref_fn, torch.float64)
    assert_error_budget(fast, ref, exact, torch.float32, ["out", "grad_x", "grad_w", "grad_b"], f"{fn} {size}")
    # without autograd the same kernel, the same output
    with torch.no_grad(), _OpCalls() as calls:
        out = fast_fn(x64.float(), w64.float(), b64.float())
    assert calls.names.count("rim_fast.winograd_conv3d.default") == 1
    torch.testing.assert_close(out, fast[0], rtol=0, atol=0)


def test_winograd_double_backward(winograd_path):
    # the backward is oneDNN's differentiable convolution_backward: second derivatives work
    x = torch.randn(2, 16, 3, 4, 5, requires_grad=True)
    w = (torch.randn(16, 16, 3, 3, 3) / 12).requires_grad_()
    gx, = torch.autograd.grad(_cpu.conv(x, w, None, 1, "same").square().sum(), x, create_graph=True)
    hx, = torch.autograd.grad(gx.sum(), w)
    gx_ref, = torch.autograd.grad(reference.conv(x, w, None, 1, "same").square().sum(), x, create_graph=True)
    hx_ref, = torch.autograd.grad(gx_ref.sum(), w)
    torch.testing.assert_close(hx, hx_ref, rtol=1e-4, atol=1e-4)


def test_winograd_where_it_runs(winograd_path, monkeypatch):
    x = torch.randn(2, 32, 6, 6, 6)
    w = torch.randn(32, 32, 3, 3, 3)

    def runs(x, w, **kwargs):
        with _OpCalls() as calls:
            _cpu.conv(x, w, None, **kwargs)
        return "rim_fast.winograd_conv3d.default" in calls.names

    assert runs(x, w)
    assert not runs(x, w, stride=2, padding=0)                       # strided
    assert not runs(x, w, padding=0)                                 # not "same"
    assert not runs(x, w, dilation=2)                                # dilated
    assert not runs(x, torch.randn(32, 32, 5, 5, 5))                 # another kernel size
    assert not runs(x, torch.randn(48, 32, 3, 3, 3))                 # 48 output channels
    assert not runs(x.double(), w.double())                          # float64
    assert not runs(x[:, :, 0], w[:, :, 0])                          # 2D
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs(x, w)
    # one small sample with autograd: the depth split (aten's native kernels otherwise run its backward)
    assert runs(x[:1], w) and not runs(x[:1], w.requires_grad_())
    monkeypatch.setattr(_cpu, "WINOGRAD_ISA", None)                 # a CPU without AVX-512 or AVX2
    assert not runs(x, w.detach())
    monkeypatch.setattr(_cpu, "WINOGRAD_ISA", "avx2")
    monkeypatch.setattr(_cpu, "WINOGRAD", False)                    # RIM_FAST_WINOGRAD=0
    assert not runs(x, w.detach())


def test_cpu_isa_for_torchs_capability():
    capabilities = ("AVX512", "AVX512_BF16", "AVX2", "DEFAULT", "NO AVX", "ZVECTOR", "SVE256")
    assert [_cpu.cpu_isa_for(c) for c in capabilities] == ["avx512", "avx512", "avx2"] + [None] * 4


@pytest.mark.parametrize("capability, expected",
                         [("avx2", ["avx2", "avx2", "32"]), ("default", ["None", "plain", "256"])])
def test_winograd_follows_torchs_cpu_capability(shift_ext, capability, expected):
    """ATEN_CPU_CAPABILITY caps torch's CPU kernels and rim_fast's CPU loops alike (in a fresh process): the
    instruction set the Winograd convolutions take, the one the C++ loops run and the weight gradient's threshold."""
    if _cpu.WINOGRAD_ISA is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2")
    code = ("import rim_fast, rim_fast._C as C; from rim_fast.ops import _cpu; "
            "print(_cpu.WINOGRAD_ISA, C._cpu_isa(), _cpu.WINOGRAD_WEIGHT_MIN_TILES)")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == expected


def test_cpu_isa_hook_rejects_unknown_names(shift_ext):
    with pytest.raises(ValueError, match="isa must be 'avx512', 'avx2' or 'plain', got 'sse4'"):
        shift_ext._set_cpu_isa("sse4")
    assert shift_ext._cpu_isa() == (_cpu.CPU_ISA or "plain")


@pytest.mark.parametrize("steps", [1, 3])
def test_winograd_weight_gradient_in_a_rim_call(winograd_path, steps):
    """Inside a RIM call (``derived.per_call_cache``) the weight gradient of a large enough convolution goes
    through the transformed weight: ``winograd_conv3d_weight`` per call, its sum over the calls turned into the
    weight's once (no oneDNN backward at all); the bias gradient is a sum. Gradients of T steps sharing the
    weight, against the reference, within the error budget."""
    from rim_fast.layers import derived
    x64, w64, b64 = _winograd_inputs(4, 32, 32, 8, 8, 8)  # 256 tiles: WINOGRAD_WEIGHT_MIN_TILES
    grad64 = torch.randn(4, 32, 8, 8, 8, dtype=torch.float64)

    def run(fn, dtype, cache):
        x, w, b = (t.to(dtype).requires_grad_() for t in (x64, w64, b64))
        with _OpCalls() as calls:
            with derived.per_call_cache() if cache else contextlib.nullcontext():
                h = x
                for _ in range(steps):
                    h = fn(h, w, b)
            grads = torch.autograd.grad(h, (x, w, b), grad64.to(dtype))
        return [h, *grads], calls.names

    fast_fn = lambda x, w, b: _cpu.conv_tanh(x, w, b, "same", 1, 1)  # noqa: E731
    ref_fn = lambda x, w, b: reference.conv_tanh(x, w, b, "same", 1, 1)  # noqa: E731
    fast, names = run(fast_fn, torch.float32, True)
    assert names.count("rim_fast.winograd_conv3d_weight.default") == steps
    assert "aten.convolution_backward.default" not in names
    ref, _ = run(ref_fn, torch.float32, False)
    exact, _ = run(ref_fn, torch.float64, False)
    assert_error_budget(fast, ref, exact, torch.float32, ["out", "grad_x", "grad_w", "grad_b"], f"{steps} steps")


def test_winograd_weight_gradient_ops(winograd_path, monkeypatch):
    # which ops run: with the per-call cache, Winograd's three (forward, input and weight gradient) and no oneDNN
    # convolution; outside it, or below WINOGRAD_WEIGHT_MIN_TILES, oneDNN's backward for the weight
    from rim_fast.layers import derived
    x = torch.randn(4, 32, 8, 8, 8, requires_grad=True)
    w = torch.randn(32, 32, 3, 3, 3, requires_grad=True)

    def names(cache):
        with _OpCalls() as calls:
            with derived.per_call_cache() if cache else contextlib.nullcontext():
                out = _cpu.conv(x, w, None, 1, "same")
            out.sum().backward()
        return calls.names

    inside = names(True)
    assert inside.count("rim_fast.winograd_conv3d.default") == 2
    assert inside.count("rim_fast.winograd_conv3d_weight.default") == 1
    assert "aten.convolution_backward.default" not in inside
    outside = names(False)
    assert "rim_fast.winograd_conv3d_weight.default" not in outside
    assert "aten.convolution_backward.default" in outside
    monkeypatch.setattr(_cpu, "WINOGRAD_WEIGHT_MIN_TILES", 257)
    assert "rim_fast.winograd_conv3d_weight.default" not in names(True)
    monkeypatch.setattr(_cpu, "WINOGRAD_WEIGHT_MIN_TILES", 256)
    # one sample with autograd, which outside a call takes the depth split: inside one, with the weight's gradient
    # by Winograd, no aten backward runs and the whole convolution is Winograd's
    x = torch.randn(1, 32, 16, 16, 16, requires_grad=True)  # 512 tiles
    inside, outside = names(True), names(False)
    assert inside.count("rim_fast.winograd_conv3d_weight.default") == 1
    assert "aten.convolution_backward.default" not in inside
    assert "rim_fast.winograd_conv3d.default" not in outside


def test_winograd_weight_gradient_double_backward(winograd_path):
    # under create_graph the weight's gradient comes from oneDNN through w: second derivatives within the error
    # budget against float64
    from rim_fast.layers import derived
    x64 = torch.randn(4, 32, 8, 8, 8, dtype=torch.float64)
    w64 = torch.randn(32, 32, 3, 3, 3, dtype=torch.float64) / 17

    def second(fn, dtype, cache):
        x, w = (t.to(dtype).requires_grad_() for t in (x64, w64))
        with derived.per_call_cache() if cache else contextlib.nullcontext():
            out = fn(x, w)
        gw, = torch.autograd.grad(out.square().sum(), w, create_graph=True)
        return list(torch.autograd.grad(gw.sum(), (x, w)))

    fast = second(lambda x, w: _cpu.conv(x, w, None, 1, "same"), torch.float32, True)
    ref = second(lambda x, w: reference.conv(x, w, None, 1, "same"), torch.float32, False)
    exact = second(lambda x, w: reference.conv(x, w, None, 1, "same"), torch.float64, False)
    assert_error_budget(fast, ref, exact, torch.float32, ["x", "w"], "second derivatives")
