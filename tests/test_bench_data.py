"""bench/bench_data.py runs (smoke sizes): the machine line first, both loader settings and the two bounds."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_data_smoke(tmp_path):
    env = dict(os.environ, RIM_FAST_BENCH_SMOKE="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_data", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert any(line.startswith("pin_memory: not used") for line in lines)
    assert any(line.startswith("num_workers=0 ") for line in lines)
    assert any(line.startswith("num_workers=2 ") for line in lines)
    assert out.exists()
