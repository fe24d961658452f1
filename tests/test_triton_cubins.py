"""The Triton kernels (kernels/gru_gates.py, kernels/bias_tanh.py) compile into real cubins for A100 (sm_80) and H100/H200 (sm_90),
without a GPU, at the launch configurations the launchers pick on those GPUs, and no kernel spills registers.

The interpreter tests (test_gru_gates.py) check the math; this checks that the GPU compiler accepts the code. The
compilation runs in a subprocess (tests/triton_aot.py): this process imports Triton under TRITON_INTERPRET=1
(conftest.py), where the kernels are interpreted functions. The spill detector is shown to trip, on canned
cuobjdump / ptxas output and on a real cubin compiled under a register cap."""
import json
import os
import subprocess
import sys

import pytest

import triton_aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "triton_aot.py")
#: compute capability -> SM count the launchers size their grids for (A100: 108, H100/H200 SXM: 132)
ARCHS = {80: 108, 90: 132}
TIMEOUT_S = 900


def _start(arch: int, out_dir: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RIM_FAST_NO_EXT"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, HELPER, "--arch", str(arch), "--sm-count", str(ARCHS[arch]),
                             "--out", os.path.join(out_dir, f"sm{arch}")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def compile_reports(request, tmp_path_factory):
    """arch -> the helper's JSON report; the compilation for an arch starts on first use. Without xdist every
    selected arch starts at once (the processes share the cores); under xdist each worker compiles only its own."""
    out_dir = str(tmp_path_factory.mktemp("cubins"))
    procs, reports = {}, {}
    selected = {item.callspec.params["arch"] for item in request.session.items
                if item.module is request.module and "arch" in getattr(getattr(item, "callspec", None), "params", {})}

    def get(arch):
        if arch not in reports:
            wanted = [arch] if os.environ.get("PYTEST_XDIST_WORKER") else sorted(selected | {arch})
            for a in wanted:
                if a not in procs and a not in reports:
                    procs[a] = _start(a, out_dir)
            proc = procs.pop(arch)
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                pytest.fail(f"compiling for sm_{arch} took over {TIMEOUT_S} s")
            lines = stdout.strip().splitlines()
            try:
                report = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                report = None
            if proc.returncode == triton_aot.SKIP and report and "skip" in report:
                pytest.skip(report["skip"])
            if proc.returncode != 0 or report is None:
                pytest.fail(f"tests/triton_aot.py --arch {arch} exited {proc.returncode}\n"
                            f"stdout (tail): {stdout[-2000:]}\nstderr (tail): {stderr[-6000:]}")
            reports[arch] = report
        return reports[arch]

    yield get
    for proc in procs.values():
        proc.kill()
        proc.communicate()


def _cubin_problems(arch: int, r: dict) -> list:
    if r.get("error"):
        return [f"does not compile: {r['error']}"]
    problems = []
    if not (r["elf_magic"] and r["cubin_bytes"] > 0):
        problems.append(f"the cubin is not an ELF file ({r['cubin_bytes']} bytes)")
    if f"sm_{arch}" not in r["list_elf"]:
        problems.append(f"cuobjdump --list-elf names no sm_{arch}: {r['list_elf']!r}")
    if not r["usage"].get("REG"):
        problems.append(f"no register count for {r['kernel']} in cuobjdump's resource usage: {r['resource_usage']!r}")
    problems += [f"spills: {p}" for p in r["spills"]]
    return problems


@pytest.mark.parametrize("arch", sorted(ARCHS), ids=[f"sm{a}" for a in sorted(ARCHS)])
def test_cubins_compile_without_spills(compile_reports, arch):
    """Every launch the launchers make on the real problems (triton_aot.PROBLEMS, the SM count of the GPU), in
    fp32, fp16, bf16 and bf16 with fp32 biases, compiles into a cubin for the arch with no stack, no local
    memory, and no spill stores or loads; the detector flags the register-capped canary; every kernel of the
    module is compiled, for every dtype variant and (fp32) every problem."""
    report = compile_reports(arch)
    print(triton_aot.summary(report))
    failures = []

    canary = report["canary"]
    if canary.get("error"):
        failures.append(f"{canary['id']}: the canary does not compile: {canary['error']}")
    elif not (canary["spills"] and canary["usage"].get("STACK", 0) > 0 and canary["ptxas"]["spill_stores"]):
        failures.append(f"{canary['id']}: the spill detector misses the canary's spills (usage {canary['usage']}, "
                        f"ptxas {canary['ptxas']}): a 'no spills' verdict would mean nothing")

    results = report["results"]
    compiled = {r["kernel"] for r in results}
    if set(report["module_kernels"]) != set(triton_aot.KERNELS) or compiled != set(triton_aot.KERNELS):
        failures.append(f"kernels of the module {report['module_kernels']}, compiled {sorted(compiled)}, expected "
                        f"{sorted(triton_aot.KERNELS)}: a kernel without a launch here is not checked")
    for kernel in triton_aot.KERNELS:
        mine = [r for r in results if r["kernel"] == kernel]
        # a variant whose launch shares another's specialisation (bias_tanh's backward reads the promoted fp32 output
        # of bf16 activations with fp32 biases) is compiled under the first variant's name
        missing_dtypes = set(triton_aot.DTYPES) - {launch["dtype"] for r in mine for launch in r["launches"]}
        fp32_problems = {launch["problem"] for r in mine if r["dtype"] == "fp32" for launch in r["launches"]}
        missing_problems = {p[0] for p in triton_aot.PROBLEMS} - fp32_problems
        if missing_dtypes or missing_problems:
            failures.append(f"{kernel}: no launch for dtypes {sorted(missing_dtypes)}, fp32 problems "
                            f"{sorted(missing_problems)}")
        # the problem meant to need int64 arguments does
        if not any("i64" in r["signature"].values() for r in mine if r["dtype"] == "fp32"
                   and any(launch["problem"] == "i64" for launch in r["launches"])):
            failures.append(f"{kernel}: the 'i64' problem compiled without an i64 argument")

    for r in results:
        failures += [f"{r['id']}: {p}" for p in _cubin_problems(arch, r)]
    assert not failures, "\n".join(failures)


# ---- the detector on known output (no compilation) ------------------------------------------------------

USAGE_CLEAN = """
Resource usage:
 Common:
  GLOBAL:0
 Function _gru_zr_fwd_kernel:
  REG:50 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
USAGE_SPILLING = """
Resource usage:
 Common:
  GLOBAL:0
 Function _gru_zr_bwd_kernel:
  REG:24 STACK:4008 SHARED:1024 LOCAL:0 CONSTANT[0]:704 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
PTXAS_CLEAN = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_gru_zr_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _gru_zr_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 50 registers, used 0 barriers, 640 bytes cmem[0]
"""
PTXAS_SPILLING = PTXAS_CLEAN.replace("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                                     "4008 bytes stack frame, 6488 bytes spill stores, 6904 bytes spill loads")


def test_spill_detector_on_known_output():
    clean = triton_aot.parse_resource_usage(USAGE_CLEAN)["_gru_zr_fwd_kernel"]
    assert clean["REG"] == 50 and clean["STACK"] == 0 and clean["LOCAL"] == 0
    assert triton_aot.parse_ptxas_log(PTXAS_CLEAN) == {"registers": 50, "stack_frame": 0, "spill_stores": 0,
                                                      "spill_loads": 0}
    assert triton_aot.spill_problems(clean, triton_aot.parse_ptxas_log(PTXAS_CLEAN)) == []

    spilling = triton_aot.parse_resource_usage(USAGE_SPILLING)["_gru_zr_bwd_kernel"]
    assert triton_aot.spill_problems(spilling, triton_aot.parse_ptxas_log(PTXAS_CLEAN)) == ["STACK:4008"]
    assert triton_aot.spill_problems(clean, triton_aot.parse_ptxas_log(PTXAS_SPILLING)) == [
        "6488 bytes spill stores", "6904 bytes spill loads"]
    assert triton_aot.spill_problems({**clean, "LOCAL": 16}, triton_aot.parse_ptxas_log(PTXAS_CLEAN)) == ["LOCAL:16"]
    # nothing read is not a pass
    assert len(triton_aot.spill_problems({}, triton_aot.parse_ptxas_log(""))) == 4
