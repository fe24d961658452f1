"""The channels-last layout of the CUDA convolutions (rim_fast/ops/_cudnn.py, ``RIM_FAST_CUDA_LAYOUT``): its
convolutions against the references (forward, every gradient, channels-last outputs), the switch and the dispatch
rules, and a whole RIM kept channels-last from its input to its output. On the CPU the convolutions run through
the same functions (oneDNN serves them there), and the RIM through a stand-in that lets the layout serve CPU
tensors with the Triton gates and bias + tanh under the interpreter, as a GPU runs them; on CUDA the real thing."""
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rim_fast
from rim_fast import ops
from rim_fast.cuda_graphs import EagerRecorder
from rim_fast.ops import _cpu, _cudnn, _triton, reference
from rim_fast.ops._dispatch import OPS
from rim_fast.rim import CUDA_LAYOUT_VARIANTS

import test_error_budget as budget
from conftest import CUDA, assert_error_budget, assert_error_budget_over_draws, requires_cuda, tol

K = _triton.K
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
CONV_OPS = ("conv", "conv_same", "conv_transpose")


def conv_tol(dtype):
    # another summation order (see test_conv.conv_tol); TF32 is off in these tests' CUDA runs
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else tol(dtype)


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def is_channels_last(t: torch.Tensor) -> bool:
    # [B, C, *S] with the channels innermost (1D: [B, C, L] with strides (C L, 1, C))
    return t.movedim(1, -1).is_contiguous()


CASES = [
    pytest.param(1, (17,), 3, 1, 1, id="1D-L17-k3"),
    pytest.param(1, (17,), 3, 2, 1, id="1D-L17-k3-s2"),
    pytest.param(1, (16,), 4, 2, 1, id="1D-L16-k4-s2"),
    pytest.param(1, (19,), 3, 2, 2, id="1D-L19-k3-s2-d2"),
    pytest.param(2, (7, 9), 3, 1, 1, id="2D-7x9-k3"),
    pytest.param(2, (8, 5), 5, 2, 1, id="2D-8x5-k5-s2"),
    pytest.param(2, (9, 8), 3, 2, 2, id="2D-9x8-k3-s2-d2"),
    pytest.param(3, (3, 4, 5), 3, 1, 1, id="3D-3x4x5-k3"),
    pytest.param(3, (4, 4, 4), 3, 2, 1, id="3D-4x4x4-k3-s2"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims,size,k,stride,dilation", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_convs_match_reference_and_stay_channels_last(device, dims, size, k, stride, dilation, dtype, no_tf32):
    """conv ("same", stride 1), conv_same (score_models' strided "same": symmetric padding with zero taps, or a pad
    where the dilation rules that out) and conv_transpose: values and gradients of x, weight and bias as the
    reference's, outputs channels-last."""
    x = torch.randn(2, 3, *size, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(5, 3, *([k] * dims), dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
    if stride == 1:
        args = (w, b, 1, "same", dilation, 1)
        ref, new = reference.conv(x, *args), _cudnn.conv(x, *args)
    else:
        args = (w, b, k, stride, dilation, 1, True)
        ref, new = reference.conv_same(x, *args), _cudnn.conv_same(x, *args)
    # float64 convolutions answer contiguous on CUDA (aten turns cuDNN's NHWC off for float64:
    # cudnn_conv_suggest_memory_format) and in 3D on the CPU (no oneDNN there): the layout is asserted elsewhere
    layout_kept = dtype == torch.float32 or (device == "cpu" and dims < 3)
    assert new.shape == ref.shape and (is_channels_last(new) or not layout_kept)
    torch.testing.assert_close(new, ref, **conv_tol(dtype))
    cot = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(new, (x, w, b), cot), torch.autograd.grad(ref, (x, w, b), cot)):
        torch.testing.assert_close(a, c, **conv_tol(dtype))

    wt = torch.randn(3, 4, *([k] * dims), dtype=dtype, device=device, requires_grad=True)
    ref_t = reference.conv_transpose(x, wt, b[:4], 2, (k - 1) // 2, 1, 1, 1)
    new_t = _cudnn.conv_transpose(x, wt, b[:4], 2, (k - 1) // 2, 1, 1, 1)
    assert new_t.shape == ref_t.shape and (is_channels_last(new_t) or not layout_kept)
    torch.testing.assert_close(new_t, ref_t, **conv_tol(dtype))
    cot = torch.randn_like(ref_t)
    for a, c in zip(torch.autograd.grad(new_t, (x, wt), cot), torch.autograd.grad(ref_t, (x, wt), cot)):
        torch.testing.assert_close(a, c, **conv_tol(dtype))


def test_layout_switch_and_its_errors(monkeypatch):
    assert ops.CUDA_LAYOUTS == ("auto", "contiguous", "channels_last")
    before = ops.cuda_layout()
    with ops.use_cuda_layout("channels_last"):
        assert ops.cuda_layout() == "channels_last"
        with ops.use_cuda_layout("contiguous"):
            assert ops.cuda_layout() == "contiguous"
        assert ops.cuda_layout() == "channels_last"
    assert ops.cuda_layout() == before
    with pytest.raises(ValueError, match="layout 'nhwc' is not one of"):
        with ops.use_cuda_layout("nhwc"):
            pass
    monkeypatch.setenv("RIM_FAST_CUDA_LAYOUT", "NHWC")
    expected = r"RIM_FAST_CUDA_LAYOUT='nhwc' is not one of \('auto', 'contiguous', 'channels_last'\)"
    with pytest.raises(ValueError, match=expected):
        _cudnn._read_layout()
    monkeypatch.setenv("RIM_FAST_CUDA_LAYOUT", " Channels_Last ")
    assert _cudnn._read_layout() == "channels_last"
    monkeypatch.delenv("RIM_FAST_CUDA_LAYOUT")
    assert _cudnn._read_layout() == "auto"
    # per thread, as autocast: a layout set in one thread (a graph recording) is not another's
    seen = []
    with ops.use_cuda_layout("channels_last"):
        worker = threading.Thread(target=lambda: seen.append(ops.cuda_layout()))
        worker.start()
        worker.join()
    assert seen == [_cudnn._DEFAULT]


@pytest.mark.parametrize("backend", ["auto", "kernels"])
def test_the_layout_serves_cuda_tensors_only_and_only_when_asked(backend):
    """Never on CPU tensors (the CPU has its own channels-last convolutions), never unasked, under any backend."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    for layout in ops.CUDA_LAYOUTS:
        with ops.use_backend(backend), ops.use_cuda_layout(layout), ops.trace() as calls:
            ops.conv_same(x, w, None, kernel_size=3, stride=2)
            ops.conv(x, w)
        assert all(impl != "cudnn_channels_last" for _, impl in calls), calls
    impl = OPS["conv"].impl("cudnn_channels_last")
    assert impl.kernel is False  # a layout, not a kernel: RIM_FAST_BACKEND=kernels never raises for it
    with ops.use_cuda_layout("auto"):
        assert not impl.usable(x, w) and impl.why_not(x, w) == (
            "RIM_FAST_CUDA_LAYOUT is 'auto': eager calls run contiguous, a CUDA graph the faster layout")
    with ops.use_cuda_layout("contiguous"):
        assert not impl.usable(x, w) and impl.why_not(x, w) == "RIM_FAST_CUDA_LAYOUT is 'contiguous'"
    with ops.use_cuda_layout("channels_last"):
        assert not impl.usable(x, w) and impl.why_not(x, w) == "CUDA tensors only"
    # registered before symmetric_padding: on CUDA, when asked, it serves the strided "same" convolutions
    names = [i.name for i in OPS["conv_same"].impls]
    assert names.index("cudnn_channels_last") < names.index("symmetric_padding")


def test_the_layout_leaves_float64_to_nchw(fake_cuda):
    """aten runs cuDNN's float64 convolutions in NCHW whatever the input's layout: the layout would only add
    conversions there (float32, float16 and bfloat16 take it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    impl = OPS["conv"].impl("cudnn_channels_last")
    with FakeTensorMode(), ops.use_cuda_layout("channels_last"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = torch.empty(2, 3, 8, 8, device="cuda", dtype=dtype)
            w = torch.empty(4, 3, 3, 3, device="cuda", dtype=dtype)
            assert impl.usable(x, w) == (dtype != torch.float64), dtype
        assert impl.why_not(x, w) == "float64: aten runs cuDNN's float64 convolutions in NCHW whatever the layout"


class Conversions(TorchDispatchMode):
    """Counts the copies that change a tensor's layout (``clone`` with a memory format, as ``.contiguous(fmt)``
    runs), by the copied tensor's shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten.clone and kwargs.get("memory_format") not in (None,
                                                                                             torch.preserve_format):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)


@pytest.fixture
def cpu_stand_in(monkeypatch):
    """CPU tensors served as a GPU serves them under RIM_FAST_CUDA_LAYOUT=channels_last: the layout's
    convolutions, the Triton gates and bias + tanh (interpreter), not the CPU's channels-last and oneDNN paths."""
    if K is None or not K.INTERPRETED:
        pytest.skip("the stand-in runs the Triton kernels through the interpreter (TRITON_INTERPRET=1)")
    usable = lambda x, *a: _cudnn.cuda_layout() == "channels_last" and x.dim() in (3, 4, 5)  # noqa: E731
    never = lambda *a: False  # noqa: E731
    for op in CONV_OPS:
        for name, fn in (("cudnn_channels_last", usable), ("channels_last", never)):
            monkeypatch.setattr(OPS[op].impl(name), "usable", fn)
            monkeypatch.setattr(OPS[op].impl(name), "auto", fn)
    for op in ("conv_tanh", "conv_transpose_tanh"):
        monkeypatch.setattr(OPS[op].impl("onednn_fused"), "usable", never)
        monkeypatch.setattr(OPS[op].impl("onednn_fused"), "auto", never)


#: the small RIM of the error-budget tests, on one channel as the standard workloads
KW = dict(score_fn=budget.score_fn, channels=1)


def _rim(dims, size, device="cpu"):
    return budget._small_rim(dims, KW, torch.float32, size, device)[0]


def _within_budget(dims, size, backend, device="cpu", layout="channels_last"):
    """The trajectory with autograd, the loss and every gradient (``budget._run``; rms over ``budget.DRAWS`` of
    weights and data, as test_error_budget's: one draw's errors swing by several times), and the trajectory without
    (``budget._predict``: the inference-only paths; one draw), in ``layout`` with ``backend``, within the budget of
    conftest against the float32 and float64 references (contiguous)."""
    draws = []
    for seed in budget.DRAWS:
        names, exact, ref = budget._reference_runs(dims, KW, seed, size=size, device=device)
        _, fast = budget._run(dims, KW, torch.float32, backend, size=size, device=device, layout=layout, seed=seed)
        draws.append((fast, ref, exact))
    assert_error_budget_over_draws(draws, torch.float32, names, what=f"{layout} on {device}, {backend}, _run")
    names, exact = budget._predict(dims, KW, torch.float64, "reference", size=size, device=device)
    _, ref = budget._predict(dims, KW, torch.float32, "reference", size=size, device=device)
    _, fast = budget._predict(dims, KW, torch.float32, backend, size=size, device=device, layout=layout)
    assert_error_budget(fast, ref, exact, torch.float32, names, what=f"{layout} on {device}, {backend}, _predict")


@pytest.mark.parametrize("dims,size", [(1, (32,)), (2, (12, 8)), (3, (8, 4, 8))], ids=["1D", "2D", "3D"])
def test_rim_stays_channels_last_from_input_to_output(cpu_stand_in, dims, size):
    """predict and a training step in channels-last equal the contiguous path's, and the only activations
    converted are the network's 2-channel input, once per step (the weights: once per call)."""
    r = _rim(dims, size)
    B = 2
    y, x_true = torch.randn(B, 1, *size), torch.randn(B, 1, *size)
    conv_weights = sum(p.dim() >= 3 for p in r.model.parameters())
    results = {}
    for layout in ("contiguous", "channels_last"):
        with ops.use_backend("kernels"), ops.use_cuda_layout(layout):
            with torch.no_grad(), ops.trace() as calls, Conversions() as conv:
                predict = r.predict(y)
            r.zero_grad(set_to_none=True)
            r.loss_fn(y, x_true).backward()
        grads = {n: p.grad.clone() for n, p in r.model.named_parameters()}
        results[layout] = predict, grads
        used = {op: impl for (op, impl) in calls if op in CONV_OPS}
        if layout == "channels_last":
            assert set(used.values()) == {"cudnn_channels_last"}, calls
            assert calls[("gru_gates_zero_state", "triton")] > 0 and calls[("bias_tanh", "triton")] > 0
            activations = [s for s in conv.shapes if s[0] == B]
            # (1D runs as [B, C, 1, L])
            assert activations == [(B, 2, *((1,) if dims == 1 else ()), *size)] * r.T, conv.shapes
            # each weight once per call, not once per step (T = 3); the GRUs' merged weights are a few more
            assert len(conv.shapes) - len(activations) <= conv_weights + 4, conv.shapes
    torch.testing.assert_close(results["channels_last"][0], results["contiguous"][0], **tol(torch.float32))
    for name, g in results["contiguous"][1].items():
        torch.testing.assert_close(results["channels_last"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dims,size", [(1, (32,)), (2, (8, 12)), (3, (4, 8, 4))], ids=["1D", "2D", "3D"])
def test_rim_in_channels_last_within_the_error_budget(cpu_stand_in, dims, size):
    """The trajectory (no autograd: bias + tanh in Triton), the loss and every gradient, channels-last with the
    kernels, within the budget of conftest against the float32 and float64 references."""
    _within_budget(dims, size, "kernels")


class _LayoutClock(EagerRecorder):
    """The stand-in recorder with a scripted clock per layout: the RIM records its variants in the order of
    ``CUDA_LAYOUT_VARIANTS``, so the n-th capture of a call is that variant's graph."""

    def __init__(self, seconds):
        self.seconds, self.captured = seconds, 0

    def capture(self, fn):
        graph, out = super().capture(fn)
        name = CUDA_LAYOUT_VARIANTS[self.captured % len(CUDA_LAYOUT_VARIANTS)].name
        self.captured += 1
        return (name, graph), out

    def replay(self, graph, out):
        super().replay(graph[1], out)

    def time(self, graph, out, replays):
        self.replay(graph, out)
        return self.seconds[graph[0]]


@pytest.mark.parametrize("faster", ["contiguous", "channels_last"])
def test_rim_graph_keeps_the_faster_layout(cpu_stand_in, monkeypatch, faster):
    """RIM_FAST_CUDA_LAYOUT=auto: a RIM's first graphed call records its loop in both layouts and keeps the faster
    graph (scripted clock); its replays then run in that layout, and equal the eager contiguous predict."""
    seconds = {"contiguous": 1.0, "channels_last": 1.0}
    seconds[faster] = 0.5
    monkeypatch.setattr(rim_fast.RIM, "_graph_recorder", lambda self: _LayoutClock(seconds))
    monkeypatch.setattr(rim_fast.RIM, "cuda_graph_variants", lambda self: CUDA_LAYOUT_VARIANTS)
    r = _rim(2, (12, 8))
    y1, y2 = torch.randn(2, 1, 12, 8), torch.randn(2, 1, 12, 8)
    with ops.use_backend("kernels"), ops.use_cuda_layout("auto"), torch.no_grad():
        first = r.predict(y1)
        (tuning,) = r._graph_cache.tuning.values()
        assert tuning["kept"] == faster and set(tuning["seconds"]) == {"contiguous", "channels_last"}, tuning
        assert r._graph_cache.captures == 2 and tuning["left_out"] == {}
        with ops.trace() as calls:
            second = r.predict(y2)
        assert r._graph_cache.captures == 2
        assert {impl for (op, impl) in calls if op in CONV_OPS} == (
            {"cudnn_channels_last"} if faster == "channels_last" else {"reference", "symmetric_padding"}), calls
        r.cuda_graphs = False
        expected = [r.predict(y) for y in (y1, y2)]
    torch.testing.assert_close(first, expected[0], **tol(torch.float32))
    torch.testing.assert_close(second, expected[1], **tol(torch.float32))


# ---- CUDA: the real layout, eagerly and in CUDA graphs -----------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dims,size", [(1, (64,)), (2, (24, 20))], ids=["1D", "2D"])
def test_cuda_rim_graph_times_both_layouts_and_keeps_one(dims, size, no_tf32):
    """On the GPU, the default (RIM_FAST_CUDA_LAYOUT=auto): the first predict records the loop in both layouts,
    times them on this GPU and keeps one; its outputs and the replays' equal the eager contiguous path's."""
    r = _rim(dims, size, device="cuda")
    y1, y2 = torch.randn(2, 1, *size, device="cuda"), torch.randn(2, 1, *size, device="cuda")
    with ops.use_cuda_layout("auto"), torch.no_grad():
        first, second = r.predict(y1), r.predict(y2)
        (tuning,) = r._graph_cache.tuning.values()
        r.cuda_graphs = False
        expected = [r.predict(y) for y in (y1, y2)]
    assert r._graph_cache.captures == 2 and tuning["left_out"] == {}, tuning
    assert tuning["kept"] in ("contiguous", "channels_last") and all(s > 0 for s in tuning["seconds"].values())
    # the graph runs the Triton gates, bias + tanh and the bias fold, eager calls of this size the references: two
    # float32 computations (as test_cuda_graphs' CUDA predict test)
    torch.testing.assert_close(first, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, expected[1], rtol=1e-4, atol=1e-5)

@requires_cuda
@pytest.mark.parametrize("dims,size", [(1, (64,)), (2, (24, 20)), (3, (8, 8, 12))], ids=["1D", "2D", "3D"])
def test_cuda_rim_in_channels_last_matches_contiguous(dims, size, no_tf32):
    """On the GPU: predict (recorded into a CUDA graph, then replayed; and without graphs) and a training step in
    channels-last equal the contiguous path's; the trace shows the layout served every convolution."""
    r = _rim(dims, size, device="cuda")
    y, x_true = torch.randn(2, 1, *size, device="cuda"), torch.randn(2, 1, *size, device="cuda")
    with torch.no_grad():
        expected = r.predict(y)
    with ops.use_cuda_layout("channels_last"):
        with torch.no_grad():
            first, second = r.predict(y).clone(), r.predict(y)
            r.cuda_graphs = False
            with ops.trace() as calls:
                eager = r.predict(y)
            r.cuda_graphs = True
        assert {impl for (op, impl) in calls if op in CONV_OPS} == {"cudnn_channels_last"}, calls
        r.zero_grad(set_to_none=True)
        r.loss_fn(y, x_true).backward()
        grads = {n: p.grad.clone() for n, p in r.model.named_parameters()}
    for out in (first, second, eager):  # other kernels than the contiguous eager path's (see above)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    r.zero_grad(set_to_none=True)
    r.loss_fn(y, x_true).backward()
    for name, p in r.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@requires_cuda
@pytest.mark.parametrize("dims,size", [(1, (64,)), (2, (16, 12)), (3, (8, 4, 8))], ids=["1D", "2D", "3D"])
@pytest.mark.parametrize("backend", ["auto", "kernels"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_rim_within_the_error_budget(dims, size, backend, layout, no_tf32):
    """On the GPU, TF32 off (the budget is float32's): the default layout's fast paths (symmetric padding, the
    gates and bias + tanh in Triton where auto or kernels picks them, the update step in CUDA) and the
    channels-last layout's, trajectory, loss and every gradient."""
    _within_budget(dims, size, backend, device="cuda", layout=layout)


@requires_cuda
def test_cuda_channels_last_does_not_fold_biases_into_an_odd_channel():
    """fold_next_bias's extra channel (33 of 32) would misalign cuDNN's NHWC kernels: not in channels-last."""
    x = torch.randn(2, 32, 16, 16, device="cuda")
    w, b = torch.randn(32, 32, 3, 3, device="cuda"), torch.randn(32, device="cuda")
    with ops.graph_region():  # what a CUDA graph's recording picks: the Triton bias + tanh, and the fold with it
        assert ops.folds_bias(x, w, b, "same", 1, 1) == (_triton.missing() is None)
        with ops.use_cuda_layout("channels_last"):
            assert not ops.folds_bias(x, w, b, "same", 1, 1)


@pytest.mark.parametrize("dims,size", [(1, (32,)), (2, (12, 8))], ids=["1D", "2D"])
def test_checkpointed_steps_recompute_in_the_forwards_layout_on_another_thread(cpu_stand_in, dims, size):
    """On CUDA the autograd engine runs backward, and so gradient checkpointing's recompute, on its own thread per
    device, where the layout a thread selected (``use_cuda_layout``, per thread) is not: the recompute must run in
    the forward's layout (1D: otherwise its saved tensors' shapes differ and torch's checkpoint raises). On the CPU
    the backward is run from another thread to stand for it."""
    import threading
    r = _rim(dims, size)
    y, x_true = torch.randn(2, 1, *size), torch.randn(2, 1, *size)
    grads = {}
    for checkpointing in (False, True):
        r.gradient_checkpointing = checkpointing
        r.zero_grad(set_to_none=True)
        with ops.use_backend("kernels"), ops.use_cuda_layout("channels_last"):
            loss = r.loss_fn(y, x_true)
        failures, calls = [], {}

        def backward():
            try:
                with ops.use_backend("kernels"), ops.trace() as traced:
                    loss.backward()
                calls.update(traced)
            except Exception as err:  # noqa: BLE001 - reported below
                failures.append(err)
        thread = threading.Thread(target=backward)
        thread.start()
        thread.join()
        assert not failures, failures
        recomputed = {impl for (op, impl) in calls if op in CONV_OPS}
        assert recomputed == ({"cudnn_channels_last"} if checkpointing else set()), calls
        grads[checkpointing] = {n: p.grad.clone() for n, p in r.model.named_parameters()}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-6, msg=name)
