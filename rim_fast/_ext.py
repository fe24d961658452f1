"""Loads the compiled extension ``rim_fast._C`` once, and says on which GPUs its CUDA kernels can run.

Importing ``rim_fast._C`` registers its CPU (and, in a CUDA build, CUDA) kernels with the PyTorch dispatcher
for the ``rim_fast::`` ops defined in ``rim_fast.ops._cpp``; it has no Python functions. When it is
missing or cannot be loaded, rim_fast still imports: it warns once and the ops run their PyTorch references.
``RIM_FAST_NO_EXT=1`` skips loading it (and building it, in setup.py) without a warning.

A CUDA build records what it was built for: ``CUDA_VERSION`` ("13.0") and ``CUDA_ARCHS`` ("sm_80,...,compute_90";
``sm_XY`` a GPU image, ``compute_XY`` PTX). ``cuda_problem(device)`` decides from them, and from the device's
compute capability, whether the CUDA kernels can run on a GPU; when they cannot, the update-step ops take
their references there, with one warning per device.

Build it in place with ``CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace``
(or ``pip install --no-build-isolation -e .``; setup.py documents the arch list).
"""
from __future__ import annotations

import importlib
import os
import re
import warnings
from types import ModuleType
from typing import Optional, Sequence

import torch

_module: Optional[ModuleType] = None
_error: Optional[str] = None


def _load() -> None:
    global _module, _error
    if os.environ.get("RIM_FAST_NO_EXT") == "1":
        _error = "rim_fast._C not loaded (RIM_FAST_NO_EXT=1)"
        return
    try:
        _module = importlib.import_module("rim_fast._C")
    except (ImportError, OSError) as exc:
        _error = (f"rim_fast._C could not be loaded ({type(exc).__name__}: {exc}); build it with "
                  f"`python setup.py build_ext --inplace` (see setup.py)")
        # setup.py leaves a note when the package was installed without the extension (a failed or skipped build)
        note = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_BUILD_ERROR.txt")
        if isinstance(exc, ModuleNotFoundError) and os.path.exists(note):
            with open(note) as f:
                _error = f"rim_fast._C was not installed: {f.read().strip()}"
        warnings.warn(f"rim_fast: {_error}. The C++/CUDA update-step kernels are unavailable; rim_fast runs "
                      f"their PyTorch references instead.", RuntimeWarning, stacklevel=2)


def module() -> Optional[ModuleType]:
    """The loaded ``rim_fast._C``, or None."""
    return _module


def missing() -> Optional[str]:
    """None when ``rim_fast._C`` is loaded, else why it is not."""
    return _error


def built_with_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return _module is not None and bool(getattr(_module, "WITH_CUDA", 0))


def cuda_version() -> Optional[str]:
    """The CUDA toolkit the extension's CUDA kernels were compiled with ("13.0"), None without them."""
    return (getattr(_module, "CUDA_VERSION", "") or None) if built_with_cuda() else None


def cuda_archs() -> tuple[str, ...]:
    """What the CUDA kernels were built for: ("sm_80", ..., "compute_90"); empty without them or when unknown
    (an extension built outside setup.py)."""
    if not built_with_cuda():
        return ()
    return tuple(a.strip() for a in str(getattr(_module, "CUDA_ARCHS", "")).split(",") if a.strip())


def describe_archs(archs: Sequence[str]) -> str:
    """'sm_80, sm_90 + PTX compute_90' (or 'an unknown arch list')."""
    images = [a for a in archs if a.startswith("sm_")]
    ptx = [a for a in archs if a.startswith("compute_")]
    text = ", ".join(images) or "no GPU image"
    if ptx:
        text += " + PTX " + ", ".join(ptx)
    return text if archs else "an unknown arch list"


def _arch_number(arch: str) -> Optional[tuple[int, int, str]]:
    """("sm_86") -> (8, 6, ""), ("sm_90a") -> (9, 0, "a"), ("compute_120") -> (12, 0, "")."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", arch)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def archs_run_on(archs: Sequence[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of compute ``capability`` (major, minor).

    A GPU image sm_XY runs on capability X.y for y >= Y (same major; an arch-specific sm_XYa only on X.Y);
    PTX compute_XY is compiled by the driver for any capability >= X.Y."""
    major, minor = capability
    for arch in archs:
        parsed = _arch_number(arch)
        if parsed is None:
            continue
        a_major, a_minor, suffix = parsed
        if arch.startswith("sm_"):
            if a_major == major and (a_minor == minor if suffix else a_minor <= minor):
                return True
        elif (a_major, a_minor) <= (major, minor) and not suffix:
            return True
    return False


def cuda_problem_for(capability: tuple[int, int], archs: Sequence[str], built_cuda: Optional[str],
                     runtime_cuda: Optional[str]) -> Optional[str]:
    """Why CUDA kernels built for ``archs`` with CUDA ``built_cuda`` cannot run on a GPU of ``capability`` under
    a torch built with CUDA ``runtime_cuda``; None when they can (an unknown arch list is assumed to run)."""
    if built_cuda and runtime_cuda and built_cuda.split(".")[0] != runtime_cuda.split(".")[0]:
        return (f"they were compiled with CUDA {built_cuda} but torch runs CUDA {runtime_cuda} (another major "
                f"version)")
    if archs and not archs_run_on(archs, capability):
        return (f"they were built for {describe_archs(archs)}, which has no image or PTX for compute capability "
                f"{capability[0]}.{capability[1]}")
    return None


def device_capability(index: int) -> tuple[int, int]:
    """The compute capability of cuda:index (tests replace this to fake a GPU)."""
    return tuple(torch.cuda.get_device_capability(index))


#: device index -> None (the CUDA kernels run there) or why not; filled on first use, per device
_CUDA_PROBLEMS: dict = {}


def _cuda_problem(index: int) -> Optional[str]:
    if index in _CUDA_PROBLEMS:
        return _CUDA_PROBLEMS[index]
    if not built_with_cuda():
        problem = missing() or "rim_fast._C was built without its CUDA kernels (CPU only)"
        warn = _module is not None  # a missing extension was reported once, at import
    else:
        capability = device_capability(index)
        problem = cuda_problem_for(capability, cuda_archs(), cuda_version(), torch.version.cuda)
        warn = problem is not None
        if problem is not None:
            problem = f"cuda:{index} (compute capability {capability[0]}.{capability[1]}): {problem}"
    _CUDA_PROBLEMS[index] = problem
    if warn:
        warnings.warn(f"rim_fast: the C++/CUDA update-step kernels cannot run on {problem}; the update-step ops run "
                      f"their PyTorch references on this GPU. Rebuild rim_fast._C for it (TORCH_CUDA_ARCH_LIST, "
                      f"see setup.py) or run `python -m rim_fast.info`.", RuntimeWarning, stacklevel=4)
    return problem


# torch.compile runs it once at trace time and keeps the answer as a constant (no capability query in the graph)
@torch.compiler.assume_constant_result
def cuda_problem(index: int) -> Optional[str]:
    """None when the extension's CUDA kernels can run on cuda:index, else why not (warns once per device)."""
    return _cuda_problem(index)


_load()
