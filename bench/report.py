"""Report of an end-to-end benchmark run (bench/bench_rim.py): markdown table, JSON summary, PNG chart.

    python -m bench.report STATUS.jsonl --out DIR

STATUS.jsonl is the run's results file (``RIM_FAST_BENCH_STATUS``): a line describing the run (machine, settings,
planned cases), then one line per case as it ended: ok (with its timings and measurements), skipped, error or
interrupted. Planned cases without a line were not reached (the run was cut first). Writes DIR/report.md,
DIR/summary.json and DIR/speedups.png (skipped, with a note, without matplotlib) and prints the markdown.

A case whose spread (IQR over the median) exceeds ``NOISY`` (10%, or the run's ``noisy`` setting) is marked noisy
in its row, and one line at the end says to rerun on a quiet machine. Speedups are computed only from this run: the
baseline's median (torch_rim; rim_fast_reference for workloads torch_rim cannot run) over the case's median. A case
that failed its correctness check, or whose baseline did not run or failed, gets no speedup (a noisy one keeps its
speedup, with the mark beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from bench import kernel_time

PROVIDER_ORDER = ("torch_rim", "torch_rim_compiled", "rim_fast_reference", "rim_fast_nographs", "rim_fast",
                  "rim_fast_cl", "rim_fast_graphed", "rim_fast_graphed_cl", "rim_fast_compiled")
MODE_ORDER = ("predict", "train_step")
MiB = 2 ** 20
#: a case whose IQR exceeds this fraction of its median is noisy (bench_rim.NOISY)
NOISY = 0.10
#: the measurements of a case copied from its results line into its row
ROW_INFO = ("baseline", "memory_bytes", "memory_kind", "steady_memory_bytes", "first_call_s", "warmup",
            "reference_s", "check_ok", "check_err", "check_tol", "check_against", "graphs", "graph_breaks",
            "graph_break_reasons", "recompiled_while_timed", "impls", "memory_error", "cudagraph_skips",
            "cudagraph_skip_reasons", "cuda_kernels", "cuda_memory_ops", "kernels_per_step", "kernels_error",
            "kernel_time", "retried", "train_graph", "optimizer", "flop", "graph_layouts")


def _order(value, order) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def load(status_path: str) -> dict:
    """Rows (one per planned or finished case: workload x mode x provider) and the run's metadata."""
    run, rows, group_order = {}, {}, []
    with open(status_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for rec in records:
        if rec.get("kind") == "run":
            run = rec
            for w, m, p in rec.get("planned", []):
                if (w, m) not in group_order:
                    group_order.append((w, m))
                rows.setdefault((w, m, p), {"workload": w, "mode": m, "provider": p, "status": "not reached",
                                            "reason": "the run ended (time box) before this case",
                                            "median_ms": None})
            continue
        key = (rec["workload"], rec["mode"], rec["provider"])
        if key[:2] not in group_order:
            group_order.append(key[:2])
        row = {"workload": key[0], "mode": key[1], "provider": key[2], "status": rec.get("status", "error"),
               "reason": rec.get("reason", ""), "seconds": rec.get("seconds"), "median_ms": None}
        stats, info = rec.get("stats"), rec.get("info", {})
        if row["status"] == "ok" and stats:
            row.update({f"{k}_ms": stats[k] * 1e3 for k in ("median", "iqr", "q1", "q3", "min", "max", "mean")})
            row["rounds"] = stats["rounds"]
            row["spread"] = stats["iqr"] / stats["median"] if stats["median"] > 0 else 0.0
            row["noisy"] = row["spread"] > run.get("settings", {}).get("noisy", NOISY)
            row["shape"] = {k: info.get(k) for k in ("arch", "dims", "size", "batch", "channels", "T")}
            row.update({k: info.get(k) for k in ROW_INFO})
        rows[key] = row
    _speedups(rows)
    ordered = sorted(rows.values(), key=lambda r: (group_order.index((r["workload"], r["mode"])),
                                                   _order(r["provider"], PROVIDER_ORDER)))
    counts = {}
    for row in ordered:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = {"machine": run.get("machine", "machine: unknown (no run line in the results)"),
               "settings": run.get("settings", {}), "groups": [f"{w}:{m}" for w, m in group_order],
               "counts": counts, "rows": ordered}
    summary["goals"] = goals(summary)
    return summary


def _stand_in(row) -> bool:
    # rim_fast_graphed on the CPU: the stand-in recorder runs the step again (and SGD): not a speed to quote
    return (row.get("train_graph") or {}).get("recorder") == "EagerRecorder"


def _speedups(rows: dict) -> None:
    for (w, m, p), row in rows.items():
        row["speedup"] = None
        if row["status"] != "ok":
            row["speedup_note"] = row["status"]
            continue
        if _stand_in(row):
            row["speedup_note"] = "a CPU stand-in, not a speed"
            continue
        base = rows.get((w, m, row.get("baseline")))
        if base is None or base["status"] != "ok":
            row["speedup_note"] = "baseline not run"
        elif base.get("check_ok") is False:
            row["speedup_note"] = "baseline failed its check"
        elif row.get("check_ok") is not True:
            row["speedup_note"] = "check failed"
        else:
            row["speedup"] = base["median_ms"] / row["median_ms"]
            row["speedup_note"] = ""


def _fmt_err(row) -> str:
    if row.get("check_ok") is None:
        return "-"
    err, tol = row.get("check_err") or {}, row.get("check_tol") or {}
    worst = max(err, key=lambda k: err[k] / tol[k] if tol.get(k) else 0.0) if err else None
    detail = f"{worst} {err[worst]:.1e}" if worst else ""
    if row["check_ok"]:
        return f"ok ({detail})" if detail else "ok"
    return f"**FAIL** ({detail} > {tol[worst]:.0e})" if worst else "**FAIL**"


def _cudagraph_note(row, device: str) -> str | None:
    if device != "cuda" or row.get("cudagraph_skips") is None:
        return None
    skips = row["cudagraph_skips"]
    if not skips:
        return "CUDA graphs: no skip"
    reasons = "; ".join(row.get("cudagraph_skip_reasons") or []) or "reason not logged"
    must = " (rim_fast_compiled must have none)" if row["provider"] == "rim_fast_compiled" else ""
    return f"**CUDA graphs skipped {skips}x{must}**: {reasons}"


def _train_graph_note(row) -> str | None:
    """rim_fast_graphed: whether its timed steps were replays of one CUDA graph (or the CPU stand-in's re-runs)."""
    graph = row.get("train_graph")
    if not graph:
        return None
    optimizer = row.get("optimizer") or "?"
    if graph.get("eager"):
        return f"**not recorded, ran eagerly**: {(graph.get('reason') or 'reason unknown')[:160]}; {optimizer}"
    if _stand_in(row):
        return (f"CPU stand-in recorder: each replay runs the step again (no graph; {graph.get('replays')} "
                f"replays), {optimizer}")
    return f"training step: one CUDA graph, {graph.get('replays')} replays; {optimizer}"


def _notes(row, device: str = "cpu") -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    notes = []
    if row.get("noisy"):
        notes.append(f"**noisy**: IQR {100 * row['spread']:.0f}% of the median")
    if row["provider"] == row.get("baseline"):
        notes.append("baseline")
    graph = _train_graph_note(row)
    if graph:
        notes.append(graph)
    if row.get("graphs") is not None:
        notes.append(f"{row['graphs']} graph{'s' if row['graphs'] != 1 else ''}, "
                     f"{row['graph_breaks']} break{'s' if row['graph_breaks'] != 1 else ''}")
        if row.get("recompiled_while_timed"):
            notes.append(f"**recompiled {row['recompiled_while_timed']}x while timed**")
    cudagraphs = _cudagraph_note(row, device)
    if cudagraphs:
        notes.append(cudagraphs)
    kernels = sorted({i.split(":", 1)[1] for i in row.get("impls") or []} - {"reference"})
    if kernels:
        notes.append("kernels: " + ", ".join(kernels))
    if row.get("retried"):
        notes.append("retried " + row["retried"][:120])
    if row.get("kernels_error"):
        notes.append("kernel count: " + row["kernels_error"][:80])
    if row.get("memory_error"):
        notes.append("memory not measured: " + row["memory_error"][:80])
    if row.get("speedup_note"):
        notes.append(f"no speedup: {row['speedup_note']}")
    return "; ".join(notes)


def _workload_line(name: str, shape: dict) -> str:
    size = "x".join(str(s) for s in shape.get("size") or [])
    return (f"- **{name}**: {shape.get('arch')}(nf=32, ch_mult=(2, 2), hidden_units=32), {shape.get('dims')}D "
            f"{size}, B={shape.get('batch')}, C={shape.get('channels')}, T={shape.get('T')}")


def _on_off(value) -> str:
    return "?" if value is None else ("on" if value else "off")


def _check_rule(settings: dict, cuda: bool) -> str:
    if (settings.get("check") or ("fp64" if cuda else "fp32")) != "fp64":
        return "the fp32 baseline (1e-5 predict and loss, 1e-4 each parameter gradient)."
    tf32 = (", 9.8e-4 with cuDNN's TF32 on: which convolutions run in TF32 depends on their shapes and layout; the "
            "float32 budget is the tests', TF32 off" if cuda and settings.get("cudnn_allow_tf32") else "")
    return ("a float64 run of the baseline; a case passes within max(2x the fp32 baseline's own error, 1e-5 "
            f"predict/loss, 1e-4 gradients{tf32}).")


def markdown(summary: dict) -> str:
    s = summary["settings"]
    device = s.get("device") or "?"
    cuda = device == "cuda"
    counts = ", ".join(f"{n} {status}" for status, n in summary.get("counts", {}).items())
    lines = [summary["machine"], "", "# rim_fast end-to-end benchmark", "",
             f"Device {device}, T={s.get('T')}, timed calls per case: {s.get('rounds')} ({s.get('timer')}"
             + ("; a group's providers take turns, one call each per round" if s.get("order") else "") + "), after "
             f"{s.get('warmup')} warm-up call(s) and the check call"
             + (" (SMOKE: tiny sizes, timings meaningless)" if s.get("smoke") else "") + ". "
             f"rim_fast backend `{s.get('rim_fast_backend')}`"
             + (f", TRITON_INTERPRET={s.get('triton_interpret')}" if s.get("triton_interpret") else "")
             + f". torch_rim_compiled: mode {s.get('torch_rim_compiled_mode')}. "
             f"TF32: cuDNN {_on_off(s.get('cudnn_allow_tf32'))}, matmul {_on_off(s.get('matmul_allow_tf32'))} "
             f"(float32 matmul precision {s.get('float32_matmul_precision')}); cudnn.benchmark "
             f"{_on_off(s.get('cudnn_benchmark'))}.", "",
             f"Order of the groups (a time box cuts the last): {', '.join(summary.get('groups', []))}. "
             f"Cases: {counts}.", ""]
    seen = {}
    for row in summary["rows"]:
        if row.get("shape") and row["workload"] not in seen:
            seen[row["workload"]] = row["shape"]
    lines += [_workload_line(n, shape) for n, shape in seen.items()] + [""]
    mem_header = "peak MiB" if cuda else "saved MiB"
    lines += [f"| workload | mode | provider | median ms | IQR ms | rounds | speedup | {mem_header} | first call s "
              "| kernels/step | check | notes |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in summary["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['workload']} | {row['mode']} | {row['provider']} | - | - | - | - | - | - | - | - "
                         f"| {_notes(row, device)} |")
            continue
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        mem = f"{row['memory_bytes'] / MiB:.1f}" if row.get("memory_bytes") is not None else "-"
        first = f"{row['first_call_s']:.1f}" if row.get("first_call_s") is not None else "-"
        kernels = f"{row['kernels_per_step']:.1f}" if row.get("kernels_per_step") is not None else "-"
        lines.append(f"| {row['workload']} | {row['mode']} | {row['provider']} | {row['median_ms']:.2f} | "
                     f"{row['iqr_ms']:.2f} | {row['rounds']} | {speedup} | {mem} | {first} | {kernels} | "
                     f"{_fmt_err(row)} | {_notes(row, device)} |")
    noisy = [r for r in summary["rows"] if r.get("noisy")]
    if noisy:
        names = ", ".join(f"{r['workload']} {r['mode']} {r['provider']}" for r in noisy)
        limit = s.get("noisy", NOISY)
        lines += ["", f"**{len(noisy)} noisy case{'s' if len(noisy) > 1 else ''}** (IQR above {100 * limit:.0f}% of "
                      f"the median: {names}): the machine was probably busy; rerun on a quiet machine before quoting "
                      f"{'their' if len(noisy) > 1 else 'its'} speedup."]
    lines += ["",
              "- median ms: " + ("CUDA events around each call on the current stream (the GPU's time from the "
                                 "call's start to its last kernel, host launch gaps included)." if cuda else
                                 "host clock around each call."),
              "- speedup: the baseline's median over the case's median, both measured in this run (baseline: "
              "torch_rim eager; rim_fast_reference where torch_rim has no such model). None for a case that "
              "failed its correctness check or whose baseline did not run.",
              "- check: the worst relative error max|a - b| / max|b| against " + _check_rule(s, cuda),
              ("- peak MiB: torch.cuda.max_memory_allocated over warm-up (CUDA-graph capture included) and the "
               "check call, minus what was allocated before the case (the shared inputs)." if cuda else
               "- saved MiB (train_step): distinct non-parameter storages saved for backward; eager providers: by "
               "the backbone's calls (saved_tensors_hooks around model.forward: the torch.func score refuses "
               "hooks), compiled providers: by the compiled graph. Not measured for predict."),
              "- first call s: the first untimed call, compilation included (shorter when Inductor's on-disk "
              "caches hold the graphs, e.g. from the prewarm of bench/gpu_check.sh).",
              ("- kernels/step: CUDA kernels launched by one call (torch.profiler; memcpy/memset not counted) "
               "divided by T; train_step counts forward, backward and the Adam step." if cuda else
               "- kernels/step: counted on CUDA only."),
              "- torch_rim_compiled: torch.compile(rim.predict) / torch.compile(rim.loss_fn), no fullgraph, mode "
              f"{s.get('torch_rim_compiled_mode')}; rim_fast_compiled: RIM.compile() (fullgraph; reduce-overhead "
              "CUDA graphs on CUDA). The optimizer step stays eager for every provider but rim_fast_graphed "
              "(train_step: zero_grad, forward, backward and a capturable Adam's step recorded as one CUDA graph, "
              "as fit(cuda_graphs=True) records them; on the CPU only a stand-in that runs the step again).", ""]
    return "\n".join(lines + kernel_time.markdown(summary["rows"]) + layout_markdown(summary["rows"])
                     + goals_markdown(summary))


def chart(summary: dict, path: str) -> str | None:
    """A bar chart of the speedups (log scale); returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed"
    groups = []
    for row in summary["rows"]:
        g = (row["workload"], row["mode"])
        if g not in groups:
            groups.append(g)
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in summary["rows"])]
    providers += sorted({r["provider"] for r in summary["rows"]} - set(providers))
    by_key = {(r["workload"], r["mode"], r["provider"]): r for r in summary["rows"]}
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups) + 2), 4.8))
    for i, provider in enumerate(providers):
        xs, ys, missing = [], [], []
        for j, g in enumerate(groups):
            row = by_key.get((*g, provider))
            x = j - 0.4 + width * (i + 0.5)
            if row is not None and row.get("speedup") is not None:
                xs.append(x)
                ys.append(row["speedup"])
            elif row is not None and row["status"] == "ok" and row.get("check_ok") is False:
                missing.append(x)
        bars = ax.bar(xs, ys, width, label=provider, color=f"C{i}")
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.2g}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
        if missing:
            ax.plot(missing, [1.0] * len(missing), "x", color=f"C{i}", markersize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ys_all = [r["speedup"] for r in summary["rows"] if r.get("speedup")]
    if ys_all:
        ax.set_ylim(min(min(ys_all), 1.0) / 1.6, max(max(ys_all), 1.0) * 1.6)
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w}\n{m}" for w, m in groups])
    ax.set_ylabel("speedup vs baseline (log scale)")
    machine = summary["machine"]
    cut = machine.find(" | ", len(machine) // 2)
    ax.set_title(machine if cut < 0 else machine[:cut] + "\n" + machine[cut + 3:], fontsize=7)
    ax.legend(fontsize=7, ncol=min(len(providers), 5), loc="upper center", bbox_to_anchor=(0.5, -0.14),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None




# ---- the goals (issue 13 and the project's CPU goal) against this run's numbers ------------------------------

#: the GPUs' dense TF32 tensor-core peaks in TFLOP/s (NVIDIA's data sheets give twice these "with sparsity"), by
#: a part of torch.cuda.get_device_name(); the first match wins (None: not known here, so "A10" does not claim an
#: A10G). RIM_FAST_BENCH_TF32_PEAK overrides (any GPU).
TF32_PEAK_TFLOPS = (("H200 NVL", 417.5), ("H200", 494.7), ("H100 NVL", 417.5), ("H100 PCIe", 378.0),
                    ("H100", 494.7), ("GH200", 494.7), ("A100", 156.0), ("A800", 156.0), ("L40S", 183.0),
                    ("L40", 90.5), ("A40", 74.8), ("A10G", None), ("A10", 62.5), ("L4", 60.0))

#: (workload, mode, provider, kind, other provider, target, what): kind "speedup" (over the baseline, at least the
#: target), "within" (the provider's median at most target x the other's), "ahead" (faster than the other),
#: "roofline" (at most target x the dense TF32 roofline time: torch_rim's FLOPs over the GPU's peak)
GOALS = {
    "cpu": [*[(w, "train_step", "rim_fast", "speedup", None, 1.25, "training step as imported vs torch_rim eager "
               "(issue 13)") for w in ("S1", "S2", "S3")],
            *[(w, "predict", "rim_fast", "speedup", None, 1.25, "predict as imported vs torch_rim eager (the CPU "
               "goal: every case)") for w in ("S1", "S2", "S3")]],
    "cuda": [("S1", "predict", "rim_fast", "speedup", None, 10.0, "predict as imported (whole-loop CUDA graphs) vs "
              "torch_rim eager"),
             ("S2", "predict", "rim_fast", "speedup", None, 5.0, "predict as imported vs torch_rim eager"),
             *[(w, "predict", "rim_fast", "within", "rim_fast_compiled", 1.2, "predict as imported within 1.2x of "
                "RIM.compile()") for w in ("S1", "S2")],
             ("S2", "train_step", "rim_fast_graphed", "speedup", None, 4.0, "fit(cuda_graphs=True)'s recorded step "
              "vs torch_rim's training step"),
             ("L2", "predict", "rim_fast", "roofline", None, 2.0, "predict within 2x of its TF32 roofline"),
             *[(w, "predict", "rim_fast", "ahead", "torch_rim_compiled", 1.0, "ahead of torch.compile of "
                "torch_rim") for w in ("S1", "S2", "L2")],
             ("S2", "train_step", "rim_fast_graphed", "ahead", "torch_rim_compiled", 1.0, "ahead of torch.compile "
              "of torch_rim")],
}


def tf32_peak(settings: dict):
    """(TFLOP/s, where from) of the run's GPU, or (None, why not)."""
    if settings.get("tf32_peak_tflops"):
        return float(settings["tf32_peak_tflops"]), "RIM_FAST_BENCH_TF32_PEAK"
    name = settings.get("gpu") or ""
    for part, peak in TF32_PEAK_TFLOPS:
        if part.lower() in name.lower():
            if peak is None:
                break
            return peak, f"{part} data sheet, dense"
    return None, f"no TF32 peak known for {name or 'this GPU'!r} (set RIM_FAST_BENCH_TF32_PEAK)"


def _usable(row) -> str | None:
    """None when the row's median can be quoted, else why not."""
    if row is None:
        return "not run"
    if row["status"] != "ok":
        return row["status"]
    if row.get("check_ok") is not True:
        return "check failed"
    if _stand_in(row):
        return "a CPU stand-in, not a speed"
    if (row.get("train_graph") or {}).get("eager"):
        return "the step was not recorded (it ran eagerly)"
    return None


def goals(summary: dict) -> list:
    """One dict per goal of the run's device: goal, workload, mode, provider, measured (text), target (text), met
    (True / False / None when not measured) and why (when not measured)."""
    settings = summary.get("settings", {})
    device = settings.get("device") or "cpu"
    rows = {(r["workload"], r["mode"], r["provider"]): r for r in summary["rows"]}
    out = []
    for w, m, p, kind, other, target, what in GOALS.get(device, []):
        row = rows.get((w, m, p))
        goal = {"goal": what, "workload": w, "mode": m, "provider": p, "met": None, "measured": "-", "why": None}
        why = "a smoke run (tiny sizes)" if settings.get("smoke") else _usable(row)
        if kind == "speedup":
            goal["target"] = f">= {target:g}x"
            if why is None and row.get("speedup") is None:
                why = row.get("speedup_note") or "no speedup"
            if why is None:
                goal.update(measured=f"{row['speedup']:.2f}x", met=row["speedup"] >= target)
        elif kind in ("within", "ahead"):
            ref = rows.get((w, m, other))
            goal["target"] = f"<= {target:g}x {other}" if kind == "within" else f"faster than {other}"
            why = why or (f"{other}: {_usable(ref)}" if _usable(ref) else None)
            if why is None:
                ratio = row["median_ms"] / ref["median_ms"]
                goal.update(measured=f"{ratio:.2f}x {other}'s time",
                            met=ratio <= target if kind == "within" else ratio < target)
        else:  # roofline
            goal["target"] = f"<= {target:g}x the roofline"
            peak, source = tf32_peak(settings)
            flop = (rows.get((w, m, "torch_rim")) or {}).get("flop")
            why = why or (None if flop else "FLOPs not counted (torch_rim's predict did not run)") or (
                None if peak else source)
            if why is None:
                roofline_ms = flop / (peak * 1e12) * 1e3
                ratio = row["median_ms"] / roofline_ms
                goal.update(measured=f"{ratio:.2f}x ({row['median_ms']:.2f} ms; {flop / 1e12:.2f} TFLOP at "
                                     f"{peak:g} TFLOP/s, {source}: {roofline_ms:.2f} ms)", met=ratio <= target)
        # the medians the verdict divides: the provider's and its baseline's (speedup) or the other provider's
        compared = rows.get((w, m, row.get("baseline") if kind == "speedup" and why is None else other))
        if why is None and (row.get("noisy") or (compared or {}).get("noisy")):
            goal["measured"] += " (noisy)"
        goal["why"] = why
        out.append(goal)
    return out


#: the providers that have a channels-last twin (their name + "_cl": bench_rim.CHANNELS_LAST)
LAYOUT_TWINS = ("rim_fast", "rim_fast_graphed")


def graph_layouts_cell(row: dict) -> str:
    """What a graphed call's first recording chose under RIM_FAST_CUDA_LAYOUT=auto (``graph_layouts``): the layout
    kept, and each layout's replay time as the recording timed it."""
    choices = row.get("graph_layouts") or []
    if not choices:
        return "-"
    cells = []
    for choice in choices:
        timed = ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in choice["seconds"].items())
        left = "; ".join(f"{name} left out: {why}" for name, why in choice["left_out"].items())
        cells.append(f"{choice['kept']}" + (f" ({timed} ms)" if timed else "") + (f"; {left}" if left else ""))
    return " / ".join(cells)


def layout_markdown(rows: list) -> list:
    """What the default (``RIM_FAST_CUDA_LAYOUT=auto``: a graph recorded in both layouts, the faster kept) chose,
    with the channels-last twins beside their providers where the run had them (each pair measured in the same
    group); [] when neither is in the run."""
    by_key = {(r["workload"], r["mode"], r["provider"]): r for r in rows}
    lines = []
    for (w, m, p), row in by_key.items():
        twin = by_key.get((w, m, p + "_cl"))
        if p not in LAYOUT_TWINS or (twin is None and not row.get("graph_layouts")):
            continue
        if twin is None:
            ms = f"{row['median_ms']:.2f}" if _usable(row) is None else "-"
            cells = f"{ms} | - | no channels-last provider in this run"
        else:
            why = _usable(row) or _usable(twin)
            cells = (f"{row['median_ms']:.2f} | {twin['median_ms']:.2f} | "
                     f"{twin['median_ms'] / row['median_ms']:.2f}x" if why is None else f"- | - | not compared: {why}")
        lines.append(f"| {w} | {m} | {p} | {cells} | {graph_layouts_cell(row)} |")
    if not lines:
        return []
    return (["## The CUDA convolutions in channels-last (RIM_FAST_CUDA_LAYOUT=channels_last), beside the default",
             "", "The default is `auto`: eager calls run NCHW, and a graph's first call records both layouts, times "
             "their replays and keeps the faster (its last column).", "",
             "| workload | mode | provider | default ms | channels-last ms | channels-last's time | the graph kept |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"] + lines + [""])


def goals_markdown(summary: dict) -> list:
    """The section of report.md: each goal of the run's device (``summary["goals"]``, from ``load``), measured in
    this run, met or not."""
    items = summary.get("goals") or []
    if not items:
        return []
    device = summary.get("settings", {}).get("device")
    lines = [f"## Goals on the {'GPU' if device == 'cuda' else 'CPU'} (this run's medians)", "",
             "| goal | workload | mode | provider | measured | target | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in items:
        verdict = ("met" if g["met"] else "**not met**") if g["met"] is not None else f"not measured: {g['why']}"
        lines.append(f"| {g['goal']} | {g['workload']} | {g['mode']} | {g['provider']} | {g['measured']} | "
                     f"{g['target']} | {verdict} |")
    met = sum(g["met"] is True for g in items)
    unmeasured = sum(g["met"] is None for g in items)
    lines += ["", f"{met} of {len(items)} met, {len(items) - met - unmeasured} not met, {unmeasured} not measured. "
              "A noisy median (IQR above the limit) is marked: rerun before quoting its verdict.", ""]
    return lines


def op_counts_markdown(rows: list) -> list:
    """The section of report.md for OUT/op_counts.json (bench.op_count)."""
    lines = ["## Ops per RIM step that launch a GPU kernel (counted on the CPU, bench/op_count.py)", ""]
    if any("error" in r for r in rows):
        return lines + [f"Not counted: {rows[0].get('error')}", ""]
    lines += ["torch_rim 0.2.9; rim_fast's references; rim_fast as a GPU runs it (each Triton gate and C++/CUDA "
              "update-step call one kernel, forward and backward; conv + tanh as the convolution and the bias + tanh "
              "kernel; a convolution's bias add and bias gradient each one more kernel, as cuDNN leaves them to aten). "
              "Views, metadata and allocations are not counted; train_step is loss_fn and its backward (no "
              "optimizer step). Compiled: the kernels of a compiled predict in Inductor's generated code (the CPU's), "
              "torch.compile of torch_rim's predict and rim_fast's RIM.compile() (on the CPU conv + tanh is one oneDNN "
              "op; 'as on GPUs': rim_fast's GPU choices, the tanh a kernel of its own and biases folded). Every count "
              "includes the benchmark's score function A^T (y - A x), 3 ops a step (2 convolutions). Issue 13's "
              "targets: kernels predict <= 40, train_step <= 135, compiled predict <= 34.", "",
              "| workload | mode | torch_rim | rim_fast reference | rim_fast kernels | torch_rim compiled | "
              "rim_fast compiled | rim_fast compiled as on GPUs |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_key = {(r["workload"], r["mode"], r["provider"]): r["per_step"] for r in rows}
    for workload, mode in dict.fromkeys((r["workload"], r["mode"]) for r in rows):
        cells = [f"{by_key[(workload, mode, p)]:.1f}" if (workload, mode, p) in by_key else "-"
                 for p in ("torch_rim", "reference", "kernels", "torch_rim_compiled", "compiled",
                           "compiled_as_on_gpus")]
        lines.append(f"| {workload} | {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def write(status_path: str, out_dir: str) -> dict:
    """Write report.md, summary.json and speedups.png into ``out_dir``; returns the summary (with "markdown").
    OUT/op_counts.json, when bench.run wrote it, adds the ops per step."""
    summary = load(status_path)
    os.makedirs(out_dir, exist_ok=True)
    counts_path = os.path.join(out_dir, "op_counts.json")
    if os.path.exists(counts_path):
        with open(counts_path) as f:
            summary["op_counts"] = json.load(f)
    note = chart(summary, os.path.join(out_dir, "speedups.png"))
    md = markdown(summary)
    if summary.get("op_counts"):
        md += "\n" + "\n".join(op_counts_markdown(summary["op_counts"]))
    if note:
        md += f"\n({note})\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    summary["chart"] = None if note else "speedups.png"
    summary["chart_note"] = note
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["markdown"] = md
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("status", help="the run's results file (status.jsonl)")
    parser.add_argument("--out", required=True, help="directory for report.md, summary.json, speedups.png")
    args = parser.parse_args(argv)
    summary = write(args.status, args.out)
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
