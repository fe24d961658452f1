"""The extension's build record and the GPU-portability rule: what rim_fast._C was built for (CUDA version, arch
list), the same list read from the binary itself, and the dispatch decision on a GPU it cannot run on (faked
here: fake CUDA tensors and a faked compute capability) taking the references with one warning, never a crash."""
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rim_fast
from rim_fast import _ext, info, ops
from rim_fast.ops import _cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cuda_ext():
    module = _ext.module()
    if module is None or not module.WITH_CUDA:
        pytest.skip("rim_fast._C was built without its CUDA kernels (no nvcc matching torch's CUDA)")
    return module


def _cuobjdump():
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        bundled = None
    for candidate in (bundled, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("no cuobjdump (Triton's package or the CUDA toolkit) to read the extension's GPU code")


# ---- the build record ---------------------------------------------------------------------------------------

def test_build_record_is_readable(cuda_ext):
    assert re.fullmatch(r"\d+\.\d+", cuda_ext.CUDA_VERSION)
    assert cuda_ext.CUDA_VERSION.split(".")[0] == torch.version.cuda.split(".")[0]
    assert cuda_ext.TORCH_VERSION == ".".join(torch.__version__.split(".")[:2])
    archs = _ext.cuda_archs()
    assert archs and all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", a) for a in archs)
    assert _ext.cuda_version() == cuda_ext.CUDA_VERSION


def test_build_record_matches_the_binary(cuda_ext):
    """The arch list the module reports is the GPU code the .so holds: images (ELF) and PTX."""
    tool = _cuobjdump()
    so = cuda_ext.__file__
    elf = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, timeout=120).stdout
    ptx = subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True, timeout=120).stdout
    images = {f"sm_{n}" for n in re.findall(r"\.sm_(\d+a?)\.", elf)}
    ptxs = {f"compute_{n}" for n in re.findall(r"\.sm_(\d+a?)\.", ptx)}
    assert images | ptxs == set(_ext.cuda_archs()), (elf, ptx)


def test_default_build_covers_ampere_to_hopper_with_ptx(cuda_ext):
    """With no GPU visible and TORCH_CUDA_ARCH_LIST unset (CI, a login node), setup.py builds for A100, A10/RTX 30,
    L4/L40/RTX 40 and H100/H200, and PTX for newer GPUs."""
    if torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("the build followed the visible GPUs or TORCH_CUDA_ARCH_LIST, not the default")
    assert set(_ext.cuda_archs()) == {"sm_80", "sm_86", "sm_89", "sm_90", "compute_90"}


# ---- the rule -----------------------------------------------------------------------------------------------

DEFAULT = ("sm_80", "sm_86", "sm_89", "sm_90", "compute_90")


@pytest.mark.parametrize("archs,capability,runs", [
    (DEFAULT, (8, 0), True),      # A100
    (DEFAULT, (8, 6), True),      # A10, RTX 3090
    (DEFAULT, (8, 7), True),      # Jetson Orin: sm_86's image runs on 8.7
    (DEFAULT, (8, 9), True),      # L4, L40, RTX 4090
    (DEFAULT, (9, 0), True),      # H100, H200
    (DEFAULT, (10, 0), True),     # B200: compute_90 PTX, compiled by the driver
    (DEFAULT, (12, 0), True),     # RTX 5090: the same PTX
    (DEFAULT, (7, 5), False),     # T4: older than anything built
    (DEFAULT, (7, 0), False),     # V100
    (("sm_90",), (8, 0), False),  # yesterday's Hopper-only build on an A100
    (("sm_90",), (10, 0), False),  # no PTX: nothing for Blackwell
    (("sm_80",), (9, 0), False),  # an image runs within its major only
    (("sm_90a",), (9, 0), True),  # arch-specific image: exactly 9.0
    (("sm_90a",), (9, 1), False),
    (("compute_80",), (8, 0), True),
    (("compute_80",), (7, 5), False),
], ids=lambda v: ",".join(v) if isinstance(v, tuple) and isinstance(v[0], str) else str(v))
def test_archs_run_on(archs, capability, runs):
    assert _ext.archs_run_on(archs, capability) is runs


def test_problem_names_capability_archs_and_cuda_major():
    problem = _ext.cuda_problem_for((7, 5), ("sm_90",), "13.0", "13.0")
    assert "7.5" in problem and "sm_90" in problem
    assert _ext.cuda_problem_for((9, 0), ("sm_90",), "13.0", "13.2") is None
    problem = _ext.cuda_problem_for((9, 0), ("sm_90",), "13.0", "12.8")
    assert "13.0" in problem and "12.8" in problem
    assert _ext.cuda_problem_for((9, 0), (), "13.0", "13.0") is None  # unknown list: trusted, as before


# ---- the dispatch decision on a faked GPU ---------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """Set the faked compute capability of cuda:0; decisions made before are forgotten."""
    def set_capability(capability, cuda_version=None):
        monkeypatch.setattr(_ext, "device_capability", lambda index: capability)
        monkeypatch.setattr(_ext, "_CUDA_PROBLEMS", {})
        if cuda_version is not None:
            monkeypatch.setattr(torch.version, "cuda", cuda_version)
    return set_capability


def _update_twice_on_fake_cuda():
    """Two eager calls of the fused update step (auto would use the extension's kernel) on fake CUDA tensors;
    returns the (op, implementation) counts and the RuntimeWarnings."""
    with warnings.catch_warnings(record=True) as caught, ops.trace() as calls:
        warnings.simplefilter("always")
        with FakeTensorMode():
            x, g, x_true = (torch.empty(4, 1, 8, 8, device="cuda") for _ in range(3))
            for _ in range(2):
                x_new, loss = ops.update_state(x, g, x_true)
                assert x_new.device.type == "cuda" and loss.shape == ()
    return dict(calls), [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_gpu_the_build_covers_runs_the_kernels(cuda_ext, fake_gpu):
    fake_gpu((8, 6))
    calls, caught = _update_twice_on_fake_cuda()
    assert calls == {("update_state", "cpp"): 2}
    assert not caught


@pytest.mark.parametrize("capability,cuda_version,expected", [
    ((7, 5), None, "compute capability 7.5"),
    ((9, 0), "12.8", "torch runs CUDA 12.8"),
], ids=["capability-outside-the-build", "another-cuda-major"])
def test_a_gpu_the_build_cannot_run_takes_the_reference_with_one_warning(cuda_ext, fake_gpu, capability,
                                                                       cuda_version, expected):
    fake_gpu(capability, cuda_version)
    calls, caught = _update_twice_on_fake_cuda()
    assert calls == {("update_state", "reference"): 2}
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert expected in message and "cuda:0" in message
    if cuda_version is None:
        assert _ext.describe_archs(_ext.cuda_archs()) in message


def test_kernels_backend_raises_on_a_gpu_the_build_cannot_run(cuda_ext, fake_gpu):
    fake_gpu((7, 5))
    with FakeTensorMode(), ops.use_backend("kernels"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, g, x_true = (torch.empty(4, 1, 8, 8, device="cuda") for _ in range(3))
        with pytest.raises(RuntimeError, match="no kernel of op 'update_state' can run"):
            ops.update_state(x, g, x_true)


def test_a_cpu_only_build_on_a_gpu_warns_once(monkeypatch, fake_gpu):
    if _ext.module() is None:
        pytest.skip("rim_fast._C is not loaded")
    fake_gpu((9, 0))
    monkeypatch.setattr(_ext, "built_with_cuda", lambda: False)
    calls, caught = _update_twice_on_fake_cuda()
    assert calls == {("update_state", "reference"): 2}
    assert len(caught) == 1 and "without its CUDA kernels" in str(caught[0].message)


def test_the_decision_is_a_constant_under_torch_compile(cuda_ext, fake_gpu):
    """cuda_problem is read at trace time (no capability query in the graph, no graph break)."""
    fake_gpu((7, 5))

    def decide(x):
        return x + (1.0 if _cpp.runs_on(torch.device("cuda", 0)) else 2.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(decide, fullgraph=True, backend="eager")(torch.zeros(2))
    assert torch.equal(out, torch.full((2,), 2.0))


# ---- python -m rim_fast.info ----------------------------------------------------------------------------------

def test_info_reports_the_build_and_the_choices():
    facts = info.collect()
    assert facts["rim_fast"]["version"] == rim_fast.__version__
    assert facts["torch"]["version"] == torch.__version__
    ext = facts["extension"]
    assert ext["cpu_kernels"] == (_ext.module() is not None)
    assert ext["cuda_archs"] == list(_ext.cuda_archs())
    rows = {(r["op"], r["device"]): r for r in facts["ops"]}
    # every public op, with what auto runs on the CPU and a reason for every other implementation
    assert {op for op, _ in rows} == {"conv", "conv_same", "conv_transpose", "tanh", "conv_tanh",
                                      "conv_transpose_tanh", "bias_tanh", "upfirdn",
                                      "gru_gates_zr", "gru_gates_h", "gru_gates_zero_state", "preprocess_score",
                                      "update_state"}
    from rim_fast.ops._dispatch import OPS
    assert {op for op, _ in rows} == set(OPS)  # a new op is listed too
    assert rows[("update_state", "cpu")]["auto"] == ("cpp" if _ext.module() is not None else "reference")
    from rim_fast.ops import _cpp
    cpp_tanh = _ext.module() is not None and not _cpp.MKL_TANH_FASTER  # float32 sample: MKL's tanh where faster
    assert rows[("tanh", "cpu")]["auto"] == ("cpp" if cpp_tanh else "reference")
    assert all(why for r in facts["ops"] for why in r["others"].values())


def test_info_command_prints_versions_build_and_ops():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "rim_fast.info"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"rim_fast {rim_fast.__version__}")
    assert f"torch {torch.__version__}" in text and "RIM_FAST_BACKEND=" in text
    layout = os.environ.get("RIM_FAST_CUDA_LAYOUT", "auto").strip().lower() or "auto"
    assert f"RIM_FAST_CUDA_LAYOUT={layout}" in text
    pool = "on" if _ext.module() is not None else "off"
    assert f"CPU memory pool (eager CPU calls and their backward): {pool}" in text
    env["RIM_FAST_CPU_POOL"] = "0"
    off = subprocess.run([sys.executable, "-m", "rim_fast.info", "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert off.returncode == 0 and '"cpu_pool": false' in off.stdout, off.stderr
    from rim_fast.ops import _cpu
    if _ext.module() is not None and _cpu.WINOGRAD_ISA is not None:
        isa = {"avx512": "AVX-512", "avx2": "AVX2"}[_cpu.WINOGRAD_ISA]
        assert f"CPU Winograd convolutions (3D 3x3x3, stride 1, float32): on, {isa} kernels" in text
        env["ATEN_CPU_CAPABILITY"] = "default"  # torch's capability caps the kernels': off, and why
        capped = subprocess.run([sys.executable, "-m", "rim_fast.info"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        # DEFAULT, or "NO AVX" before torch 2.7
        assert "CPU Winograd convolutions (3D 3x3x3, stride 1, float32): off (torch's CPU capability is " in (
            capped.stdout), capped.stderr
        del env["ATEN_CPU_CAPABILITY"]
    assert "| update_state | cpu |" in text
    if _ext.built_with_cuda():
        assert _ext.describe_archs(_ext.cuda_archs()) in text
    short = subprocess.run([sys.executable, "-m", "rim_fast.info", "--short"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert short.returncode == 0 and len(short.stdout.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cpu_sources_compile_for_the_baseline_only():
    """Where the CPU is not x86-64 (or the compiler has no target attributes), the CPU loops are compiled once, for
    the baseline (csrc/cpu_isa.h): that build is checked here, on x86-64, with -DRIM_FAST_NO_SIMD (syntax and
    warnings; -Werror)."""
    import sysconfig

    from torch.utils import cpp_extension
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    for source in ("tanh.cpp", "shift.cpp", "winograd.cpp", "register.cpp"):
        run = subprocess.run(["c++", "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-fopenmp",
                              "-DRIM_FAST_NO_SIMD", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                              *includes, os.path.join(ROOT, "csrc", source)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{source}:\n{run.stderr[-3000:]}"
