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


def _bench_run(out, *pytest_args, env_extra=None, **popen):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIM_FAST_BENCH_")}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "bench.run", "--device", "cpu", "--smoke", "--threads", "1", "--out", str(out),
           "--", *pytest_args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def test_runner_inside_an_xdist_worker_still_benchmarks(tmp_path):
    """pytest-benchmark switches itself off when PYTEST_XDIST_WORKER is set; the runner's pytest must not
    inherit it from a `pytest -n` worker (bench/gpu_check.sh runs the suite with xdist on the GPU machine)."""
    pytest.importorskip("pytest_benchmark")
    proc = _bench_run(tmp_path, "-k", "S1-cpu-predict-torch_rim and not compiled",
                      env_extra={"PYTEST_XDIST_WORKER": "gw3", "PYTEST_XDIST_WORKER_COUNT": "4"})
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-4000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [("torch_rim", "ok")]


def test_runner_interrupted_reports_the_finished_cases(tmp_path):
    """`timeout -s INT` (bench/gpu_check.sh's time box) interrupts the runner's process group after some cases:
    the runner still writes results.json and the report of those, and exits 130."""
    pytest.importorskip("pytest_benchmark")
    import signal
    import time
    proc = _bench_run(tmp_path, "-k", "not compiled", start_new_session=True)
    status = tmp_path / "status.jsonl"
    deadline = time.monotonic() + 600
    while not (status.exists() and len(status.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before two cases finished"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-4000:]
    assert "interrupted" in stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    ok = [r for r in summary["rows"] if r["status"] == "ok"]
    assert len(ok) >= 2, summary["rows"]
    assert len(summary["rows"]) < 4 * 2 * 3, "every case ran: nothing was interrupted"
    md = (tmp_path / "report.md").read_text()
    for r in ok:
        assert f"| {r['workload']} | {r['mode']} | {r['provider']} |" in md


def test_gpu_report_names_a_stage_that_ran_out_of_time(tmp_path):
    from bench import gpu_report
    (tmp_path / "stages.txt").write_text("build=0\ntests=124\nbench_rim=137\n")
    (tmp_path / "machine.txt").write_text("machine: test\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="2" failures="0" errors="0" skipped="0">'
        '<testcase classname="tests.test_a" name="test_one"/><testcase classname="tests.test_a" name="test_two"/>'
        "</testsuite></testsuites>")
    gpu_report.main(str(tmp_path), "full")
    md = (tmp_path / "report.md").read_text()
    assert "| build | 0 | ok |" in md
    assert "| tests | 124 | ran out of its time" in md
    assert "| bench_rim | 137 | killed at its time limit" in md
    assert "Tests: 2 passed, 0 failed, 0 skipped (of 2)." in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stages"] == {"build": 0, "tests": 124, "bench_rim": 137}
