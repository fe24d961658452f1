"""pytest configuration of the benchmarks: the machine line (bench.common.machine_line) printed first and
stored in the JSON's machine_info, so a report names the machine its numbers came from."""
from bench.common import machine_line


def pytest_report_header(config):
    return machine_line()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rim_fast_machine_line"] = machine_line()
