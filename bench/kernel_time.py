"""Where a case's GPU time goes: the CUDA kernels of one profiled call, grouped by what they do.

bench/bench_rim.py profiles one call of each CUDA case (torch.profiler, CUDA graph replays included) and keeps, per
RIM step (divided by T), the kernel time in all, the time and count of each class below, and the costliest
kernels by name. The report sets the kernel time beside the median: kernel time near the median means the GPU
is busy (fewer or faster kernels help), well below it means gaps between kernels (launch-bound: graphs help).

Classes, first match wins (lower-cased kernel name):
- ``gates``: rim_fast's Triton gate and bias + tanh kernels (``_gru_*``, ``_bias_tanh*``);
- ``update step``: rim_fast's C++/CUDA update-step kernels (``preprocess_*_kernel``, ``update_state*``);
- ``inductor``: Inductor's generated Triton kernels (``triton_poi``/``triton_red``/``triton_per``/...);
- ``layout``: layout conversions and copies (cuDNN's ``nchwToNhwc``/``nhwcToNchw``, transposes, aten's copy);
- ``convolution``: cuDNN / CUTLASS convolution and GEMM kernels (``conv``, ``xmma``, ``implicit_gemm``,
  ``cutlass``, ``gemm``, ``wgrad``, ``dgrad``, ``fprop``, ``winograd``, ``cudnn``, ``sm80_``/``sm90_``...);
- ``reduction``: aten's reductions (bias gradients, norms);
- ``elementwise``: aten's element-wise kernels (tanh, adds, Adam's foreach ops);
- ``other``: the rest.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

#: (class, pattern) in order; the first pattern found in the lower-cased name classifies the kernel
CLASSES = (
    ("gates", re.compile(r"_gru_|_bias_tanh")),
    ("update step", re.compile(r"preprocess_(moments|arcsinh)|update_state")),
    ("inductor", re.compile(r"triton_(poi|red|per|tem|for|unk)")),
    ("layout", re.compile(r"nchwtonhwc|nhwctonchw|transpose|copy|permute")),
    ("convolution", re.compile(r"conv|xmma|implicit_gemm|cutlass|gemm|wgrad|dgrad|fprop|winograd|cudnn|"
                               r"\bsm[0-9]{2,3}_|fft")),
    ("reduction", re.compile(r"reduce")),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|foreach|multi_tensor")),
)
#: how many kernels by name a case keeps
TOP = 8
#: a kernel name is cut to this many characters in the summary (C++ template arguments make them long)
NAME_CHARS = 90


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if pattern.search(low):
            return cls
    return "other"


def short_name(name: str) -> str:
    name = name[5:] if name.startswith("void ") else name
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def summarize(kernels: Iterable[tuple[str, float]], steps: int) -> dict:
    """kernels: (name, duration in microseconds) of every kernel one call launched; steps: T. Per step: the kernel
    time in all (``us_per_step``), each class's [kernels, microseconds] (``classes``, costliest first) and the
    ``TOP`` costliest kernels by name as [name, kernels, microseconds] (``top``)."""
    by_class = defaultdict(lambda: [0, 0.0])
    by_name = defaultdict(lambda: [0, 0.0])
    total = 0.0
    for name, us in kernels:
        total += us
        for table, key in ((by_class, kernel_class(name)), (by_name, short_name(name))):
            table[key][0] += 1
            table[key][1] += us
    per_step = lambda item: [item[0] / steps, item[1] / steps]  # noqa: E731
    classes = {k: per_step(v) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1][1])}
    top = [[k, *per_step(v)] for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP]]
    return {"us_per_step": total / steps, "classes": classes, "top": top}


def markdown(rows: list) -> list:
    """The report's section for the rows that carry a ``kernel_time`` summary (CUDA cases); [] when none does."""
    rows = [r for r in rows if r.get("status") == "ok" and r.get("kernel_time") and r.get("median_ms")]
    if not rows:
        return []
    lines = ["## Where the GPU time goes (one profiled call per case, per RIM step; bench/kernel_time.py)", "",
             "busy: the kernels' time over the median (near 100%: the GPU is busy, fewer or faster kernels help; "
             "far below: gaps between launches, which CUDA graphs remove). Classes: microseconds per step "
             "(kernels per step).", "",
             "| workload | mode | provider | median us/step | kernel us/step | busy | by class | costliest kernels |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        kt = row["kernel_time"]
        steps = (row.get("shape") or {}).get("T") or 10
        median_us = row["median_ms"] * 1e3 / steps
        classes = ", ".join(f"{cls} {us:.0f} ({n:.1f})" for cls, (n, us) in kt["classes"].items())
        top = "; ".join(f"`{name}` {us:.0f} ({n:.1f})" for name, n, us in kt["top"][:3])
        lines.append(f"| {row['workload']} | {row['mode']} | {row['provider']} | {median_us:.0f} | "
                     f"{kt['us_per_step']:.0f} | {100 * kt['us_per_step'] / median_us:.0f}% | {classes} | {top} |")
    return lines + [""]
