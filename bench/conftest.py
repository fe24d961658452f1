"""pytest configuration of the benchmarks: the machine line (bench.common.machine_line) printed first; for
pytest-benchmark's files (bench_gru_gates, bench_update_step) stored in the JSON's machine_info; for
bench_rim.py the first line of its results file: the machine, the settings and the planned cases in order."""
import pytest

from bench.common import machine_line


def pytest_report_header(config):
    return machine_line()


# optional: pytest-benchmark may be absent (the GPU machine); bench_rim.py does not need it
@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rim_fast_machine_line"] = machine_line()


def pytest_collection_finish(session):
    planned = [tuple(item.callspec.params[k] for k in ("workload", "mode", "provider"))
               for item in session.items
               if item.originalname == "test_rim" and hasattr(item, "callspec")]
    if planned:
        from bench import bench_rim
        bench_rim.log_run(planned)
