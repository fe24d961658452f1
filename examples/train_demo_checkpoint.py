"""Train the demo's RIM (rim_fast.demo) and write the pretrained weights the package ships.

    python examples/train_demo_checkpoint.py [--steps 1200] [--seed 0] [--threads 1] [--out rim_fast/pretrained/demo_deblur.pt]

Reproducible from the seed: the initial weights come from ``--seed``, the training images from the stream of seed
``seed + 1`` and the held-out images from ``seed + 2`` (the demo evaluates on the stream of seed 0, so none of its
images is trained on), and a fixed number of steps is trained (up to the floating-point summation order of the
machine's convolution kernels). The weights are stored in float16
(~290 KB for the demo's Unet of 140k parameters); rim_fast.demo loads them into float32."""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from rim_fast import __version__, demo


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (the shipped weights: 1; another count sums in another order)")
    parser.add_argument("--out", default=demo.PRETRAINED)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    problem = demo.DeblurProblem(seed=args.seed + 1)
    rim = demo.build_rim(problem)
    start = time.time()
    demo.train(rim, problem, args.steps, 0.0, log_every=100)
    y, x, sigma = demo.DeblurProblem(seed=args.seed + 2).sample(64)
    state = {k: v.detach().to(torch.float16) for k, v in rim.model.state_dict().items()}
    rim.model.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        rmse = math.sqrt(float(((rim.predict(y, sigma) - x) ** 2).mean()))
    info = {"steps": args.steps, "seed": args.seed, "size": problem.size, "T": demo.T, "network": demo.NETWORK,
            "learning_rate": demo.LEARNING_RATE, "rim_fast": __version__, "torch": str(torch.__version__),
            "threads": args.threads,
            "train_seconds": round(time.time() - start, 1), "rmse_held_out": round(rmse, 4),
            "rmse_observation_held_out": round(math.sqrt(float(((y - x) ** 2).mean())), 4)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"state_dict": state, "info": info}, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB): {info}")
    return info


if __name__ == "__main__":
    main()
