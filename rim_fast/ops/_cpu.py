"""The CPU backend of the convolution family: the convolutions in channels-last layout (``channels_last``) and
conv + tanh as one oneDNN primitive (``onednn_fused``), each with its ``usable``/``auto`` rule.

oneDNN runs fp32 convolutions in NHWC / NDHWC much faster than in NCHW on our CPUs (single-thread, the
standard workloads: a 3x3 32->32 conv at 64x64 2x faster, the 2-channel input conv ~20x, stride-2 and
transposed convs 3-4x; a 1D conv of length 256 4x when run as a [B, C, 1, L] channels-last 2D conv). The
first conv of a network converts its input once; the outputs stay channels-last (element-wise ops keep the
layout), so later convs pay nothing. Each weight is laid out once per RIM call. Thin convolutions (one output
channel; the input gradient of one with at most two input channels), where oneDNN runs at 15-60 GFLOP/s, are
matrix products and shifted sums instead (without autograd in 3D, one output channel as a depthwise convolution
and a sum over the channels). Results equal the reference up to float rounding (another summation
order), which is why ``RIM_FAST_BACKEND=reference`` keeps torch_rim's NCHW convs bit for bit."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext
from . import _cpp, reference
from ._dispatch import exporting, functorch_active, needs_grad

Tensor = torch.Tensor
_CL = {4: torch.channels_last, 5: torch.channels_last_3d}
_FLOATS = (torch.float32, torch.float64, torch.bfloat16)


def usable(x, *args) -> bool:
    """CPU tensors of 1 to 3 spatial dims, float32/float64/bfloat16 (``auto`` takes them all: oneDNN is faster in
    channels-last than in the reference's NCHW); not under torch.func transforms (vmap cannot ask a batched tensor
    for its channels-last layout)."""
    return x.device.type == "cpu" and x.dtype in _FLOATS and x.dim() in (3, 4, 5) and not functorch_active()


def auto(x, *args) -> bool:
    """``auto`` takes the channels-last convolutions where oneDNN runs them faster than aten's native kernels
    (``onednn_pays``): below that size the reference's NCHW convolution, as torch_rim runs it."""
    return onednn_pays(x) and usable(x)


#: aten's own rule for taking oneDNN on the CPU (at::native): a batch of two or more, or more than this many
#: elements in N * C * H * W (1D as [N, C, 1, L]), in 3D N * C * D * H (the width not counted)
ATEN_ONEDNN_MIN_NUMEL = 20480

#: Inputs of one sample (B = 1) of at most this many elements (by number of spatial dims) run faster in aten's
#: native convolution kernels than in oneDNN, whose primitives cost 50-70 us a call on our 2-core CPU however small
#: the problem. Measured per convolution (bench/conv_threshold.py, bench/results/cpu-small-batch-90d68f7: 3x3
#: kernels, 2 -> 32, 32 -> 32 and 64 -> 64 channels), oneDNN's conv + tanh against aten's conv and tanh in NCHW:
#: 1D and 2D 1.04-4.9x the time at or below 20,480 elements (aten's own rule for taking oneDNN), 0.73-0.86x above;
#: 3D 0.95-3.4x at or below 4,096 (but the 2 -> 32 input conv at 12^3, 3,456 elements: 0.79x), 0.22-0.64x above
#: (aten's rule, which counts the depth but not the width, leaves 3D inputs of one sample up to 16 times larger
#: with its slow native kernels: ``_depth_split``). Batches of two or more always take oneDNN (aten does too).
ONEDNN_MIN_NUMEL = {1: ATEN_ONEDNN_MIN_NUMEL, 2: ATEN_ONEDNN_MIN_NUMEL, 3: 4096}


def onednn_pays(x: Tensor) -> bool:
    """Whether a convolution of ``x`` [B, C, *S] should run in oneDNN (channels-last): batches of two or more, and
    one sample above ``ONEDNN_MIN_NUMEL`` elements. Always under torch.compile (Inductor picks its kernels)."""
    if torch.compiler.is_compiling():
        return True
    return x.shape[0] > 1 or x.numel() > ONEDNN_MIN_NUMEL.get(x.dim() - 2, 0)


def why_not(x, *args) -> str:
    if x.device.type != "cpu":
        return "CPU tensors only (cuDNN serves GPU tensors in their own layout)"
    if functorch_active():
        return "not under torch.func transforms"
    return f"{x.dtype} / {x.dim() - 2} spatial dims not covered"


def _to_cl(x: Tensor) -> Tensor:
    """[B, C, *S] (S of 1-3 dims) -> channels-last 4D/5D tensor; 1D as [B, C, 1, L]. No copy when the layout
    already fits (the squeezed output of an earlier conv)."""
    if x.dim() == 3:
        x = x.unsqueeze(2)
    return x.contiguous(memory_format=_CL[x.dim()])


def _weight(weight: Tensor) -> Tensor:
    """The weight as oneDNN takes it beside a channels-last input: 4D/5D channels-last (1D as [C_out, C_in, 1, k]).
    Inside a RIM call (``layers.derived``) built once per call: the T steps' convolutions and their backward passes
    read the one copy, where aten converts a contiguous weight in every forward and backward. Outside, converted
    here (as aten would): the same layout either way, which gradient checkpointing's recomputation (outside the
    call's cache) checks."""
    from ..layers import derived
    if torch.compiler.is_compiling():
        return weight.unsqueeze(2) if weight.dim() == 3 else weight
    return derived.derived(weight, "channels_last", lambda: _to_cl(weight))


def _pair(v, one_d: bool, fill=0):
    return (fill, v) if one_d else v


def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int = 1, padding="same",
         dilation: int = 1, groups: int = 1) -> Tensor:
    one_d = x.dim() == 3
    xc = _to_cl(x)
    w = _weight(weight)
    if w.shape[0] <= THIN_OUT and _thin_ok(xc, w, _pads(padding, w, one_d, dilation), stride, dilation, groups):
        if _thin_depthwise_ok(xc, w, bias):
            return _thin_out_depthwise(xc, w, bias)
        out = _ThinOutConv.apply(xc, w, bias)
        return out.squeeze(2) if one_d else out
    if stride == 1 and _winograd_ok(xc, w, bias, _pads(padding, w, one_d, dilation), dilation, groups):
        return _winograd(xc, w, bias, weight)
    if _depth_split_ok(xc, w, stride, dilation, groups):  # 3D only
        return _depth_split(xc, w, bias, stride, _pads(padding, w, one_d, dilation))
    pad = padding if isinstance(padding, str) else _pair(padding, one_d)
    out = (F.conv2d if xc.dim() == 4 else F.conv3d)(xc, w, bias, _pair(stride, one_d, 1), pad,
                                                   _pair(dilation, one_d, 1), groups)
    return out.squeeze(2) if one_d else out


def _depth_split_ok(xc: Tensor, w: Tensor, stride, dilation, groups) -> bool:
    # a 3D float32/bfloat16 CPU input (oneDNN's types) of one sample that aten would give its native kernels
    # (N * C * D * H at most ``ATEN_ONEDNN_MIN_NUMEL``) but that oneDNN runs faster (``onednn_pays``); eagerly,
    # plain stride-1 or strided convolutions (the depth split takes no dilation or groups). CPU tensors only:
    # ``_cudnn`` serves CUDA tensors through ``conv`` as they are, and cuDNN has no such rule
    return (xc.dim() == 5 and xc.shape[0] == 1 and xc.device.type == "cpu"
            and xc.dtype in (torch.float32, torch.bfloat16)
            and math.prod(xc.shape[:4]) <= ATEN_ONEDNN_MIN_NUMEL and xc.shape[2] > 1
            and dilation == 1 and groups == 1
            and onednn_pays(xc) and not torch.compiler.is_compiling() and not exporting())


def _depth_split(xc: Tensor, w: Tensor, bias: Optional[Tensor], stride: int, pads: list) -> Tensor:
    """A 3D convolution of one sample ``xc`` [1, C, D, H, W] (channels-last) run as a batch of two: its depth
    halves, each with the planes its outputs read. aten runs a batch of one of this size in its native kernels,
    forward and backward, a batch of two in oneDNN (S3's 32 -> 32 conv at 16^3: 3.3 -> 0.87 ms forward, 8.8 -> 2.2
    ms backward; bench/conv_threshold.py). The same products and sums per output
    and gradient element (the weight gradient sums the two halves' contributions); padding, slicing and the
    concatenations are differentiable, so autograd needs nothing of its own."""
    k, depth = w.shape[2], xc.shape[2]
    d_out = (depth + 2 * pads[0] - k) // stride + 1
    half = (d_out + 1) // 2  # output planes per half (the second half's last one is cut when d_out is odd)
    span = stride * (half - 1) + k  # input planes one half reads
    total = stride * half + span  # the padded depth both halves read
    xp = F.pad(xc, (0, 0, 0, 0, pads[0], max(0, total - depth - pads[0])))  # keeps the channels-last layout
    halves = torch.cat([xp[:, :, :span], xp[:, :, stride * half:stride * half + span]])
    out = F.conv3d(halves, w, bias, stride, [0, pads[1], pads[2]])
    out = torch.cat([out[:1], out[1:]], dim=2)
    return out if 2 * half == d_out else out[:, :, :d_out]


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: int, stride: int, dilation: int,
              groups: int, axis_swap: bool = True) -> Tensor:
    from .reference import conv_same_pads
    pads = conv_same_pads(tuple(x.shape[2:]), kernel_size, stride, dilation, axis_swap)
    # pad the channels-last tensor (F.pad keeps its layout), not the NCL/NCHW one: no second copy
    out = conv(F.pad(_to_cl(x), pads), weight, bias, stride, 0, dilation, groups)
    return out.squeeze(2) if x.dim() == 3 else out


def conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                   output_padding: int, groups: int, dilation: int) -> Tensor:
    one_d = x.dim() == 3
    xc = _to_cl(x)
    w = _weight(weight)
    fn = F.conv_transpose2d if xc.dim() == 4 else F.conv_transpose3d
    late = _late_bias(xc, bias)
    out = fn(xc, w, None if late else bias, _pair(stride, one_d, 1), _pair(padding, one_d),
             _pair(output_padding, one_d), groups, _pair(dilation, one_d, 1))
    if late:
        # in place: the transposed convolution's backward does not read its output
        out = out.add_(bias.reshape(-1, *([1] * (out.dim() - 2))))
    return out.squeeze(2) if one_d else out


def _late_bias(xc: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether a transposed convolution adds its bias after oneDNN's primitive rather than inside it: where the
    bias needs a gradient, eagerly. oneDNN's transposed-convolution backward computes the bias gradient in a slow
    loop of its own (S3's 64 -> 32 upsampling, [4, 32, 16^3]: 1.37 ms alone, where a sum over the output gradient
    takes 0.05); an added bias gets that sum from autograd. Measured, transposed conv + tanh forward and backward,
    in one process (2-core Xeon with AVX-512, 2026-12-04): S2 18.0 -> 14.6 ms (64 -> 32) and 10.6 -> 8.9 ms
    (128 -> 64), S1 1.39 -> 1.31 and 1.99 -> 1.88 ms, S3 about 0.3 ms of 3.8. The in-place add costs a pass over
    the output, which inference (no bias gradient) does not pay. CPU tensors only: the CUDA channels-last
    layout (``_cudnn``) runs this function too, where aten adds cuDNN's bias in a pass of its own anyway."""
    return (bias is not None and bias.requires_grad and torch.is_grad_enabled() and xc.device.type == "cpu"
            and bias.dtype == xc.dtype and not torch.compiler.is_compiling() and not _autocast_on())


# ---- 3x3x3 convolutions by Winograd's F(2x2x2, 3x3x3) (csrc/winograd.h) -------------------------------------

#: ``RIM_FAST_WINOGRAD=0`` turns the Winograd convolutions off (oneDNN's direct ones run instead); read at import.
WINOGRAD = os.environ.get("RIM_FAST_WINOGRAD", "1").strip() != "0"
_WINOGRAD_CHANNELS = (16, 32, 64, 128)


def cpu_isa_for(capability: str) -> Optional[str]:
    """The instruction set of rim_fast's CPU loops (csrc/cpu_isa.h: the Winograd kernels, tanh, the shifted sums)
    for torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``): "avx512" or "avx2", else None (plain
    loops; the Winograd convolutions are then slower than oneDNN's direct ones, which run instead)."""
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else None


#: The instruction set of rim_fast's CPU loops here, torch's own: ``ATEN_CPU_CAPABILITY=avx2`` caps torch's
#: kernels and ours alike (with ``ONEDNN_MAX_CPU_ISA=AVX2`` a stand-in for a CPU without AVX-512, as
#: bench/results/cpu-avx2-*)
CPU_ISA = cpu_isa_for(torch.backends.cpu.get_cpu_capability())
#: The Winograd kernels' instruction set, or None where they do not run (neither AVX-512 nor AVX2)
WINOGRAD_ISA = CPU_ISA
# (an extension built before the hook existed picks its own: rebuild it)
_set_cpu_isa = getattr(_ext.module(), "_set_cpu_isa", None)
if _set_cpu_isa is not None:
    _set_cpu_isa(CPU_ISA or "plain")


def _winograd_ok(xc: Tensor, w: Tensor, bias: Optional[Tensor], pads: list, dilation, groups: int) -> bool:
    """Whether a stride-1 convolution runs as ``rim_fast::winograd_conv3d``: 3D, a 3x3x3 kernel with padding 1
    ("same"), no dilation or groups, float32, 16/32/64/128 input and output channels, a CPU with AVX-512 or AVX2
    (``WINOGRAD_ISA``), eagerly (not under torch.compile, torch.export, torch.func transforms or autocast), with
    rim_fast._C built. With autograd the input gradient runs by Winograd too, and inside a RIM call the weight's
    where it pays (``_Winograd``, ``WINOGRAD_WEIGHT_MIN_TILES``). Measured, forward, against oneDNN's channels-last
    convolution on our 2-core Xeon, 2026-12-05 (bench/bench_conv.py: providers "channels_last" / "onednn_fused"
    against "direct"): with AVX-512, S3's 32 -> 32 at [4, 32, 16^3] 2.83 -> 1.82 ms, 64 -> 64 at [4, 64, 8^3]
    1.30 -> 0.74 ms (bench/results/cpu-41b7e96); capped at AVX2 (torch, oneDNN, MKL and ours), 4.29 -> 2.87 ms and
    2.06 -> 1.31 ms (bench/results/cpu-avx2-94064cc)."""
    return (WINOGRAD and WINOGRAD_ISA is not None and xc.dim() == 5 and tuple(w.shape[2:]) == (3, 3, 3)
            and list(pads) == [1, 1, 1]
            and dilation in (1, [1, 1, 1]) and groups == 1 and xc.device.type == "cpu"
            and xc.dtype == torch.float32 and w.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and w.shape[0] in _WINOGRAD_CHANNELS and w.shape[1] in _WINOGRAD_CHANNELS
            and _cpp.has_kernel("cpu") and not torch.compiler.is_compiling() and not exporting()
            and not _autocast_on() and not functorch_active()
            # one small sample with autograd: its backward takes the depth split (aten's native kernels otherwise),
            # unless Winograd computes the weight's gradient too (then no aten backward runs)
            and not (needs_grad(xc, w, bias) and _depth_split_ok(xc, w, 1, 1, 1) and not _winograd_weight_ok(xc, w)))


#: The weight gradient by Winograd (``rim_fast::winograd_conv3d_weight``) from this many tiles (2x2x2 outputs) up,
#: per instruction set. AVX-512: measured against oneDNN's weight and bias gradient, alternated in one process
#: (2-core Xeon, 2026-12-05): [4, 32, 16^3] (2048 tiles) 2.36 -> 1.84 ms, [4, 64, 8^3] (256) 1.32 -> 1.16, the
#: GRU's [4, 128 -> 16, 4^3] (32) 0.19 -> 0.22 (slower). AVX2 (the same Xeon capped at AVX2, oneDNN too), where
#: oneDNN's weight gradient is slower: the GRU's 0.79 -> 0.32 ms (the kernel; G^T du G runs once a call); S3B1's
#: training step with 32 against 256, alternated: 1.065x and 1.075x (S3 1.01x; on AVX-512 S3 0.99x)
#: (bench/results/cpu-avx2-94064cc).
WINOGRAD_WEIGHT_MIN_TILES_BY_ISA = {"avx512": 256, "avx2": 32}
WINOGRAD_WEIGHT_MIN_TILES = WINOGRAD_WEIGHT_MIN_TILES_BY_ISA.get(WINOGRAD_ISA, 256)


def _winograd_weight_ok(xc: Tensor, weight: Tensor) -> bool:
    # ``weight``: the parameter or its channels-last copy (the same requires_grad)
    # inside a RIM call (``derived``: the transformed weight is built once, its gradient summed over the T steps
    # and turned into the weight's once) and where it pays
    from ..layers import derived
    tiles = xc.shape[0] * math.prod((s + 1) // 2 for s in xc.shape[2:])
    return derived.active() and weight.requires_grad and tiles >= WINOGRAD_WEIGHT_MIN_TILES


#: kron(G, G, G) in float64, [64, 27]: ``reference.winograd_weight`` as one matrix product
_WINOGRAD_KRON = torch.einsum("ai,bj,ck->abcijk", *[torch.tensor(reference._WINOGRAD_G, dtype=torch.float64)] * 3
                              ).reshape(64, 27)


def _transformed(weight: Tensor) -> Tensor:
    """``reference.winograd_weight(weight)`` computed in float64 and rounded once to the weight's dtype, as one matrix
    product with kron(G, G, G) (differentiable: the casts and the product are). In float32 its roundings took a whole
    3D RIM's early gradients to 0.99 of the error budget (1.14 on AVX2 CPUs); rounded once, at most 0.73 (AVX2:
    0.55), where oneDNN's direct convolutions give 0.70 (0.90) (bench/error_budget.py, worst 3D case; S3's predict
    pays 1.2% for the float64 product)."""
    c_out, c_in = weight.shape[:2]
    w27 = weight.permute(2, 3, 4, 1, 0).reshape(27, c_in * c_out).double()  # [27 taps, C_in x C_out]
    return (_WINOGRAD_KRON @ w27).to(weight.dtype).view(64, c_in, c_out)


def _winograd(xc: Tensor, w: Tensor, bias: Optional[Tensor], weight: Tensor) -> Tensor:
    # the transformed weights once per RIM call (``derived``), from the parameter itself
    from ..layers import derived
    if not needs_grad(xc, w, bias):
        u = derived.derived(weight, "winograd", lambda: _transformed(weight.detach()))
        return _cpp.winograd_conv3d(xc, u, bias)
    # the input gradient is the "same" convolution of the output gradient with the flipped, transposed weight
    u_t = derived.derived(weight, "winograd_input_grad", lambda: _transformed(
        weight.detach().flip(2, 3, 4).transpose(0, 1))) if xc.requires_grad else None
    if _winograd_weight_ok(xc, weight):
        # with autograd: the weight's gradient flows through u (G^T du G, once per call)
        u = derived.derived(weight, "winograd_differentiable", lambda: _transformed(weight))
    else:
        u = derived.derived(weight, "winograd", lambda: _transformed(weight.detach()))
    return _Winograd.apply(xc, w, bias, u, u_t)


class _Winograd(torch.autograd.Function):
    """A 3x3x3 "same" convolution by Winograd (``rim_fast::winograd_conv3d`` with the transformed weight ``u``).
    Backward: the input gradient by Winograd too (the convolution of the output gradient with the flipped,
    transposed weight, transformed: ``u_t``); the weight's, where ``u`` requires grad, as u's gradient by Winograd
    (``rim_fast::winograd_conv3d_weight``; the bias's a sum), else by oneDNN (``aten.convolution_backward`` of the
    direct convolution with ``w``, in the channels-last layout). Under create_graph (double backward) every
    gradient comes from oneDNN's differentiable convolution_backward, the weight's through ``w``."""

    @staticmethod
    def forward(ctx, xc, w, bias, u, u_t):
        ctx.save_for_backward(xc, w, u_t)
        ctx.has_bias = bias is not None
        return _cpp.winograd_conv3d(xc, u, bias)

    @staticmethod
    def backward(ctx, grad):
        xc, w, u_t = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        need_x, need_w, need_b, need_u = ctx.needs_input_grad[:4]
        need_b = need_b and ctx.has_bias
        single = not torch.is_grad_enabled()  # not under create_graph
        by_u = need_u and single  # the weight's gradient as u's (w's is then left out)
        winograd_gx = need_x and u_t is not None and single
        gx = gw = gb = gu = None
        mask = [need_x and not winograd_gx, need_w and not by_u, need_b and not by_u]
        if any(mask):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad, xc, w, [w.shape[0]] if ctx.has_bias else None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
                [0, 0, 0], 1, mask)
        if winograd_gx:
            gx = _cpp.winograd_conv3d(grad, u_t, None)
        if by_u:
            gu = _cpp.winograd_conv3d_weight(xc, grad)
            gb = grad.sum((0, 2, 3, 4)) if need_b else None
        return gx, gw, gb if ctx.has_bias else None, gu, None


# ---- conv + tanh in one oneDNN primitive (inference) --------------------------------------------------------

def _probe() -> dict:
    """Whether the private oneDNN ops (Inductor's; their signatures are not a public promise) run and give
    tanh(conv) on this torch: probed once, at import, so that torch.compile never traces the probe."""
    works = {"conv": False, "conv_transpose": False}
    if not torch.backends.mkldnn.is_available():
        return works
    x = torch.ones(1, 1, 1, 3).contiguous(memory_format=torch.channels_last)
    w = torch.ones(1, 1, 1, 3)
    # a 1x3 kernel of ones over three ones, padded by 1 (the transposed conv of stride 1 sums the same taps)
    expected = torch.tanh(torch.tensor([[[[2.0, 3.0, 2.0]]]]))
    calls = {"conv": lambda: torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 1], [1, 1], [1, 1], 1, "tanh",
                                                                      [], ""),
             "conv_transpose": lambda: torch.ops.mkldnn._convolution_transpose_pointwise(
                 x, w, None, [0, 1], [0, 0], [1, 1], [1, 1], 1, "tanh", [], "")}
    with torch.no_grad():
        for name, call in calls.items():
            try:
                works[name] = bool(torch.allclose(call(), expected))
            except (AttributeError, RuntimeError, TypeError):
                pass
    return works


_WORKS = _probe()


def _fused_works() -> bool:
    return _WORKS["conv"]


def _transpose_fused_works() -> bool:
    return _WORKS["conv_transpose"]


def _autocast_on() -> bool:
    # eager CPU autocast: the reference's convolution runs in autocast's dtype, the fused primitives would not
    if torch.compiler.is_compiling():
        return False
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


def _fusable(x, weight, bias, autograd: bool = False) -> bool:
    # CPU float32, 1-3 spatial dims, not under eager autocast or torch.func transforms; with autograd only where
    # ``autograd`` (the primitives have no derivative of their own: ``_ConvTanh`` gives conv + tanh one)
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() in (3, 4, 5)
            and weight.dtype == torch.float32 and (autograd or not needs_grad(x, weight, bias))
            and not _autocast_on() and not functorch_active())


def conv_tanh_why_not(x, weight, bias, padding, dilation, groups) -> str:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "CPU float32 only"
    if not _fused_works():
        return "this torch has no working mkldnn._convolution_pointwise"
    if exporting():
        return "not under torch.export (a saved program cannot hold the op's arguments)"
    if _autocast_on():
        return "not under autocast (the convolution runs in autocast's dtype)"
    if functorch_active():
        return "not under torch.func transforms (grad, vmap, ...)"
    return ("a symmetric padding only; under torch.compile neither with autograd nor for 1D inputs (torch 2.6's "
            "Inductor computed 1D ones wrong)")


def conv_tanh_auto(x, weight, bias, padding, dilation, groups) -> bool:
    """``conv_tanh_usable`` where oneDNN pays (``onednn_pays``): below, the reference's conv and tanh."""
    return onednn_pays(x) and conv_tanh_usable(x, weight, bias, padding, dilation, groups)


def conv_tanh_usable(x, weight, bias, padding, dilation, groups) -> bool:
    """oneDNN's conv with a tanh post-op: CPU float32, a symmetric padding ("same" with an odd effective kernel).
    Without autograd eagerly and under torch.compile (Inductor runs the op as an extern kernel: on the CPU it fuses
    no epilogue into a convolution of parameters that are not frozen); with autograd eagerly (``_ConvTanh``: under
    torch.compile Inductor differentiates the reference); not under torch.export (torch.export cannot serialize the
    op's empty list of scalars)."""
    grad = needs_grad(x, weight, bias)
    if not (_fusable(x, weight, bias, autograd=True) and _fused_works()) or exporting():
        return False
    # under torch.compile: not with autograd, and not for 1D inputs (run as [B, C, 1, L]: torch 2.6's Inductor
    # computed them wrong, 2.4e-4 relative error in a compiled RIM's predict; tests/test_error_budget.py)
    if torch.compiler.is_compiling() and (grad or x.dim() == 3):
        return False
    if isinstance(padding, str):
        return padding == "valid" or all(dilation * (k - 1) % 2 == 0 for k in weight.shape[2:])
    return True


def _thin_in(xc: Tensor, w: Tensor, pads: list, dilation: list, groups: int) -> bool:
    # few input channels (the input conv) and a 2D/3D kernel: oneDNN's backward-data is slow there (with a 1D
    # kernel of 3 taps it is not: bench_conv.py, S1 conv_in), ``_ConvTanh``'s backward takes the thin path
    return (w.shape[1] <= THIN_IN and math.prod(w.shape[2:]) >= 9
            and _thin_ok(xc, w, pads, 1, max(dilation), groups))


def _fused_conv_tanh(xc: Tensor, w: Tensor, bias: Optional[Tensor], pads: list, dilation: list,
                     groups: int) -> Tensor:
    # oneDNN's stride-1 conv with the tanh post-op on a channels-last 4D/5D tensor
    spatial = xc.dim() - 2
    return torch.ops.mkldnn._convolution_pointwise(xc, w, bias, pads, [1] * spatial, dilation, groups, "tanh", [], "")


class _ConvTanh(torch.autograd.Function):
    """tanh(conv(x)) with oneDNN's fused forward; backward: tanh's derivative from the saved output
    (``aten.tanh_backward``), then the convolution's (``aten.convolution_backward``, in the forward's layout), with
    the thin input gradient (``_thin_in_input_grad``) where the input has few channels. Both are differentiable
    ops, so double backward works too. Only for those thin inputs (``_thin_in``): elsewhere ``conv_tanh`` runs
    aten's convolution and an in-place tanh with autograd, whose nodes cost less host time than this Python
    Function's (measured, training step, alternated in one process on a 2-core Xeon with AVX-512, 2026-12-03, two
    runs: torch_rim / rim_fast 1.31-1.32x -> 1.35-1.36x S1, 1.31-1.36x -> 1.32-1.37x S2 (+0.5%), 1.20x -> 1.21-1.23x
    S3; bench/results/cpu-a0fba49/ab_conv_tanh_autograd.txt)."""

    @staticmethod
    def forward(ctx, xc, w, bias, pads, dilation, groups):
        y = _fused_conv_tanh(xc, w, bias, pads, dilation, groups)
        ctx.save_for_backward(xc, w, y)
        ctx.conf = (pads, dilation, groups, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, w, y = ctx.saved_tensors
        pads, dilation, groups, has_bias = ctx.conf
        spatial = xc.dim() - 2
        # the gradient in the forward's layout (channels-last), as oneDNN's backward takes it
        grad_pre = torch.ops.aten.tanh_backward(grad.contiguous(memory_format=_CL[xc.dim()]), y)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        thin = mask[0] and _thin_in(xc, w, pads, dilation, groups)
        gx = gw = gb = None
        if mask[1] or mask[2] or not thin:
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_pre, xc, w, [w.shape[0]] if has_bias else None, [1] * spatial, pads, dilation, False,
                [0] * spatial, groups, [mask[0] and not thin, *mask[1:]])
        if thin:
            gx = _thin_in_input_grad(grad_pre, w)
        return gx, gw, gb if has_bias else None, None, None, None


def conv_tanh(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding, dilation: int, groups: int) -> Tensor:
    """tanh(conv(x)) with stride 1, as one oneDNN primitive in channels-last layout (the activation rides on
    the conv's output instead of a pass of its own). Measured, S3 predict, interleaved in one process on our 2-core
    CPU: 1.11x torch_rim fused vs 1.03x unfused; S1 and S2 unchanged (1.51x / 1.35x either way). With autograd:
    through ``_ConvTanh`` where the input gradient takes the thin path, else the channels-last convolution and an
    in-place tanh (see ``_ConvTanh``)."""
    one_d = x.dim() == 3
    xc = _to_cl(x)
    w = _weight(weight)
    spatial = xc.dim() - 2
    pads = _pads(padding, w, one_d, dilation)
    dil = _list(dilation, one_d, spatial, 1)
    if xc.requires_grad and _thin_in(xc, w, pads, dil, groups):
        out = _ConvTanh.apply(xc, w, bias, pads, dil, groups)
    elif _winograd_ok(xc, w, bias, pads, max(dil), groups):
        out = _winograd(xc, w, bias, weight).tanh_()
    elif needs_grad(xc, w, bias):
        # autograd's own nodes: the channels-last convolution, then tanh in place on its fresh output (the
        # convolution's backward does not read its output; tanh's reads the result)
        if _depth_split_ok(xc, w, 1, max(dil), groups):
            out = _depth_split(xc, w, bias, 1, pads).tanh_()
        else:
            out = (F.conv2d if spatial == 2 else F.conv3d)(xc, w, bias, 1, pads, dil, groups).tanh_()
    else:
        out = _fused_conv_tanh(xc, w, bias, pads, dil, groups)
    return out.squeeze(2) if one_d else out


def conv_transpose_tanh_usable(x, weight, bias, *args) -> bool:
    """oneDNN's transposed conv with a tanh post-op: CPU float32, no autograd, eager only: the op's shape function
    under torch.compile takes the weight in Inductor's packed layout, not torch's (it inferred 128 output channels
    for a [128, 64, 3, 3] weight, where the eager op gives 64)."""
    return _fusable(x, weight, bias) and _transpose_fused_works() and not torch.compiler.is_compiling()


def conv_transpose_tanh_auto(x, weight, bias, *args) -> bool:
    """Never: slower than the channels-last transposed conv and the C++ tanh on our CPU (bench/bench_conv.py).

    Measured 2026-12-02, S1 / S2 / S3 decoder shapes: 1.02x / 1.39x / 1.39x the reference fused against
    1.44x / 1.98x / 1.82x unfused; in an interleaved A/B 2 of 3 shapes slower. ``RIM_FAST_BACKEND=kernels``
    still runs it, and bench_conv keeps measuring it."""
    return False


def conv_transpose_tanh_why_not(x, weight, bias, *args) -> str:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "CPU float32 only"
    if not _transpose_fused_works():
        return "this torch has no working mkldnn._convolution_transpose_pointwise"
    if torch.compiler.is_compiling():
        return "not under torch.compile (its shape function expects Inductor's packed weight layout)"
    return "no autograd (the fused primitive has no derivative)"


def conv_transpose_tanh(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                        output_padding: int, groups: int, dilation: int, crop) -> Tensor:
    """tanh(conv_transpose(x)) cropped to ``crop`` (tanh commutes with the crop), one oneDNN primitive in
    channels-last layout."""
    from .reference import crop_spatial
    one_d = x.dim() == 3
    xc = _to_cl(x)
    w = weight.unsqueeze(2) if one_d else weight
    spatial = xc.dim() - 2
    out = torch.ops.mkldnn._convolution_transpose_pointwise(
        xc, w, bias, _list(padding, one_d, spatial, 0), _list(output_padding, one_d, spatial, 0),
        _list(stride, one_d, spatial, 1), _list(dilation, one_d, spatial, 1), groups, "tanh", [], "")
    return crop_spatial(out.squeeze(2) if one_d else out, crop)


def _pads(padding, w: Tensor, one_d: bool, dilation: int) -> list:
    # a convolution's padding per spatial axis of its 4D/5D weight ``w`` ("same" as a symmetric one)
    if padding == "valid":
        return [0] * (w.dim() - 2)
    if isinstance(padding, str):
        return [dilation * (k - 1) // 2 for k in w.shape[2:]]
    return _list(padding, one_d, w.dim() - 2, 0)


def _list(v: int, one_d: bool, spatial: int, fill: int) -> list:
    return [fill, v] if one_d else [v] * spatial


# ---- thin convolutions: few output or input channels, as matrix products and shifted sums -------------------

#: the thin paths: at most THIN_OUT output channels (``_ThinOutConv``), at most THIN_IN input channels
#: (``_thin_in_input_grad``). Measured, forward + backward, S2 / S3 shapes on a 2-core Xeon with AVX-512
#: (2026-12-03), against oneDNN channels-last: 32 -> 1 5.6 -> 3.1 ms / 3.6 -> 1.5 ms, 32 -> 2 6.2 -> 5.0 / 3.6 ->
#: 2.4, 32 -> 4 5.8 -> 7.5 / 3.8 -> 4.2 (slower), 2 -> 32 5.5 -> 4.6 / 2.7 -> 2.1, 4 -> 32 6.0 -> 6.7 / 3.1 -> 2.9.
#: Two output channels stay with oneDNN: there the whole-RIM error budget's 3D C=2 case went over (1.18 of it, a
#: GRU bias gradient, with 2 threads; 0.75 with 1): another summation order, unluckily, for a small gain.
THIN_OUT = 1
THIN_IN = 2


def _thin_ok(xc: Tensor, w: Tensor, pads, stride, dilation, groups) -> bool:
    # stride 1, no dilation, no groups, odd kernels padded (k - 1) / 2 on both sides: the output has the input's
    # size and tap k of every output position reads the input shifted by k - pad; eagerly, float32/float64, CPU
    # tensors (the thin paths work around oneDNN; cuDNN runs ``_cudnn``'s through ``conv`` as they are)
    ks = tuple(w.shape[2:])
    return (xc.device.type == "cpu" and stride == 1 and groups == 1 and dilation == 1
            and xc.dtype in (torch.float32, torch.float64)
            and w.dtype == xc.dtype and all(k % 2 == 1 for k in ks)
            and list(pads) == [(k - 1) // 2 for k in ks] and not torch.compiler.is_compiling() and not exporting()
            and not _autocast_on())


def _rows(xc: Tensor) -> Tensor:
    # a channels-last [N, C, *S] tensor as its [N * S, C] matrix (a view when it is channels-last)
    return xc.movedim(1, -1).reshape(-1, xc.shape[1])


def _taps(w: Tensor) -> Tensor:
    # a weight [C_out, C_in, *ks] as the matrix [C_out K, C_in] (row: an output channel's tap, in the weight's order)
    return w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 2).reshape(-1, w.shape[1])


class _ThinOutConv(torch.autograd.Function):
    """A stride-1 "same" convolution with few output channels (the Hourglass' merged output conv, nf -> C):
    oneDNN runs those far below its speed elsewhere (S2's 32 -> 1 3x3 conv: 16 GFLOP/s, 2.2 ms forward, 2.9 ms
    backward). Here forward is one matrix product [C_out K, C_in] x [C_in, N S] (the K taps' planes), then the
    planes summed shifted (``_cpp.shift_sum``, one pass of csrc/shift.cpp); backward stacks the output gradient's K
    shifted copies once (``_cpp.shift_stack``, its adjoint) and contracts it with the weight (input gradient) and the
    input (weight gradient). Backward uses differentiable ops: double backward works."""

    @staticmethod
    def forward(ctx, xc, w, bias):
        ks = tuple(w.shape[2:])
        planes = (_taps(w) @ _rows(xc).t()).reshape(w.shape[0], math.prod(ks), xc.shape[0], *xc.shape[2:])
        out = _cpp.shift_sum(planes, ks, 1)
        if bias is not None:
            out += bias.reshape(-1, *([1] * (out.dim() - 1)))
        ctx.save_for_backward(xc, w)
        ctx.has_bias = bias is not None
        return out.movedim(0, 1).contiguous(memory_format=_CL[xc.dim()])

    @staticmethod
    def backward(ctx, grad):
        xc, w = ctx.saved_tensors
        ks = tuple(w.shape[2:])
        c_out, c_in = w.shape[:2]
        stacked = _cpp.shift_stack(grad.movedim(1, 0), ks, 1).reshape(c_out * math.prod(ks), -1)  # [C_out K, N S]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (stacked.t() @ _taps(w)).reshape(xc.shape[0], *xc.shape[2:], c_in).movedim(-1, 1)
        if ctx.needs_input_grad[1]:
            gw = (stacked @ _rows(xc)).reshape(c_out, -1, c_in).transpose(1, 2).reshape(w.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum([0, *range(2, grad.dim())])
        return gx, gw, gb


#: Spatial dims where a thin convolution without autograd runs as ``_thin_out_depthwise``. Measured against the
#: matrix products (2-core Xeon with AVX-512, 2026-12-04; bench/results/cpu-74ace30): S3's 32 -> 1 3x3x3 conv
#: [4, 32, 16^3] 0.70 -> 0.57 ms (``bench.bench_conv``'s conv_out fwd); in the RIM, alternated in one process for 30
#: rounds, S3 predict 235.4 -> 233.3 ms, S3B1 99.8 -> 98.9 ms. In 1D and 2D the two were equal (S1 0.09 ms, S2 0.67
#: ms), so they keep the matrix products; with autograd the depthwise convolution's backward took 3x the thin
#: path's (S3 5.8 against 1.8 ms forward + backward). Since the shifted sums run in C++ (csrc/shift.cpp) the matrix
#: products come closer: S3 predict 228.4 against 227.1 ms depthwise, S3B1 96.8 either way (alternated, 20 rounds).
THIN_DEPTHWISE_DIMS = (3,)


def _thin_depthwise_ok(xc: Tensor, w: Tensor, bias: Optional[Tensor]) -> bool:
    # float32 (oneDNN's depthwise convolution; float64 would run aten's slow native one), nothing to differentiate
    return (xc.dim() - 2 in THIN_DEPTHWISE_DIMS and xc.dtype == torch.float32
            and not needs_grad(xc, w, bias))


def _thin_out_depthwise(xc: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A thin stride-1 "same" convolution (the checks of ``_thin_ok``) without autograd: oneDNN's depthwise
    convolution gives each input channel's contribution to each output channel (C_in x C_out channels, each input
    channel with its own taps), then a sum over the input channels. The same products, summed per input channel
    first."""
    c_out, c_in, ks = w.shape[0], w.shape[1], tuple(w.shape[2:])
    conv_nd = F.conv3d if xc.dim() == 5 else F.conv2d
    depthwise = w.transpose(0, 1).reshape(c_in * c_out, 1, *ks)  # group i: input channel i's taps, per output
    parts = conv_nd(xc, depthwise, None, 1, [(k - 1) // 2 for k in ks], 1, c_in)  # [B, C_in C_out, *S]
    out = parts.unflatten(1, (c_in, c_out)).sum(1)
    if bias is not None:
        out += bias.reshape(-1, *([1] * (out.dim() - 2)))
    return out.contiguous(memory_format=_CL[xc.dim()])


def _thin_in_input_grad(grad: Tensor, w: Tensor) -> Tensor:
    """The input gradient of a stride-1 "same" convolution with few input channels (the network's input conv,
    2 C -> nf), where oneDNN's backward-data runs slowly (S2: 2.5 ms): one matrix product [C_in K, C_out] x
    [C_out, N S], then the planes summed shifted the other way."""
    ks = tuple(w.shape[2:])
    taps = _taps(w.transpose(0, 1))  # [C_in K, C_out]
    planes = (taps @ _rows(grad).t()).reshape(w.shape[1], math.prod(ks), grad.shape[0], *grad.shape[2:])
    return _cpp.shift_sum(planes, ks, -1).movedim(0, 1)
