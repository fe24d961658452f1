"""The measurement behind ``rim_fast.cuda_graphs.AGREE`` and ``AGREE_16`` (CPU; no GPU needed).

A CUDA graph recorded in two layouts keeps the second only if its outputs agree with the first's within a relative
distance in norm (``cuda_graphs.agree``): AGREE (2^-6) in float32 or TF32, AGREE_16 (2^-3) under a 16-bit autocast.
Two correct runs differ there only by rounding: each op rounds to the format's precision, in another order. This
prints, per RIM, the same distance between
- ``16 vs f32``: a bfloat16 (float16) autocast run and the float32 run: two 16-bit runs that both stay this close
  to float32 lie within twice it of each other;
- ``16 vs 16~``: two autocast runs whose observation differs by noise of one rounding (the format's unit roundoff,
  relative: 2^-8 for bfloat16, 2^-11 for float16): how much the loop amplifies one rounding-sized difference;
- ``f32 vs f32~(2^-11)``: the same in float32 with TF32's unit roundoff (2^-11): two TF32 algorithms' difference;
the worst of them against the tolerance. TF32 rounds every convolution, not only the input: its pair bound also
counts twice the bfloat16-vs-float32 distance scaled by 2^-3 (TF32 keeps 11 significant bits, bfloat16 8).

RIMs: the standard workloads' network (Hourglass nf=32, ch_mult=(2,2), T=10; S1 B=32, S2 B=4, S3 B=2) at its
benchmark weights and two more random initialisations, and the pretrained demo RIM (a Unet, T=6, Adam-preprocessed
scores: trained weights, whose loop amplifies more).

    python -m bench.agree_spread [--seeds 3]
"""
from __future__ import annotations

import argparse

import torch

import rim_fast
from bench import bench_rim
from bench.common import WORKLOADS, machine_line
from rim_fast import cuda_graphs, demo

#: the 16-bit formats and their unit roundoff (half an ulp, relative: 2^-p for p significant bits)
HALVES = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BF16_UNIT, TF32_UNIT = HALVES[torch.bfloat16], 2.0 ** -11


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``cuda_graphs.agree``'s measure: ||b - a|| / ||a||, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a))


def _jitter(y: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    return y * (1 + scale * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)))


def spread(predict, y: torch.Tensor, seed: int) -> dict:
    """The distances of one RIM's ``predict(y)`` (see the module docstring)."""
    out = {}
    with torch.no_grad():
        f32 = predict(y)
        out["f32 vs f32~(2^-11)"] = distance(f32, predict(_jitter(y, TF32_UNIT, seed)))
        for dtype, unit in HALVES.items():
            name = str(dtype).split(".")[-1]
            with torch.autocast("cpu", dtype=dtype):
                a = predict(y)
                b = predict(_jitter(y, unit, seed))
            out[f"{name} vs f32"] = distance(f32, a)
            out[f"{name} vs {name}~"] = distance(a, b)
    return out


def rims(seeds: int):
    """(label, predict, y) for each RIM measured."""
    batches = {"S1": None, "S2": 4, "S3": 2}
    for name, batch in batches.items():
        spec = WORKLOADS[name]
        data = bench_rim.workload_data(name)
        y = data["y"].cpu()[:batch] if batch else data["y"].cpu()
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = rim_fast.Hourglass(1, dimensions=spec["dims"], **bench_rim.MODEL)
            if seed == 0:
                net.load_state_dict(data["state"])
            r = rim_fast.RIM(spec["size"], net, score_fn=data["score_fn"], T=bench_rim.T, device="cpu")
            label = f"{name} ({'benchmark weights' if seed == 0 else f'init seed {seed}'}, B={y.shape[0]})"
            yield label, r.predict, y
    problem = demo.DeblurProblem(seed=0)
    r = demo.build_rim(problem)
    demo.load_pretrained(r)
    y, _, sigma = problem.sample(16)
    yield "pretrained demo (Unet, T=6, ADAM, B=16)", (lambda obs: r.predict(obs, sigma)), y


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="initialisations of the workloads' network")
    args = parser.parse_args(argv)
    columns = ["f32 vs f32~(2^-11)", "bfloat16 vs f32", "bfloat16 vs bfloat16~", "float16 vs f32",
               "float16 vs float16~"]
    rows = [machine_line(), "", "| RIM | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    print("\n".join(rows), flush=True)
    worst = {"32": 0.0, "16": 0.0}
    for i, (label, predict, y) in enumerate(rims(args.seeds)):
        d = spread(predict, y, seed=100 + i)
        tf32 = 2 * d["bfloat16 vs f32"] * TF32_UNIT / BF16_UNIT
        worst["32"] = max(worst["32"], d["f32 vs f32~(2^-11)"], tf32)
        # two 16-bit runs: within twice the distance to float32 by the triangle inequality, or one rounding apart
        worst["16"] = max(worst["16"], *(max(2 * d[f"{n} vs f32"], d[f"{n} vs {n}~"])
                                         for n in ("bfloat16", "float16")))
        rows.append(f"| {label} | " + " | ".join(f"{d[c]:.2e}" for c in columns) + " |")
        print(rows[-1], flush=True)
    rows += ["", f"float32 / TF32: worst pair bound {worst['32']:.2e} against AGREE = {cuda_graphs.AGREE:.2e} "
                 f"({cuda_graphs.AGREE / worst['32']:.0f}x margin)",
             f"16-bit autocast: worst pair bound {worst['16']:.2e} against AGREE_16 = {cuda_graphs.AGREE_16:.2e} "
             f"({cuda_graphs.AGREE_16 / worst['16']:.0f}x margin)"]
    print("\n".join(rows[-3:]))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
