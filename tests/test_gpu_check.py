"""bench/gpu_check.sh, the GPU acceptance run, checked on the CPU: its plan fits the 420 s budget, its preflight
stops a broken run at once with a one-line reason (the report still written), the toolkit is found by its real
path and its CUDA major compared with torch's, the report of a run (a synthetic work folder laid out like a run's)
is at most 8 files that start with rim_fast.info's output and the machine line and give every stage's exit code,
and the `cuda` marker selects what conftest's _runs_on_the_gpu identifies."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import gpu_preflight, gpu_report  # noqa: E402

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
OUT_FILES = {"report.md", "report.json", "logs.tgz", "speedups.png"}


def _plan(*args):
    proc = subprocess.run(["bash", SCRIPT, "--plan", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    boxes = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)(\s|$)", line)
        if m:
            boxes[m.group(1)] = int(m.group(2))
    return boxes


def test_plan_fits_seven_minutes():
    boxes = _plan()
    total = boxes.pop("total")
    assert {"preflight", "build", "tests", "bench", "report"} <= set(boxes)
    assert sum(boxes.values()) == total <= 420, boxes
    assert 45 <= boxes["preflight"] <= 60 and boxes["tests"] <= 150, boxes
    # the convolution A/B runs within the benchmarks' share, not beside it
    assert re.search(r"^conv_ab\s+<=\d+\s.*from the bench's share", subprocess.run(
        ["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=30).stdout, re.M)
    # --no-tests (a second run): the tests' box goes to the benchmarks
    no_tests = _plan("--no-tests")
    assert no_tests["tests"] == 0 and no_tests["bench"] == boxes["bench"] + boxes["tests"]
    assert no_tests["total"] == total


def _toolkit(tmp_path, release):
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "lib64").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "lib64" / "libcudart.so").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.99'\n")
    nvcc.chmod(0o755)
    return home


def test_nvcc_found_by_its_real_path_and_its_major_checked(tmp_path):
    home = _toolkit(tmp_path, "12.4")
    # a symlink on PATH, as /usr/bin/nvcc -> /usr/local/cuda-12.4/bin/nvcc
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    env = {"PATH": str(tmp_path / "bin")}
    ok, detail, exports = gpu_preflight.check_nvcc("13.0", env)
    assert not ok and "12.4" in detail and "13.0" in detail and "majors differ" in detail
    assert "\n" not in detail
    ok, detail, exports = gpu_preflight.check_nvcc("12.8", env)
    assert ok, detail
    assert exports == {"CUDA_HOME": str(home.resolve())}
    # a wrapper script (/usr/local/bin/nvcc on our CPU machine: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`)
    (tmp_path / "wrap").mkdir()
    wrapper = tmp_path / "wrap" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    ok, _, exports = gpu_preflight.check_nvcc("12.1", {"PATH": str(tmp_path / "wrap")})
    assert ok and exports["CUDA_HOME"] == str(home.resolve())
    ok, detail, _ = gpu_preflight.check_nvcc("13.0", {"CUDA_HOME": str(tmp_path / "nowhere")})
    assert not ok and "holds no bin/nvcc" in detail
    ok, detail, _ = gpu_preflight.check_nvcc(None, {"CUDA_HOME": str(home)})
    assert not ok and "CPU build" in detail


def test_preflight_failure_stops_the_run_with_a_one_line_reason(tmp_path):
    """A test wheel that does not import: the run stops after the preflight (seconds), nothing is built, and the
    report (at most 8 files) gives the reason in one line and every stage's exit code."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path),
               RIM_FAST_PREFLIGHT_MODULES="rim,rim_fast_no_such_wheel")
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = set(os.listdir(out))
    assert files <= OUT_FILES and len(files) <= 8 and {"report.md", "report.json", "logs.tgz"} <= files, files
    md = (out / "report.md").read_text()
    reason = next(line for line in md.splitlines() if "Preflight FAILED" in line)
    assert "rim_fast_no_such_wheel" in reason and "ModuleNotFoundError" in reason
    report = json.loads((out / "report.json").read_text())
    assert report["exit_codes"] == {"preflight": 1, "build": None, "tests": None, "conv_ab": None, "bench": None,
                                    "bench_compiled": None}
    assert "| build | 300 | 0 | - | not run (preflight failed) |" in md
    assert "preflight: FAILED: import rim_fast_no_such_wheel" in proc.stdout


def _work_folder(tmp_path, info_ok=True):
    """A work folder as gpu_check.sh leaves it: the tests and the benchmarks cut by their time boxes."""
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "prewarm").mkdir()
    (work / "refs").mkdir()
    (work / "stages.tsv").write_text("preflight\t0\t9\t30\nbuild\t0\t71\t120\ntests\t124\t150\t150\n"
                                     "conv_ab\t0\t21\t45\nbench\t124\t160\t160\nbench_compiled\t124\t0\t0\n")
    (work / "conv_ab.json").write_text(json.dumps({"machine": "m", "device": "cuda", "repeat": 10, "rounds": 15,
                                                   "rows": [
        {"workload": "L2", "mode": "fwd", "question": "fold", "variant": "32 ch + bias, nchw", "us": 400.0,
         "ratio": 1.0},
        {"workload": "L2", "mode": "fwd", "question": "fold", "variant": "32 ch + bias, channels_last",
         "us": 300.0, "ratio": 0.75},
        {"workload": "L2", "mode": "fwd", "question": "fold", "variant": "33 ch, no bias, channels_last",
         "error": "RuntimeError: boom"}]}))
    if info_ok:
        (work / "info.txt").write_text("rim_fast 0.1.0 | torch 2.11.0 | triton 3.6.0\nextension: sm_90\n")
        (work / "info.rc").write_text("0\n")
    else:
        (work / "info.txt").write_text("")
        (work / "info.err").write_text("Traceback (most recent call last):\n  ...\nAttributeError: boom\n")
        (work / "info.rc").write_text("1\n")
    (work / "machine.txt").write_text("machine: NVIDIA H200 (CUDA 13.0) | torch 2.11.0 | rev abc\n")
    (work / "preflight.json").write_text(json.dumps({
        "ok": True, "reason": None, "seconds": 8.5,
        "checks": [{"name": "collect", "ok": True, "fatal": False, "detail": "457 tests marked cuda of 1160"}]}))
    (work / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_one"/>'
        '<testcase classname="tests.test_a" name="test_two"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_a" name="test_three"><skipped message="needs two GPUs"/></testcase>'
        "</testsuite></testsuites>")
    (work / "tests.log").write_text("x" * 5000)
    run = {"kind": "run", "machine": "machine: NVIDIA H200", "settings": {
        "device": "cuda", "T": 10, "cudnn_allow_tf32": True, "matmul_allow_tf32": False, "cudnn_benchmark": False,
        "torch_rim_compiled_mode": "reduce-overhead", "gpu": "NVIDIA H200"},
        "planned": [["L2", "predict", "torch_rim"], ["L2", "predict", "rim_fast"],
                    ["L2", "predict", "rim_fast_compiled"], ["S2", "predict", "torch_rim"]]}
    stats = {"median": 0.05, "iqr": 0.001, "q1": 0.05, "q3": 0.051, "min": 0.049, "max": 0.06, "mean": 0.05,
             "rounds": 20}
    info = {"baseline": "torch_rim", "arch": "Hourglass", "dims": 2, "size": [256, 256], "batch": 32, "channels": 1,
            "T": 10, "check_ok": True, "check_err": {"predict": 1e-7}, "check_tol": {"predict": 1e-5},
            "memory_bytes": 2 ** 30, "first_call_s": 0.5, "kernels_per_step": 74.0}
    records = [run, {"workload": "L2", "mode": "predict", "provider": "torch_rim", "status": "ok", "stats": stats,
                     "info": dict(info, flop=4.1e12)},
               {"workload": "L2", "mode": "predict", "provider": "rim_fast", "status": "ok",
                "stats": dict(stats, median=0.025), "info": dict(info, kernels_per_step=40.0)},
               {"workload": "L2", "mode": "predict", "provider": "rim_fast_compiled", "status": "interrupted",
                "reason": "cut by the time box (SIGINT)"}]
    (work / "bench" / "status.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (work / "prewarm" / "prewarm.jsonl").write_text(json.dumps(
        {"job": "compile", "workload": "L2", "mode": "predict", "provider": "rim_fast_compiled", "status": "ok",
         "seconds": 61.0}) + "\n")
    (work / "refs" / "L2-predict.pt").write_bytes(b"\0" * 1000)
    return work


def test_report_of_a_cut_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_report, "MAX_LOG", 1000)
    work = _work_folder(tmp_path)
    out = tmp_path / "out"
    gpu_report.write(str(work), str(out), mode="full", budget=420, elapsed=405)
    files = set(os.listdir(out))
    assert files <= OUT_FILES and len(files) <= 8, files
    md = (out / "report.md").read_text()
    assert md.startswith("rim_fast 0.1.0 | torch 2.11.0 | triton 3.6.0\nextension: sm_90\n"
                         "machine: NVIDIA H200 (CUDA 13.0) | torch 2.11.0 | rev abc\n")
    assert "| tests | 150 | 150 | 124 | cut by its time box (SIGINT): what finished is reported |" in md
    assert "| bench | 160 | 160 | 124 | cut by its time box" in md
    assert "| build | 120 | 71 | 0 | ok |" in md
    assert "1 passed, 1 failed, 1 skipped (of 3 run)." in md and "FAILED tests.test_a::test_two" in md
    assert "| L2 | predict | rim_fast | 25.00 |" in md and "2.00x" in md
    assert "| L2 | predict | rim_fast_compiled | - |" in md and "interrupted" in md
    assert "| S2 | predict | torch_rim | - |" in md and "not reached" in md
    assert "TF32: cuDNN on, matmul off" in md and "cudnn.benchmark off" in md
    # the goals on its medians: L2 predict 25 ms against 4.1 TFLOP at the H200's 494.7 TFLOP/s (8.29 ms)
    assert "## Goals on the GPU" in md
    assert "| predict within 2x of its TF32 roofline | L2 | predict | rim_fast | 3.02x (25.00 ms;" in md
    assert "| <= 2x the roofline | **not met** |" in md
    assert "| S2 | predict | rim_fast | - | >= 5x | not measured: not run |" in md
    report = json.loads((out / "report.json").read_text())
    assert [g["met"] for g in report["bench"]["goals"] if g["workload"] == "L2"] == [False, None]
    assert report["exit_codes"] == {"preflight": 0, "build": 0, "tests": 124, "conv_ab": 0, "bench": 124,
                                    "bench_compiled": 124}
    assert "## Convolution A/B" in md and "| L2 | fwd | fold | 32 ch + bias, channels_last | 300.0 | 0.75 |" in md
    assert "| L2 | fwd | fold | 33 ch, no bias, channels_last | - | RuntimeError: boom |" in md
    assert "## End to end, compiled" in md and md.count("No results (the stage did not run") == 1
    assert report["elapsed_s"] == 405 and report["budget_s"] == 420
    with tarfile.open(out / "logs.tgz") as tar:
        names = tar.getnames()
        assert "logs/stages.tsv" in names and "logs/bench/status.jsonl" in names
        assert not any(n.endswith(".pt") for n in names)
        assert tar.getmember("logs/tests.log").size == 1000  # a big log travels as its tail
    assert (out / "logs.tgz").stat().st_size < 16 * 2 ** 20


def test_report_of_unreadable_results_still_brings_the_rest(tmp_path):
    work = _work_folder(tmp_path)
    with open(work / "bench" / "status.jsonl", "a") as f:
        f.write('{"workload": "S1", "status": "ok", "stats": \n')  # a line cut in the middle of its write
    out = tmp_path / "out"
    facts = gpu_report.write(str(work), str(out), mode="full", budget=420, elapsed=405)
    md = (out / "report.md").read_text()
    assert "**The results could not be read**" in md and "1 passed, 1 failed, 1 skipped" in md
    assert "bench_error" in facts and (out / "logs.tgz").exists()
    with tarfile.open(out / "logs.tgz") as tar:
        assert "logs/bench/status.jsonl" in tar.getnames()


def test_a_collection_out_of_time_says_so():
    """The preflight makes a collection that ran out of time a note (a cold disk), other failures fatal: it tells
    them apart by this wording."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ok, detail = gpu_preflight._collect_result(proc, 1.0)
    assert not ok and "did not finish" in detail


def test_report_gives_the_info_error_line(tmp_path):
    work = _work_folder(tmp_path, info_ok=False)
    os.remove(work / "preflight.json")
    (work / "preflight.log").write_text("preflight torch: ok\n")
    out = tmp_path / "out"
    gpu_report.write(str(work), str(out), mode="dry")
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0] == "python -m rim_fast.info failed (exit 1): AttributeError: boom"
    assert lines[1].startswith("machine: NVIDIA H200")
    assert any("**Preflight FAILED**: the preflight wrote no result" in line for line in lines)


def test_gpu_marker_selects_the_gpu_tests():
    """-m cuda keeps exactly the tests conftest's _runs_on_the_gpu names (the marker is applied before pytest
    deselects by marker); on the CPU, those of test_compile.py are its requires_cuda tests."""
    def collect(*args):
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_compile.py", "--collect-only", "-q",
                               "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode in (0, 5), proc.stdout[-2000:]
        return {line for line in proc.stdout.splitlines() if "::" in line}
    everything, cuda = collect(), collect("-m", "cuda")
    expected = {n for n in everything if "cuda" in n.split("::")[-1].lower()}
    assert expected and cuda == expected
