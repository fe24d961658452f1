"""Imaging metrics of an estimate against its target, per sample: MSE, NMSE, PSNR and SSIM, in 1D, 2D and 3D.

Plain torch (any device, no autograd needed), the reference ops that ``fit``'s validation reports and that can be
used on their own::

    from rim_fast import metrics
    x_hat = rim.predict(y, *args)                       # [B, C, *spatial], physical space
    metrics.psnr(x_hat, x_true)                          # [B]
    metrics.ssim(x_hat, x_true, data_range=1.0)          # [B]

Every function takes ``estimate`` and ``target`` of the same shape ``[B, C, *spatial]`` (1 to 3 spatial dimensions)
and returns one value per sample, ``[B]``, in the inputs' floating dtype (float32 for lower precisions).
``data_range`` (PSNR, SSIM) is a number, a ``[B]`` tensor, or None: each sample's ``target.max() - target.min()``.

They match scikit-image (``skimage.metrics``) on the same arrays: ``psnr`` is ``peak_signal_noise_ratio(target,
estimate, data_range=...)`` per sample; ``ssim`` is ``structural_similarity(estimate, target, data_range=...,
channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` per sample (Wang et al. 2004:
an 11-point Gaussian window, sigma 1.5, truncated at 3.5 sigma; the mean of the SSIM map over the positions where
the window fits; channels averaged). Every spatial size must be at least the window (11 by default).
"""
from __future__ import annotations

import functools
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mse", "nmse", "psnr", "ssim", "ssim_window", "image_metrics", "METRICS", "MONITORS"]

#: metric name -> "min" (lower is better) or "max"
METRICS = {"mse": "min", "nmse": "min", "psnr": "max", "ssim": "max"}
#: the values ``fit(monitor=...)`` can follow -> "min" or "max"
MONITORS = {"train_loss": "min", "val_loss": "min", **{f"val_{name}": mode for name, mode in METRICS.items()}}

DataRange = Union[None, float, Tensor]


def _check(estimate: Tensor, target: Tensor, who: str) -> None:
    if not isinstance(estimate, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: estimate and target must be tensors, got {type(estimate).__name__} and "
                        f"{type(target).__name__}")
    if estimate.shape != target.shape:
        raise ValueError(f"{who}: estimate and target must have the same shape, got {tuple(estimate.shape)} and "
                         f"{tuple(target.shape)}")
    if not 3 <= estimate.dim() <= 5:
        raise ValueError(f"{who}: inputs must be [B, C, *spatial] with 1 to 3 spatial dimensions, got shape "
                         f"{tuple(estimate.shape)}")


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _per_sample(x: Tensor) -> Tensor:
    return x.flatten(1)


def _data_range(data_range: DataRange, target: Tensor) -> Tensor:
    """[B] ranges: the given number or tensor, else each sample's target max - min."""
    if data_range is None:
        flat = _per_sample(target)
        return flat.amax(1) - flat.amin(1)
    if isinstance(data_range, Tensor):
        return data_range.to(target).expand(target.shape[0])
    return torch.full((target.shape[0],), float(data_range), dtype=target.dtype, device=target.device)


def mse(estimate: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: mean over C and the spatial positions. [B]."""
    _check(estimate, target, "mse")
    estimate, target = _float(estimate), _float(target)
    return _per_sample((estimate - target) ** 2).mean(1)


def nmse(estimate: Tensor, target: Tensor) -> Tensor:
    """Normalised MSE per sample, ||estimate - target||^2 / ||target||^2 (fastMRI's definition). [B]."""
    _check(estimate, target, "nmse")
    estimate, target = _float(estimate), _float(target)
    return _per_sample((estimate - target) ** 2).sum(1) / _per_sample(target ** 2).sum(1)


def psnr(estimate: Tensor, target: Tensor, data_range: DataRange = None) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, 10 log10(data_range^2 / MSE). [B]."""
    _check(estimate, target, "psnr")
    estimate, target = _float(estimate), _float(target)
    err = _per_sample((estimate - target) ** 2).mean(1)
    return 10 * torch.log10(_data_range(data_range, target) ** 2 / err)


def ssim_window(sigma: float = 1.5, truncate: float = 3.5) -> int:
    """The Gaussian window's length, 2 int(truncate sigma + 0.5) + 1 (11 for sigma 1.5): the smallest spatial size
    ``ssim`` accepts."""
    return 2 * int(truncate * sigma + 0.5) + 1


@functools.lru_cache(maxsize=16)
def _gaussian(sigma: float, truncate: float, dtype: torch.dtype, device) -> Tensor:
    """The window, made once per device and dtype (a copy to a GPU at every validation batch would wait for it);
    a normal tensor even when first made under inference_mode. Read, never written."""
    radius = int(truncate * sigma + 0.5)
    with torch.inference_mode(False):
        r = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 * (r / sigma) ** 2)
        return (w / w.sum()).to(dtype=dtype, device=device)


def _filter_valid(x: Tensor, w: Tensor) -> Tensor:
    """Separable Gaussian filter of [N, 1, *spatial], only where the window fits (no padding)."""
    d = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    for axis in range(d):
        shape = [1, 1] + [1] * d
        shape[2 + axis] = w.numel()
        x = conv(x, w.view(shape))
    return x


def ssim(estimate: Tensor, target: Tensor, data_range: DataRange = None, *, sigma: float = 1.5,
         truncate: float = 3.5, k1: float = 0.01, k2: float = 0.03, use_sample_covariance: bool = False) -> Tensor:
    """Structural similarity per sample (Gaussian-weighted, Wang et al. 2004), averaged over channels. [B].

    Each spatial size must be at least ``ssim_window(sigma, truncate)`` (11 by default).
    ``use_sample_covariance=True`` normalises the (co)variances by N - 1 with N = window ** ndim, as
    scikit-image's default does. Computed in float64 for float64 inputs, else in float32."""
    _check(estimate, target, "ssim")
    estimate, target = _float(estimate), _float(target)
    if estimate.dtype != target.dtype:
        estimate, target = estimate.double(), target.double()
    size = ssim_window(sigma, truncate)
    spatial = tuple(estimate.shape[2:])
    if min(spatial) < size:
        raise ValueError(f"ssim: every spatial size must be >= the Gaussian window ({size} for sigma={sigma}, "
                         f"truncate={truncate}), got spatial shape {spatial}")
    B, C = estimate.shape[:2]
    R = _data_range(data_range, target).repeat_interleave(C)  # [B*C]
    view = (-1,) + (1,) * (len(spatial) + 1)
    c1, c2 = ((k1 * R) ** 2).view(view), ((k2 * R) ** 2).view(view)
    a = estimate.reshape(B * C, 1, *spatial)
    b = target.reshape(B * C, 1, *spatial)
    w = _gaussian(sigma, truncate, a.dtype, a.device)
    # the five local moments in one filter pass: [5 * B * C, 1, *valid]
    ux, uy, uxx, uyy, uxy = _filter_valid(torch.cat([a, b, a * a, b * b, a * b]), w).chunk(5)
    n = size ** len(spatial)
    cov_norm = n / (n - 1) if use_sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).view(B, C).mean(1)


def image_metrics(estimate: Tensor, target: Tensor, data_range: DataRange = None,
                  names=("mse", "nmse", "psnr", "ssim")) -> dict:
    """{name: [B] tensor} for the metrics named (``METRICS``' keys); SSIM is left out when a spatial size is smaller
    than its window."""
    out = {}
    for name in names:
        if name == "mse":
            out[name] = mse(estimate, target)
        elif name == "nmse":
            out[name] = nmse(estimate, target)
        elif name == "psnr":
            out[name] = psnr(estimate, target, data_range)
        elif name == "ssim":
            if min(estimate.shape[2:]) >= ssim_window():
                out[name] = ssim(estimate, target, data_range)
        else:
            raise ValueError(f"names must be among {tuple(METRICS)}, got {name!r}")
    return out

