"""MRI example: reconstruct accelerated Cartesian MRI of synthetic phantoms with a RIM.

    python examples/mri.py [--seconds 180] [--steps N] [--short] [--out examples/figures]

The data: complex images of Shepp-Logan-like phantoms (a skull ring, brain tissue, random ellipses, a smooth
random phase), as two channels (real, imaginary). The forward model: the orthonormal 2D FFT, keeping the k-space
lines of a random Cartesian mask per sample (the central eighth always, 4x acceleration), with complex Gaussian
noise: y = M (F x + n). The mask is a score-function argument, and the score A^H (y - A x) is written for one
sample and batched by ``torch.func.vmap``. The naive inverse is the zero-filled inverse FFT, whose aliasing the RIM
learns to remove. PSNR/SSIM are measured on the magnitude images; one figure is saved."""
from __future__ import annotations

import math
import os
import sys

import torch
from torch.func import vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from rim_fast import RIM, Unet  # noqa: E402

#: the short mode (tests/test_examples.py): 250 steps; at 150 the margin over the zero-filled inverse depended on
#: the CPU's rounding (seed 0: +2.7 dB on an AMD EPYC, +0.8 dB on a Xeon with AVX-512, where 250 give +4.6 dB)
SHORT = dict(n=32, steps=250, batch=4, test=16, lr=3e-3)
#: the full mode trains for --seconds (3 minutes) at the same size, with larger batches
FULL = dict(n=32, batch=8, test=32, lr=3e-3)


def phantoms(B: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Complex phantoms [B, n, n], magnitude in [0, 1]: a Shepp-Logan-like head (skull ring, tissue, ventricles)
    with 3-6 random ellipses of random intensity, times exp(i phase) with a smooth random phase."""
    g = generator
    c = torch.linspace(-1, 1, n)
    yy, xx = torch.meshgrid(c, c, indexing="ij")

    def ellipse(cx, cy, a, b, angle):
        ca, sa = math.cos(angle), math.sin(angle)
        u, v = (xx - cx) * ca + (yy - cy) * sa, -(xx - cx) * sa + (yy - cy) * ca
        return ((u / a) ** 2 + (v / b) ** 2 <= 1).float()

    def rand(lo, hi):
        return lo + (hi - lo) * float(torch.rand(1, generator=g))
    images = torch.zeros(B, n, n, dtype=torch.complex64)
    for i in range(B):
        a, b, angle = rand(0.72, 0.9), rand(0.8, 0.95), rand(-0.3, 0.3)
        img = 0.9 * ellipse(0, 0, a, b, angle) - 0.5 * ellipse(0, 0, a - 0.1, b - 0.1, angle)
        for _ in range(int(torch.randint(3, 7, (1,), generator=g))):
            img += rand(-0.2, 0.4) * ellipse(rand(-0.4, 0.4), rand(-0.45, 0.45), rand(0.08, 0.3), rand(0.08, 0.3),
                                             rand(0, math.pi))
        img = img.clamp(0, 1)
        phase = rand(-0.5, 0.5) * xx + rand(-0.5, 0.5) * yy + rand(-0.3, 0.3) * xx * yy
        images[i] = img * torch.exp(1j * phase)
    return images


def cartesian_masks(B: int, n: int, generator: torch.Generator, acceleration: int = 4,
                    centre_fraction: float = 0.125) -> torch.Tensor:
    """[B, n] line masks (phase-encoding lines kept): the central lines, then random others up to n / acceleration."""
    masks = torch.zeros(B, n)
    centre = max(2, int(round(n * centre_fraction)))
    lo = n // 2 - centre // 2
    for i in range(B):
        masks[i, lo:lo + centre] = 1
        others = torch.randperm(n, generator=generator)
        others = others[masks[i, others] == 0][: max(0, n // acceleration - centre)]
        masks[i, others] = 1
    # the FFT's zero frequency is at index 0: move the centre there
    return torch.fft.ifftshift(masks, dim=-1)


def to_channels(z: torch.Tensor) -> torch.Tensor:
    """complex [..., n, n] -> real [..., 2, n, n] (real, imaginary)."""
    return torch.stack([z.real, z.imag], dim=-3)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(x[..., 0, :, :], x[..., 1, :, :])


def forward_operator(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sample: x [2, n, n] (an image as two channels), mask [n] (columns kept) -> masked k-space [2, n, n]."""
    k = torch.fft.fft2(to_complex(x), norm="ortho")
    return to_channels(k * mask)


def adjoint_operator(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sample: masked k-space [2, n, n] -> image [2, n, n] (the zero-filled inverse FFT)."""
    return to_channels(torch.fft.ifft2(to_complex(y) * mask, norm="ortho"))


class MRI:
    def __init__(self, n: int, sigma: float = 0.01, seed: int = 0, device="cpu"):
        self.n, self.sigma, self.device = n, sigma, device
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, B: int):
        """(y: masked k-space [B, 2, n, n], x: image [B, 2, n, n], mask [B, n])."""
        images = phantoms(B, self.n, self.generator)
        masks = cartesian_masks(B, self.n, self.generator)
        noise = torch.complex(torch.randn(B, self.n, self.n, generator=self.generator),
                              torch.randn(B, self.n, self.n, generator=self.generator)) * (self.sigma / math.sqrt(2))
        k = (torch.fft.fft2(images, norm="ortho") + noise) * masks[:, None, :]
        return tuple(v.to(self.device) for v in (to_channels(k), to_channels(images), masks))

    @staticmethod
    @vmap
    def score_fn(x, y, mask):
        # one sample: A^H (y - A x), A = M F (the likelihood's gradient up to 1 / sigma^2)
        return adjoint_operator(y - forward_operator(x, mask), mask)

    @staticmethod
    def zero_filled(y, mask):
        return vmap(adjoint_operator)(y, mask)


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, n, n] -> [B, 1, n, n]."""
    return x.pow(2).sum(1, keepdim=True).sqrt()


def main(argv=None) -> dict:
    args = common.parser(__doc__.splitlines()[0], seconds=180.0, out="examples/figures").parse_args(argv)
    size = SHORT if args.short else FULL
    steps = args.steps if args.steps is not None else (size.get("steps") if args.short else None)
    common.seed_everything(args.seed)
    problem = MRI(size["n"], seed=args.seed, device=args.device)
    net = Unet(2, dimensions=2, nf=16, ch_mult=(2, 2), hidden_units=16)
    rim = RIM((size["n"], size["n"]), net, score_fn=problem.score_fn, T=5, score_preprocessing_method="ADAM",
              initialization_method="approximate_inverse", approximate_inverse_fn=lambda y: y, device=args.device)
    # approximate_inverse_fn gets y only: start from the zero-filled image, computed from y (the mask zeroes
    # the lines it did not keep, so the inverse FFT of y is the zero-filled image)
    rim.approximate_inverse_fn = lambda y: to_channels(torch.fft.ifft2(to_complex(y), norm="ortho"))
    y_test, x_test, m_test = problem.sample(size["test"])
    print(f"training a RIM on {size['n']}x{size['n']} phantoms, 4x Cartesian undersampling ("
          + (f"{steps} steps" if steps is not None else f"{args.seconds:g} s") + f", {args.device})")
    result = common.train(rim, problem.sample, size["batch"], steps, args.seconds, learning_rate=size["lr"])
    with torch.no_grad():
        x_naive, x_rim = problem.zero_filled(y_test, m_test), rim.predict(y_test, m_test)
    target, naive, estimate = magnitude(x_test), magnitude(x_naive), magnitude(x_rim)
    print(f"trained {result['steps']} steps in {result['seconds']} s")
    result["naive"] = common.report("zero-filled", naive, target)
    result["rim"] = common.report("RIM", estimate, target)

    rows = []
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1}
    for i in range(3):
        kspace = torch.log1p(magnitude(y_test[i:i + 1])[0, 0] / problem.sigma)
        rows.append([(target[i, 0].cpu().numpy(), gray),
                     (torch.fft.fftshift(kspace).cpu().numpy(), {"cmap": "magma"}),
                     (naive[i, 0].cpu().numpy(), gray), (estimate[i, 0].cpu().numpy(), gray),
                     ((estimate - target)[i, 0].cpu().numpy(), {"cmap": "RdBu_r", "vmin": -0.3, "vmax": 0.3})])
    result["figure"] = common.figure(
        os.path.join(args.out, "mri.png"),
        f"4x Cartesian MRI: PSNR {result['naive']['psnr']:.1f} dB (zero-filled) -> {result['rim']['psnr']:.1f} dB "
        f"(RIM), {result['steps']} steps",
        ["target |x|", "observation (log |k-space|)", "naive inverse (zero-filled)", "RIM estimate", "error"], rows)
    return result


if __name__ == "__main__":
    main()
