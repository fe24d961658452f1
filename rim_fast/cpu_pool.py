"""A CPU memory pool for a RIM call and the backward pass through its outputs: freed activations and gradients are
reused by the next step, not handed back to the kernel and faulted in again.

glibc's malloc returns the free memory at the top of its heap to the kernel once more than its trim threshold (128
KiB, raised only when a large block it had mapped is freed) lies free, and a RIM's T steps free and allocate the
same activations over and over: each step's pages then fault and are zeroed anew. Measured on a 2-core Xeon, eager
predict, rim_fast alone in a fresh process: S2 ~110,000 minor page faults per call (640 ms), S3 ~16,000; with the
pool ~1,500 / ~1,900 (S2 515 ms) when it served blocks of 128 KiB and up, none since it serves blocks of a page and
up (bench/results/cpu-pool-training/).

``pooled()`` makes the C++ pool (``csrc/cpu_pool.h``) torch's CPU allocator while a RIM call runs its steps
eagerly on the CPU: blocks of a page (4 KiB) or more are listed when freed and handed out again. Leaving restores
the allocator. A block is listed when freed whether the pool is open or not, and stays listed while a call
since the previous one opened listed or reused it (a training step is two calls: the forward, and its backward
pass, which ``during_backward`` opens the pool for); blocks listed earlier are freed when a call closes.
``release()`` frees all of them. Between the steps of a training loop the pool so keeps about one step's
activations (S3: ~195 MiB) that the next step reuses, where glibc would hand them back and fault them in again.

Off with ``RIM_FAST_CPU_POOL=0`` (read at each call), and without the extension (``rim_fast._C``). Other threads'
CPU allocations while it is open go through the pool too (it is thread-safe, and fork-safe: a process forked
while another thread holds its lock, a DataLoader worker, gets it unlocked); an allocator registered with a
higher priority than torch's default one is left in place (no pool). Not under torch.compile, torch.export or CUDA
graphs (the RIM only opens it around its eager loop). A backward pass that fails leaves its open behind (autograd
runs no final callback then): the next RIM call or ``release()`` made outside a backward pass closes it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple, Optional

import torch

from . import _ext


class Stats(NamedTuple):
    """The pool's counters: open depth, blocks kept now and their bytes, blocks handed out again (hits) and
    allocated anew (misses) since the process started, blocks in use."""
    depth: int
    listed: int
    listed_bytes: int
    hits: int
    misses: int
    in_use: int


def _module():
    """The extension when it is loaded and has the pool's functions (a build before the pool has not), else None."""
    module = _ext.module()
    return module if module is not None and hasattr(module, "_cpu_pool_open") else None


def available() -> bool:
    """Whether the pool can be used: the extension is loaded and ``RIM_FAST_CPU_POOL`` is not ``0``."""
    return _module() is not None and os.environ.get("RIM_FAST_CPU_POOL", "1") != "0"


def stats() -> Stats:
    """The pool's counters (``Stats``); zeros without the extension."""
    module = _module()
    return Stats(0, 0, 0, 0, 0, 0) if module is None else Stats(*module._cpu_pool_stats())


def release() -> None:
    """Frees the blocks the pool keeps between calls (nothing while a call runs), after closing the opens that a
    failed backward pass left behind."""
    module = _module()
    if module is not None:
        _close_stale()
        module._cpu_pool_release()


@contextlib.contextmanager
def pooled(keep: bool = True) -> Iterator[bool]:
    """Within the block, torch's CPU allocations of a page (4 KiB) or more come from the pool (nested blocks share
    it); yields whether it is open. Leaving the last block keeps the blocks listed since the previous block opened
    (``keep``) and frees the others."""
    module = _module() if available() else None
    if module is not None:
        _close_stale()
    opened = module is not None and bool(module._cpu_pool_open())
    try:
        yield opened
    finally:
        if opened:
            module._cpu_pool_close(keep)


# opens made by ``_open_in_backward`` that the end of their backward pass has not closed yet
_backward_opens = 0


def _close_backward_open() -> None:
    global _backward_opens
    if _backward_opens > 0:
        _backward_opens -= 1
        _module()._cpu_pool_close(True)


def _close_stale() -> None:
    """Closes the opens of backward passes that ended in an error (autograd does not run a failed pass's final
    callbacks): any left when no backward runs on this thread."""
    while _backward_opens > 0 and torch._C._current_autograd_node() is None:
        _close_backward_open()


def _open_in_backward(grad: torch.Tensor) -> Optional[torch.Tensor]:
    """Tensor hook: opens the pool when the backward pass reaches a RIM output, and queues its close for the end
    of that pass (autograd's final callback)."""
    global _backward_opens
    module = _module() if available() and not torch.compiler.is_compiling() else None
    if module is None or not module._cpu_pool_open():
        return None
    _backward_opens += 1
    try:
        torch.autograd.Variable._execution_engine.queue_callback(_close_backward_open)
    except RuntimeError:
        _close_backward_open()
    return None


def during_backward(*tensors: Optional[torch.Tensor]) -> None:
    """The backward passes through these tensors (a RIM's outputs) run with the pool open: the blocks that the
    forward's saved activations free are handed to the backward's gradients and to the next forward, instead of
    going back to the kernel."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(_open_in_backward)
