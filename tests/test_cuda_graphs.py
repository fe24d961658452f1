"""The CUDA-graph cache of eager inference (rim_fast/cuda_graphs.py): its logic on the CPU through the stand-in
recorder (replays by running the function again), the real capture on CUDA."""
import warnings

import pytest
import torch

from rim_fast.cuda_graphs import CaptureError, CudaRecorder, EagerRecorder, GraphCache, signature

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
    assert cache.captures == 1 and cache.recorder.replays == 1
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
