"""score_models' Conv{1,2,3}dSame / ConvTransposed{1,2,3}dSame, and plain "same" convolutions, through ops.

Parameter names match score_models (``conv.weight``, ``conv.bias``; with spectral_norm ``conv.module.*``)
so checkpoints load unchanged."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .. import ops
from ..validation import integer
from .spectral_norm import SpectralNorm

_NN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NN_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _check_sizes(kernel_size, stride, dilation):
    for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        integer(name, value, note=" (square kernels only)")


def unobserved(*layers: nn.Module) -> bool:
    """No forward hook (the layers' own or global ones) could observe these layers' calls: an op may compute
    several layers, or a layer and its activation, without calling them."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    return not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


class _SameConvMixin:
    """nn.ConvNd whose forward goes through ``ops.conv`` (state_dict keys unchanged: weight, bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return ops.conv(x, self.weight, self.bias, stride=self.stride[0], padding=self.padding,
                        dilation=self.dilation[0], groups=self.groups)


class SameConv1d(_SameConvMixin, nn.Conv1d):
    pass


class SameConv2d(_SameConvMixin, nn.Conv2d):
    pass


class SameConv3d(_SameConvMixin, nn.Conv3d):
    pass


class SameLinear(nn.Linear):
    """nn.Linear through ``ops.conv`` (a 0-dimensional convolution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv(x, self.weight, self.bias)


_SAME = {0: SameLinear, 1: SameConv1d, 2: SameConv2d, 3: SameConv3d}


def same_conv(dimensions: int, in_ch: int, out_ch: int, kernel_size: int, bias: bool = True) -> nn.Module:
    """torch_rim's ``nn.Conv{N}d(in, out, k, padding="same")`` (``nn.Linear`` for dimensions 0)."""
    if dimensions == 0:
        return SameLinear(in_ch, out_ch, bias=bias)
    _check_sizes(kernel_size, 1, 1)
    return _SAME[dimensions](in_ch, out_ch, kernel_size, padding="same", bias=bias)


class _StridedSame(nn.Module):
    """What Conv*dSame and ConvTransposed*dSame share: the wrapped ``conv`` (score_models' SpectralNorm around
    it with ``spectral_norm``), the sizes, and the input check."""
    _dims = 0

    def __init__(self, conv: nn.Module, spectral_norm: bool, kernel_size: int, stride: int, dilation: int):
        super().__init__()
        self.conv = SpectralNorm(conv) if spectral_norm else conv
        self.stride = stride
        self.dilation = dilation
        self.kernel_size = kernel_size

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self._dims + 2:
            raise ValueError(f"{type(self).__name__} expects a [B, C, *spatial] tensor with {self._dims} spatial "
                             f"dims, got shape {tuple(x.shape)}")


class _ConvNdSame(_StridedSame):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 spectral_norm: bool = False, device=None, dtype=None, *, axis_swap: bool = True):
        _check_sizes(kernel_size, stride, dilation)
        conv = _NN_CONV[self._dims](in_channels, out_channels, kernel_size, stride=stride,
                                    padding="valid" if stride > 1 else "same", dilation=dilation, groups=groups,
                                    bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        super().__init__(conv, spectral_norm, kernel_size, stride, dilation)
        #: score_models pads the last axis with the first axis' amount (see compat.Compat.conv_same_axis_swap)
        self.axis_swap = axis_swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if isinstance(self.conv, SpectralNorm):
            if self.stride > 1:
                x = torch.nn.functional.pad(x, ops.reference.conv_same_pads(
                    tuple(x.shape[2:]), self.kernel_size, self.stride, self.dilation, self.axis_swap))
            return self.conv(x)
        if self.stride > 1:
            return ops.conv_same(x, self.conv.weight, self.conv.bias, kernel_size=self.kernel_size, stride=self.stride,
                                 dilation=self.dilation, groups=self.conv.groups, axis_swap=self.axis_swap)
        if self.conv.padding_mode != "zeros":
            return self.conv(x)
        return ops.conv(x, self.conv.weight, self.conv.bias, dilation=self.dilation, groups=self.conv.groups)


class _ConvTransposedNdSame(_StridedSame):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 spectral_norm: bool = False, device=None, dtype=None, *, crop_to_stride_multiple: bool = False):
        _check_sizes(kernel_size, stride, dilation)
        conv = _NN_CONV_T[self._dims](in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                                      groups=groups, bias=bias, padding=dilation * (kernel_size - 1) // 2 + padding,
                                      output_padding=stride - 1, padding_mode=padding_mode, device=device,
                                      dtype=dtype)
        super().__init__(conv, spectral_norm, kernel_size, stride, dilation)
        #: score_models returns stride*n + 1 samples for even kernels; True crops to stride*n (TF "same")
        self.crop_to_stride_multiple = crop_to_stride_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        spatial = x.shape[2:]
        if isinstance(self.conv, SpectralNorm):
            out = self.conv(x)
        else:
            c = self.conv
            out = ops.conv_transpose(x, c.weight, c.bias, stride=self.stride, padding=c.padding[0],
                                     output_padding=c.output_padding[0], groups=c.groups, dilation=self.dilation)
        if self.crop_to_stride_multiple:
            out = out[(slice(None), slice(None)) + tuple(slice(0, n * self.stride) for n in spatial)]
        return out

    def forward_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(self(x)) as one op (``ops.conv_transpose_tanh``: on CUDA the transposed convolution without its
        bias, then bias + tanh in one kernel)."""
        self._check_input(x)
        if isinstance(self.conv, SpectralNorm) or self.conv.padding_mode != "zeros":
            return ops.tanh(self(x))
        c = self.conv
        crop = tuple(n * self.stride for n in x.shape[2:]) if self.crop_to_stride_multiple else None
        return ops.conv_transpose_tanh(x, c.weight, c.bias, stride=self.stride, padding=c.padding[0],
                                       output_padding=c.output_padding[0], groups=c.groups, dilation=self.dilation,
                                       crop=crop)


class Conv1dSame(_ConvNdSame):
    _dims = 1


class Conv2dSame(_ConvNdSame):
    _dims = 2


class Conv3dSame(_ConvNdSame):
    _dims = 3


class ConvTransposed1dSame(_ConvTransposedNdSame):
    _dims = 1


class ConvTransposed2dSame(_ConvTransposedNdSame):
    _dims = 2


class ConvTransposed3dSame(_ConvTransposedNdSame):
    _dims = 3


CONV_SAME = {1: Conv1dSame, 2: Conv2dSame, 3: Conv3dSame}
CONV_TRANSPOSED_SAME = {1: ConvTransposed1dSame, 2: ConvTransposed2dSame, 3: ConvTransposed3dSame}
