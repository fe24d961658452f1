"""The measurement behind ``rim_fast.ops._cpu.ONEDNN_MIN_NUMEL`` and the 3D depth split (CPU only).

For one sample (B = 1) aten runs small convolutions in its native kernels and larger ones, and every batch of two or
more, in oneDNN. rim_fast's CPU fast paths (channels-last convolutions, oneDNN's conv + tanh) call oneDNN
themselves, whose primitives cost 50-70 us a call however small the problem. This prints, per convolution of a
3x3 (3x3x3) kernel and the network's channel counts (2 -> 32, the input conv; 32 -> 32; 64 -> 64), the median time
of conv + tanh as aten runs it in NCHW (``nchw``, torch_rim's and the reference's), in channels-last (``cl``) and as
oneDNN's fused primitive (``fused``), with each input's element count beside ``ONEDNN_MIN_NUMEL``; then, for 3D
inputs of one sample, aten's backward (native kernels) against the same convolution as two depth halves
(``_cpu._depth_split``, a batch of two that aten gives oneDNN).

    python -m bench.conv_threshold [--rounds 25]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import machine_line, measure
from rim_fast.ops import _cpu


def _time(fn, rounds: int) -> float:
    """Median microseconds of ``rounds`` calls after 3 untimed ones."""
    return measure(fn, "cpu", warmup=3, rounds=rounds)["median"] * 1e6


def forward_table(rounds: int) -> list:
    rows = ["| dims | B | size | channels | elements | nchw us | cl us | fused us | fused / nchw | oneDNN by the "
            "rule |", "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    grid = ((1, (32, 128, 256, 512, 1024)), (2, (8, 16, 24, 32, 64)), (3, (4, 6, 8, 12, 16)))
    for dims, sizes in grid:
        for batch in (1, 2):
            for n in sizes:
                for c_in, c_out in ((2, 32), (32, 32), (64, 64)):
                    x = torch.randn(batch, c_in, *([n] * dims))
                    w = torch.randn(c_out, c_in, *([3] * dims)) / (c_in * 3 ** dims) ** 0.5
                    b = torch.randn(c_out)
                    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
                    x4, w4 = _cpu._to_cl(x), _cpu._to_cl(w)
                    pads = [0, 1] if dims == 1 else [1] * dims
                    ones = [1] * len(pads)
                    nchw = _time(lambda: torch.tanh(conv(x, w, b, 1, 1)), rounds)
                    cl = _time(lambda: torch.tanh((F.conv2d if x4.dim() == 4 else F.conv3d)(x4, w4, b, 1, pads)),
                               rounds)
                    fused = _time(lambda: torch.ops.mkldnn._convolution_pointwise(
                        x4, w4, b, pads, ones, ones, 1, "tanh", [], ""), rounds)
                    rows.append(f"| {dims} | {batch} | {n} | {c_in} -> {c_out} | {x.numel()} | {nchw:.1f} | "
                                f"{cl:.1f} | {fused:.1f} | {fused / nchw:.2f} | "
                                f"{'yes' if _cpu.onednn_pays(x) else 'no'} |")
    return rows


def backward_table(rounds: int) -> list:
    rows = ["| size | channels | aten fwd us | split fwd us | aten bwd us | split bwd us | bwd ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for n, c in ((8, 32), (16, 32), (8, 64), (12, 32)):
        x = torch.randn(1, c, n, n, n).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        w = (torch.randn(c, c, 3, 3, 3) / (c * 27) ** 0.5).contiguous(
            memory_format=torch.channels_last_3d).requires_grad_()
        b = torch.randn(c, requires_grad=True)
        assert _cpu._depth_split_ok(x, w, 1, 1, 1)
        aten = lambda: F.conv3d(x, w, b, 1, 1)  # noqa: E731
        split = lambda: _cpu._depth_split(x, w, b, 1, [1, 1, 1])  # noqa: E731
        cot = torch.randn(1, c, n, n, n).contiguous(memory_format=torch.channels_last_3d)
        out_aten, out_split = aten(), split()
        bwd_aten = _time(lambda: torch.autograd.grad(out_aten, (x, w, b), cot, retain_graph=True), rounds)
        bwd_split = _time(lambda: torch.autograd.grad(out_split, (x, w, b), cot, retain_graph=True), rounds)
        with torch.no_grad():
            fwd_aten, fwd_split = _time(aten, rounds), _time(split, rounds)
        rows.append(f"| {n}^3 | {c} -> {c} | {fwd_aten:.0f} | {fwd_split:.0f} | {bwd_aten:.0f} | {bwd_split:.0f} | "
                    f"{bwd_aten / bwd_split:.2f}x |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"\nONEDNN_MIN_NUMEL = {_cpu.ONEDNN_MIN_NUMEL} (one sample; batches always take oneDNN)\n")
    print("\n".join(forward_table(args.rounds)))
    print("\n3D, one sample: aten (native kernels) against the depth split (a batch of two: oneDNN), "
          "forward without autograd, backward (every gradient)\n")
    print("\n".join(backward_table(args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
