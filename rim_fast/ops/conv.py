"""The convolution family: convolutions, the tanh activation, conv + tanh, bias + tanh, FIR resampling.

cuDNN / oneDNN serve the convolutions; on the CPU they run in channels-last layout (``_cpu``), tanh runs the
C++ kernel of ``rim_fast._C`` (``_cpp``), and conv + tanh without autograd is one oneDNN primitive. On CUDA,
conv + tanh runs as the convolution without its bias, then one Triton kernel for bias + tanh (``_triton``,
``bias_tanh``): two kernels where cuDNN + aten run three (convolution, bias add, tanh). Shapes:
x [B, C_in, *S] with S of 1 to 3 spatial dims (or [B, C_in] for a linear layer in ``conv``), weight as
torch's ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` take it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _cpp, _cpu, _cudnn, _triton, reference
from ._dispatch import Impl, Op, backend, in_graph_region

Tensor = torch.Tensor

_conv = Op("conv", reference.conv)
_conv_same = Op("conv_same", reference.conv_same)
_conv_transpose = Op("conv_transpose", reference.conv_transpose)
_tanh = Op("tanh", reference.tanh)
_conv_tanh = Op("conv_tanh", reference.conv_tanh)
_conv_transpose_tanh = Op("conv_transpose_tanh", reference.conv_transpose_tanh)
_bias_tanh = Op("bias_tanh", reference.bias_tanh)
_upfirdn = Op("upfirdn", reference.upfirdn)


def _graph_weight(weight: Tensor) -> Tensor:
    """Under torch.compile, inside a RIM call, a parameter used as a convolution's weight is copied once per call
    (``layers.derived.conv_weight``), so that Inductor does not convert it to its layout again before each step's
    convolution (S2: 2.6 copy kernels per step fewer)."""
    if not torch.compiler.is_compiling():  # every eager convolution passes here: nothing more to check
        return weight
    from ..layers import derived
    if isinstance(weight, torch.nn.Parameter) and derived.active() and rewrites():
        return derived.conv_weight(weight, "graph_weight", lambda: weight)
    return weight


def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride: int = 1,
         padding: Union[str, int] = "same", dilation: int = 1, groups: int = 1) -> Tensor:
    """N-d convolution (N = x.dim() - 2; N = 0 is a linear layer on [B, C_in] with weight [C_out, C_in]).

    x: [B, C_in, *S]; weight: [C_out, C_in / groups, *k]; bias: [C_out] or None. Returns [B, C_out, *S']."""
    return _conv(x, _graph_weight(weight), bias, stride, padding, dilation, groups)


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, kernel_size: int, stride: int,
              dilation: int = 1, groups: int = 1, axis_swap: bool = True) -> Tensor:
    """score_models' strided "same" convolution: an asymmetric zero pad (``reference.conv_same_pads``; with
    ``axis_swap``, torch_rim's F.pad order), then a valid convolution. x: [B, C_in, *S] -> [B, C_out, *S/stride]."""
    return _conv_same(x, _graph_weight(weight), bias, kernel_size, stride, dilation, groups, axis_swap)


def conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, stride: int, padding: int = 0,
                   output_padding: int = 0, groups: int = 1, dilation: int = 1) -> Tensor:
    """N-d transposed convolution. x: [B, C_in, *S]; weight: [C_in, C_out / groups, *k]; bias: [C_out] or None."""
    return _conv_transpose(x, _graph_weight(weight), bias, stride, padding, output_padding, groups, dilation)


def tanh(x: Tensor) -> Tensor:
    """tanh(x), any shape; the result keeps x's memory layout."""
    return _tanh(x)


def conv_tanh(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, padding: Union[str, int] = "same",
              dilation: int = 1, groups: int = 1) -> Tensor:
    """tanh(conv(x)) with stride 1 (a network's conv followed by its activation). Shapes as ``conv``."""
    return _conv_tanh(x, _graph_weight(weight), bias, padding, dilation, groups)


def conv_transpose_tanh(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, stride: int, padding: int = 0,
                        output_padding: int = 0, groups: int = 1, dilation: int = 1,
                        crop: Optional[tuple] = None) -> Tensor:
    """tanh(conv_transpose(x)) on its first ``crop`` samples per spatial axis (None: all): an upsampling layer and
    its activation. Shapes as ``conv_transpose``."""
    return _conv_transpose_tanh(x, _graph_weight(weight), bias, stride, padding, output_padding, groups, dilation,
                                crop)


def bias_tanh(x: Tensor, bias: Tensor) -> Tensor:
    """tanh(x + bias[c]): the bias and activation of a convolution run without its bias.

    x: [B, C, *S] (S of 0 to 3 dims, any layout; the result keeps a dense x's), bias: [C]; float32, float16 or
    bfloat16 (float32 math in the kernel). Returns [B, C, *S] in the promoted dtype."""
    return _bias_tanh(x, bias)


def upfirdn(x: Tensor, kernel: Tensor, *, up: int, down: int, pad0: int, pad1: int) -> Tensor:
    """score_models' upfirdn per channel: upsample by ``up`` (zero insertion), pad ``pad0``/``pad1`` on every
    spatial axis (negative crops), FIR-filter with ``kernel`` [k]*N, keep every ``down``-th sample.
    x: [B, C, *S]."""
    return _upfirdn(x, kernel, up, down, pad0, pad1)


def rewrites() -> bool:
    """Whether layers may be computed another way than torch_rim computes them, equal in exact arithmetic (the
    Hourglass' merged output conv, ``fold_next_bias``): yes, except with ``RIM_FAST_BACKEND=reference``, which
    stays torch_rim's computation (bit-identical where torch_rim's ops are the same)."""
    return backend() != "reference"


def folds_bias(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding, dilation: int, groups: int) -> bool:
    """Whether a conv + tanh whose output feeds a convolution with a bias should carry that bias as an extra
    channel of constant 1 (``architectures.base.fold_next_bias``), which saves the next convolution's bias add, a
    kernel of its own on GPUs: where a kernel saved counts, in a CUDA graph where ``conv_tanh`` runs the
    convolution and then the Triton ``bias_tanh``, and under torch.compile on GPUs (Inductor's stand-alone bias
    kernel between two convolutions goes). Not on the CPU, eager or compiled, where oneDNN adds biases inside the
    convolution, nor in the channels-last CUDA layout (``_cudnn``), nor in eager CUDA calls: there ``conv_tanh``
    takes the Triton kernel only for outputs of 2^23 elements and more, where a launch is nothing beside the
    convolutions, the bias add is one pass over the output, and the extra channel costs 1/32 more multiply-adds in
    two convolutions and may cost cuDNN its aligned kernels (L2's eager training step, which folded, ran 0.91x
    torch_rim's speed in the first GPU run)."""
    if bias is None or not rewrites() or x.device.type == "cpu":
        return False
    if torch.compiler.is_compiling():
        return True
    if _cudnn.usable(x) or not in_graph_region():
        # eager calls (above); channels-last: the extra channel (33 of 32) would misalign cuDNN's NHWC tensor-core
        # kernels, which want channels in multiples of 4 (TF32) or 8 (half precision); the next convolution keeps
        # its bias add
        return False
    return _conv_tanh._choose((x, weight, bias, padding, dilation, groups))[0] == "triton_bias_tanh"


def _conv_then_tanh(x, weight, bias, padding, dilation, groups):
    # the two ops, each dispatched (channels-last conv and the C++ tanh on the CPU; cuDNN and torch.tanh on GPUs)
    return tanh(conv(x, weight, bias, padding=padding, dilation=dilation, groups=groups))


def _conv_bias_tanh(x, weight, bias, padding, dilation, groups):
    # the convolution without its bias (cuDNN would add it in a pass of its own), then bias + tanh in one pass;
    # the bias in the convolution's output dtype, as the convolution would have used it (autocast)
    y = conv(x, weight, None, padding=padding, dilation=dilation, groups=groups)
    return bias_tanh(y, bias.to(y.dtype))


def _conv_transpose_then_tanh(x, weight, bias, stride, padding, output_padding, groups, dilation, crop):
    y = conv_transpose(x, weight, bias, stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                       dilation=dilation)
    return tanh(reference.crop_spatial(y, crop))


def _conv_transpose_bias_tanh(x, weight, bias, stride, padding, output_padding, groups, dilation, crop):
    # as _conv_bias_tanh: the transposed convolution without its bias, then bias + tanh in one pass
    y = conv_transpose(x, weight, None, stride=stride, padding=padding, output_padding=output_padding,
                       groups=groups, dilation=dilation)
    return bias_tanh(reference.crop_spatial(y, crop), bias.to(y.dtype))


def _weight_taps(weight, weight_pads):
    # the kernel with its zero taps, built once per RIM call (layers.derived; keyed by the weight tensor, which the
    # cache keeps alive for the call)
    from ..layers.derived import derived
    return derived(weight, ("zero_taps", tuple(weight_pads)), lambda: torch.nn.functional.pad(weight, weight_pads))


def _conv_same_symmetric(x, weight, bias, kernel_size, stride, dilation, groups, axis_swap):
    return reference.conv_same_symmetric(x, weight, bias, kernel_size, stride, dilation, groups, axis_swap,
                                         taps=_weight_taps)


def _symmetric_usable(x, weight, bias, kernel_size, stride, dilation, groups, axis_swap) -> bool:
    return dilation == 1 and x.dim() >= 3


def _symmetric_auto(x, weight, bias, kernel_size, stride, dilation, groups, axis_swap) -> bool:
    # CUDA, in a CUDA graph or eagerly below 2^23 input elements (one kernel fewer, for launch-bound steps); not for
    # larger eager inputs, where a launch is nothing and the 4x4 kernel's 16/9 multiply-adds (forward and both
    # gradients) cost about what the pad's pass saves in TF32 and more without it (L2: [32, 32, 256x256]); under
    # torch.compile Inductor fuses the pad into the kernel that writes the convolution's input
    if not x.is_cuda or dilation != 1 or torch.compiler.is_compiling():
        return False
    return in_graph_region() or x.numel() < _triton.AUTO_EAGER_MIN_ELEMENTS


def _unfused_auto(x, *args) -> bool:
    # on the CPU below the size where oneDNN pays (``_cpu.onednn_pays``) the two ops would each take their
    # reference: the reference conv + tanh directly then, without two more dispatches (~10 us each)
    return x.device.type != "cpu" or _cpu.onednn_pays(x)


def _always(*args) -> bool:
    return True


for _op, _fn in ((_conv, _cpu.conv), (_conv_same, _cpu.conv_same), (_conv_transpose, _cpu.conv_transpose)):
    _op.register(Impl("channels_last", _fn, usable=_cpu.usable, auto=_cpu.auto, why_not=_cpu.why_not,
                      kernel=False, auto_implies_usable=True))
for _op, _fn in ((_conv, _cudnn.conv), (_conv_same, _cudnn.conv_same), (_conv_transpose, _cudnn.conv_transpose)):
    # usable only where the layout is channels_last (RIM_FAST_CUDA_LAYOUT, or a RIM's graph variant), so that no
    # backend takes it unasked
    _op.register(Impl("cudnn_channels_last", _fn, usable=_cudnn.usable, auto=_cudnn.usable, why_not=_cudnn.why_not,
                      kernel=False))
_tanh.register(Impl("cpp", _cpp.tanh, usable=_cpp.tanh_usable, auto=_cpp.tanh_auto, missing=_cpp.missing,
                    why_not=_cpp.tanh_why_not, devices=("cpu",)))
_conv_same.register(Impl("symmetric_padding", _conv_same_symmetric, usable=_symmetric_usable, auto=_symmetric_auto,
                         why_not=lambda *a: "dilation 1 only", kernel=False))
_conv_transpose_tanh.register(Impl("triton_bias_tanh", _conv_transpose_bias_tanh,
                                   usable=_triton.conv_transpose_tanh_usable, auto=_triton.conv_transpose_tanh_auto,
                                   missing=_triton.missing, why_not=_triton.conv_transpose_tanh_why_not))
_conv_transpose_tanh.register(Impl("onednn_fused", _cpu.conv_transpose_tanh, usable=_cpu.conv_transpose_tanh_usable,
                                   auto=_cpu.conv_transpose_tanh_auto, why_not=_cpu.conv_transpose_tanh_why_not,
                                   kernel=False))
_conv_transpose_tanh.register(Impl("unfused", _conv_transpose_then_tanh, usable=_always, auto=_unfused_auto,
                                   kernel=False))
_conv_tanh.register(Impl("onednn_fused", _cpu.conv_tanh, usable=_cpu.conv_tanh_usable,
                         auto=_cpu.conv_tanh_auto, why_not=_cpu.conv_tanh_why_not, kernel=False,
                         auto_implies_usable=True))
_conv_tanh.register(Impl("triton_bias_tanh", _conv_bias_tanh, usable=_triton.conv_tanh_usable,
                         auto=_triton.conv_tanh_auto, missing=_triton.missing, why_not=_triton.conv_tanh_why_not))
_conv_tanh.register(Impl("unfused", _conv_then_tanh, usable=_always, auto=_unfused_auto, kernel=False))
_bias_tanh.register(Impl("triton", _triton.bias_tanh, usable=_triton.bias_tanh_usable, auto=_triton.bias_tanh_auto,
                         missing=_triton.missing, why_not=_triton.bias_tanh_why_not))
