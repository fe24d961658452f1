"""Tensors derived from parameters alone (merged or rewritten convolution weights), built once per RIM call.

A layer asks ``derived(owner, key, build)``; inside ``per_call_cache()`` (the RIM enters it around its T-step loop:
eager, recorded into a CUDA graph, or traced by torch.compile) it gets ``build()`` computed once per call, not once
per step: autograd sums the T steps' gradients into the one tensor, so backward also splits or contracts it once.
The grad mode is part of the key: a tensor built without autograd never feeds a training step. Outside the context
every call builds. Under torch.compile the cache lives while the loop is traced: the compiled graph computes each
derived tensor once (Inductor does not merge the T copies of an inference graph by itself).

Nothing is cached across calls: a parameter changed through ``.data`` (``torch_ema``'s ``copy_to`` does so) keeps
its version counter and storage, so no cheap key could tell a stale tensor from a good one.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Hashable, Iterator

import torch

_CALL_CACHES: list = []


@contextlib.contextmanager
def per_call_cache() -> Iterator[None]:
    """Within one call of a recurrent loop (the RIM's T steps), each ``derived`` tensor is built once."""
    push()
    try:
        yield
    finally:
        pop()


def push() -> None:
    """Open a cache (``per_call_cache`` without ``contextlib``, for code that torch.compile traces: plain list
    operations, which every supported torch's Dynamo follows). Close it with ``pop`` in a ``finally``."""
    _CALL_CACHES.append({})


def pop() -> None:
    _CALL_CACHES.pop()


def active() -> bool:
    """Whether a per-call cache is open (a ``derived`` tensor is built once for the call, not once per use)."""
    return len(_CALL_CACHES) > 0  # not bool(list): torch 2.6's dynamo cannot trace it


def derived(owner: object, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, a tensor computed from ``owner`` (a module's parameters, or a tensor) alone, once per call (see
    the module docstring). The cache holds ``owner`` for the call, so that its ``id`` cannot be reused."""
    if not _CALL_CACHES:
        return build()
    cache = _CALL_CACHES[-1]
    full_key = (id(owner), key, torch.is_grad_enabled())
    if full_key not in cache:
        cache[full_key] = (owner, build())
    return cache[full_key][1]


def conv_weight(owner: object, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``derived`` for a convolution's weight. Under torch.compile the weight is a copy of the graph's own, -(-w)
    (exact for every value; Inductor removes a clone or a * 1 as a no-op): Inductor lays it out once per call as
    the convolutions want it (channels-last where it picks that layout), where a parameter (a graph input) or a
    concatenation (a fixed layout) would be converted again before every step's convolution. Not in a program
    that torch.export traces (no layout to fix there)."""
    from ..ops._dispatch import exporting
    if torch.compiler.is_compiling() and not exporting():
        return derived(owner, key, lambda: -(-build()))
    return derived(owner, key, build)
