"""Backend choice and call tracing for every rim_fast op (the op families build on ``Op`` and ``Impl``).

One switch, ``RIM_FAST_BACKEND=auto|reference|kernels``, read once at import:

- ``reference``: the pure-PyTorch reference of every op (the spec, and the CPU fallback);
- ``kernels``: the compiled implementation (Triton or the C++/CUDA extension) of every op that has one.
  An op that has kernels but none usable for the tensors at hand raises, with each kernel's reason (under
  torch.compile too); an op that has no kernel at all (plain convolutions) runs its reference, or a plain-PyTorch
  variant (``kernel=False``) where it can;
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
#: every op by name (the op families create them; ``python -m rim_fast.info`` and the tests look them up)
OPS: dict = {}
_TRACES: list = []
_WARNED: set = set()


_GRAPH_REGION = [0]
_EXPORT_REGION = [0]


@contextlib.contextmanager
def _region(depth: list) -> Iterator[None]:
    # a nesting counter that a region's calls read (plain list operations: torch.compile traces them)
    depth[0] += 1
    try:
        yield
    finally:
        depth[0] -= 1


def graph_region():
    """Calls recorded into a CUDA graph, and their warm-up: ``auto`` picks what it picks under capture (the
    kernels whose launch cost a graph removes) in the warm-up too, so that nothing is first run (and compiled)
    inside the capture."""
    return _region(_GRAPH_REGION)


def in_graph_region() -> bool:
    """Whether a call is being recorded into a CUDA graph (or warmed up for it)."""
    return _GRAPH_REGION[0] > 0 or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def export_region():
    """Calls traced by ``RIM.export`` (torch.export): ops pick what a saved program can hold (no private oneDNN
    op, whose arguments torch.export cannot serialize)."""
    return _region(_EXPORT_REGION)


#: whether torch.export sets ``torch.compiler._is_exporting_flag`` around all its tracing: from torch 2.8 on (2.7's
#: strict export traces through Dynamo without it); read in the released wheels
_EXPORT_SETS_FLAG = hasattr(torch.compiler, "_is_exporting_flag") and torch.__version__ >= "2.8"


def exporting() -> bool:
    """Whether torch.export traces the call: ``RIM.export``, or torch.export itself where torch says so.

    From torch 2.8 on torch's flag is read directly, not through ``torch.compiler.is_exporting()``: Dynamo replaces a
    call of that function by a constant True while it traces for torch.compile too (torch 2.7 to 2.11;
    pytorch#176347, fixed in 2.12), which would take under ``torch.compile`` what a saved program needs instead of
    what is fast. The flag is a module global that torch.export sets around its tracing, strict or not, and that
    Dynamo reads as a value. On torch 2.7 the call stays (its strict export does not set the flag): a compiled RIM
    there takes export's choices."""
    if _EXPORT_REGION[0]:
        return True
    if _EXPORT_SETS_FLAG:
        return bool(torch.compiler._is_exporting_flag)
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) runs the call eagerly. rim_fast's kernels and fused
    primitives have no batching rules, and their registered derivatives no functorch support: the references serve
    such calls. (Under torch.compile, which traces torch.func transforms itself, False.)"""
    return _FUNCTORCH_ACTIVE is not None and not torch.compiler.is_compiling() and bool(_FUNCTORCH_ACTIVE())


def needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on these arguments (grad mode on, a tensor among them requiring grad);
    non-tensors and None are ignored."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


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
    ``missing()`` returns None when the implementation is installed, else why it is not;
    ``why_not(*args)``, optional, why it cannot run these arguments (errors and ``python -m rim_fast.info``).
    ``kernel=False`` marks a plain-PyTorch variant (e.g. another memory layout): ``RIM_FAST_BACKEND=kernels``
    uses it where it can, but never raises for it. ``devices``, optional, the device types it is written for
    (the C++ tanh: the CPU, CUDA's own being one fast pass): elsewhere ``kernels`` does not count it as a kernel
    that should have run. ``auto_implies_usable``: ``auto`` is only true where ``usable`` is (and nothing is
    missing), so ``auto`` need not ask ``usable`` again (a few us of host time per call on every op call)."""

    def __init__(self, name: str, fn: Callable, usable: Callable[..., bool],
                 auto: Callable[..., bool], missing: Callable[[], Optional[str]] = lambda: None,
                 kernel: bool = True, why_not: Optional[Callable[..., Optional[str]]] = None,
                 devices: Optional[tuple] = None, auto_implies_usable: bool = False):
        self.name, self.fn, self.usable, self.auto, self.missing = name, fn, usable, auto, missing
        self.kernel, self._why_not, self.devices = kernel, why_not, devices
        self.auto_implies_usable = auto_implies_usable

    def why_not(self, *args) -> str:
        """Why it cannot run these arguments (call when ``missing()`` or ``usable(*args)`` says it cannot)."""
        reason = self.missing() or (self._why_not(*args) if self._why_not is not None else None)
        return reason or "cannot run these inputs"


class Op:
    """An op: a reference plus zero or more other implementations, chosen per call. The op families
    (``conv``, ``gru_gates``, ``update_step``) wrap theirs in typed public functions."""

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.reference = reference
        self.impls: list[Impl] = []
        OPS[name] = self

    def register(self, impl: Impl) -> Impl:
        self.impls.append(impl)
        return impl

    def impl(self, name: str) -> Impl:
        """The registered implementation called ``name``."""
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(f"op '{self.name}' has no implementation '{name}' ({[i.name for i in self.impls]})")

    def _choose(self, args) -> tuple[str, Callable]:
        if _BACKEND == "reference" or not self.impls:
            return "reference", self.reference
        if _BACKEND == "kernels":
            reasons = []
            device = None  # the first tensor's (a plain loop: torch 2.6's Dynamo cannot trace next() on a generator)
            for a in args:
                if isinstance(a, torch.Tensor):
                    device = a.device.type
                    break
            for impl in self.impls:
                if impl.missing() is None and impl.usable(*args):
                    return impl.name, impl.fn
                if impl.kernel and (impl.devices is None or device in impl.devices):
                    reasons.append(f"{impl.name}: {impl.why_not(*args)}")
            if not reasons:
                return "reference", self.reference
            raise RuntimeError(
                f"RIM_FAST_BACKEND=kernels, but no kernel of op '{self.name}' can run here "
                f"({'; '.join(reasons)}). Build the extension / install Triton, set TRITON_INTERPRET=1 for "
                f"eager CPU tensors, or use RIM_FAST_BACKEND=auto.")
        for impl in self.impls:
            if impl.auto(*args):
                if impl.auto_implies_usable or (impl.missing() is None and impl.usable(*args)):
                    return impl.name, impl.fn
                if self.name not in _WARNED:
                    _WARNED.add(self.name)
                    warnings.warn(f"rim_fast: op '{self.name}' falls back from '{impl.name}' to the reference "
                                  f"({impl.why_not(*args)})", RuntimeWarning, stacklevel=4)
        return "reference", self.reference

    def __call__(self, *args):
        impl_name, fn = self._choose(args)
        _record(self.name, impl_name)
        return fn(*args)
