"""The end-to-end benchmark suite runs and reports (no timing assertions).

``python -m bench.run --smoke`` on the CPU: tiny sizes, T=2, one round, one thread. Eager providers run every
workload and mode; the compiled ones (each compilation costs seconds on our CPU) only S1 predict. Then the report:
every file exists, every row is in the table, every case passes its correctness check and gets a speedup."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.report import load, markdown  # noqa: E402

PROVIDERS = ("torch_rim", "torch_rim_compiled", "rim_fast_reference", "rim_fast", "rim_fast_compiled")
WORKLOADS = ("S1", "S2", "S3", "U2")  # the CPU workloads of bench.common, plus the Unet
MODES = ("predict", "train_step")


def _expected_rows():
    for w in WORKLOADS:
        for m in MODES:
            for p in PROVIDERS:
                if p.endswith("_compiled") and (w, m) != ("S1", "predict"):
                    continue
                yield w, m, p


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path_factory.mktemp("bench_smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIM_FAST_BENCH_")}
    cmd = [sys.executable, "-m", "bench.run", "--device", "cpu", "--smoke", "--threads", "1", "--out", str(out),
           "--", "-k", "not compiled or S1-cpu-predict"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_files_exist(smoke_run):
    out, _ = smoke_run
    for name in ("results.json", "status.jsonl", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_every_row(smoke_run):
    out, stdout = smoke_run
    md = (out / "report.md").read_text()
    assert md.splitlines()[0].startswith("machine: ")
    assert "| workload | mode | provider | median ms | IQR ms |" in md
    assert "| workload | mode | provider |" in stdout  # the runner printed the table
    for w, m, p in _expected_rows():
        assert f"| {w} | {m} | {p} |" in md, (w, m, p)
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["workload"], r["mode"], r["provider"]): r for r in summary["rows"]}
    for key in _expected_rows():
        row = rows[key]
        if key[0] == "U2" and key[2].startswith("torch_rim"):
            assert row["status"] == "skipped" and "Unet" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["rounds"] == 1
        assert row["check_ok"] is True, row
        assert row["speedup"] is not None and row["speedup"] > 0, row
        if key[1] == "train_step":
            assert row["memory_bytes"] > 0, row
        if key[2].endswith("_compiled"):
            assert row["graphs"] >= 1 and row["recompiled_while_timed"] == 0, row
    assert rows[("U2", "predict", "rim_fast")]["baseline"] == "rim_fast_reference"
    assert rows[("S1", "predict", "rim_fast")]["baseline"] == "torch_rim"


def _fake_results(tmp_path, cases, status_lines=()):
    benchmarks = []
    for (w, m, p), median, ok in cases:
        benchmarks.append({
            "name": f"test_rim[{w}-cpu-{m}-{p}]", "stats": {
                "median": median, "iqr": 0.0, "q1": median, "q3": median, "min": median, "max": median,
                "mean": median, "rounds": 3},
            "extra_info": {"workload": w, "mode": m, "provider": p, "device": "cpu", "baseline": "torch_rim",
                           "arch": "Hourglass", "dims": 1, "size": [256], "batch": 32, "channels": 1, "T": 10,
                           "check_ok": ok, "check_err": {"predict": 0.0 if ok else 1e-3},
                           "check_tol": {"predict": 1e-5}, "memory_bytes": None}})
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine_info": {"rim_fast_machine_line": "machine: test"},
                                "benchmarks": benchmarks}))
    (tmp_path / "status.jsonl").write_text("".join(json.dumps(s) + "\n" for s in status_lines))
    return str(path)


def test_report_speedup_only_from_passing_cases_and_their_baseline(tmp_path):
    path = _fake_results(tmp_path, [
        (("S1", "predict", "torch_rim"), 2.0, True),
        (("S1", "predict", "rim_fast"), 0.5, True),
        (("S1", "predict", "rim_fast_compiled"), 0.1, False),
        (("S3", "predict", "rim_fast"), 0.5, True),  # its baseline did not run
    ], [{"workload": "S3", "mode": "predict", "provider": "torch_rim", "status": "error", "reason": "boom"}])
    summary = load(path)
    rows = {(r["workload"], r["mode"], r["provider"]): r for r in summary["rows"]}
    assert rows[("S1", "predict", "torch_rim")]["speedup"] == pytest.approx(1.0)
    assert rows[("S1", "predict", "rim_fast")]["speedup"] == pytest.approx(4.0)
    assert rows[("S1", "predict", "rim_fast_compiled")]["speedup"] is None
    assert rows[("S3", "predict", "rim_fast")]["speedup"] is None
    assert rows[("S3", "predict", "torch_rim")]["status"] == "error"
    md = markdown(summary)
    assert md.splitlines()[0] == "machine: test"
    assert "**FAIL**" in md and "| S3 | predict | torch_rim | - |" in md
    line = next(line for line in md.splitlines() if line.startswith("| S1 | predict | rim_fast_compiled |"))
    assert "| - |" in line and "4.00x" not in line
