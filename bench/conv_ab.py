"""Convolution A/B on the standard workloads' shapes: the layout and the two rewrites that trade kernels for work.

Three questions the end-to-end numbers cannot separate, answered on the GPU in about 20 seconds:
- **layout**: NCHW (the default) or channels-last (``RIM_FAST_CUDA_LAYOUT=channels_last``, ``ops._cudnn``)?
- **fold**: a stride-1 conv on 33 input channels with no bias (``fold_next_bias``, one bias-add kernel fewer), or
  on 32 with its bias?
- **stride-2 "same"**: zero pad then a 3x3 conv (the reference: two kernels), or one 4x4 conv with zero taps and a
  symmetric pad (``symmetric_padding``: 16/9 of the multiply-adds)?

Each case runs forward (no autograd) and forward + backward (the gradients of x and the weight), in each layout;
``REPEAT`` calls share a weight's derived copies as a RIM call's T steps do (``layers.derived``).
Shapes are the Hourglass(nf=32)'s: its full-resolution 32-channel activations [B, 32, *S] and their first
downsampling to 64 channels, for S1 (1D, as [B, C, 1, L] in channels-last), S2 and L2.

Timing (CUDA): ``REPEAT`` calls captured in one CUDA graph (after warm-up on a side stream), replayed; the time
per call is the replay's over ``REPEAT``: GPU time, no host launch overhead (what the RIM's graphs see). The
variants of a workload take turns, one replay each per round, ``ROUNDS`` rounds; the table gives medians in
microseconds per call, and each variant's ratio to the first of its question (below 1: faster). Before any timing
each variant's forward is compared with its question's first (``CHECK_TOL``; the 33-channel input carries the
bias as ``fold_next_bias`` builds it): a wrong variant is a row with its error, not a time. On the CPU (CI)
tiny sizes, one round, no graphs: a test of the plumbing, not a speed.

    python -m bench.conv_ab [--device cuda] [--json out.json] [--workloads S2,L2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.common import capture, error_line, machine_line, synchronize, to_channels_last
from rim_fast.layers.derived import per_call_cache
from rim_fast.ops import _cudnn, reference
from rim_fast.ops.conv import _conv_same_symmetric

REPEAT = 10
ROUNDS = 15
#: (dims, spatial size, batch) per workload, and tiny ones for the CPU
SHAPES = {"S1": (1, (256,), 32), "S2": (2, (64, 64), 16), "L2": (2, (256, 256), 32)}
TINY = {"S1": (1, (16,), 2), "S2": (2, (8, 8), 2), "L2": (2, (16, 16), 2)}
NF = 32


def _cases(dims: int, size: tuple, batch: int, device: str) -> dict:
    """{(question, variant): (fn, inputs needing gradients)}; each fn maps the inputs to one output."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    k = (3,) * dims
    x, w, b = rnd(batch, NF, *size), rnd(NF, NF, *k) * 0.1, rnd(NF)
    # the fold as fold_next_bias builds it: a channel of ones, and the bias at the kernel's centre tap there
    x33 = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    w33 = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
    w33[(slice(None), NF) + (1,) * dims] = b
    w2, b2 = rnd(2 * NF, NF, *k) * 0.1, rnd(2 * NF)
    conv = (F.conv1d, F.conv2d)[dims - 1]
    cl = _cudnn.conv
    cases = {}
    for layout in ("nchw", "channels_last"):
        if layout == "channels_last":  # inputs as the previous op leaves them in that layout
            x, x33 = to_channels_last(x), to_channels_last(x33)
        same = (lambda x_, w_, b_: conv(x_, w_, b_, padding="same")) if layout == "nchw" else \
            (lambda x_, w_, b_: cl(x_, w_, b_, 1, "same", 1, 1))
        cases[("fold", f"32 ch + bias, {layout}")] = (lambda x_, w_, s=same: s(x_, w_, b), (x, w))
        cases[("fold", f"33 ch, no bias, {layout}")] = (lambda x_, w_, s=same: s(x_, w_, None), (x33, w33))
        if layout == "nchw":
            pad = lambda x_, w_: reference.conv_same(x_, w_, b2, 3, 2, 1, 1, True)  # noqa: E731
            sym = lambda x_, w_: _conv_same_symmetric(x_, w_, b2, 3, 2, 1, 1, True)  # noqa: E731
        else:
            pad = lambda x_, w_: cl(F.pad(x_, reference.conv_same_pads(  # noqa: E731
                tuple(x_.shape[2:]), 3, 2, 1, True)), w_, b2, 2, 0, 1, 1)
            sym = lambda x_, w_: _cudnn.conv_same(x_, w_, b2, 3, 2, 1, 1, True)  # noqa: E731
        cases[("stride-2 same", f"pad + 3x3, {layout}")] = (pad, (x, w2))
        cases[("stride-2 same", f"symmetric 4x4, {layout}")] = (sym, (x, w2))
    return cases


def _compute(fn, inputs, mode: str):
    """REPEAT calls as one RIM call makes T steps' (``per_call_cache``: a weight's channels-last copy or zero taps
    built once for the REPEAT calls, as once per RIM call)."""
    if mode == "fwd":
        def compute():
            with torch.no_grad(), per_call_cache():
                for _ in range(REPEAT):
                    out = fn(*inputs)  # the previous output is freed: a graph's pool holds about two (L2: 268 MB)
            return out
        return compute
    leaves = [t.detach().requires_grad_() for t in inputs]

    def compute():
        # the T steps' outputs live until the one backward, as in a RIM's training step (L2: 10 x 268 MB)
        with per_call_cache():
            outs = [fn(*leaves) for _ in range(REPEAT)]
        cotangent = torch.ones_like(outs[0])
        return torch.autograd.grad(outs, leaves, [cotangent] * len(outs))
    return compute


def _timer(compute, device: str):
    """A callable returning seconds per call: a graph replay (CUDA) or a run (CPU), over REPEAT."""
    if device != "cuda":
        def run():
            t0 = time.perf_counter()
            compute()
            return (time.perf_counter() - t0) / REPEAT
        return run
    graph, _ = capture(compute, warmup=2)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay():
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / REPEAT
    return replay


def _check(cases: dict) -> dict:
    """{key: relative error of its forward against its question's first variant that runs} (max |a - b| /
    max |b|): the variants compute the same thing (TF32 aside), so that no wrong one is timed; a variant that
    fails has its error's text instead (a row of the report, not the run's end)."""
    errors, first = {}, {}
    with torch.no_grad():
        for (question, variant), (fn, inputs) in cases.items():
            try:
                out = fn(*inputs).float()
            except Exception as err:  # noqa: BLE001
                errors[(question, variant)] = error_line(err, 160)
                continue
            ref = first.setdefault(question, out)
            errors[(question, variant)] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return errors


#: a variant further than this from its question's first one is not timed (TF32 errors are ~1e-3)
CHECK_TOL = 1e-2


def run(workloads, device: str, rounds: int, done: Optional[Callable[[dict], None]] = None) -> dict:
    """The rows of every workload's variants; ``done(results)`` after each workload (the GPU check writes its JSON
    there, so that a time box's cut keeps the workloads that finished)."""
    shapes = SHAPES if device == "cuda" else TINY
    results = {"machine": machine_line(), "device": device, "repeat": REPEAT, "rounds": rounds, "rows": []}
    for name in workloads:
        dims, size, batch = shapes[name]
        cases = _cases(dims, size, batch, device)
        checked = _check(cases)
        for mode in ("fwd", "fwdbwd"):
            timers, errors = {}, {}
            for key, (fn, inputs) in cases.items():
                if isinstance(checked[key], str):
                    errors[key] = f"failed: {checked[key]}"
                    continue
                if checked[key] > CHECK_TOL:
                    first = next(v for q, v in cases if q == key[0])
                    errors[key] = f"wrong: {checked[key]:.1e} from {first}'s output, not timed"
                    continue
                try:
                    timers[key] = _timer(_compute(fn, inputs, mode), device)
                except Exception as err:  # noqa: BLE001 - one variant's failure is a row, not the run's
                    errors[key] = error_line(err, 160)
            times = {key: [] for key in timers}
            for _ in range(rounds):
                for key, timer in list(timers.items()):
                    try:
                        times[key].append(timer())
                    except Exception as err:  # noqa: BLE001
                        errors[key] = error_line(err, 160)
                        del timers[key]
            synchronize(device)
            first = {}
            for (question, variant) in cases:
                key = (question, variant)
                row = {"workload": name, "mode": mode, "question": question, "variant": variant,
                       "check": checked[key] if isinstance(checked[key], float) else None}
                if key in errors:
                    row["error"] = errors[key]
                else:
                    row["us"] = statistics.median(times[key]) * 1e6
                    first.setdefault(question, row["us"])
                    row["ratio"] = row["us"] / first[question]
                results["rows"].append(row)
            del timers
            if device == "cuda":
                torch.cuda.empty_cache()
        if done is not None:
            done(results)
    return results


def write_json(path: str, results: dict) -> None:
    """``results`` into ``path``, atomically."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def markdown(results: dict) -> list:
    timing = (f"GPU time in CUDA graphs ({results['repeat']} calls a replay, " if results["device"] == "cuda" else
              "host time on the CPU (tiny sizes, no graphs: a test of the plumbing, not a speed; ")
    lines = [f"Per call, {timing}median of {results['rounds']} round(s)); ratio: to the first variant of its "
             "question (below 1: faster). Forward (fwd) without autograd; fwdbwd: and the gradients of x and the "
             "weight.", "",
             "| workload | mode | question | variant | us | ratio |", "| --- | --- | --- | --- | ---: | ---: |"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['question']} | {r['variant']} | - | "
                         f"{r['error']} |")
        else:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['question']} | {r['variant']} | {r['us']:.1f} | "
                         f"{r['ratio']:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="S2,L2,S1")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in SHAPES]
    if unknown:
        parser.error(f"--workloads: {unknown} not in {list(SHAPES)}")
    rounds = args.rounds or (ROUNDS if args.device == "cuda" else 1)
    results = run(workloads, args.device, rounds,
                  done=(lambda partial: write_json(args.json, partial)) if args.json else None)
    print(results["machine"])
    print("\n".join(markdown(results)))
    return 1 if any("error" in r for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
