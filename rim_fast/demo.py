"""Demo: a RIM that deblurs synthetic 2D images, on any machine in seconds.

    python -m rim_fast.demo                    # the pretrained RIM shipped with rim_fast: evaluate, report, plot
    python -m rim_fast.demo --train 60         # train one from scratch for 60 s on this machine instead
    python -m rim_fast.demo --steps N          # train exactly N steps from scratch (reproducible); --short: 60

The inverse problem: y = k * x + n, a Gaussian blur k (symmetric, so A^T = A) and white noise of std sigma; the
likelihood score A^T (y - A x) / sigma^2 reaches the score function through *args (the noise level), as in
torch_rim's README. Prints the reconstruction error against the observation's, and saves a PNG of truth /
observation / reconstruction. The pretrained weights (``rim_fast/pretrained/demo_deblur.pt``, float16) were trained
by ``examples/train_demo_checkpoint.py`` from a seed; training from scratch shows how far a RIM gets in the time
given (on a busy 2-core machine, a minute is 50 to 300 steps: the result is still blurry)."""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

from . import RIM, Unet

#: training steps of ``--short``: enough for the RIM to beat the observation clearly (measured at size 16: RMSE
#: 0.149 (observation) -> 0.120 (RIM); 40 steps reach 0.133, 20 steps 0.148)
SHORT_STEPS = 60
#: the pretrained RIM shipped with the package (examples/train_demo_checkpoint.py writes it)
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "demo_deblur.pt")
#: the demo RIM's settings (the pretrained weights belong to them)
NETWORK = dict(nf=16, ch_mult=(2, 2), hidden_units=16)
T = 6
SIZE = 32
LEARNING_RATE = 2e-3


def gaussian_kernel(size: int = 7, width: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-0.5 * (r / width) ** 2)
    k = torch.outer(k, k)
    return (k / k.sum()).view(1, 1, size, size)


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, kernel, padding=kernel.shape[-1] // 2)


def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random discs, squares and Gaussian blobs in [0, 1]: [n, 1, size, size]."""
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(2, 5, (1,), generator=generator))):
            cx, cy = (torch.rand(2, generator=generator) * 1.4 - 0.7).tolist()
            r = float(torch.rand(1, generator=generator) * 0.3 + 0.1)
            a = float(torch.rand(1, generator=generator) * 0.6 + 0.4)
            kind = int(torch.randint(0, 3, (1,), generator=generator))
            if kind == 0:
                shape = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2).float()
            elif kind == 1:
                shape = (((xx - cx).abs() < r) & ((yy - cy).abs() < r)).float()
            else:
                shape = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
            images[i, 0] = torch.maximum(images[i, 0], a * shape)
    return images


class DeblurProblem:
    def __init__(self, size: int = SIZE, sigma: float = 0.05, seed: int = 0):
        self.size, self.sigma = size, sigma
        self.kernel = gaussian_kernel()
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int):
        x = synthetic_images(n, self.size, self.generator)
        y = blur(x, self.kernel) + self.sigma * torch.randn(x.shape, generator=self.generator)
        return y, x, torch.full((n,), self.sigma)

    def score_fn(self, x, y, sigma):
        # A^T (y - A x) / sigma^2 with A = A^T the blur; sigma: [B]
        return blur(y - blur(x, self.kernel), self.kernel) / sigma.view(-1, 1, 1, 1) ** 2


def build_rim(problem: DeblurProblem) -> RIM:
    """The demo's RIM (the pretrained weights fit it): a Unet, T=6, Adam-preprocessed scores, started from the
    observation itself (the blur preserves the mean: the RIM learns to sharpen it)."""
    net = Unet(1, dimensions=2, **NETWORK)
    return RIM((problem.size, problem.size), net, score_fn=problem.score_fn, T=T, score_preprocessing_method="ADAM",
               initialization_method="approximate_inverse", approximate_inverse_fn=lambda y: y, device="cpu")


def train(rim: RIM, problem: DeblurProblem, steps: Optional[int], seconds: float, batch_size: int = 16,
          log_every: int = 20) -> int:
    """Adam on rim.loss_fn over fresh batches: exactly ``steps`` steps, or as many as fit in ``seconds``."""
    optimizer = torch.optim.Adam(rim.model.parameters(), lr=LEARNING_RATE)
    start, done = time.time(), 0
    while (done < steps) if steps is not None else (time.time() - start < seconds):
        y, x, sigma = problem.sample(batch_size)
        optimizer.zero_grad()
        loss = rim.loss_fn(y, x, sigma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rim.model.parameters(), 1.0)
        optimizer.step()
        done += 1
        if log_every and done % log_every == 0:
            print(f"step {done:5d} | {time.time() - start:6.1f} s | loss {loss.item():.4f}", flush=True)
    return done


def load_pretrained(rim: RIM, path: str = PRETRAINED) -> dict:
    """Load the shipped weights (stored in float16) into ``rim``; returns the checkpoint's description."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.float() for k, v in checkpoint["state_dict"].items()}
    rim.model.load_state_dict(state)
    return checkpoint["info"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=float, default=None, metavar="SECONDS",
                        help="train a RIM from scratch for this many seconds instead of loading the pretrained one")
    parser.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)  # the old name of --train
    parser.add_argument("--out", default="demo_output", help="where the PNG goes")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps from scratch (reproducible), whatever the time budget")
    parser.add_argument("--short", action="store_true", help=f"--steps {SHORT_STEPS} (a few seconds), for CI")
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args(argv)
    if args.train is None:
        args.train = args.seconds
    if args.short and args.steps is None:
        args.steps = SHORT_STEPS
    pretrained = args.train is None and args.steps is None
    torch.manual_seed(0)
    problem = DeblurProblem(size=args.size)
    rim = build_rim(problem)
    y_test, x_test, s_test = problem.sample(32)

    start = time.time()
    if pretrained:
        info = load_pretrained(rim)
        steps = info["steps"]
        how = f"pretrained RIM ({steps} steps, seed {info['seed']}, rim_fast/pretrained/demo_deblur.pt)"
        print(f"loaded the {how}; --train SECONDS trains one from scratch")
    else:
        steps = train(rim, problem, args.steps, args.train or 0.0)
        how = f"trained {steps} steps in {time.time() - start:.1f} s"
        print(how)

    with torch.no_grad():
        x_hat = rim.predict(y_test, s_test)
    rmse = lambda a: math.sqrt(float(((a - x_test) ** 2).mean()))  # noqa: E731
    result = {"steps": steps, "pretrained": pretrained, "seconds": round(time.time() - start, 1),
              "rmse_observation": rmse(y_test), "rmse_reconstruction": rmse(x_hat)}
    print(f"RMSE observation vs truth:    {result['rmse_observation']:.4f}")
    print(f"RMSE reconstruction vs truth: {result['rmse_reconstruction']:.4f} "
          f"({result['rmse_observation'] / result['rmse_reconstruction']:.2f}x lower)")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return result
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(3, 4, figsize=(8, 6.4))
    for col in range(4):
        for row, (img, title) in enumerate([(x_test, "truth"), (y_test, "observation"), (x_hat, "RIM")]):
            ax = axes[row, col]
            ax.imshow(img[col, 0].numpy(), cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title)
    fig.suptitle(f"RIM deblurring: RMSE {result['rmse_observation']:.3f} (observation) -> "
                 f"{result['rmse_reconstruction']:.3f} (RIM), "
                 + (f"pretrained, {steps} steps" if pretrained else f"{steps} steps from scratch"))
    fig.tight_layout()
    path = os.path.join(args.out, "deblur.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")
    result["png"] = path
    return result


if __name__ == "__main__":
    main()
