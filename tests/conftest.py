import os
import random

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
if os.environ.get("RIM_FAST_NO_INTERPRET") != "1":
    try:
        import torch as _torch
        if not _torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

import numpy as np
import pytest
import torch

# One dtype -> (rtol, atol) table for kernel-vs-reference comparisons.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


#: The error budget of every non-reference implementation (each op alone, and a whole RIM forward and backward):
#: its error against a float64 run of the reference is at most BUDGET_FACTOR times the reference's own error in
#: the same precision, plus BUDGET_SLACK[dtype]; errors are relative to the largest magnitude of the exact tensor.
BUDGET_FACTOR = 2.0
BUDGET_SLACK = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
}


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """max |actual - exact| / max |exact| (absolute where the exact tensor is all zero)."""
    diff = (actual.double() - exact.double()).abs().max().item()
    scale = exact.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def budget_errors(fast, reference, exact, dtype, names=None) -> list:
    """For tensors computed in ``dtype`` by an implementation under test (``fast``) and by the reference, and in
    float64 by the reference (``exact``): [(name, fast error, reference error, allowed)] of those over budget.
    The three sequences must have the same length."""
    fast, reference, exact = list(fast), list(reference), list(exact)
    assert len(fast) == len(reference) == len(exact), (len(fast), len(reference), len(exact))
    names = list(names) if names is not None else [str(i) for i in range(len(exact))]
    assert len(names) == len(exact)
    over = []
    for name, a, r, e in zip(names, fast, reference, exact):
        e_fast, e_ref = relative_error(a, e), relative_error(r, e)
        allowed = BUDGET_FACTOR * e_ref + BUDGET_SLACK[dtype]
        if not e_fast <= allowed:
            over.append((name, e_fast, e_ref, allowed))
    return over


def errors_over_draws(draws, dtype, names=None) -> list:
    """For several draws of weights and data, ``draws`` = [(fast, reference, exact)] each as ``budget_errors``
    takes them: [(name, fast error, reference error, allowed)] for every tensor, each error the root mean square
    over the draws. For a whole RIM's gradients (tests/test_error_budget.py): there one draw's error is a sum of
    roundings through T steps of backward, and where the largest element is a small sum of larger terms (a bias
    gradient) it swings by several times from draw to draw, for the reference summed in another order too
    (bench/error_budget.py --seeds); the mean over draws is the error a path makes, one draw's a sample of it."""
    draws = [tuple(map(list, d)) for d in draws]
    n = len(draws[0][2])
    assert all(len(f) == len(r) == len(e) == n for f, r, e in draws)
    names = list(names) if names is not None else [str(i) for i in range(n)]

    def rms(errors):
        return (sum(x * x for x in errors) / len(errors)) ** 0.5

    rows = []
    for j, name in enumerate(names):
        e_fast = rms([relative_error(f[j], e[j]) for f, _, e in draws])
        e_ref = rms([relative_error(r[j], e[j]) for _, r, e in draws])
        rows.append((name, e_fast, e_ref, BUDGET_FACTOR * e_ref + BUDGET_SLACK[dtype]))
    return rows


def budget_errors_over_draws(draws, dtype, names=None) -> list:
    """``errors_over_draws``' rows over budget."""
    return [row for row in errors_over_draws(draws, dtype, names) if not row[1] <= row[3]]


def _budget_message(over, dtype, what) -> str:
    return f"{what} over the error budget: " + "; ".join(
        f"{n}: {f:.3g} > {BUDGET_FACTOR:g} x {r:.3g} + {BUDGET_SLACK[dtype]:g}" for n, f, r, _ in over)


def assert_error_budget_over_draws(draws, dtype, names=None, what=""):
    """``budget_errors_over_draws`` is empty."""
    over = budget_errors_over_draws(draws, dtype, names)
    assert not over, _budget_message(over, dtype, what + f" (rms over {len(draws)} draws)")


def assert_error_budget(fast, reference, exact, dtype, names=None, what=""):
    """``budget_errors`` is empty: every tensor of ``fast`` within budget (see BUDGET_FACTOR)."""
    over = budget_errors(fast, reference, exact, dtype, names)
    assert not over, _budget_message(over, dtype, what)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpu"] + (["cuda"] if CUDA else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def no_tf32():
    """Every test compares float32 results with float32 references (or with the CPU, which has no TF32): fp32
    convolutions and matmuls on CUDA run without TF32 (cuDNN's default is TF32), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """One intra-op thread, for tests that train: with torch_rim imported (scipy's OpenBLAS and OpenMP runtime
    loaded beside torch's), small CPU trainings on two threads run up to 20x slower on a busy 2-core machine; and
    numbers measured for one thread stay reproducible (another thread count sums in another order, which a few
    hundred training steps amplify)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_FAKE_CUDA_PROBE = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    x = torch.empty(2, 8, 5, 6, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.empty(4, 8, 3, 3, device="cuda", requires_grad=True)
    torch.tanh(torch.nn.functional.conv2d(x, w, padding=1))
"""


@pytest.fixture(scope="session")
def fake_cuda():
    """Skips a test whose decisions run on fake CUDA tensors where this torch cannot make them without a GPU
    driver (torch 2.6: 'CUDA driver version is insufficient', or a crash): probed once, in a subprocess."""
    if not CUDA:
        import subprocess
        import sys
        probe = subprocess.run([sys.executable, "-c", _FAKE_CUDA_PROBE], capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            lines = (probe.stderr.strip() or f"exit code {probe.returncode}").splitlines()
            error = next((line for line in lines if "Error" in line.split(":")[0]), lines[-1])
            pytest.skip(f"this torch cannot run fake CUDA convolutions without a GPU ({error[:160]})")


def _runs_on_the_gpu(item) -> bool:
    """A test that exercises CUDA here: a CUDA-only test, a cuda parametrisation, or the Triton kernel files (their
    tests run on CUDA wherever a GPU is visible)."""
    marker = item.get_closest_marker("skipif")
    return ("cuda" in item.nodeid.lower() or item.nodeid.startswith(("tests/test_gru_gates.py",
                                                                      "tests/test_bias_tanh.py"))
            or (marker is not None and marker.kwargs.get("reason") == requires_cuda.kwargs["reason"]))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: the test exercises CUDA where a GPU is visible (applied by conftest from _runs_on_the_gpu; "
                   "bench/gpu_check.sh runs `pytest -m cuda` on the GPU machine, CI runs the whole suite)")


# tryfirst: the markers must be on the items before pytest's own hook deselects by `-m`
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_on_the_gpu(item):
            item.add_marker(pytest.mark.cuda)
    # On a GPU machine the CUDA tests go first (stable order otherwise), so that a cut of a time-boxed whole-suite
    # run leaves out CPU tests, which CI runs anyway. RIM_FAST_GPU_FIRST=1 forces the order.
    if CUDA or os.environ.get("RIM_FAST_GPU_FIRST") == "1":
        items.sort(key=lambda item: not _runs_on_the_gpu(item))
