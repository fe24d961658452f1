"""Whole-loop CUDA graphs for eager inference, and a training step in one graph, without torch.compile.

A RIM on a GPU runs hundreds of small kernels per call; at 5-10 us of host time per launch, small workloads are
launch-bound. ``GraphCache`` records a call (the whole T-step loop, score function included) once per signature
and replays it afterwards: the inputs are copied into static buffers, the graph replays, and the outputs are
handed out as copies that a later replay cannot overwrite.

The cache's logic (signatures, static buffers, invalidation, fallback, output copies) is written against a small
recorder interface, so that it is tested on the CPU with ``EagerRecorder``, a stand-in that replays by running
the function again; ``CudaRecorder`` is the real thing (torch.cuda.CUDAGraph), tested on CUDA.

Rules (each tested):
- parameters updated in place are seen by the next replay (the graph reads their memory);
- a parameter or buffer tensor replaced (``load_state_dict(assign=True)``, ``.to()``, a new model) invalidates
  every graph (``watch``);
- the first call of a signature is recorded, then replayed for its outputs (a capture runs nothing);
- a call that cannot be captured (a host sync such as ``.item()``, a CPU allocation in the score function, a
  parameter whose memory the call replaces, ...) makes its signature run eagerly from then on, with one warning;
  never an error, and the cache stays usable;
- at most ``max_entries`` signatures are kept (the least recently used is dropped); ``clear()`` frees them all;
- at most ``max_values`` graphs are recorded for calls that differ only in the values of Python numbers; calls with
  further values run eagerly, with one warning (a number that changes at every call would record at every call);
- a call given several ``Variant``s (ways to run it: the RIM's are the two layouts of the CUDA convolutions) is
  recorded once per variant and the graphs are timed against each other, alternated; the fastest is kept, the
  others are freed. The first variant is the default: another one is kept only if it is at least ``margin`` faster
  and its outputs agree with the default's (``agree``), and a variant that cannot be captured is left out without a
  warning. What was timed, and what was kept, is in ``GraphCache.tuning``.

``TrainStepGraph`` records a whole training step (forward, backward, clipping, optimizer step, EMA update) on the
same recorders; ``set_lr``, ``ema_decay`` and ``ema_update`` keep the learning rate and torch_ema's decay in
device tensors that a replay reads.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, ContextManager, Hashable, NamedTuple, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import ops
from .validation import warn

Tensor = torch.Tensor

#: the signature's entry when its call cannot be captured: it runs eagerly
_EAGER = object()


class CaptureError(RuntimeError):
    """A call that cannot be recorded into a graph (the stand-in raises it where CUDA would fail)."""


class Variant(NamedTuple):
    """One way to run a recorded call: its name, and a function returning the context manager that the warm-up and
    the capture run under (what it selects is baked into the graph; replays need no context)."""
    name: str
    context: Callable[[], ContextManager]


#: float outputs of two variants agree when ||b - a|| <= AGREE * ||a|| for each: far above the difference of two
#: float32 (or TF32) summation orders over a T-step loop, far below that of a wrong result; AGREE_16 where the call
#: computes in a 16-bit float (autocast, or half-precision outputs). Measured (bench/agree_spread.py,
#: bench/results/cpu-agree-2d9ec19): two correct runs lie within 1.2e-3 in TF32 (13x under AGREE) and 9.7e-3 under
#: a bfloat16 autocast (13x under AGREE_16), the trained demo RIM being the widest
AGREE, AGREE_16 = 2.0 ** -6, 2.0 ** -3
_HALF = (torch.float16, torch.bfloat16)


def agree_tolerance(outputs: Sequence[Tensor] = ()) -> float:
    """``AGREE``, or ``AGREE_16`` where autocast runs in a 16-bit float or an output is one."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in _HALF:
            return AGREE_16
    return AGREE_16 if any(t.dtype in _HALF for t in outputs) else AGREE


def agree(a: Sequence[Tensor], b: Sequence[Tensor], tol: float = AGREE) -> bool:
    """Whether the float tensors ``b`` (a variant's outputs) agree with ``a`` (the default's): the same shapes, NaN
    and inf at the same places, and the finite values within ``tol`` relative, in norm."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
        x, y = x.to(wide), y.to(wide)
        finite = torch.isfinite(x)
        if not torch.equal(finite, torch.isfinite(y)) or not torch.equal(x[~finite].nan_to_num(),
                                                                           y[~finite].nan_to_num()):
            return False
        if float(torch.linalg.vector_norm(x[finite] - y[finite])) > tol * float(torch.linalg.vector_norm(x[finite])):
            return False
    return True


def signature(tree: Any) -> Optional[Hashable]:
    """A hashable key of a call's arguments: the tree structure, every tensor's shape, dtype, device and
    requires_grad, every other leaf's value; None when a leaf is not hashable (such calls stay eager)."""
    leaves, spec = tree_flatten(tree)
    key = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append((type(leaf), leaf))
    return tuple(key)


class Identity:
    """A key's leaf that is one object, whatever it is (a function, a module): equal only to itself, hashable even
    when the object is not, and holding it, so that its ``id`` is not handed to a new object while a key lives."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Identity) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"Identity({self.obj!r})"


class EagerRecorder:
    """The stand-in for the CPU: ``capture`` runs the function once under a mode that raises ``CaptureError`` on
    a host sync (what breaks a CUDA capture) and keeps its outputs as the static outputs; ``replay`` runs the
    function again and copies the results into them, as a graph writes the same memory at every replay."""

    class _NoHostSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                raise CaptureError(f"{func} synchronises with the host: it cannot be captured")
            return func(*args, **(kwargs or {}))

    def capture(self, fn: Callable[[], Any]):
        with ops.graph_region(), self._NoHostSync():
            out = fn()
        # a CUDA capture records the kernels without running them: its outputs hold garbage until the first
        # replay, so the stand-in's hold NaN (a caller that forgets to replay sees it)
        with torch.no_grad(), torch.inference_mode(False):
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
                    with torch.inference_mode(t.is_inference()):
                        t.fill_(float("nan"))
        return fn, out

    def replay(self, graph, out) -> None:
        new = graph()
        for static, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
            if isinstance(static, Tensor):
                # a graph writes its outputs' memory in any mode; outputs made under inference_mode take
                # in-place writes only inside it
                with torch.inference_mode(static.is_inference()):
                    static.copy_(fresh)

    def time(self, graph, out, replays: int) -> float:
        """Seconds per replay, by the host clock."""
        start = time.perf_counter()
        for _ in range(replays):
            self.replay(graph, out)
        return (time.perf_counter() - start) / replays


class SharedPool:
    """The memory pool a recorder's graphs share, renewed once they are all gone. torch's allocator keeps a pool
    whose graphs were all freed as long as one of its blocks is in use (cuBLAS's workspace for a stream, allocated
    by the first matrix product captured on it, lives for the process), and refuses a later capture into it (an
    internal assert, ``use_count > 0``): so the first capture after the last graph went takes a new handle.
    ``new_handle``: ``torch.cuda.graph_pool_handle`` (the CPU tests give a counter)."""

    def __init__(self, new_handle: Callable[[], Any]):
        self._new_handle = new_handle
        self._handle = None
        self._users: weakref.WeakSet = weakref.WeakSet()

    def handle(self):
        """The handle for the next capture."""
        if self._handle is None or len(self._users) == 0:
            self._handle = self._new_handle()
        return self._handle

    def used_by(self, graph) -> None:
        """``graph`` (weakly referenced) holds the current pool until it is freed."""
        self._users.add(graph)

    def drop(self) -> None:
        """The next capture takes a new pool (after a capture that failed)."""
        self._handle = None


class CudaGraph:
    """A recorded ``torch.cuda.CUDAGraph``, the only reference to it: the pool it was recorded into knows it is
    gone (``SharedPool``) when this is."""

    __slots__ = ("graph", "__weakref__")

    def __init__(self, graph):
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()


class CudaRecorder:
    """``torch.cuda.CUDAGraph``: warm-up calls on a side stream (lazy initialisation, cuDNN and Triton choices
    happen outside the capture; the last one refuses host syncs, so that a call that would break the capture is
    turned down before it starts), then the capture on the recorder's own stream of its device, into a memory pool
    shared by the RIM's graphs (``SharedPool``: a new one once they are all freed). Sharing is safe here whatever
    the order of the replays: graphs never run concurrently, their static inputs live outside the pool, and a
    graph's outputs are copied right after its replay, before another graph can write over them.

    The capture is ``thread_local`` (another thread's CUDA calls, e.g. a DataLoader's pin-memory thread, cannot
    break it), runs with autocast's weight cache off (a cached cast would be a copy the graph keeps reading after
    autocast frees it, blind to later weight updates) and with the RIM's device current (Triton launches on the
    current device). A capture that fails, or records no GPU work, raises ``CaptureError`` and leaves the
    thread's current stream as it was, and the current stream after the warm-up's work whether or not it failed
    (the fallback that follows runs on it)."""

    def __init__(self, device: torch.device, warmup: int = 2):
        self.device, self.warmup = torch.device(device), warmup
        self.pool = SharedPool(torch.cuda.graph_pool_handle)
        self.stream = None

    def capture(self, fn: Callable[[], Any]):
        with ops.graph_region(), torch.cuda.device(self.device), _autocast_without_cache(self.device.type):
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    for i in range(self.warmup):
                        with _refuse_host_syncs(i == self.warmup - 1 and i > 0):
                            fn()
            except RuntimeError as err:
                raise CaptureError(str(err)) from err
            finally:
                # also after a failed warm-up: the eager fallback must not overtake its queued work
                current.wait_stream(side)
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                # the outer stream context puts the current stream back even when the capture's own exit raises
                with torch.cuda.stream(self.stream), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with torch.cuda.graph(graph, pool=self.pool.handle(), stream=self.stream,
                                          capture_error_mode="thread_local"):
                        out = fn()
            except RuntimeError as err:
                # a capture that failed may leave the allocator routing this stream's allocations to its pool
                # (torch versions differ): the next capture gets a stream and a pool of its own
                self.stream = None
                self.pool.drop()
                raise CaptureError(str(err)) from err
            if any("graph is empty" in str(w.message).lower() for w in caught):
                raise CaptureError(f"the graph recorded no GPU work on {self.device} (are the tensors on another "
                                   f"device?)")
        recorded = CudaGraph(graph)
        self.pool.used_by(recorded)
        return recorded, out

    def replay(self, graph: CudaGraph, out) -> None:
        graph.replay()

    def time(self, graph: CudaGraph, out, replays: int) -> float:
        """Seconds per replay, by CUDA events around ``replays`` replays on the current stream."""
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(replays):
                graph.replay()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / replays


@contextlib.contextmanager
def _refuse_host_syncs(on: bool):
    """torch's sync debug mode set to "error": a call that synchronises with the host raises here, in a warm-up,
    rather than breaking the capture that follows."""
    if not on:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _autocast_without_cache(device_type: str):
    """The caller's autocast, with its cache of cast weights off (torch.cuda.make_graphed_callables refuses that
    cache for the same reason); nothing when autocast is off."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


def _family(key: tuple) -> tuple:
    """A ``signature`` with the values of its numbers (int, float) left out, their types kept."""
    return tuple((leaf[0],) if type(leaf) is tuple and len(leaf) == 2 and leaf[0] in (int, float) else leaf
                 for leaf in key)


def _memory(tensors: Sequence[Tensor]) -> tuple:
    """Which memory these tensors are: a graph reads them by address."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in tensors)


class _Entry:
    def __init__(self, graph, inputs, out):
        self.graph, self.inputs, self.out = graph, inputs, out


def _float_outputs(out) -> list:
    return [t.detach().clone() for t in tree_flatten(out)[0]
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]


def _under(variant: Optional[Variant], fn: Callable[..., Any], args: Sequence[Any]) -> Callable[[], Any]:
    """``fn(*args)`` under the variant's context, as a recorder captures it: the context is part of what is recorded
    (the stand-in's replays run it again)."""
    def call():
        with variant.context() if variant is not None else contextlib.nullcontext():
            return fn(*args)
    return call


def keep_fastest(recorder, default: _Entry, variants: tuple, capture: Callable[[Variant], _Entry],
                 replay_once: Callable[[_Entry], list], rounds: int, replays: int, margin: float):
    """(kept entry, {"kept", "seconds", "left_out"}): ``default`` (recorded under ``variants[0]``) or the graph of
    another variant (``capture(variant)``) that agrees with it (``replay_once(entry)``: the float tensors a replay
    leaves, compared by ``agree``) and is at least ``margin`` faster, each graph timed in ``rounds`` alternated
    blocks of ``replays`` replays, the order reversed every other round (the upper median per variant). Whatever
    goes wrong with another variant leaves it out, never the call. Graphs of one pool may reuse each other's
    memory: each replay's results are read right after it, and graphs never run concurrently."""
    left_out: dict = {}
    candidates = [(variants[0].name, default)]
    for variant in variants[1:]:
        try:
            candidates.append((variant.name, capture(variant)))
        except Exception as err:  # noqa: BLE001 - the default stays
            left_out[variant.name] = f"not recorded: {type(err).__name__}: {str(err)[:200]}"
    seconds: dict = {}
    if len(candidates) > 1:
        expected = replay_once(default)
        tol = agree_tolerance(expected)
        agreeing = candidates[:1]
        for name, entry in candidates[1:]:
            try:
                ok = agree(expected, replay_once(entry), tol)
            except Exception as err:  # noqa: BLE001
                left_out[name] = f"replay failed: {type(err).__name__}: {str(err)[:200]}"
                continue
            if ok:
                agreeing.append((name, entry))
            else:
                left_out[name] = "its outputs differ from the default's"
        candidates = agreeing
    if len(candidates) > 1:
        times: dict = {name: [] for name, _ in candidates}
        try:
            for r in range(rounds):
                # A B, B A, A B, ...: a drift of the GPU's clocks or temperature does not favour the one timed last
                for name, entry in (candidates if r % 2 == 0 else candidates[::-1]):
                    times[name].append(recorder.time(entry.graph, entry.out, replays))
        except Exception as err:  # noqa: BLE001 - timing is a measurement: the default stays
            left_out.update({name: f"timing failed: {type(err).__name__}: {str(err)[:200]}"
                             for name, _ in candidates[1:]})
            candidates = candidates[:1]
        else:
            seconds = {name: statistics.median_high(values) for name, values in times.items()}
    kept_name, kept = candidates[0]
    if seconds:
        name, entry = min(candidates[1:], key=lambda c: seconds[c[0]])
        if math.isfinite(seconds[name]) and seconds[name] <= (1.0 - margin) * seconds[kept_name]:
            kept_name, kept = name, entry
    return kept, {"kept": kept_name, "seconds": seconds, "left_out": left_out}


class GraphCache:
    """Records ``fn(*inputs)`` once per signature and replays it; see the module docstring."""

    def __init__(self, recorder, max_entries: int = 8, max_values: int = 4, rounds: int = 3, replays: int = 2,
                 margin: float = 0.03):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        if rounds < 1 or replays < 1:
            raise ValueError(f"rounds and replays must be >= 1, got {rounds} and {replays}")
        self.recorder, self.max_entries, self.max_values = recorder, max_entries, max_values
        self.rounds, self.replays, self.margin = rounds, replays, margin
        #: per signature recorded with several variants: {"kept": name, "seconds": {name: median seconds per
        #: replay}, "left_out": {name: why}} (the benchmarks report it)
        self.tuning: dict = {}
        self._values: dict = {}  # the keys recorded per family (a key with its numbers' values left out)
        self._warned_families: set = set()  # families whose further values run eagerly (warned once)
        self._entries: OrderedDict = OrderedDict()
        self._watched: Optional[tuple] = None
        self._watched_tensors: list = []
        self.captures = 0  # graphs recorded so far (tests and benchmarks read it)

    def __len__(self) -> int:
        return sum(entry is not _EAGER for entry in self._entries.values())

    def clear(self) -> None:
        """Drop every graph and its static buffers (the memory goes back to the allocator)."""
        self._entries.clear()
        self._values.clear()
        self._warned_families.clear()
        self.tuning.clear()

    def watch(self, tensors: Sequence[Tensor]) -> None:
        """Invalidate every graph when these tensors (the parameters and buffers a call reads) are not the same
        memory as at the last call: a graph would read the old tensors. In-place updates keep them."""
        now = _memory(tensors)
        if now != self._watched:
            if self._watched is not None:  # the graphs go; signatures that cannot be captured stay eager
                for key in [k for k, entry in self._entries.items() if entry is not _EAGER]:
                    del self._entries[key]
                    self.tuning.pop(key, None)
            self._watched = now
        self._watched_tensors = list(tensors)

    def __call__(self, key: Optional[Hashable], fn: Callable[..., Any], inputs: Sequence[Any],
                 variants: Sequence[Variant] = ()) -> Any:
        """``fn(*inputs)``: replayed from a graph recorded for ``key`` (recorded now on the first call, under each
        of ``variants`` if more than one, keeping the fastest); eagerly when ``key`` is None or the signature could
        not be captured. Tensors in ``inputs`` are copied into the graph's static buffers; the outputs are copies,
        never the graph's memory."""
        if key is None:
            return fn(*inputs)
        entry = self._entries.get(key)
        if entry is _EAGER:
            self._entries.move_to_end(key)
            return fn(*inputs)
        if entry is None:
            family = _family(key)
            values = self._values.setdefault(family, set())
            if key not in values and len(values) >= self.max_values:
                # a number that changes from call to call (a noise level, a step size) would record a graph per
                # call, three runs each, and push the other graphs out
                if family in self._warned_families:
                    return fn(*inputs)
                self._warned_families.add(family)
                warn(f"rim_fast: {self.max_values} CUDA graphs were recorded for calls that differ only in "
                     f"the values of Python numbers (arguments or the RIM's settings); calls with new values "
                     f"run eagerly. Pass a number that changes as a 0-dim tensor: it is copied into the graph "
                     f"at each call")
                return fn(*inputs)
            entry = self._record(key, fn, inputs, tuple(variants))
            if entry is _EAGER:
                return fn(*inputs)
            # a capture records without running: this call's outputs come from the first replay
        else:
            self._entries.move_to_end(key)
            for static, value in zip(tree_flatten(entry.inputs)[0], tree_flatten(list(inputs))[0]):
                if isinstance(static, Tensor):
                    static.copy_(value)
        self.recorder.replay(entry.graph, entry.out)
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.out)

    def _capture(self, fn, static, variant: Optional[Variant]):
        before = [t.data for t in self._watched_tensors]
        graph, out = self.recorder.capture(_under(variant, fn, static))
        if self._watched is not None and _memory(self._watched_tensors) != self._watched:
            # e.g. score_models' SpectralNorm, which sets ``u.data`` at every forward: the graph would keep
            # reading memory the capture wrote nothing into; the tensors get their memory back, as before
            # the call (the warm-up's and the capture's updates undone), and the call runs eagerly
            for tensor, data in zip(self._watched_tensors, before):
                if tensor.data_ptr() != data.data_ptr():
                    tensor.data = data
            raise CaptureError("the call replaces the memory of parameters or buffers (``.data = ...``, e.g. a "
                               "spectral norm's power iteration)")
        return graph, out

    def _record(self, key, fn, inputs, variants: tuple = ()):
        leaves, spec = tree_flatten(list(inputs))
        # normal tensors even when the first call runs under inference_mode: later calls copy into them in any mode
        with torch.inference_mode(False):
            static = tree_unflatten([t.clone() if isinstance(t, Tensor) else t for t in leaves], spec)
        try:
            graph, out = self._capture(fn, static, variants[0] if variants else None)
        except Exception as err:  # noqa: BLE001 - whatever breaks a capture, the call runs eagerly
            warn(f"rim_fast: this call cannot be recorded into a CUDA graph ({type(err).__name__}: {err}); "
                 f"calls with the same signature run eagerly (a score function that synchronises with "
                 f"the host, e.g. .item(), or allocates on the CPU cannot be captured)")
            self._store(key, _EAGER)
            return _EAGER
        self.captures += 1
        self._values.setdefault(_family(key), set()).add(key)
        entry = _Entry(graph, static, out)
        if len(variants) > 1:
            entry = self._fastest(key, fn, entry, variants)
        self._store(key, entry)
        return entry

    def _fastest(self, key, fn, default: _Entry, variants: tuple) -> _Entry:
        """The default's graph, or another variant's (``keep_fastest``)."""
        def capture(variant):
            graph, out = self._capture(fn, default.inputs, variant)
            self.captures += 1
            return _Entry(graph, default.inputs, out)

        def replay_once(entry):
            self.recorder.replay(entry.graph, entry.out)
            return _float_outputs(entry.out)

        kept, self.tuning[key] = keep_fastest(self.recorder, default, variants, capture, replay_once, self.rounds,
                                              self.replays, self.margin)
        return kept

    def _store(self, key, entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self.tuning.pop(self._entries.popitem(last=False)[0], None)


class TrainStepGraph:
    """A whole training step (zero_grad, forward, backward, gradient clipping, optimizer step, EMA update) recorded
    once and replayed for every batch of the same shapes, so that a step costs one launch.

    ``step(*batch)`` does the whole step and returns the loss, with device work only: no ``.item()``, no Python
    number that changes from step to step (the learning rate and the EMA decay are device tensors updated in
    place between steps, see ``set_lr`` and ``ema_update``), and gradients set to None at its start. The first
    batch runs eagerly (it creates the optimizer's state), then the step is recorded: the warm-up and the capture
    run real steps, so every tensor of ``state()`` (parameters, optimizer state, EMA shadows) is restored in place
    afterwards and each batch is stepped exactly once. Batches of another shape (the last, partial one) run
    eagerly; a step that cannot be recorded runs eagerly from then on, with one warning (``eager`` is then True
    and ``reason`` says why). On a GPU the optimizer must be capturable (``torch.optim.Adam(..., capturable=True)``,
    the learning rate a tensor). ``replays`` counts the steps replayed from the graph.

    ``variants()`` (called when the step is recorded; the RIM's ``cuda_graph_variants``): ways to run the step, each
    recorded and timed as ``GraphCache`` does (``keep_fastest``; agreement on the loss and on ``state()`` after one
    step from the same state), the fastest kept; ``tuning`` then says what was timed and kept."""

    def __init__(self, step: Callable[..., Tensor], state: Callable[[], Sequence[Tensor]], recorder,
                 variants: Callable[[], Sequence[Variant]] = tuple, rounds: int = 3, replays: int = 2,
                 margin: float = 0.03):
        self.step, self.state, self.recorder, self.variants = step, state, recorder, variants
        self.rounds, self.replays_per_time, self.margin = rounds, replays, margin
        self._key = None
        self._entry = None
        self.eager = False
        self.reason: Optional[str] = None
        self.replays = 0
        self.tuning: Optional[dict] = None

    def __call__(self, *batch) -> Tensor:
        key = signature(batch)
        if self.eager or key is None or (self._key is not None and key != self._key):
            return self.step(*batch)
        if self._key is None:
            self._key = key
            loss = self.step(*batch)
            self._record(batch)
            return loss
        for static, value in zip(self._entry.inputs, batch):
            if isinstance(static, Tensor):
                static.copy_(value)
        self.recorder.replay(self._entry.graph, self._entry.out)
        self.replays += 1
        return self._entry.out.clone()

    def _record(self, batch) -> None:
        with torch.inference_mode(False):
            static = [t.clone() if isinstance(t, Tensor) else t for t in batch]
        saved = [t.detach().clone() for t in self.state()]

        def restore():
            with torch.no_grad():
                for tensor, value in zip(self.state(), saved):
                    tensor.copy_(value)

        def capture(variant: Optional[Variant]) -> _Entry:
            graph, out = self.recorder.capture(_under(variant, self.step, static))
            entry = _Entry(graph, static, out)
            # the gradients a recording leaves are its graph's memory, which its replays write: kept with it
            entry.grads = [t.grad for t in self.state()]
            return entry

        def replay_once(entry: _Entry) -> list:
            # one step from the saved state: its loss and what it leaves (parameters, optimizer state, EMA)
            restore()
            self.recorder.replay(entry.graph, entry.out)
            return _float_outputs(entry.out) + _float_outputs(list(self.state()))

        entry = None
        try:
            variants = tuple(self.variants())
            entry = capture(variants[0] if variants else None)
            if len(variants) > 1:
                entry, self.tuning = keep_fastest(self.recorder, entry, variants, capture, replay_once, self.rounds,
                                                  self.replays_per_time, self.margin)
                for tensor, grad in zip(self.state(), entry.grads):  # .grad as the kept graph's recording left it
                    tensor.grad = grad
        except Exception as err:  # noqa: BLE001 - whatever breaks a capture, the steps run eagerly
            self.reason = f"{type(err).__name__}: {err}"
            warn(f"rim_fast: the training step cannot be recorded into a CUDA graph ({self.reason}); it runs "
                 f"eagerly")
            self.eager = True
            entry = None
        finally:
            restore()
        self._entry = entry


#: the least learning rate ``set_lr`` writes into a tensor: capturable Adam divides by it, and 0 (a warm-up's first
#: step, a schedule's end) gives NaN weights; the steps it makes (about 1e-30) leave weights unchanged but exact zeros
LR_FLOOR = 1e-30


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate, in place when it is a tensor (a recorded step reads it); a
    tensor's rate is kept at ``LR_FLOOR`` or above (capturable Adam gives NaN weights at 0)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(max(float(lr), LR_FLOOR))
        else:
            group["lr"] = lr


def ema_decay(ema) -> float:
    """The decay torch_ema's ``ExponentialMovingAverage.update`` would use for its next update; counts it."""
    decay = ema.decay
    if ema.num_updates is not None:
        ema.num_updates += 1
        decay = min(decay, (1 + ema.num_updates) / (10 + ema.num_updates))
    return decay


def ema_update(ema, parameters: Sequence[Tensor], one_minus_decay: Tensor) -> None:
    """torch_ema's update of the shadow parameters, s -= (s - p) (1 - decay), operation for operation, with
    ``1 - decay`` a device tensor (filled before each step with ``1.0 - ema_decay(ema)``), so that a recorded step
    reads the decay of each replay."""
    with torch.no_grad():
        for shadow, param in zip(ema.shadow_params, parameters):
            tmp = shadow - param
            tmp.mul_(one_minus_decay)
            shadow.sub_(tmp)
