"""Backend choice and call tracing for every rim_fast op.

One switch, ``RIM_FAST_BACKEND=auto|reference|kernels``, read once at import:

- ``reference``: the pure-PyTorch reference of every op (the spec, and the CPU fallback);
- ``kernels``: the compiled implementation (Triton or the C++/CUDA extension) of every op that has one.
  An op that has kernels but none usable for the tensors at hand raises; an op that has no kernel at all
  (plain convolutions) runs its reference;
- ``auto`` (default): the fastest available implementation for the tensor's device and dtype; it never
  raises, and warns once per op when it has to fall back from a kernel it would have used.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "kernels")


def _read_backend() -> str:
    value = os.environ.get("RIM_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RIM_FAST_BACKEND={value!r} is not one of {BACKENDS}")
    return value


_BACKEND = _read_backend()
_TRACES: list = []
_WARNED: set = set()


def backend() -> str:
    """The backend selected by ``RIM_FAST_BACKEND`` (read once, at import)."""
    return _BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend (tests and benchmarks; not thread-safe)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    old, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = old


@contextlib.contextmanager
def trace() -> Iterator[Counter]:
    """Count ``(op name, implementation name)`` for every op call made eagerly inside the block.

    Calls traced by torch.compile are not counted (they run as compiled code)."""
    counter: Counter = Counter()
    _TRACES.append(counter)
    try:
        yield counter
    finally:
        _TRACES.remove(counter)


def _record(op: str, impl: str) -> None:
    # is_compiling() first: reading _TRACES while tracing would make compiled graphs guard on it
    if not torch.compiler.is_compiling() and _TRACES:
        for counter in _TRACES:
            counter[(op, impl)] += 1


class Impl:
    """One implementation of an op.

    ``usable(*args)`` says whether it can run these arguments now (device, dtype, compile state);
    ``auto(*args)`` whether ``auto`` should prefer it over the reference for them;
    ``missing()`` returns None when the implementation is installed, else why it is not.
    ``kernel=False`` marks a plain-PyTorch variant (e.g. another memory layout): ``RIM_FAST_BACKEND=kernels``
    uses it where it can, but never raises for it."""

    def __init__(self, name: str, fn: Callable, usable: Callable[..., bool],
                 auto: Callable[..., bool], missing: Callable[[], Optional[str]] = lambda: None,
                 kernel: bool = True):
        self.name, self.fn, self.usable, self.auto, self.missing = name, fn, usable, auto, missing
        self.kernel = kernel


class Op:
    """A public op: a reference plus zero or more compiled implementations, chosen per call."""

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.reference = reference
        self.impls: list[Impl] = []

    def register(self, impl: Impl) -> Impl:
        self.impls.append(impl)
        return impl

    def _choose(self, args) -> tuple[str, Callable]:
        if _BACKEND == "reference" or not self.impls:
            return "reference", self.reference
        if _BACKEND == "kernels":
            reasons = []
            for impl in self.impls:
                why = impl.missing()
                if why is None and impl.usable(*args):
                    return impl.name, impl.fn
                if impl.kernel:
                    reasons.append(f"{impl.name}: {why or 'cannot run these inputs'}")
            # torch.compile traces CPU tensors with fake tensors that the Triton interpreter cannot run.
            if not reasons or torch.compiler.is_compiling():
                return "reference", self.reference
            raise RuntimeError(
                f"RIM_FAST_BACKEND=kernels, but no kernel of op '{self.name}' can run here "
                f"({'; '.join(reasons)}). Build the extension / install Triton, set TRITON_INTERPRET=1 for "
                f"CPU tensors, or use RIM_FAST_BACKEND=auto.")
        for impl in self.impls:
            if impl.auto(*args):
                if impl.missing() is None and impl.usable(*args):
                    return impl.name, impl.fn
                if self.name not in _WARNED:
                    _WARNED.add(self.name)
                    warnings.warn(f"rim_fast: op '{self.name}' falls back from '{impl.name}' to the reference "
                                  f"({impl.missing() or 'cannot run these inputs'})", RuntimeWarning, stacklevel=3)
        return "reference", self.reference

    def __call__(self, *args):
        impl_name, fn = self._choose(args)
        _record(self.name, impl_name)
        return fn(*args)
