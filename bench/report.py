"""Report of an end-to-end benchmark run (bench/bench_rim.py): markdown table, JSON summary, PNG chart.

    python -m bench.report RESULTS.json --out DIR [--status STATUS.jsonl]

RESULTS.json is pytest-benchmark's ``--benchmark-json`` output; STATUS.jsonl (default: ``status.jsonl`` beside
it, when present) holds one line per case, so skipped and failed cases appear too. Writes DIR/report.md,
DIR/summary.json and DIR/speedups.png (skipped, with a note, without matplotlib) and prints the markdown.

Speedups are computed only from this run: the baseline's median (torch_rim; rim_fast_reference for workloads
torch_rim cannot run) over the case's median. A case that failed its correctness check, or whose baseline did
not run or failed, gets no speedup.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PROVIDER_ORDER = ("torch_rim", "torch_rim_compiled", "rim_fast_reference", "rim_fast", "rim_fast_compiled")
MODE_ORDER = ("predict", "train_step")
MiB = 2 ** 20


def _order(value, order) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def load(results_path: str, status_path: str | None = None) -> dict:
    """Rows (one per workload x mode x provider, measured or not) and the run's metadata."""
    with open(results_path) as f:
        data = json.load(f)
    machine_info = data.get("machine_info", {})
    machine = machine_info.get("rim_fast_machine_line") or (
        f"machine: {machine_info.get('cpu', {}).get('brand_raw', machine_info.get('machine', '?'))} | "
        f"python {machine_info.get('python_version', '?')}")
    rows = {}
    workload_order = []
    settings = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "workload" not in info:
            continue
        stats = bench["stats"]
        key = (info["workload"], info["mode"], info["provider"])
        if info["workload"] not in workload_order:
            workload_order.append(info["workload"])
        settings = {k: info.get(k) for k in ("device", "T", "rounds_requested", "warmup_requested", "smoke",
                                               "rim_fast_backend", "triton_interpret", "check", "cudnn_allow_tf32",
                                               "matmul_allow_tf32")}
        rows[key] = {
            "workload": info["workload"], "mode": info["mode"], "provider": info["provider"], "status": "ok",
            "reason": "", "name": bench.get("name"),
            "shape": {k: info.get(k) for k in ("arch", "dims", "size", "batch", "channels", "T")},
            "baseline": info.get("baseline"),
            "median_ms": stats["median"] * 1e3, "iqr_ms": stats["iqr"] * 1e3, "q1_ms": stats["q1"] * 1e3,
            "q3_ms": stats["q3"] * 1e3, "min_ms": stats["min"] * 1e3, "max_ms": stats["max"] * 1e3,
            "mean_ms": stats["mean"] * 1e3, "rounds": stats["rounds"],
            "memory_bytes": info.get("memory_bytes"), "memory_kind": info.get("memory_kind"),
            "steady_memory_bytes": info.get("steady_memory_bytes"),
            "first_call_s": info.get("first_call_s"), "warmup": info.get("warmup"),
            "check_ok": info.get("check_ok"), "check_err": info.get("check_err"),
            "check_tol": info.get("check_tol"), "check_against": info.get("check_against"),
            "graphs": info.get("graphs"), "graph_breaks": info.get("graph_breaks"),
            "graph_break_reasons": info.get("graph_break_reasons"),
            "recompiled_while_timed": info.get("recompiled_while_timed"), "impls": info.get("impls"),
            "memory_error": info.get("memory_error"),
        }
    if status_path is None:
        candidate = os.path.join(os.path.dirname(os.path.abspath(results_path)), "status.jsonl")
        status_path = candidate if os.path.exists(candidate) else None
    if status_path:
        with open(status_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                rec = json.loads(line)
                key = (rec["workload"], rec["mode"], rec["provider"])
                if rec["workload"] not in workload_order:
                    workload_order.append(rec["workload"])
                if key in rows:
                    if rec.get("status") == "error":  # failed after it was timed
                        rows[key].update(status="error", reason=rec.get("reason", ""))
                    continue
                if rec.get("status") == "ok":
                    continue
                rows[key] = {"workload": key[0], "mode": key[1], "provider": key[2], "status": rec["status"],
                             "reason": rec.get("reason", ""), "median_ms": None}
    _speedups(rows)
    ordered = sorted(rows.values(), key=lambda r: (workload_order.index(r["workload"]),
                                                   _order(r["mode"], MODE_ORDER),
                                                   _order(r["provider"], PROVIDER_ORDER)))
    return {"machine": machine, "datetime": data.get("datetime"), "settings": settings,
            "commit": data.get("commit_info", {}).get("id"), "rows": ordered}


def _speedups(rows: dict) -> None:
    for (w, m, p), row in rows.items():
        row["speedup"] = None
        if row["status"] != "ok":
            row["speedup_note"] = row["status"]
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


def _notes(row) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    notes = []
    if row["provider"] == row.get("baseline"):
        notes.append("baseline")
    if row.get("graphs") is not None:
        notes.append(f"{row['graphs']} graph{'s' if row['graphs'] != 1 else ''}, "
                     f"{row['graph_breaks']} break{'s' if row['graph_breaks'] != 1 else ''}")
        if row.get("recompiled_while_timed"):
            notes.append(f"**recompiled {row['recompiled_while_timed']}x while timed**")
    kernels = sorted({i.split(":", 1)[1] for i in row.get("impls") or []} - {"reference"})
    if kernels:
        notes.append("kernels: " + ", ".join(kernels))
    if row.get("memory_error"):
        notes.append("memory not measured: " + row["memory_error"][:80])
    if row.get("speedup_note"):
        notes.append(f"no speedup: {row['speedup_note']}")
    return "; ".join(notes)


def _workload_line(name: str, shape: dict) -> str:
    size = "x".join(str(s) for s in shape.get("size") or [])
    return (f"- **{name}**: {shape.get('arch')}(nf=32, ch_mult=(2, 2), hidden_units=32), {shape.get('dims')}D "
            f"{size}, B={shape.get('batch')}, C={shape.get('channels')}, T={shape.get('T')}")


def markdown(summary: dict) -> str:
    s = summary["settings"]
    device = s.get("device") or "?"
    lines = [summary["machine"], "", "# rim_fast end-to-end benchmark", "",
             f"Run {summary.get('datetime') or '?'}, device {device}, T={s.get('T')}, "
             f"timed rounds: {s.get('rounds_requested')}, after {s.get('warmup_requested')} warm-up call(s) "
             "(at least 1 for compiled providers) and the check call"
             + (" (SMOKE: tiny sizes, timings meaningless)" if s.get("smoke") else "") + ". "
             f"rim_fast backend `{s.get('rim_fast_backend')}`"
             + (f", TRITON_INTERPRET={s.get('triton_interpret')}" if s.get("triton_interpret") else "")
             + (f", cuDNN TF32 {'on' if s.get('cudnn_allow_tf32') else 'off'}, matmul TF32 "
                f"{'on' if s.get('matmul_allow_tf32') else 'off'}" if device == "cuda" else "") + ".", ""]
    seen = {}
    for row in summary["rows"]:
        if row.get("shape") and row["workload"] not in seen:
            seen[row["workload"]] = row["shape"]
    lines += [_workload_line(n, shape) for n, shape in seen.items()] + [""]
    mem_header = "peak MiB" if device == "cuda" else "saved MiB"
    lines += [f"| workload | mode | provider | median ms | IQR ms | rounds | speedup | {mem_header} | first call s "
              "| check | notes |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in summary["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['workload']} | {row['mode']} | {row['provider']} | - | - | - | - | - | - | - "
                         f"| {_notes(row)} |")
            continue
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        mem = f"{row['memory_bytes'] / MiB:.1f}" if row.get("memory_bytes") is not None else "-"
        first = f"{row['first_call_s']:.1f}" if row.get("first_call_s") is not None else "-"
        lines.append(f"| {row['workload']} | {row['mode']} | {row['provider']} | {row['median_ms']:.2f} | "
                     f"{row['iqr_ms']:.2f} | {row['rounds']} | {speedup} | {mem} | {first} | {_fmt_err(row)} | "
                     f"{_notes(row)} |")
    lines += ["",
              "- speedup: the baseline's median over the case's median, both measured in this run (baseline: "
              "torch_rim eager; rim_fast_reference where torch_rim has no such model). None for a case that "
              "failed its correctness check or whose baseline did not run.",
              "- check: the worst relative error max|a - b| / max|b| against "
              + ("a float64 run of the baseline; a case passes within max(2x the fp32 baseline's own error, "
                 "1e-5 predict/loss, 1e-4 gradients)." if (s.get("check") or ("fp64" if device == "cuda" else
                                                                               "fp32")) == "fp64" else
                 "the fp32 baseline (1e-5 predict and loss, 1e-4 each parameter gradient)."),
              ("- peak MiB: torch.cuda.max_memory_allocated over warm-up (CUDA-graph capture included) and the "
               "check call, minus what was allocated before the case (the shared inputs)." if device == "cuda" else
               "- saved MiB (train_step): distinct non-parameter storages saved for backward; eager providers: by "
               "the backbone's calls (saved_tensors_hooks around model.forward: the torch.func score refuses "
               "hooks), compiled providers: by the compiled graph. Not measured for predict."),
              "- first call s: the first untimed call, compilation included (shorter when Inductor's on-disk "
              "caches hold the graphs from an earlier run).",
              "- torch_rim_compiled: torch.compile(rim.predict) / torch.compile(rim.loss_fn) with default "
              "settings (no fullgraph); rim_fast_compiled: RIM.compile() (fullgraph; reduce-overhead CUDA graphs "
              "on CUDA). The optimizer step stays eager for every provider.", ""]
    return "\n".join(lines)


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


def write(results_path: str, out_dir: str, status_path: str | None = None) -> dict:
    """Write report.md, summary.json and speedups.png into ``out_dir``; returns the summary (with "markdown")."""
    summary = load(results_path, status_path)
    os.makedirs(out_dir, exist_ok=True)
    note = chart(summary, os.path.join(out_dir, "speedups.png"))
    md = markdown(summary)
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
    parser.add_argument("results", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", required=True, help="directory for report.md, summary.json, speedups.png")
    parser.add_argument("--status", default=None, help="status.jsonl of the run (default: beside RESULTS)")
    args = parser.parse_args(argv)
    summary = write(args.results, args.out, args.status)
    print(summary["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
