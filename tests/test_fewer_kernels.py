"""Fewer kernels per RIM step (issue 13, part 3): each rewrite against what it replaces, forward and every gradient.

- ``conv_same`` without its pad (``reference.conv_same_symmetric``: the larger pad on both sides, zero taps);
- ``conv_transpose_tanh`` (on CUDA the transposed convolution without its bias, then ``bias_tanh``; on the CPU
  without autograd oneDNN's fused primitive), and oneDNN's conv + tanh under torch.compile;
- the Hourglass' last decoder conv and 1-wide output conv as one convolution (``Hourglass._merged_output``);
- a conv + tanh carrying the next convolution's bias as a channel of ones (``architectures.base.fold_next_bias``);
- the counts of bench/op_count.py at or under the issue's targets, on every workload's dimensions.
"""
import os
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rim_fast
from rim_fast import ops
from rim_fast.layers import per_call_cache
from rim_fast.ops import _triton, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.op_count import count  # noqa: E402

F64 = torch.float64


def _grads(out, inputs, cot):
    return torch.autograd.grad(out, inputs, cot, allow_unused=True)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("size", [8, 9, 6, 5])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("axis_swap", [True, False])
def test_conv_same_without_its_pad_matches_the_reference(dims, size, k, axis_swap):
    """Every (size, kernel) pair, odd and even, crops (k=1: negative pads) and score_models' axis swap included."""
    spatial = [size + j for j in range(dims)]  # non-square: the axis swap matters
    x = torch.randn(2, 3, *spatial, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, *[k] * dims, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)
    try:
        ref = reference.conv_same(x, w, b, k, 2, 1, 1, axis_swap)
    except RuntimeError:
        pytest.skip("the reference itself cannot run this size (crop below one sample)")
    new = reference.conv_same_symmetric(x, w, b, k, 2, 1, 1, axis_swap)
    assert new.shape == ref.shape
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for a, c in zip(_grads(new, (x, w, b), cot), _grads(ref, (x, w, b), cot)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_conv_same_without_its_pad_through_the_op():
    """The op's ``symmetric_padding`` implementation (CUDA's) on CPU tensors, and its dilation rule."""
    impl = rim_fast.ops._dispatch.OPS["conv_same"].impl("symmetric_padding")
    x, w, b = torch.randn(2, 3, 10, 12), torch.randn(5, 3, 3, 3), torch.randn(5)
    with per_call_cache():
        out = impl.fn(x, w, b, 3, 2, 1, 1, True)
    torch.testing.assert_close(out, reference.conv_same(x, w, b, 3, 2, 1, 1, True), rtol=1e-5, atol=1e-5)
    assert not impl.usable(x, w, b, 3, 2, 2, 1, True)
    with pytest.raises(ValueError, match="dilation 1"):
        reference.conv_same_symmetric(x, w, b, 3, 2, 2, 1, True)


TRANSPOSED = [
    pytest.param(1, (7,), 3, None, id="1D-k3"),
    pytest.param(2, (5, 6), 3, None, id="2D-k3"),
    pytest.param(2, (4, 5), 4, (8, 10), id="2D-k4-crop"),
    pytest.param(3, (3, 4, 2), 3, None, id="3D-k3"),
]


def _transposed_args(dims, size, k, dtype):
    x = torch.randn(2, 6, *size, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4, *[k] * dims, dtype=dtype, requires_grad=True)
    b = torch.randn(4, dtype=dtype, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("dims,size,k,crop", TRANSPOSED)
def test_conv_transpose_tanh_implementations_match_the_reference(dims, size, k, crop):
    """``unfused`` (the CPU's) in float64 and ``triton_bias_tanh`` (CUDA's; the Triton interpreter here) in float32:
    forward and the gradients of x, weight and bias; the crop keeps the first samples."""
    op = rim_fast.ops._dispatch.OPS["conv_transpose_tanh"]
    impls = {i.name: i for i in op.impls}
    for name, dtype in (("unfused", F64), ("triton_bias_tanh", torch.float32)):
        x, w, b = _transposed_args(dims, size, k, dtype)
        args = (x, w, b, 2, (k - 1) // 2, 1, 1, 1, crop)
        with torch.no_grad():  # the kernel path is picked for inference only; its gradients are tested anyway
            if not impls[name].usable(*args) or impls[name].missing():
                pytest.skip(f"{name}: {impls[name].why_not(*args)}")
        if name == "triton_bias_tanh":
            assert not impls[name].usable(*args) and "inference only" in impls[name].why_not(*args)
        ref = reference.conv_transpose_tanh(*args)
        new = impls[name].fn(*args)
        if crop is not None:
            assert ref.shape[2:] == crop
        assert new.shape == ref.shape and torch.isfinite(new).all()
        tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(new, ref, **tol)
        cot = torch.randn_like(ref)
        for a, c in zip(_grads(new, (x, w, b), cot), _grads(ref, (x, w, b), cot)):
            torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize("dims,size,k,crop", TRANSPOSED)
def test_conv_transpose_tanh_onednn_matches_the_reference(dims, size, k, crop):
    """The CPU's inference path: oneDNN's transposed convolution with a tanh post-op, cropped (float32); not taken
    with autograd (no derivative) nor under torch.compile (its shape function expects a packed weight)."""
    from rim_fast.ops import _cpu
    if not _cpu._transpose_fused_works():
        pytest.skip("this torch has no working mkldnn._convolution_transpose_pointwise")
    x, w, b = _transposed_args(dims, size, k, torch.float32)
    args = (x, w, b, 2, (k - 1) // 2, 1, 1, 1, crop)
    assert not _cpu.conv_transpose_tanh_usable(*args)  # autograd
    with torch.no_grad():
        assert _cpu.conv_transpose_tanh_usable(*args)
        ref = reference.conv_transpose_tanh(*args)
        assert not _cpu.conv_transpose_tanh_auto(*args)  # measured slower than unfused (bench_conv)
        new = _cpu.conv_transpose_tanh(*args)
    assert new.shape == ref.shape and torch.isfinite(new).all()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)


def test_compiled_cpu_conv_tanh_is_one_onednn_op():
    """Under torch.compile (fullgraph, no autograd) a CPU conv + tanh is oneDNN's fused primitive, an extern kernel
    in Inductor's code; the transposed one stays a convolution, then tanh."""
    from torch._inductor.utils import run_and_get_code
    from rim_fast.ops import _cpu
    if not _cpu._fused_works():
        pytest.skip("this torch has no working mkldnn._convolution_pointwise")
    x, w, b = torch.randn(2, 3, 9, 7), torch.randn(5, 3, 3, 3), torch.randn(5)
    wt, bt = torch.randn(5, 4, 3, 3), torch.randn(4)

    def f(x):
        y = ops.conv_tanh(x, w, b, padding="same")
        return ops.conv_transpose_tanh(y, wt, bt, stride=2, padding=1, output_padding=1)
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(f, fullgraph=True), x)
        ref = reference.conv_transpose_tanh(reference.conv_tanh(x, w, b, "same", 1, 1), wt, bt, 2, 1, 1, 1, 1, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    code = "".join(codes)
    assert code.count("mkldnn._convolution_pointwise") >= 1 and "_convolution_transpose_pointwise" not in code


def test_exported_conv_tanh_is_saved_and_reloaded():
    """torch.export (here called directly, not through RIM.export) gets no oneDNN op, whose empty scalar list it
    cannot serialize: the program saves, reloads and computes conv + tanh."""
    import io

    class ConvTanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, padding="same")

        def forward(self, x):
            return ops.conv_tanh(x, self.conv.weight, self.conv.bias, padding="same")
    if not hasattr(torch.compiler, "is_exporting"):
        pytest.skip("this torch cannot tell that torch.export traces (no torch.compiler.is_exporting): a direct "
                    "torch.export needs rim_fast.ops._dispatch.export_region() around it, as RIM.export has")
    net, x = ConvTanh(), torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
        assert "mkldnn" not in str(program.graph)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        out = torch.export.load(buffer).module()(x)
        torch.testing.assert_close(out, torch.tanh(net.conv(x)), rtol=1e-5, atol=1e-6)


def _forced_folds(monkeypatch):
    # as on CUDA: every conv + tanh with a bias carries the next convolution's bias (with any backend)
    monkeypatch.setattr(rim_fast.ops, "folds_bias", lambda x, weight, bias, *args: bias is not None)
    monkeypatch.setattr(rim_fast.ops, "rewrites", lambda: True)


def _network_and_grads(net, x, s, h):
    """(g, h', {parameter: gradient}) of one Hourglass call (within one RIM call's cache), float64."""
    net.zero_grad()
    with per_call_cache():
        g, h2 = net(x, None, s, h)
    cot = torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)
    (g * cot).sum().backward()
    return g.detach(), h2.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
def test_hourglass_rewrites_match_the_layers(dims, num_layers, monkeypatch):
    """Against the layers run one by one (a forward hook on the output layer turns the rewrites off), float64:
    the folded biases (CUDA's rule, forced here) in training, outputs, states and every parameter's gradient;
    the merged output conv in training and without autograd, the folds without autograd, outputs and states."""
    net = rim_fast.Hourglass(1, dimensions=dims, nf=6, hidden_units=8, num_layers=num_layers).to(F64)
    spatial = [8, 12, 4][:dims]
    x = torch.randn(3, 1, *spatial, dtype=F64)
    s = torch.randn_like(x)
    h = net.initalize_hidden_states(spatial, 3, dtype=F64)
    _forced_folds(monkeypatch)
    fast = _network_and_grads(net, x, s, h)
    with torch.no_grad(), per_call_cache():
        fast_inference = net(x, None, s, h)
        assert net._merged_output() is not None or num_layers == 0
    monkeypatch.undo()
    seen = []
    handle = net.output_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    plain = _network_and_grads(net, x, s, h)
    with torch.no_grad():
        plain_inference = net(x, None, s, h)
        assert net._merged_output() is None  # the hook turns the merge off
    handle.remove()
    assert len(seen) == 2  # the hook saw the output layer run
    for a, b in ((fast[0], plain[0]), (fast[1], plain[1])) + tuple(zip(fast_inference, plain_inference)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert set(fast[2]) == set(plain[2]) and len(plain[2]) == len(list(net.parameters()))
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], rtol=1e-10, atol=1e-12, msg=name)
    with torch.enable_grad():
        assert net._merged_output() is not None or num_layers == 0  # training merges too (gradients compared above)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_merged_output_is_the_float64_product_rounded_once(grad):
    """The merged output conv's weight W_out W_last and bias W_out b_last + b_out are computed in float64 and rounded
    once to float32 (a float32 product's rounding errors are the same at every output position: sums over
    positions add them up, 12x the reference's error on C = 1's output bias gradient, rms over 20 draws); with
    autograd, the gradients reach both layers' parameters."""
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=2, nf=16, hidden_units=8)
    last, out = net.all_modules[-1], net.output_layer
    with torch.set_grad_enabled(grad), per_call_cache():
        weight, bias = net._merged_output()
    w_out = out.weight.detach().double().reshape(1, -1)
    w64 = (w_out @ last.weight.detach().double().reshape(last.weight.shape[0], -1)).reshape(1, *last.weight.shape[1:])
    b64 = out.bias.detach().double() + w_out @ last.bias.detach().double()
    assert weight.dtype == bias.dtype == torch.float32
    assert torch.equal(weight.detach(), w64.float()) and torch.equal(bias.detach(), b64.float())
    w32 = (out.weight.reshape(1, -1) @ last.weight.reshape(last.weight.shape[0], -1)).detach()
    assert not torch.equal(w32.reshape(weight.shape), weight.detach()), "a float32 product is as good: no test"
    if grad:
        (weight.sum() + bias.sum()).backward()
        assert all(p.grad is not None for p in (last.weight, last.bias, out.weight, out.bias))
        assert last.weight.grad.dtype == torch.float32


def test_rewrites_take_effect(monkeypatch):
    """What the rewrites remove, counted: no bias add after any convolution once folded (one conv fewer with the
    merged output), and the merge skipped, and hooks called, where a hook watches a layer."""
    from bench.op_count import LaunchCounter
    net = rim_fast.Hourglass(1, dimensions=2, nf=4, hidden_units=4)
    x = torch.randn(2, 1, 8, 8)
    h = net.initalize_hidden_states((8, 8), 2)
    _forced_folds(monkeypatch)
    with torch.no_grad(), ops.use_backend("reference"):
        with LaunchCounter() as merged:
            net(x, None, x, h)
        handle = net.output_layer.register_forward_hook(lambda *a: None)
        with LaunchCounter() as hooked:
            net(x, None, x, h)
        handle.remove()
    assert hooked.counts["aten.convolution"] == merged.counts["aten.convolution"] + 1
    # the output layer's bias: added by a convolution of its own only when the merge is off
    assert merged.counts["aten.convolution + bias add"] < hooked.counts["aten.convolution + bias add"]
    monkeypatch.undo()
    # RIM_FAST_BACKEND=reference is torch_rim's computation: no layer merged, no bias folded
    with torch.no_grad(), ops.use_backend("reference"):
        with LaunchCounter() as spec:
            net(x, None, x, h)
    assert spec.counts["aten.convolution"] == hooked.counts["aten.convolution"]
    assert spec.counts["aten.convolution + bias add"] > hooked.counts["aten.convolution + bias add"]


@pytest.mark.parametrize("workload", ["S1", "S2", "S3"])
def test_op_counts_meet_the_targets(workload):
    """Issue 13's targets, as a GPU runs the step (bench/op_count.py, ``kernels``): at most 40 ops per predict step
    and 135 per training step, with no convolution bias added in a kernel of its own."""
    predict = count("kernels", "predict", workload)
    train = count("kernels", "train_step", workload)
    assert sum(predict.values()) / 10 <= 40, predict
    assert sum(train.values()) / 10 <= 135, train
    # no convolution bias added by a kernel of its own, but in training the two upsampling layers' (inference only:
    # conv_transpose_tanh's kernel path; the merged output conv carries the output layer's bias in training too)
    assert "aten.convolution + bias add" not in predict
    assert train["aten.convolution + bias add"] == 2 * 10 and train["aten.convolution_backward + bias grad"] == 20
    # every pad pads a weight, once per call (the zero taps of the strided convs, the folded biases' weights):
    # none pads an activation
    assert count("kernels", "predict", workload, T=3)["aten.constant_pad_nd"] == predict["aten.constant_pad_nd"]


def _fake_cuda_hourglass_calls(region: bool, B: int = 16, S=(64, 64), grad: bool = False):
    """The op implementations an Hourglass call runs on fake CUDA tensors (auto backend)."""
    net = rim_fast.Hourglass(1, dimensions=len(S), nf=32, hidden_units=32)
    with FakeTensorMode(), ops.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        params = {n: torch.empty(p.shape, device="cuda", requires_grad=True) for n, p in net.named_parameters()}
        x = torch.empty(B, 1, *S, device="cuda")
        h = torch.zeros(B, 32, *[n // 4 for n in S], device="cuda")
        with ops.trace() as calls, (ops.graph_region() if region else warnings.catch_warnings()), per_call_cache(), \
                torch.set_grad_enabled(grad):
            g, _ = torch.func.functional_call(net, params, (x, None, x, h))
        assert g.shape == x.shape and g.device.type == "cuda"
    return calls


def test_cuda_rule_on_fake_tensors(fake_cuda):
    """On CUDA under graph capture: bias + tanh kernels for every conv + tanh and (inference) upsampling + tanh, the
    strided convs without a pad; small eager calls keep cuDNN's conv + bias + tanh."""
    if _triton.K is None:
        pytest.skip(_triton.missing())
    saved = _triton.K.INTERPRETED
    _triton.K.INTERPRETED = False
    try:
        graph = _fake_cuda_hourglass_calls(region=True)
        eager = _fake_cuda_hourglass_calls(region=False)
        training = _fake_cuda_hourglass_calls(region=True, grad=True)
    finally:
        _triton.K.INTERPRETED = saved
    assert graph[("conv_transpose_tanh", "triton_bias_tanh")] == 2
    assert graph[("conv_same", "symmetric_padding")] == 2
    # the GRUBlock's hidden layer has no bias to fuse: cuDNN's conv, then tanh (unfused)
    assert graph[("conv_tanh", "triton_bias_tanh")] == 7 and graph[("conv_tanh", "unfused")] == 1
    assert eager[("conv_transpose_tanh", "unfused")] == 2 and eager[("conv_tanh", "unfused")] == 8
    # with autograd the upsampling layers keep cuDNN's conv with its bias (the whole-RIM error budget)
    assert training[("conv_transpose_tanh", "unfused")] == 2 and training[("conv_tanh", "triton_bias_tanh")] == 7


def test_the_bias_fold_only_where_a_kernel_saved_counts(fake_cuda, monkeypatch):
    """fold_next_bias on CUDA (fake tensors): in a CUDA graph, where conv + tanh is the Triton bias + tanh and the
    next convolution's bias add a kernel saved; not eagerly, even where the eager conv + tanh takes the Triton
    kernel (L2's [32, 32, 256x256]: there the extra channel costs multiply-adds and alignment, a launch nothing);
    not in channels-last."""
    if _triton.K is None:
        pytest.skip(_triton.missing())
    monkeypatch.setattr(_triton.K, "INTERPRETED", False)
    from rim_fast.ops.conv import _conv_tanh
    choose = _conv_tanh._choose
    with FakeTensorMode(), ops.use_backend("auto"), ops.use_cuda_layout("auto"):
        w, b = torch.empty(32, 32, 3, 3, device="cuda"), torch.empty(32, device="cuda")
        for x in (torch.empty(32, 32, 256, 256, device="cuda"), torch.empty(16, 32, 64, 64, device="cuda")):
            large = x.numel() >= _triton.AUTO_EAGER_MIN_ELEMENTS
            assert choose((x, w, b, "same", 1, 1))[0] == ("triton_bias_tanh" if large else "unfused")
            assert not ops.folds_bias(x, w, b, "same", 1, 1)
            with ops.graph_region():
                assert choose((x, w, b, "same", 1, 1))[0] == "triton_bias_tanh"
                assert ops.folds_bias(x, w, b, "same", 1, 1)
                with ops.use_cuda_layout("channels_last"):
                    assert not ops.folds_bias(x, w, b, "same", 1, 1)
        assert not ops.folds_bias(torch.empty(32, 32, 256, 256), w.cpu(), b.cpu(), "same", 1, 1)


def test_the_symmetric_stride_2_conv_only_where_a_kernel_saved_counts(fake_cuda):
    """The strided "same" conv as a symmetric 4x4 (no pad kernel) on CUDA (fake tensors): in a CUDA graph, and
    eagerly below 2^23 input elements (S2); eagerly at L2's [32, 32, 256x256] the pad and the 3x3 (16/9 fewer
    multiply-adds), as torch_rim."""
    with FakeTensorMode(), ops.use_backend("auto"), ops.use_cuda_layout("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        w = torch.empty(64, 32, 3, 3, device="cuda")
        for x, eager in ((torch.empty(32, 32, 256, 256, device="cuda"), "reference"),
                         (torch.empty(16, 32, 64, 64, device="cuda"), "symmetric_padding")):
            for region in (False, True):
                with ops.trace() as calls, (ops.graph_region() if region else warnings.catch_warnings()):
                    y = ops.conv_same(x, w, None, kernel_size=3, stride=2)
                assert y.shape == (x.shape[0], 64, x.shape[2] // 2, x.shape[3] // 2)
                assert list(calls) == [("conv_same", "symmetric_padding" if region else eager)], calls
