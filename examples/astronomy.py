"""Astronomy example: deconvolve images of galaxies with a RIM driven by the log-likelihood (energy_fn).

    python examples/astronomy.py [--seconds 180] [--steps N] [--short] [--out examples/figures]

The data: synthetic galaxies with Sersic profiles I(r) = exp(-b_n ((r / r_e)^(1/n) - 1)) (random index n, effective
radius, ellipticity and orientation; a bright one and up to two faint companions), peak 1, seen through a Moffat
point-spread function (the blur A), with the sky's and the source's Poisson noise (an exposure of ``EXPOSURE``
counts per unit flux) and Gaussian read noise. The per-pixel variance map comes with the observation, as a
telescope's pipeline gives it. The RIM gets no score function: ``energy_fn`` is the Gaussian approximation of the
log-likelihood, -1/2 sum (y - A x)^2 / variance, one value per sample, and rim_fast takes its gradient with
``torch.func.vjp``. The naive inverse is a Wiener deconvolution with its regularisation tuned on held-out images;
the RIM starts from it.
Prints PSNR/SSIM of both and saves one figure."""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from rim_fast import RIM, Unet  # noqa: E402

#: sizes, RIM (Unet width nf, steps T) and training; the full mode trains for --seconds (3 minutes) on the same images
SHORT = dict(n=32, steps=250, batch=4, test=16, lr=3e-3, nf=8, T=4)
FULL = dict(n=32, batch=8, test=32, lr=3e-3, nf=8, T=4)
EXPOSURE = 400.0  # counts per unit flux
SKY = 0.05
READ_NOISE = 0.01


def sersic_b(n: float) -> float:
    """b_n such that r_e encloses half the light (Ciotti & Bertin 1999's expansion)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n ** 2)


def galaxies(B: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, size, size] images in [0, 1]: a Sersic galaxy near the centre and 0-2 fainter companions."""
    g = generator

    def rand(lo, hi):
        return lo + (hi - lo) * float(torch.rand(1, generator=g))
    c = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    images = torch.zeros(B, 1, size, size)
    scale = size / 32
    for i in range(B):
        img = torch.zeros(size, size)
        for j in range(1 + int(torch.randint(0, 3, (1,), generator=g))):
            centre = 2.0 * scale if j == 0 else 10.0 * scale
            cx, cy = rand(-centre, centre), rand(-centre, centre)
            n = rand(0.5, 3.0)
            r_e = rand(2.0, 5.0) * scale * (1 if j == 0 else 0.5)
            q, angle = rand(0.4, 1.0), rand(0, math.pi)
            u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
            v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
            r = torch.sqrt(u ** 2 + (v / q) ** 2 + 0.25)
            profile = torch.exp(-sersic_b(n) * ((r / r_e) ** (1 / n) - 1))
            img += (1.0 if j == 0 else rand(0.2, 0.5)) * profile / profile.max()
        images[i, 0] = img / img.max()
    return images


def moffat_psf(size: int = 11, fwhm: float = 3.0, beta: float = 3.0) -> torch.Tensor:
    """[size, size], unit sum."""
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    c = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    psf = (1 + r2 / alpha ** 2) ** (-beta)
    return psf / psf.sum()


class Deconvolution:
    def __init__(self, size: int, seed: int = 0, device="cpu"):
        self.size, self.device = size, device
        self.psf = moffat_psf()
        self.kernel = self.psf.view(1, 1, *self.psf.shape).to(device)
        self.generator = torch.Generator().manual_seed(seed)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), padding=self.kernel.shape[-1] // 2)

    def sample(self, B: int):
        """(y [B, 1, n, n] in flux units, sky subtracted; x [B, 1, n, n]; variance [B, 1, n, n])."""
        x = galaxies(B, self.size, self.generator)
        counts = torch.poisson(EXPOSURE * (self.blur(x) + SKY), generator=self.generator)
        y = counts / EXPOSURE - SKY + READ_NOISE * torch.randn(x.shape, generator=self.generator)
        # what a pipeline estimates from the data: Poisson variance of the observed counts, plus the read noise
        variance = (y.clamp(min=0) + SKY) / EXPOSURE + READ_NOISE ** 2
        return tuple(v.to(self.device) for v in (y, x, variance))

    def energy_fn(self, x, y, variance):
        """The log-likelihood log p(y | x) up to a constant, one value per sample: [B]."""
        return -0.5 * ((y - self.blur(x)) ** 2 / variance).flatten(1).sum(1)


def main(argv=None) -> dict:
    args = common.parser(__doc__.splitlines()[0], seconds=180.0, out="examples/figures").parse_args(argv)
    size = SHORT if args.short else FULL
    steps = args.steps if args.steps is not None else (size.get("steps") if args.short else None)
    common.seed_everything(args.seed)
    problem = Deconvolution(size["n"], seed=args.seed, device=args.device)
    net = Unet(1, dimensions=2, nf=size["nf"], ch_mult=(2, 2), hidden_units=16)
    y_val, x_val, _ = problem.sample(size["test"])
    y_test, x_test, v_test = problem.sample(size["test"])
    # the RIM starts from the naive inverse (its regularisation tuned on the validation images) and learns to do
    # better than it, rather than from the blurred observation
    inverse, lam = common.tuned_wiener(problem.psf, y_val, x_val)
    rim = RIM((size["n"], size["n"]), net, energy_fn=problem.energy_fn, T=size["T"],
              score_preprocessing_method="ADAM", initialization_method="approximate_inverse",
              approximate_inverse_fn=inverse, device=args.device)
    print(f"training a RIM on {size['n']}x{size['n']} galaxy images ("
          + (f"{steps} steps" if steps is not None else f"{args.seconds:g} s") + f", {args.device})")
    result = common.train(rim, problem.sample, size["batch"], steps, args.seconds, learning_rate=size["lr"])
    with torch.no_grad():
        x_naive, x_rim = inverse(y_test), rim.predict(y_test, v_test)
    print(f"trained {result['steps']} steps in {result['seconds']} s")
    result["naive"] = common.report(f"Wiener (l={lam:.0e})", x_naive, x_test)
    result["rim"] = common.report("RIM", x_rim, x_test)

    rows = []
    img = {"cmap": "cubehelix", "vmin": 0, "vmax": 1}
    for i in range(3):
        rows.append([(v[i, 0].cpu().numpy(), img) for v in (x_test, y_test, x_naive, x_rim)]
                    + [((x_rim - x_test)[i, 0].cpu().numpy(), {"cmap": "RdBu_r", "vmin": -0.2, "vmax": 0.2})])
    result["figure"] = common.figure(
        os.path.join(args.out, "astronomy.png"),
        f"Galaxy deconvolution (Moffat PSF, Poisson + read noise): PSNR {result['naive']['psnr']:.1f} dB (Wiener) -> "
        f"{result['rim']['psnr']:.1f} dB (RIM, energy_fn), {result['steps']} steps",
        ["target", "observation", "naive inverse (Wiener)", "RIM estimate", "error (RIM - target)"], rows)
    return result


if __name__ == "__main__":
    main()
