"""FIR up/down sampling (score_models.layers.up_or_downsampling), through ``ops.upfirdn``.

Unlike score_models, the FIR kernel is built once per (k, dims, factor, gain, device, dtype) and cached, and
it takes the input's dtype (score_models builds a float32 host tensor on every call and rejects float64)."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .. import ops
from ..validation import choice, integer
from .conv_same import same_conv


def _setup_kernel(k, dimensions: int) -> np.ndarray:
    k = np.asarray(k, dtype=np.float32)
    if k.ndim != 1:
        raise ValueError(f"FIR kernel k must be 1-D (separable), got shape {k.shape}")
    if dimensions == 2:
        k = np.outer(k, k)
    elif dimensions == 3:
        k = np.multiply.outer(np.outer(k, k), k)
    return k / np.sum(k)


@functools.lru_cache(maxsize=64)
def _kernel(k: tuple, dimensions: int, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # float32 numpy arithmetic first, exactly as score_models, then one cast
    kernel = _setup_kernel(k, dimensions) * np.float32(scale) if scale != 1 else _setup_kernel(k, dimensions)
    return torch.tensor(kernel, device=device).to(dtype)


def _check(x, dimensions, factor):
    choice("dimensions", dimensions, (1, 2, 3))
    integer("factor", factor)
    if x.dim() != dimensions + 2:
        raise ValueError(f"x must be [B, C, *spatial] with {dimensions} spatial dims, got shape {tuple(x.shape)}")


def upsample(x: torch.Tensor, k=None, factor: int = 2, gain=1, dimensions: int = 2) -> torch.Tensor:
    """Upsample [B, C, *S] by ``factor`` with FIR filter k (default box [1]*factor): [B, C, *(S*factor)]."""
    _check(x, dimensions, factor)
    k = tuple(k) if k is not None else (1,) * factor
    kernel = _kernel(k, dimensions, gain * factor ** dimensions, x.device, x.dtype)
    p = len(k) - factor
    return ops.upfirdn(x, kernel, up=factor, down=1, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample(x: torch.Tensor, k=None, factor: int = 2, gain=1, dimensions: int = 2) -> torch.Tensor:
    """Downsample [B, C, *S] by ``factor`` with FIR filter k (default box): [B, C, *(S//factor)]."""
    _check(x, dimensions, factor)
    k = tuple(k) if k is not None else (1,) * factor
    kernel = _kernel(k, dimensions, gain, x.device, x.dtype)
    p = len(k) - factor
    return ops.upfirdn(x, kernel, up=1, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def naive_upsample(x: torch.Tensor, factor: int = 2, dimensions: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling."""
    _check(x, dimensions, factor)
    for d in range(2, 2 + dimensions):
        x = x.repeat_interleave(factor, dim=d)
    return x


def naive_downsample(x: torch.Tensor, factor: int = 2, dimensions: int = 2) -> torch.Tensor:
    """Average pooling."""
    _check(x, dimensions, factor)
    return [None, torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
            torch.nn.functional.avg_pool3d][dimensions](x, factor)


class FIRResample(nn.Module):
    """FIR up- or downsampling by 2 followed by a "same" convolution that changes the channel count.

    This is what torch_rim's ``resample_with_conv=False`` meant to build: its version put plain functions in an
    ``nn.ModuleList`` (a TypeError) and kept the channel count that ``ch_mult`` expects to change."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dimensions: int, fir_kernel=(1, 3, 3, 1),
                 up: bool = False):
        super().__init__()
        self.up = up
        self.dimensions = dimensions
        self.fir_kernel = tuple(fir_kernel)
        self.conv = same_conv(dimensions, in_ch, out_ch, kernel_size)

    def forward(self, x):
        resample = upsample if self.up else downsample
        return self.conv(resample(x, self.fir_kernel, 2, 1, self.dimensions))
