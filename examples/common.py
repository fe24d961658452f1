"""What the examples share: the command line, a training loop with a step or time budget, PSNR/SSIM per sample
(``rim_fast.metrics``), and the figure (target, observation, naive inverse, RIM estimate, error)."""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Callable, Optional

import torch

from rim_fast import metrics


def parser(description: str, seconds: float, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seconds", type=float, default=seconds, help="training time budget (default %(default)s s)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead (reproducible)")
    p.add_argument("--short", action="store_true", help="small sizes and a fixed number of steps (the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="where the figure goes (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def psnr(estimate: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[B]: 10 log10(data_range^2 / MSE) per sample of [B, C, *spatial] tensors (``rim_fast.metrics.psnr``)."""
    return metrics.psnr(estimate, target, data_range=data_range)


def ssim(estimate: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[B]: the mean SSIM of each sample, channels averaged (``rim_fast.metrics.ssim``)."""
    return metrics.ssim(estimate, target, data_range=data_range)


def report(name: str, estimate: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> dict:
    """Mean PSNR (dB) and SSIM over the batch, printed as one line."""
    p, s = float(psnr(estimate, target, data_range).mean()), float(ssim(estimate, target, data_range).mean())
    print(f"{name:<14} PSNR {p:6.2f} dB | SSIM {s:.3f}")
    return {"psnr": p, "ssim": s}


def train(rim, sample: Callable[[int], tuple], batch_size: int, steps: Optional[int], seconds: float,
          learning_rate: float = 2e-3, log_every: int = 50) -> dict:
    """Adam on rim.loss_fn over fresh batches ``sample(batch_size) -> (y, x_true, *args)``: exactly ``steps``
    steps, or as many as fit in ``seconds``. Gradients clipped at norm 1; the learning rate decays along a cosine
    to a tenth over the budget (steps or seconds), so that the last weights are not one noisy step's."""
    optimizer = torch.optim.Adam(rim.model.parameters(), lr=learning_rate)
    start, step = time.time(), 0
    while (step < steps) if steps is not None else (time.time() - start < seconds):
        progress = step / steps if steps is not None else (time.time() - start) / seconds
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
        y, x, *args = sample(batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss = rim.loss_fn(y, x, *args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rim.model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0:
            print(f"step {step:5d} | {time.time() - start:6.1f} s | loss {loss.item():.4g}", flush=True)
    return {"steps": step, "seconds": round(time.time() - start, 1)}


def figure(path: str, title: str, columns: list, rows: list, error_scale: Optional[float] = None) -> Optional[str]:
    """One figure: a row per example, the columns (target, observation, naive inverse, RIM estimate, error).
    ``rows``: a list of lists of (array, kwargs for imshow or plot). 1D entries (a 1-D array) are plotted.
    Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure written (pip install matplotlib)")
        return None
    n_rows, n_cols = len(rows), len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.1 * n_cols, 2.1 * n_rows + 0.5), squeeze=False)
    for i, row in enumerate(rows):
        for j, (array, kwargs) in enumerate(row):
            ax = axes[i, j]
            if array.ndim == 1:
                for series in kwargs.get("series", [(array, {})]):
                    ax.plot(series[0], linewidth=0.9, **series[1])
                ax.tick_params(labelsize=6)
            else:
                ax.imshow(array, **kwargs)
                ax.set_xticks([])
                ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def wiener_deconvolve(y: torch.Tensor, psf: torch.Tensor, noise_to_signal: float) -> torch.Tensor:
    """Tikhonov-regularised inverse of a convolution by ``psf`` (centred, odd size, zero padding ignored: periodic
    model) in Fourier space: conj(K) Y / (|K|^2 + noise_to_signal). y: [B, C, *spatial], psf: [*k]."""
    dims = psf.dim()
    spatial = y.shape[-dims:]
    kernel = torch.zeros(spatial, dtype=y.dtype)
    kernel[tuple(slice(0, k) for k in psf.shape)] = psf
    kernel = torch.roll(kernel, shifts=tuple(-(k // 2) for k in psf.shape), dims=tuple(range(dims)))
    axes = tuple(range(-dims, 0))
    K = torch.fft.fftn(kernel, dim=axes)
    Y = torch.fft.fftn(y, dim=axes)
    return torch.fft.ifftn(K.conj() * Y / (K.abs() ** 2 + noise_to_signal), dim=axes).real


def tuned_wiener(kernel: torch.Tensor, y_val: torch.Tensor, x_val: torch.Tensor):
    """The naive inverse of a blur by ``kernel``: the Wiener deconvolution whose regularisation (10^-4 to 1, half
    decades) gives the best PSNR on (y_val, x_val). Returns (a function y -> estimate on y's device, the value)."""
    best = max((10.0 ** e for e in torch.arange(-4, 0.5, 0.5).tolist()),
               key=lambda lam: float(psnr(wiener_deconvolve(y_val.cpu(), kernel, lam), x_val.cpu()).mean()))
    return lambda y: wiener_deconvolve(y.cpu(), kernel, best).to(y.device), best


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
