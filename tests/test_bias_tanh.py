"""The Triton bias + tanh kernel (kernels/bias_tanh.py, op rim_fast::bias_tanh) against reference.bias_tanh: forward
and both gradients, 0-3 spatial dims, odd channel counts, batch 1 and more, contiguous / channels-last / strided
inputs (the output keeps a dense input's layout), NaN-poisoned outputs, the error budget against float64 in
float32, float16 and bfloat16, opcheck; conv_tanh on it (``triton_bias_tanh``) and the ``auto`` rule that picks it
on CUDA (decided here on fake CUDA tensors). On CPU the kernel runs in the Triton interpreter (conftest sets
TRITON_INTERPRET=1); the GPU-only tests run on CUDA machines."""
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rim_fast import ops
from rim_fast.ops import _triton, reference

from conftest import CUDA, assert_error_budget, requires_cuda, tol

KB = _triton.KB
requires_kernels = pytest.mark.skipif(KB is None or not (CUDA or KB.INTERPRETED),
                                      reason=f"Triton kernels cannot run here: {_triton.missing()}")
pytestmark = requires_kernels

#: where the kernel runs: CPU through the interpreter (no GPU), else CUDA
DEV = "cpu" if KB is not None and KB.INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN: an element the kernel does not write makes the comparison fail."""
    def nan_empty(shape, stride, dtype, device):
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(float("nan"))
    if KB is not None:
        monkeypatch.setattr(KB, "_empty", nan_empty)


# ---- inputs -------------------------------------------------------------------------------------------

# (B, C, spatial): 1x1, dims 0-3, odd sizes, odd channel counts, batch 1 and more
SHAPES = [
    (1, 1, ()), (3, 5, ()), (1, 17, (1,)), (3, 3, (7,)), (1, 5, (33,)),
    (3, 17, (5, 3)), (1, 3, (9, 7)), (3, 5, (1, 1)), (1, 1, (4, 6)),
    (3, 5, (3, 4, 5)), (1, 17, (3, 1, 2)),
]
LAYOUTS = ("contig", "channels_last", "strided")


def shape_id(B, C, S):
    return f"B{B}-C{C}-S" + ("x".join(map(str, S)) if S else "0")


CASES = [pytest.param(B, C, S, layout, id=f"{shape_id(B, C, S)}-{layout}")
         for (B, C, S) in SHAPES for layout in LAYOUTS if not (layout == "channels_last" and not S)]


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a layout: contiguous, channels-last (channels innermost, any number of spatial dims; the
    CPU convolutions' 1D output is [B, C, L] channels-last) or non-dense (a channel slice of a wider tensor)."""
    if layout == "contig":
        return t.contiguous()
    if layout == "channels_last":
        order = (0, *range(2, t.dim()), 1)
        out = t.permute(order).contiguous().permute(*[order.index(i) for i in range(t.dim())])
        assert (out.stride(1) == 1 or t.shape[1] == 1) and out.shape == t.shape
        return out
    big = torch.randn(t.shape[0], t.shape[1] + 3, *t.shape[2:], dtype=t.dtype, device=t.device)
    return big[:, 1:1 + t.shape[1]].copy_(t)


def make_inputs(B, C, S, layout="contig", device=DEV, dtype=torch.float32, seed=0):
    """x (pre-activations on the scale a convolution gives, some saturating), bias, and a cotangent."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g, dtype=torch.float64))  # noqa: E731
    x = in_layout(rnd(B, C, *S, scale=2.0).to(device=device, dtype=dtype), layout)
    return x, rnd(C, scale=0.5).to(device=device, dtype=dtype), rnd(B, C, *S).to(device=device, dtype=dtype)


def leaves(*ts):
    return [t.detach().requires_grad_() for t in ts]


def run(fn, x, bias, cot):
    x, bias = leaves(x, bias)
    y = fn(x, bias)
    return (y, *torch.autograd.grad(y, (x, bias), cot))


# ---- forward and backward against the reference ---------------------------------------------------------

@pytest.mark.parametrize("B,C,S,layout", CASES)
def test_matches_reference(B, C, S, layout):
    x, bias, cot = make_inputs(B, C, S, layout)
    new, ref = run(_triton.bias_tanh, x, bias, cot), run(reference.bias_tanh, x, bias, cot)
    for name, a, b in zip(("y", "grad x", "grad bias"), new, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol(torch.float32), msg=lambda m: f"{name}: {m}")
    # the output keeps a dense input's layout
    if layout != "strided":
        assert new[0].stride() == x.stride()
    else:
        assert new[0].is_contiguous()


@pytest.mark.parametrize("S", [(9,), (7, 9)], ids=["1D", "2D"])
def test_a_cropped_channels_last_input_keeps_its_layout(S):
    """A transposed convolution's channels-last output cut to a multiple of its stride (even kernels: one sample
    more) is not dense: the output and the gradient stay channels-last (dense), so that the next convolution needs
    no conversion."""
    x, bias, cot = make_inputs(2, 5, S, "channels_last")
    cut = (slice(None), slice(None), *[slice(0, s - 1) for s in S])
    crop, cot = x[cut], cot[cut]
    assert crop.stride() == x.stride() and not crop.is_contiguous()
    new, ref = run(_triton.bias_tanh, crop, bias, cot), run(reference.bias_tanh, crop, bias, cot)
    for name, a, b in zip(("y", "grad x", "grad bias"), new, ref):
        torch.testing.assert_close(a, b, **tol(torch.float32), msg=lambda m: f"{name}: {m}")
    for t in new[:2]:
        assert t.stride(1) == 1 and t.movedim(1, -1).is_contiguous(), t.stride()


@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_gradient_in_another_layout(layout):
    """The backward copies a grad_y of another layout (expanded, transposed) into y's before its pass."""
    x, bias, _ = make_inputs(3, 5, (4, 6), layout)
    for cot in (torch.ones(()).to(DEV).expand(3, 5, 4, 6), torch.randn(6, 4, 5, 3, device=DEV).permute(3, 2, 1, 0)):
        new, ref = run(_triton.bias_tanh, x, bias, cot), run(reference.bias_tanh, x, bias, cot)
        for a, b in zip(new, ref):
            torch.testing.assert_close(a, b, **tol(torch.float32))


def _budget_runs(x, bias, cot, dtype, layout):
    """(kernel, reference, float64 reference): y and both gradients, the first two computed in ``dtype``."""
    low = [in_layout(x.to(dtype), layout), bias.to(dtype), cot.to(dtype)]
    exact = run(reference.bias_tanh, *[t.double() for t in (x, bias, cot)])
    return ([t.double() for t in run(_triton.bias_tanh, *low)], [t.double() for t in run(reference.bias_tanh, *low)],
            exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_error_budget(dtype, layout):
    """Kernel error against float64 at most 2x the reference's own in that precision (+ conftest's slack)."""
    x, bias, cot = make_inputs(3, 17, (9, 7), layout, dtype=torch.float64)
    assert_error_budget(*_budget_runs(x, bias, cot, dtype, layout), dtype, names=("y", "grad x", "grad bias"),
                        what=f"bias_tanh {dtype}")


def test_mixed_dtypes_promote_like_the_reference():
    x, bias, cot = make_inputs(2, 5, (6,))
    y = _triton.bias_tanh(x.half(), bias)
    assert y.dtype == reference.bias_tanh(x.half(), bias).dtype == torch.float32
    torch.testing.assert_close(y, reference.bias_tanh(x.half(), bias), **tol(torch.float32))
    new, ref = run(_triton.bias_tanh, x.half(), bias, cot), run(reference.bias_tanh, x.half(), bias, cot)
    assert [t.dtype for t in new] == [t.dtype for t in ref] == [torch.float32, torch.float16, torch.float32]
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, **tol(torch.float16))


def test_tanh_accuracy_small_and_saturated():
    """Relative accuracy near 0 (where 2 sigmoid(2x) - 1 cancels), saturation without NaN, both gradients."""
    n = 64
    x = torch.cat([torch.logspace(-9, 0, n // 2), -torch.logspace(-9, 1.5, n // 2),
                   torch.tensor([30.0, -30.0, 80.0, -80.0])]).view(1, 1, -1).to(DEV)
    zero = torch.zeros(1, device=DEV)
    torch.testing.assert_close(_triton.bias_tanh(x, zero), reference.bias_tanh(x.double(), zero.double()).float(),
                               rtol=2e-6, atol=0)
    cot = torch.randn_like(x)
    for a, b in zip(run(_triton.bias_tanh, x, zero, cot), run(reference.bias_tanh, x, zero, cot)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_bad_shapes_raise():
    x = torch.randn(2, 5, 3, device=DEV)
    for bias in (torch.randn(4, device=DEV), torch.randn(5, 1, device=DEV)):
        with pytest.raises(ValueError, match="bias_tanh"):
            _triton.bias_tanh(x, bias)


# ---- the tests can fail --------------------------------------------------------------------------------

def test_poison_detects_unwritten_elements(monkeypatch):
    """A launch that skips its last program leaves NaN in the output (so the comparisons above would fail)."""
    x, bias, _ = make_inputs(3, 5, (7,))
    def short_grid(M, K, device):
        block_m, block_k, n_k_blocks, grid, num_warps = KB._geometry.__wrapped__(M, K, device)
        return block_m, block_k, n_k_blocks, (grid[0] - 1,), num_warps
    monkeypatch.setattr(KB, "_MAX_TILE", 16)
    monkeypatch.setattr(KB, "_MIN_TILE", 16)
    monkeypatch.setattr(KB, "_launch", short_grid)
    out = _triton.bias_tanh(x, bias)
    assert torch.isnan(out).any() and not torch.isnan(out).all()


def test_wrong_channel_index_is_caught(monkeypatch):
    """A kernel that reads the bias of the wrong channel (the other layout's rule) disagrees with the reference."""
    x, bias, _ = make_inputs(2, 5, (4, 3), "channels_last")
    monkeypatch.setattr(KB, "_matrix", lambda t: (t.numel() // t.shape[1], t.shape[1], True))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_triton.bias_tanh(x, bias), reference.bias_tanh(x, bias))


def test_outputs_not_zero_and_not_constant():
    """Guards against interpreter/numpy pairs that return all-zero outputs (triton #4440)."""
    x, bias, cot = make_inputs(3, 5, (9,))
    y = _triton.bias_tanh(x, bias)
    gx = torch.ops.rim_fast.bias_tanh_backward(cot, y)
    for o in (y, gx):
        assert torch.isfinite(o).all() and (o != 0).float().mean() > 0.99 and o.std() > 0.05


# ---- op registration ----------------------------------------------------------------------------------

def _opcheck_utils(device):
    # the Triton interpreter cannot run under AOT dispatch (fake/functional tensors): that check needs CUDA
    if device == "cuda":
        return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("layout", ["contig", "channels_last", "strided"])
@pytest.mark.parametrize("S", [(), (5,), (3, 4)], ids=["S0", "S5", "S3x4"])
def test_opcheck(S, layout):
    if layout == "channels_last" and not S:
        pytest.skip("no channels-last layout without spatial dims")
    x, bias, cot = make_inputs(2, 3, S, layout)
    torch.library.opcheck(torch.ops.rim_fast.bias_tanh.default, leaves(x, bias), test_utils=_opcheck_utils(DEV))
    y = _triton.bias_tanh(x, bias)
    torch.library.opcheck(torch.ops.rim_fast.bias_tanh_backward.default, (cot, y), test_utils=_opcheck_utils(DEV))


@pytest.mark.parametrize("S", [(), (3,), (2, 3)], ids=["S0", "S3", "S2x3"])
def test_gradcheck_reference(S):
    x, bias, _ = make_inputs(2, 3, S, dtype=torch.float64)
    assert torch.autograd.gradcheck(reference.bias_tanh, leaves(x, bias))


# ---- conv_tanh on the kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,S", [(1, (9,)), (2, (7, 6)), (3, (3, 4, 5))], ids=["1D", "2D", "3D"])
def test_conv_tanh_on_the_kernel(dims, S, monkeypatch):
    """RIM_FAST_BACKEND=kernels with autograd, oneDNN's fused primitive (which kernels takes first on the CPU) left
    out: conv_tanh runs the convolution without its bias, then the kernel; forward and the gradients of x, weight
    and bias match."""
    monkeypatch.setattr(ops._dispatch.OPS["conv_tanh"].impl("onednn_fused"), "usable", lambda *args: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *S, generator=g).to(DEV)
    w = (0.3 * torch.randn(5, 3, *[3] * dims, generator=g)).to(DEV)
    b = torch.randn(5, generator=g).to(DEV)
    cot = torch.randn(2, 5, *S, generator=g).to(DEV)

    def grads(fn):
        ins = leaves(x, w, b)
        out = fn(*ins)
        return (out, *torch.autograd.grad(out, ins, cot))

    with ops.use_backend("kernels"), ops.trace() as calls:
        new = grads(lambda x, w, b: ops.conv_tanh(x, w, b, padding="same"))
    ref = grads(lambda x, w, b: reference.conv_tanh(x, w, b, "same", 1, 1))
    assert calls[("conv_tanh", "triton_bias_tanh")] == 1 and calls[("bias_tanh", "triton")] == 1, calls
    for a, c in zip(new, ref):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(KB is None or not KB.INTERPRETED, reason="the kernels backend on CPU tensors needs the interpreter")
def test_dispatch_on_the_cpu():
    """On the CPU ``auto`` keeps the CPU's choices (oneDNN's fusion, with autograd too, or the unfused pair; the
    reference bias_tanh); the kernels backend runs the bias_tanh kernel through the interpreter, and conv_tanh as
    oneDNN's fusion where it works."""
    from rim_fast.ops import _cpu
    fused = "onednn_fused" if _cpu._fused_works() else "unfused"
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    with ops.use_backend("auto"), ops.trace() as calls:
        ops.bias_tanh(torch.randn(2, 4, 5), b)
        ops.conv_tanh(x, w, b.requires_grad_())
    assert calls[("bias_tanh", "reference")] == 1 and calls[("conv_tanh", fused)] == 1, calls
    with ops.use_backend("kernels"), ops.trace() as calls:
        ops.bias_tanh(torch.randn(2, 4, 5), b)
        ops.conv_tanh(x, w.requires_grad_(), None)
    assert calls[("bias_tanh", "triton")] == 1 and calls[("conv_tanh", fused)] == 1, calls
    assert not _triton.bias_tanh_usable(torch.randn(2, 4, 5).double(), b.double())


@pytest.fixture
def fake_cuda_kernels(monkeypatch, fake_cuda):
    """The Triton kernels as a GPU machine loads them (not interpreted): decisions on fake CUDA tensors."""
    if _triton.K is None:
        pytest.skip(_triton.missing())
    monkeypatch.setattr(_triton.K, "INTERPRETED", False)


def _conv_tanh_on_fake_cuda(B, S, bias=True, region=False):
    """The implementations conv_tanh runs for a 3x3 32 -> 32 convolution of [B, 32, *S] fake CUDA tensors (eager,
    autograd on: training); the output's layout and shape are checked."""
    with FakeTensorMode(), ops.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.empty(B, 32, *S, device="cuda")
        w = torch.empty(32, 32, 3, 3, device="cuda", requires_grad=True)
        b = torch.empty(32, device="cuda", requires_grad=True) if bias else None
        with ops.trace() as calls, (ops.graph_region() if region else warnings.catch_warnings()):
            out = ops.conv_tanh(x, w, b)
        assert out.shape == (B, 32, *S) and out.device.type == "cuda" and out.requires_grad
    return dict(calls)


def test_auto_on_cuda(fake_cuda_kernels):
    """``auto`` on CUDA: the kernel for eager calls of >= 2^23 output elements (L2's [32, 32, 256x256]) and under
    CUDA-graph capture (S2's [16, 32, 64x64] too), the unfused pair for small eager calls and without a bias."""
    fused = {("conv_tanh", "triton_bias_tanh"): 1, ("conv", "reference"): 1, ("bias_tanh", "triton"): 1}
    unfused = {("conv_tanh", "unfused"): 1, ("conv", "reference"): 1, ("tanh", "reference"): 1}
    assert _conv_tanh_on_fake_cuda(32, (256, 256)) == fused
    assert _conv_tanh_on_fake_cuda(16, (64, 64)) == unfused
    assert _conv_tanh_on_fake_cuda(16, (64, 64), region=True) == fused
    assert _conv_tanh_on_fake_cuda(32, (256, 256), bias=False) == unfused


def test_auto_not_under_compile(fake_cuda_kernels, monkeypatch):
    """Under torch.compile Inductor fuses the bias add and the tanh itself: ``auto`` leaves them to it, even in a
    CUDA-graph region."""
    with FakeTensorMode():
        x, w, b = torch.empty(32, 32, 256, 256, device="cuda"), torch.empty(32, 32, 3, 3, device="cuda"), \
            torch.empty(32, device="cuda")
        assert _triton.bias_tanh_auto(x, b) and _triton.conv_tanh_auto(x, w, b, "same", 1, 1)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        with ops.graph_region():
            assert not _triton.bias_tanh_auto(x, b) and not _triton.conv_tanh_auto(x, w, b, "same", 1, 1)
        # the CPU never: the reference (or oneDNN) is faster than the interpreter
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert not _triton.bias_tanh_auto(torch.randn(32, 32, 256, 256), torch.randn(32))


def test_fake_cuda_output_layout(fake_cuda_kernels):
    """The fake (what torch.compile traces with) gives the kernel's layout: channels-last in, channels-last out."""
    with FakeTensorMode():
        x = torch.empty(2, 8, 5, 6, device="cuda").contiguous(memory_format=torch.channels_last)
        y = _triton.bias_tanh(x, torch.empty(8, device="cuda"))
        assert y.stride() == x.stride() and y.device.type == "cuda"


# ---- GPU only -----------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["contig", "channels_last", "strided"])
@pytest.mark.parametrize("S", [(), (33,), (16, 15), (4, 5, 3)], ids=["S0", "S33", "S16x15", "S4x5x3"])
def test_cuda_matches_reference(dtype, layout, S):
    if layout == "channels_last" and not S:
        pytest.skip("no channels-last layout without spatial dims")
    x, bias, cot = make_inputs(4, 17, S, layout, device="cuda", dtype=torch.float64)
    assert_error_budget(*_budget_runs(x, bias, cot, dtype, layout), dtype, names=("y", "grad x", "grad bias"),
                        what=f"bias_tanh {dtype} {layout}")


@requires_cuda
def test_cuda_int64_offsets():
    """More than 2**31 elements: offsets past int32 (bf16 to keep it at ~4.3 GB a tensor)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with >= 40 GB")
    B, C, N = 2, 16, 2 ** 26 + 3
    bias = torch.randn(C, device="cuda", dtype=torch.bfloat16)
    for layout in ("contig", "channels_last"):
        x = torch.randn(B, C, N, device="cuda", dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        y = _triton.bias_tanh(x, bias)
        assert y.numel() > 2 ** 31 and y.stride() == x.stride()
        for b in (0, B - 1):
            for sl in (slice(0, 1000), slice(N - 1000, N)):
                torch.testing.assert_close(y[b:b + 1, :, sl], reference.bias_tanh(x[b:b + 1, :, sl], bias),
                                           **tol(torch.bfloat16))
        del x, y
        torch.cuda.empty_cache()


@requires_cuda
def test_cuda_compile_sees_the_kernel():
    """torch.compile(fullgraph=True) of conv_tanh forward + backward with RIM_FAST_BACKEND=kernels: no graph break,
    the eager numbers, and the generated code launches the kernels."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    x = torch.randn(4, 8, 16, 16, device="cuda", requires_grad=True)
    w = (0.2 * torch.randn(12, 8, 3, 3, device="cuda")).requires_grad_()
    b = torch.randn(12, device="cuda", requires_grad=True)

    def forward(x, w, b):
        return ops.conv_tanh(x, w, b)

    def step(fn):
        # the backward outside the compiled function (Dynamo does not trace torch.autograd.grad by default):
        # AOTAutograd compiles it with the forward
        out = fn(x, w, b)
        return out, torch.autograd.grad(out.square().sum(), (x, w, b))

    with ops.use_backend("kernels"):
        eager = step(forward)
        compiled, code = run_and_get_code(step, torch.compile(forward, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], **tol(torch.float32))
    for a, c in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    source = "\n".join(code)
    assert "_bias_tanh_fwd_kernel" in source and "_bias_tanh_bwd_kernel" in source


@requires_cuda
def test_cuda_graph_capture_picks_the_kernel():
    """auto under CUDA-graph capture runs conv_tanh as the convolution and the kernel; the replay is right."""
    x = torch.randn(2, 8, 16, 16, device="cuda")
    w, b = 0.2 * torch.randn(8, 8, 3, 3, device="cuda"), torch.randn(8, device="cuda")
    with ops.graph_region():
        ops.conv_tanh(x, w, b)  # warm up (compile the kernel) outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), ops.use_backend("auto"):
        graph = torch.cuda.CUDAGraph()
        with ops.trace() as calls, torch.cuda.graph(graph):
            out = ops.conv_tanh(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert calls[("conv_tanh", "triton_bias_tanh")] == 1 and calls[("bias_tanh", "triton")] == 1, calls
    torch.testing.assert_close(out, reference.conv_tanh(x, w, b, "same", 1, 1), **tol(torch.float32))
