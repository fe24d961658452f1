"""The CUDA-graph cache of eager inference (rim_fast/cuda_graphs.py): its logic on the CPU through the stand-in
recorder (replays by running the function again), the real capture on CUDA."""
import contextlib
import gc
import itertools
import warnings
import weakref

import pytest
import torch

from rim_fast.cuda_graphs import (AGREE, AGREE_16, CaptureError, CudaRecorder, EagerRecorder, GraphCache, Identity,
                                  SharedPool, Variant, _autocast_without_cache, agree, agree_tolerance, signature)

from conftest import requires_cuda


class Counting(EagerRecorder):
    def __init__(self):
        self.replays = 0

    def replay(self, graph, out):
        self.replays += 1
        super().replay(graph, out)


def _cache(max_entries=8):
    return GraphCache(Counting(), max_entries=max_entries)


def test_signature_tells_calls_apart():
    x = torch.zeros(2, 3)
    assert signature((x, 1)) == signature((torch.ones(2, 3), 1))
    assert signature((x, 1)) != signature((x, 2))
    assert signature((x, 1)) != signature((torch.zeros(2, 4), 1))
    assert signature((x, 1)) != signature((x.double(), 1))
    assert signature((x, 1)) != signature(([x], 1))
    assert signature((x, {"k": 1})) != signature((x, {"j": 1}))
    assert signature((x, [1, 2])) == signature((x, [1, 2]))
    assert signature((x, {1, 2})) is None  # an unhashable leaf: no graph, the call stays eager


def test_first_call_records_then_replays_with_new_inputs():
    cache = _cache()
    w = torch.randn(4)

    def fn(x, scale):
        return x * w * scale

    x1, x2 = torch.randn(4), torch.randn(4)
    out1 = cache(signature((x1, 2.0)), fn, [x1, 2.0])
    out2 = cache(signature((x2, 2.0)), fn, [x2, 2.0])
    # the capture records without running (the stand-in leaves NaN in its outputs): both calls replay
    assert cache.captures == 1 and cache.recorder.replays == 2
    torch.testing.assert_close(out1, x1 * w * 2.0)
    torch.testing.assert_close(out2, x2 * w * 2.0)
    # outputs are copies: a later replay does not overwrite what an earlier call returned
    torch.testing.assert_close(out1, x1 * w * 2.0)
    assert out1.data_ptr() != out2.data_ptr()


def test_in_place_parameter_updates_are_seen_and_replaced_ones_invalidate():
    cache = _cache()
    w = torch.randn(4)

    def fn(x):
        return x * w

    x = torch.randn(4)
    cache.watch([w])
    cache(signature((x,)), fn, [x])
    with torch.no_grad():
        w.mul_(3)  # an optimizer step: same memory
    cache.watch([w])
    torch.testing.assert_close(cache(signature((x,)), fn, [x]), x * w)
    assert cache.captures == 1 and len(cache) == 1
    w_new = torch.randn(4)  # load_state_dict(assign=True), .to(), a new model: new memory
    cache.watch([w_new])
    assert len(cache) == 0
    cache(signature((x,)), lambda x: x * w_new, [x])
    assert cache.captures == 2


def test_an_uncapturable_call_falls_back_to_eager_with_one_warning():
    cache = _cache()

    def syncs(x):
        return x * float(x.sum().item())  # a host sync, as a score function might do

    x = torch.randn(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [cache(signature((x,)), syncs, [x]) for _ in range(3)]
    assert len([w for w in caught if "cannot be recorded" in str(w.message)]) == 1
    for out in outs:
        torch.testing.assert_close(out, x * x.sum())
    assert cache.captures == 0 and len(cache) == 0
    # the cache stays usable for other signatures
    y = torch.randn(5)
    torch.testing.assert_close(cache(signature((y,)), lambda y: y + 1, [y]), y + 1)
    assert cache.captures == 1


def test_the_stand_in_refuses_host_syncs_like_cuda():
    with pytest.raises(CaptureError):
        EagerRecorder().capture(lambda: torch.ones(2).sum().item())


def test_the_stand_in_capture_leaves_its_outputs_unwritten_like_cuda():
    """A CUDA capture records kernels without running them: until the first replay its outputs are garbage. The
    stand-in leaves NaN there, so a cache that hands out a capture's outputs without replaying fails on the CPU."""
    graph, out = EagerRecorder().capture(lambda: (torch.ones(3) * 2, [torch.zeros(2)], torch.arange(3)))
    assert out[0].isnan().all() and out[1][0].isnan().all()
    EagerRecorder().replay(graph, out)
    torch.testing.assert_close(out[0], torch.full((3,), 2.0))
    torch.testing.assert_close(out[2], torch.arange(3))


def test_signatures_that_cannot_be_captured_stay_eager_when_parameters_are_replaced():
    cache = _cache()
    w = torch.randn(4)
    x = torch.randn(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for w_now in (w, torch.randn(4), torch.randn(4)):  # new memory at every call: the graphs go, not the verdict
            cache.watch([w_now])
            out = cache(signature((x,)), lambda x: x * float(x.sum().item()) * w_now, [x])
            torch.testing.assert_close(out, x * x.sum() * w_now)
    assert len([c for c in caught if "cannot be recorded" in str(c.message)]) == 1
    assert cache.captures == 0


def test_a_call_that_replaces_parameter_memory_runs_eagerly_and_leaves_it_as_it_was():
    """score_models' SpectralNorm sets ``u.data`` and ``v.data`` at every forward: a graph would read memory the
    capture never wrote. The call runs eagerly (one warning), and u and v are as if no capture had been tried."""
    from rim_fast.layers.spectral_norm import SpectralNorm

    torch.manual_seed(0)
    graphed, eager = SpectralNorm(torch.nn.Linear(5, 3)), SpectralNorm(torch.nn.Linear(5, 3))
    eager.load_state_dict(graphed.state_dict())
    cache = _cache()
    x = torch.randn(2, 5)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            cache.watch([*graphed.parameters(), *graphed.buffers()])
            torch.testing.assert_close(cache(signature((x,)), graphed, [x]), eager(x), rtol=0, atol=0)
    assert len([c for c in caught if "replaces the memory of parameters" in str(c.message)]) == 1
    assert cache.captures == 0
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_identity_keys_hold_their_object():
    def f():
        pass

    assert Identity(f) == Identity(f) and hash(Identity(f)) == hash(Identity(f))
    assert Identity(f) != Identity(lambda: None) and Identity([1]) != Identity([1])
    assert signature((Identity({"unhashable": [1]}),)) is not None


def test_autocast_cache_is_off_for_a_capture():
    """Autocast caches the casts of weights; a graph recorded with the cache on would keep reading a cast copy that
    autocast frees when its region ends (and that no weight update reaches)."""
    assert isinstance(_autocast_without_cache("cpu"), contextlib.nullcontext)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        with _autocast_without_cache("cpu"):
            assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_cache_enabled()


def test_oldest_signature_dropped_and_clear_frees_all():
    cache = _cache(max_entries=2)
    xs = [torch.randn(n) for n in (2, 3, 4)]
    for x in xs:
        cache(signature((x,)), torch.neg, [x])
    assert len(cache) == 2 and cache.captures == 3
    cache(signature((xs[0],)), torch.neg, [xs[0]])  # dropped: recorded again
    assert cache.captures == 4
    cache(signature((xs[2],)), torch.neg, [xs[2]])  # kept (most recent before)
    assert cache.captures == 4
    cache.clear()
    assert len(cache) == 0


class _PoolGraph:
    __slots__ = ("fn", "__weakref__")

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()


class Pooled(EagerRecorder):
    """The stand-in, recording into a ``SharedPool`` as ``CudaRecorder`` does: ``handles`` has each capture's pool."""

    def __init__(self):
        self.pool = SharedPool(itertools.count().__next__)
        self.handles = []

    def capture(self, fn):
        self.handles.append(self.pool.handle())
        graph, out = super().capture(fn)
        graph = _PoolGraph(graph)
        self.pool.used_by(graph)
        return graph, out


def test_shared_pool_renews_only_once_its_graphs_are_gone():
    pool = SharedPool(itertools.count().__next__)
    a, b = _PoolGraph(None), _PoolGraph(None)
    first = pool.handle()
    pool.used_by(a)
    assert pool.handle() == first
    pool.used_by(b)
    del a
    assert pool.handle() == first  # b still holds it
    del b
    second = pool.handle()
    assert second != first
    c = _PoolGraph(None)
    pool.used_by(c)
    pool.drop()  # a capture failed: a new pool even while graphs live
    assert pool.handle() not in (first, second)


def test_graphs_share_a_pool_until_clear_or_invalidation_frees_them_all():
    """Torch's allocator refuses a capture into a pool whose graphs are all freed while a block of it lives on
    (cuBLAS's workspace): the cache's graphs share one pool through evictions, and the first capture after
    ``clear()`` or an invalidation takes a new one."""
    cache = GraphCache(Pooled(), max_entries=2)
    xs = [torch.randn(n) for n in (2, 3, 4)]
    for x in xs:
        cache(signature((x,)), torch.neg, [x])
    assert cache.recorder.handles == [0, 0, 0]  # the oldest dropped while the others live
    cache.clear()
    torch.testing.assert_close(cache(signature((xs[0],)), torch.neg, [xs[0]]), -xs[0])
    cache(signature((xs[1],)), torch.neg, [xs[1]])
    assert cache.recorder.handles == [0, 0, 0, 1, 1]
    cache.watch([torch.ones(1)])
    cache.watch([torch.ones(1)])  # another tensor: every graph goes
    torch.testing.assert_close(cache(signature((xs[2],)), torch.neg, [xs[2]]), -xs[2])
    assert cache.recorder.handles == [0, 0, 0, 1, 1, 2] and cache.captures == 6


def test_a_number_that_changes_at_every_call_runs_eagerly_after_a_few_graphs():
    """A float argument with a new value at every call would record (three runs) at every call: after max_values
    graphs for one family (the key less its numbers' values), new values run eagerly with one warning; the graphs
    already recorded still replay, a tensor of the same value replays one graph, and other families record."""
    cache = GraphCache(Counting(), max_values=3)
    x = torch.randn(4)

    def fn(x, sigma, n):
        return x * sigma + n

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(8):
            torch.testing.assert_close(cache(signature((x, 0.1 * i, 1)), fn, [x, 0.1 * i, 1]), x * 0.1 * i + 1)
        for i in (0, 1, 2):  # recorded: replayed
            torch.testing.assert_close(cache(signature((x, 0.1 * i, 1)), fn, [x, 0.1 * i, 1]), x * 0.1 * i + 1)
    assert len([c for c in caught if "differ only in the values of Python numbers" in str(c.message)]) == 1
    assert cache.captures == 3 and cache.recorder.replays == 6
    for i in range(4):  # the advice: a 0-dim tensor, copied in at each call
        sigma = torch.tensor(0.1 * i)
        torch.testing.assert_close(cache(signature((x, sigma, 1)), fn, [x, sigma, 1]), x * sigma + 1)
    assert cache.captures == 4
    y = torch.randn(5)  # another family
    torch.testing.assert_close(cache(signature((y, 0.5, 1)), fn, [y, 0.5, 1]), y * 0.5 + 1)
    assert cache.captures == 5
    # graphs dropped and recorded again (parameters replaced) count once per key
    cache.watch([torch.randn(2)])
    cache.watch([torch.randn(2)])
    torch.testing.assert_close(cache(signature((x, 0.1, 1)), fn, [x, 0.1, 1]), x * 0.1 + 1)
    assert cache.captures == 6
    with pytest.raises(ValueError, match="max_values"):
        GraphCache(Counting(), max_values=0)


def test_nested_inputs_and_outputs():
    cache = _cache()

    def fn(pair, k):
        a, b = pair
        return {"sum": a + b, "list": [a * k, b * k]}

    a, b = torch.randn(3), torch.randn(3)
    cache(signature(((a, b), 2)), fn, [(a, b), 2])
    a2, b2 = torch.randn(3), torch.randn(3)
    out = cache(signature(((a2, b2), 2)), fn, [(a2, b2), 2])
    torch.testing.assert_close(out["sum"], a2 + b2)
    torch.testing.assert_close(out["list"][1], b2 * 2)
    assert cache.captures == 1


# ---- variants: one call recorded in several ways, the fastest graph kept ------------------------------------

#: the variant a call runs under (``_variants``' contexts set it), and the last one entered
MODE, ENTERED = ["none"], ["none"]


@contextlib.contextmanager
def _mode(name):
    old, MODE[0], ENTERED[0] = MODE[0], name, name
    try:
        yield
    finally:
        MODE[0] = old


def _variants(*names):
    return tuple(Variant(n, lambda n=n: _mode(n)) for n in names)


class Timed(Counting):
    """The stand-in with a scripted clock: each graph takes the seconds given for the variant it was recorded
    under (the variant's context runs inside the recorded function, which tags the graph)."""

    def __init__(self, seconds, fail_capture=(), fail_time=False):
        super().__init__()
        self.seconds, self.fail_capture, self.fail_time = seconds, fail_capture, fail_time
        self.timed, self.replayed = [], []

    def capture(self, fn):
        seen = []

        def tagged():
            out = fn()
            seen.append(ENTERED[0])
            if ENTERED[0] in self.fail_capture:
                raise CaptureError(f"{ENTERED[0]} cannot be captured")
            return out

        graph, out = super().capture(tagged)
        return (seen[-1], graph), out

    def replay(self, graph, out):
        self.replayed.append(graph[0])
        super().replay(graph[1], out)

    def time(self, graph, out, replays):
        if self.fail_time:
            raise RuntimeError("no clock")
        self.timed.append(graph[0])
        for _ in range(replays):
            self.replay(graph, out)
        return self.seconds[graph[0]]


def _scaled(x, w):
    # the "wrong" variant computes something else: its graph must never be kept
    return x * w * (2.0 if MODE[0] == "wrong" else 1.0)


@pytest.mark.parametrize("seconds,kept", [({"a": 1.0, "b": 0.5}, "b"), ({"a": 1.0, "b": 0.99}, "a"),
                                          ({"a": 1.0, "b": 2.0}, "a")], ids=["faster", "within-margin", "slower"])
def test_variants_are_timed_alternately_and_the_fastest_kept(seconds, kept):
    """Each variant recorded once, timed in alternated rounds (median); another variant replaces the default only
    when at least ``margin`` (3%) faster. The call's and later calls' outputs come from the kept graph, which
    replays under its own variant; the other graph is freed."""
    cache = GraphCache(Timed(seconds), rounds=3, replays=2)
    w = torch.randn(4)
    x1, x2 = torch.randn(4), torch.randn(4)
    key = signature((x1,))
    ran = []

    def fn(x):
        ran.append(MODE[0])
        return x * w

    out1 = cache(key, fn, [x1], _variants("a", "b"))
    assert cache.captures == 2 and cache.recorder.timed == ["a", "b", "b", "a", "a", "b"]
    assert cache.tuning[key] == {"kept": kept, "seconds": seconds, "left_out": {}}
    # after the agreement check (one replay each) and the timing, the call's outputs come from the kept graph
    assert cache.recorder.replayed[:2] == ["a", "b"] and cache.recorder.replayed[-1] == kept
    torch.testing.assert_close(out1, x1 * w)
    ran.clear()
    out2 = cache(signature((x2,)), fn, [x2], _variants("a", "b"))  # the same key: replayed, not tuned again
    assert cache.captures == 2 and cache.recorder.replayed[-1] == kept and ran == [kept]
    torch.testing.assert_close(out2, x2 * w)


def test_a_variant_that_disagrees_fails_or_cannot_be_captured_is_left_out_silently():
    w = torch.randn(4)
    x = torch.randn(4)
    key = signature((x,))
    fast = {"a": 1.0, "wrong": 0.1, "broken": 0.1, "b": 0.5}
    cache = GraphCache(Timed(fast, fail_capture=("broken",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cache(key, lambda x: _scaled(x, w), [x], _variants("a", "wrong", "broken", "b"))
    torch.testing.assert_close(out, x * w)
    tuning = cache.tuning[key]
    assert tuning["kept"] == "b" and set(tuning["seconds"]) == {"a", "b"}
    assert tuning["left_out"]["wrong"] == "its outputs differ from the default's"
    assert tuning["left_out"]["broken"].startswith("not recorded: CaptureError: broken cannot be captured")
    # the clock fails: the default stays, and says why
    cache = GraphCache(Timed(fast, fail_time=True))
    out = cache(key, lambda x: _scaled(x, w), [x], _variants("a", "b"))
    torch.testing.assert_close(out, x * w)
    assert cache.tuning[key]["kept"] == "a" and cache.tuning[key]["left_out"]["b"].startswith("timing failed")
    # the default cannot be captured: the call runs eagerly (one warning), the others are not tried
    cache = GraphCache(Timed(fast, fail_capture=("a",)))
    with pytest.warns(RuntimeWarning, match="cannot be recorded"):
        out = cache(key, lambda x: _scaled(x, w), [x], _variants("a", "b"))
    torch.testing.assert_close(out, x * w)
    assert cache.captures == 0 and key not in cache.tuning and cache.recorder.timed == []


def test_tuning_records_go_with_their_graphs():
    """What ``tuning`` holds (keys hold the RIM's functions) goes when the graph goes: dropped as the oldest,
    invalidated by replaced parameters, cleared."""
    cache = GraphCache(Timed({"a": 1.0, "b": 0.5}), max_entries=1)
    xs = [torch.randn(n) for n in (2, 3)]
    for x in xs:
        cache(signature((x,)), torch.neg, [x], _variants("a", "b"))
    assert list(cache.tuning) == [signature((xs[1],))]
    cache.watch([torch.randn(2)])
    cache.watch([torch.randn(2)])
    assert cache.tuning == {}
    cache(signature((xs[0],)), torch.neg, [xs[0]], _variants("a", "b"))
    cache.clear()
    assert cache.tuning == {}
    with pytest.raises(ValueError, match="rounds and replays"):
        GraphCache(Counting(), replays=0)


def test_agree_tells_a_summation_order_from_a_wrong_result():
    a = torch.randn(1000)
    assert agree([a], [a + 1e-4 * a.abs().mean() * torch.randn(1000)])
    assert not agree([a], [a * 1.1]) and not agree([a], [a[:999]]) and not agree([a], [a, a])
    with_nan = a.clone()
    with_nan[3] = float("nan")
    assert agree([with_nan], [with_nan.clone()])
    assert not agree([with_nan], [a])  # NaN where the default has a number, or the reverse
    assert not agree([a], [with_nan])
    inf = a.clone()
    inf[0] = float("inf")
    assert not agree([inf], [-inf])
    z = torch.randn(3, dtype=torch.complex64)
    assert agree([z], [z.clone()]) and not agree([z], [z * 1j])  # the imaginary part counts


def test_variants_of_a_16_bit_call_agree_within_its_rounding():
    """Under autocast to a 16-bit float, or with 16-bit outputs, two layouts' results differ by more than float32's
    rounding: the check loosens to 2^-3 (still far from a wrong result's O(1))."""
    assert agree_tolerance([torch.ones(2)]) == AGREE
    assert agree_tolerance([torch.ones(2, dtype=torch.bfloat16)]) == agree_tolerance([torch.ones(2).half()]) == AGREE_16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert agree_tolerance([torch.ones(2)]) == AGREE_16
    a = torch.randn(1000)
    for outputs_dtype, kept in ((torch.float32, "a"), (torch.bfloat16, "b")):
        w = torch.ones(1000, dtype=outputs_dtype)
        cache = GraphCache(Timed({"a": 1.0, "b": 0.5}))
        # the "b" variant's outputs differ by 3%: float32 rounding cannot, bfloat16's over a loop can
        fn = lambda x: (x * (1.03 if ENTERED[0] == "b" else 1.0)).to(outputs_dtype) * w  # noqa: E731
        cache(signature((a,)), fn, [a], _variants("a", "b"))
        assert cache.tuning[signature((a,))]["kept"] == kept


@requires_cuda
def test_cuda_recorder_replays_and_outputs_survive():
    cache = GraphCache(CudaRecorder(torch.device("cuda")))
    w = torch.randn(64, device="cuda")

    def fn(x):
        return torch.tanh(x * w) + 1

    x1, x2 = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    out1 = cache(signature((x1,)), fn, [x1])
    out2 = cache(signature((x2,)), fn, [x2])
    torch.cuda.synchronize()
    assert cache.captures == 1
    torch.testing.assert_close(out1, fn(x1))
    torch.testing.assert_close(out2, fn(x2))
    with torch.no_grad():
        w.add_(1)
    torch.testing.assert_close(cache(signature((x1,)), fn, [x1]), fn(x1))


@requires_cuda
def test_cuda_capture_error_falls_back_and_cache_stays_usable():
    cache = GraphCache(CudaRecorder(torch.device("cuda")))

    def syncs(x):
        return x * x.sum().item()

    x = torch.randn(8, device="cuda")
    with pytest.warns(RuntimeWarning, match="cannot be recorded"):
        out = cache(signature((x,)), syncs, [x])
    torch.testing.assert_close(out, x * x.sum())
    y = torch.randn(8, device="cuda")
    torch.testing.assert_close(cache(signature((y,)), torch.neg, [y]), -y)
    torch.testing.assert_close(cache(signature((y,)), torch.neg, [y]), -y)


@requires_cuda
def test_cuda_failed_capture_leaves_the_current_stream_as_it_was():
    cache = GraphCache(CudaRecorder(torch.device("cuda")))
    stream = torch.cuda.current_stream()
    x = torch.randn(8, device="cuda")
    with pytest.warns(RuntimeWarning, match="cannot be recorded"):
        cache(signature((x,)), lambda x: x * x.sum().item(), [x])
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    # (a capture that fails inside CUDA is not rehearsed here: on torch 2.11 it leaves the CUDA generator marked
    # as capturing, and every later random op of the process raises "Offset increment outside graph capture")
    torch.testing.assert_close(cache(signature((x,)), torch.neg, [x]), -x)
    # and the next signature records and replays
    z1, z2 = torch.randn(10, device="cuda"), torch.randn(10, device="cuda")
    torch.testing.assert_close(cache(signature((z1,)), torch.neg, [z1]), -z1)
    torch.testing.assert_close(cache(signature((z2,)), torch.neg, [z2]), -z2)
    assert cache.captures == 1


@requires_cuda
def test_cuda_graphs_record_again_after_clear_and_after_replaced_tensors():
    """A matrix product in the capture (cuBLAS's workspace for the capture stream is then allocated in the graphs'
    pool and outlives them): after ``clear()`` and after the watched tensors are replaced, the next call records
    again (a new pool), with no warning, and replays the right values."""
    w = torch.randn(32, 32, device="cuda")
    cache = GraphCache(CudaRecorder(torch.device("cuda")))
    x, x2 = torch.randn(4, 32, device="cuda"), torch.randn(8, 32, device="cuda")

    def fn(x):
        return torch.tanh(x @ w)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.watch([w])
        for _ in range(2):
            torch.testing.assert_close(cache(signature((x,)), fn, [x]), fn(x))
            torch.testing.assert_close(cache(signature((x2,)), fn, [x2]), fn(x2))
            torch.testing.assert_close(cache(signature((x,)), fn, [x]), fn(x))
            cache.clear()
        w = w.clone()
        cache.watch([w])
        torch.testing.assert_close(cache(signature((x,)), fn, [x]), fn(x))
        cache.watch([w.clone()])  # replaced: the graph goes
        torch.testing.assert_close(cache(signature((x,)), fn, [x]), fn(x))
    assert [str(c.message) for c in caught if "CUDA graph" in str(c.message)] == []
    assert cache.captures == 6 and len(cache) == 1


@requires_cuda
def test_cuda_graph_under_autocast_reads_the_weights_not_a_cached_cast():
    w = torch.randn(16, 16, device="cuda", requires_grad=True)
    cache = GraphCache(CudaRecorder(torch.device("cuda")))
    x = torch.randn(4, 16, device="cuda")
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            first = cache(signature((x,)), lambda x: x @ w, [x])
        w.add_(1.0)  # an optimizer step, outside the autocast region that cached the cast
        with torch.autocast("cuda", dtype=torch.bfloat16):
            again = cache(signature((x,)), lambda x: x @ w, [x])
            expected = x @ w
    assert cache.captures == 1
    torch.testing.assert_close(again, expected)
    assert not torch.equal(first, again)


# ---- the RIM's eager inference through the cache ------------------------------------------------------------

import rim_fast  # noqa: E402
from rim_fast import ops  # noqa: E402



@pytest.fixture
def stand_in(monkeypatch):
    """RIMs record their eager inference with the CPU stand-in (a GPU records CUDA graphs)."""
    monkeypatch.setattr(rim_fast.RIM, "_graph_recorder", lambda self: Counting())


def _score(x, y, a=None, scale=1.0):
    return (y - 0.7 * x) * scale if a is None else (y - a * x) * scale


def _pair(**kw):
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6)
    kw.setdefault("device", "cpu")  # the stand-in's tests run on the CPU wherever a GPU is visible
    graphed = rim_fast.RIM((8, 8), net, T=3, score_fn=_score, score_preprocessing_method="ADAM", **kw)
    net2 = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6)
    net2.load_state_dict(net.state_dict())
    eager = rim_fast.RIM((8, 8), net2, T=3, score_fn=_score, score_preprocessing_method="ADAM", cuda_graphs=False,
                         device="cpu")
    return graphed, eager


def _captures(rim):
    cache = rim.__dict__.get("_graph_cache")
    return 0 if cache is None else cache.captures


def test_rim_records_once_per_signature_and_replays(stand_in):
    graphed, eager = _pair()
    with torch.no_grad():
        y1, y2, y3 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
        out1 = graphed.predict(y1)
        out2 = graphed.predict(y2)
        assert _captures(graphed) == 1 and graphed._graph_cache.recorder.replays == 2
        torch.testing.assert_close(out1, eager.predict(y1))  # out1 survived the replay for y2
        torch.testing.assert_close(out2, eager.predict(y2))
        graphed.predict(y3)  # another batch size
        traj = graphed(y1)  # forward keeps the trajectory: another signature
        assert _captures(graphed) == 3
        expected = eager(y1)
        assert len(traj) == len(expected) == 3
        for a, b in zip(traj, expected):
            torch.testing.assert_close(a, b)
        a = torch.tensor(0.5)
        graphed.predict(y1, a)  # a score-function argument: another structure
        graphed.predict(y1, torch.tensor(0.9))  # same structure, new value: replayed with it
        torch.testing.assert_close(graphed.predict(y1, torch.tensor(0.9)), eager.predict(y1, torch.tensor(0.9)))
        graphed.predict(y1, a, scale=2.0)
        graphed.predict(y1, a, scale=3.0)  # a non-tensor argument's value is part of the signature
        torch.testing.assert_close(graphed.predict(y1, a, scale=3.0), eager.predict(y1, a, scale=3.0))
        assert _captures(graphed) == 6


def test_rim_graphs_see_in_place_updates_and_drop_replaced_parameters(stand_in):
    graphed, eager = _pair()
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        graphed.predict(y)
        for p, q in zip(graphed.model.parameters(), eager.model.parameters()):  # an optimizer step: in place
            p.add_(0.01)
            q.add_(0.01)
        torch.testing.assert_close(graphed.predict(y), eager.predict(y))
        assert _captures(graphed) == 1
        state = {k: v + 0.02 for k, v in eager.model.state_dict().items()}
        graphed.model.load_state_dict(state, assign=True)  # new tensors: the graph would read the old ones
        eager.model.load_state_dict(state)
        torch.testing.assert_close(graphed.predict(y), eager.predict(y))
        assert _captures(graphed) == 2
        graphed.to(torch.float64)  # .to(): new tensors again
        eager.to(torch.float64)
        torch.testing.assert_close(graphed.predict(y.double()), eager.predict(y.double()))
        assert _captures(graphed) == 3


def test_rim_settings_are_part_of_the_signature(stand_in):
    graphed, eager = _pair()
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        graphed.predict(y)
        graphed.T = eager.T = 5
        torch.testing.assert_close(graphed.predict(y), eager.predict(y))
        assert _captures(graphed) == 2
        # the CUDA convolutions' layout: a graph recorded in one layout replays that layout's kernels
        with ops.use_cuda_layout("channels_last"):
            graphed.predict(y)
        assert _captures(graphed) == 3
        graphed.predict(y)
        assert _captures(graphed) == 3
        # the deterministic switches decide whether both layouts are recorded (RIM.cuda_graph_variants)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.backends.cudnn, "deterministic", True)
            graphed.predict(y)
        assert _captures(graphed) == 4


def test_rim_a_new_score_function_records_anew_even_at_a_reused_id(stand_in):
    """``rim.score_fn = make_score(psf)`` in a loop: CPython hands a new closure the ``id`` of the freed one, so
    keys hold the functions themselves, not their ids (a real graph would replay the old closure's kernels)."""
    graphed, eager = _pair()
    y = torch.randn(2, 1, 8, 8)

    def make(a):
        return lambda x, y: (y - a * x)

    alive = []
    with torch.no_grad():
        for i in range(4):
            graphed.score_fn = eager.score_fn = make(0.5 + 0.1 * i)
            alive.append(weakref.ref(graphed.score_fn))
            torch.testing.assert_close(graphed.predict(y), eager.predict(y))
    assert _captures(graphed) == 4
    # the old closures live as long as their graphs: their ids cannot go to a new function meanwhile
    assert all(ref() is not None for ref in alive)
    graphed.clear_cuda_graphs()
    graphed.score_fn = eager.score_fn = _score
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_rim_train_mode_is_part_of_the_signature(stand_in):
    graphed, _ = _pair()
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        graphed.predict(y)
        graphed.eval()
        graphed.predict(y)
        graphed.model.train()
        graphed.predict(y)
    assert _captures(graphed) == 3


def test_rim_moved_to_another_device_records_with_that_devices_recorder(stand_in, monkeypatch):
    graphed, eager = _pair()
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        graphed.predict(y)
        before = graphed._graph_cache
        graphed.__dict__["_graph_device"] = torch.device("cuda", 1)  # as if its cache was made before a .to()
        torch.testing.assert_close(graphed.predict(y), eager.predict(y))
        assert graphed._graph_cache is not before and len(before) == 0 and _captures(graphed) == 1
        # a device without graphs (a RIM moved to the CPU): no cache, eager calls
        monkeypatch.setattr(rim_fast.RIM, "_graph_recorder", lambda self: None)
        graphed.__dict__["_graph_device"] = torch.device("cuda", 0)
        torch.testing.assert_close(graphed.predict(y), eager.predict(y))
        assert graphed.__dict__["_graph_cache"] is None


def test_rim_copies_record_their_own_graphs(stand_in):
    """copy.deepcopy of a RIM whose graphs were recorded: the copy's graphs would read (and replay) the original's
    parameters; the copy records its own."""
    import copy
    graphed, eager = _pair()
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        graphed.predict(y)
        twin = copy.deepcopy(graphed)
        for p, q in zip(twin.model.parameters(), eager.model.parameters()):
            p.add_(0.05)
            q.add_(0.05)
        torch.testing.assert_close(twin.predict(y), eager.predict(y))
        assert _captures(twin) == 1 and twin._graph_cache is not graphed._graph_cache


def test_rim_uncapturable_score_function_runs_eagerly_with_one_warning(stand_in):
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6)

    def syncing_score(x, y):
        return (y - x) / (1 + float(x.abs().max().item()))

    rim = rim_fast.RIM((8, 8), net, T=2, score_fn=syncing_score, device="cpu")
    y = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [rim.predict(y) for _ in range(3)]
    assert len([w for w in caught if "cannot be recorded" in str(w.message)]) == 1
    rim.cuda_graphs = False
    with torch.no_grad():
        expected = rim.predict(y)
    for out in outs:
        torch.testing.assert_close(out, expected)


def test_rim_autograd_calls_and_opt_outs_stay_eager(stand_in, monkeypatch):
    graphed, _ = _pair()
    y, x = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    graphed.loss_fn(y, x).backward()  # training: autograd, eager
    graphed.predict(y)  # grad enabled and parameters that require it: eager
    assert _captures(graphed) == 0
    off, _ = _pair(cuda_graphs=False)
    monkeypatch.setenv("RIM_FAST_CUDA_GRAPHS", "0")
    env_off, _ = _pair()
    with torch.no_grad():
        off.predict(y)
        env_off.predict(y)
    assert _captures(off) == 0 and _captures(env_off) == 0
    with torch.no_grad():
        graphed.predict(y)
        graphed.clear_cuda_graphs()
        graphed.predict(y)
    assert _captures(graphed) == 2
    with pytest.raises(TypeError, match="cuda_graphs"):
        _pair(cuda_graphs="yes")


@requires_cuda
def test_rim_predict_on_cuda_through_graphs_runs_the_kernels():
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=8, hidden_units=12)
    graphed = rim_fast.RIM((16, 16), net, T=4, score_fn=_score, score_preprocessing_method="ADAM", device="cuda")
    eager = rim_fast.RIM((16, 16), net, T=4, score_fn=_score, score_preprocessing_method="ADAM", device="cuda",
                         cuda_graphs=False)
    y1, y2 = torch.randn(4, 1, 16, 16, device="cuda"), torch.randn(4, 1, 16, 16, device="cuda")
    with torch.no_grad(), rim_fast.ops.use_cuda_layout("auto"):
        with rim_fast.ops.trace() as calls:
            out1 = graphed.predict(y1)
        out2 = graphed.predict(y2)
        torch.testing.assert_close(out1, eager.predict(y1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out2, eager.predict(y2), rtol=1e-4, atol=1e-5)
    assert graphed._graph_cache.captures == 2  # both layouts, one kept (test_cudnn_layout)
    # the warm-up and the capture run the Triton gates and the CUDA update step (their launches are free in a graph)
    assert calls[("gru_gates_zr", "triton")] > 0 and calls[("update_state", "reference")] >= 0
    assert calls[("preprocess_score", "cpp")] > 0 or rim_fast.ops._cpp.missing() is not None


def test_rim_graph_variants_are_the_cuda_layouts_where_timing_may_choose(monkeypatch):
    """A GPU RIM under RIM_FAST_CUDA_LAYOUT=auto (the default) records both layouts; a layout asked for, the CPU,
    and deterministic algorithms (the choice would depend on a clock) record one."""
    from types import SimpleNamespace
    from rim_fast.rim import CUDA_LAYOUT_VARIANTS
    net = torch.nn.Conv2d(1, 1, 3)
    gpu, cpu = SimpleNamespace(device=torch.device("cuda", 0), model=net), SimpleNamespace(device=torch.device("cpu"),
                                                                                          model=net)
    assert [v.name for v in CUDA_LAYOUT_VARIANTS] == ["contiguous", "channels_last"]
    with ops.use_cuda_layout("auto"):
        assert rim_fast.RIM.cuda_graph_variants(gpu) == CUDA_LAYOUT_VARIANTS
        assert rim_fast.RIM.cuda_graph_variants(cpu) == ()
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        assert rim_fast.RIM.cuda_graph_variants(gpu) == ()
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert rim_fast.RIM.cuda_graph_variants(gpu) == ()
        monkeypatch.undo()
        assert rim_fast.RIM.cuda_graph_variants(gpu) == CUDA_LAYOUT_VARIANTS
        # a float64 network: cuDNN's float64 convolutions run NCHW in either layout
        assert rim_fast.RIM.cuda_graph_variants(SimpleNamespace(device=gpu.device, model=net.double())) == ()
    for layout in ("contiguous", "channels_last"):
        with ops.use_cuda_layout(layout):
            assert rim_fast.RIM.cuda_graph_variants(gpu) == ()
    for variant in CUDA_LAYOUT_VARIANTS:
        with variant.context():
            assert ops.cuda_layout() == variant.name


def test_rim_graphs_under_inference_mode_and_no_grad_alike(stand_in):
    graphed, eager = _pair()
    y1, y2 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        out1 = graphed.predict(y1)
    with torch.no_grad():
        out2 = graphed.predict(y2)
    with torch.inference_mode():
        out3 = graphed.predict(y2)
    with torch.no_grad():
        torch.testing.assert_close(out1, eager.predict(y1))
        torch.testing.assert_close(out2, eager.predict(y2))
        torch.testing.assert_close(out3, out2)
    assert _captures(graphed) == 1


# ---- a training step in one graph (the recipe for one's own loop) ------------------------------------------

from torch_ema import ExponentialMovingAverage  # noqa: E402

from rim_fast.cuda_graphs import TrainStepGraph, ema_decay, ema_update, set_lr  # noqa: E402


def _trainer(graphed: bool, recorder=None, sync: bool = False, variants=tuple):
    """A RIM, its Adam and EMA, and a step function: eager torch_rim-style, or the graph-friendly form of it."""
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=6)
    rim = rim_fast.RIM((8, 8), net, T=2, score_fn=_score, score_preprocessing_method="ADAM", device="cpu")
    params = list(rim.model.parameters())
    # SGD with momentum: Adam reads its step counter on the host unless capturable, which only GPUs allow
    optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    ema = ExponentialMovingAverage(params, decay=0.9)
    one_minus_decay = torch.zeros(())

    def step(y, x):
        optimizer.zero_grad(set_to_none=True)
        loss = rim.loss_fn(y, x) * (2.0 if MODE[0] == "wrong" else 1.0)  # the "wrong" variant's gradients differ
        if sync:
            loss = loss * (1 + 0 * loss.item())  # a host sync: not capturable
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
        if graphed:
            ema_update(ema, params, one_minus_decay)
        else:
            ema.update()
        return loss.detach()

    def state():
        return [*params, *[t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)],
                *ema.shadow_params]

    def run(y, x, lr):
        if graphed:
            set_lr(optimizer, lr)
            one_minus_decay.fill_(1.0 - ema_decay(ema))
            return train(y, x)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return step(y, x)

    train = TrainStepGraph(step, state, recorder, variants=variants) if graphed else None
    return rim, ema, run, train


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(b, 1, 8, 8, generator=g), torch.randn(b, 1, 8, 8, generator=g)) for b in (2, 2, 2, 2, 1)]


def test_train_step_graph_steps_exactly_like_eager():
    """Five steps (the last batch partial) with a learning-rate schedule and EMA: recorded once, replayed for the
    full batches, eager for the partial one; losses, parameters and EMA shadows equal to the eager loop's."""
    eager_rim, eager_ema, eager_run, _ = _trainer(False)
    rim, ema, run, train = _trainer(True, Counting())
    for i, (y, x) in enumerate(_batches()):
        lr = 1e-2 * (i + 1) / 5
        torch.testing.assert_close(run(y, x, lr), eager_run(y, x, lr), rtol=0, atol=0)
    assert train._entry is not None and not train.eager and train.reason is None
    assert train.replays == 3  # batches 2-4; the first ran eagerly before the recording, the partial one eagerly
    for p, q in zip(rim.model.parameters(), eager_rim.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for s, t in zip(ema.shadow_params, eager_ema.shadow_params):
        torch.testing.assert_close(s, t, rtol=0, atol=0)
    assert ema.num_updates == eager_ema.num_updates == 5


@pytest.mark.parametrize("seconds,kept", [({"a": 1.0, "b": 0.5, "wrong": 0.1}, "b"),
                                          ({"a": 1.0, "b": 2.0, "wrong": 0.1}, "a")], ids=["b-faster", "a-faster"])
def test_train_step_graph_keeps_the_fastest_variant_and_steps_exactly_like_eager(seconds, kept):
    """A step recorded under each variant from the same state, checked (loss and state after one step), timed,
    the fastest kept: the recording's steps are all undone, so the training equals the eager loop's bit for bit,
    and the replays run the kept variant. A variant whose step differs ("wrong": another loss) is left out."""
    eager_rim, eager_ema, eager_run, _ = _trainer(False)
    recorder = Timed(seconds)
    rim, ema, run, train = _trainer(True, recorder, variants=lambda: _variants("a", "wrong", "b"))
    for i, (y, x) in enumerate(_batches()):
        lr = 1e-2 * (i + 1) / 5
        torch.testing.assert_close(run(y, x, lr), eager_run(y, x, lr), rtol=0, atol=0)
    assert not train.eager and train.replays == 3
    assert train.tuning["kept"] == kept and set(train.tuning["seconds"]) == {"a", "b"}
    assert train.tuning["left_out"] == {"wrong": "its outputs differ from the default's"}
    assert recorder.timed == ["a", "b", "b", "a", "a", "b"] and recorder.replayed[-3:] == [kept] * 3
    for p, q in zip(rim.model.parameters(), eager_rim.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for s, t in zip(ema.shadow_params, eager_ema.shadow_params):
        torch.testing.assert_close(s, t, rtol=0, atol=0)


def test_train_step_graph_falls_back_on_a_host_sync():
    eager_rim, _, eager_run, _ = _trainer(False)
    rim, _, run, train = _trainer(True, Counting(), sync=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (y, x) in enumerate(_batches()):
            torch.testing.assert_close(run(y, x, 1e-2), eager_run(y, x, 1e-2), rtol=0, atol=0)
    assert train.eager and train.replays == 0
    assert train.reason.startswith("CaptureError") and "host" in train.reason
    assert len([w for w in caught if "training step cannot be recorded" in str(w.message)]) == 1
    for p, q in zip(rim.model.parameters(), eager_rim.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("layouts", ["one", "timed"])
def test_train_step_graph_on_cuda_with_capturable_adam(layouts):
    """On the GPU: the recorded step trains (recorded in NCHW, or in both layouts and timed, as fit records it),
    and in the same steps as the eager loop from the same weights (TF32 off)."""
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=8, hidden_units=12)
    rim = rim_fast.RIM((16, 16), net, T=3, score_fn=_score, device="cuda")
    params = list(rim.model.parameters())
    lr = torch.tensor(1e-3, device="cuda")
    optimizer = torch.optim.Adam(params, lr=lr, capturable=True)

    def step(y, x):
        optimizer.zero_grad(set_to_none=True)
        loss = rim.loss_fn(y, x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def state():
        return [*params, *[t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]]

    start = [t.detach().clone() for t in params]
    variants = rim.cuda_graph_variants if layouts == "timed" else tuple
    train = TrainStepGraph(step, state, CudaRecorder(torch.device("cuda")), variants=variants)
    y, x = torch.randn(4, 1, 16, 16, device="cuda"), torch.randn(4, 1, 16, 16, device="cuda")
    with rim_fast.ops.use_cuda_layout("auto"):
        losses = [float(train(y, x)) for _ in range(6)]
    assert train.replays == 5 and not train.eager
    assert losses[-1] < losses[0]
    if layouts == "timed":
        assert train.tuning["kept"] in ("contiguous", "channels_last") and train.tuning["left_out"] == {}, \
            train.tuning
    graphed = [p.detach().clone() for p in params]
    # the parameters' .grad is the kept graph's memory, which each replay writes: a step that moves nothing (a
    # learning rate of 1e-30) leaves there the gradient at the current weights
    lr.fill_(1e-30)
    train(y, x)
    lr.fill_(1e-3)
    for p, g in zip(params, torch.autograd.grad(rim.loss_fn(y, x), params)):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    optimizer.state.clear()
    eager = [float(step(y, x)) for _ in range(6)]
    assert eager == pytest.approx(losses, rel=1e-4)
    for p, g in zip(params, graphed):  # Adam's steps (1e-3 each) from gradients equal to rounding
        torch.testing.assert_close(p, g, rtol=1e-3, atol=1e-4)

