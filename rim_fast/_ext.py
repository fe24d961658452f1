"""Loads the compiled extension ``rim_fast._C`` once.

Importing ``rim_fast._C`` registers its CPU (and, in a CUDA build, CUDA) kernels with the PyTorch dispatcher
for the ``rim_fast::`` ops defined in ``rim_fast.ops.cpp_update``; it has no Python functions. When it is
missing or cannot be loaded, rim_fast still imports: it warns once and the ops run their PyTorch references.
``RIM_FAST_NO_EXT=1`` skips loading it (and building it, in setup.py) without a warning.

Build it in place with ``CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace``
(or ``pip install --no-build-isolation -e .``).
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (libtorch must be loaded before the extension's shared library)

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


_load()
