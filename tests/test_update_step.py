"""The C++/CUDA update-step kernels (csrc/update_step.*, ops in rim_fast/ops/_cpp.py) against
rim_fast.ops.reference: every preprocessing mode, the state update and its loss term, forward and backward;
opcheck of every op; gradcheck in float64; dispatcher registration; a whole RIM, kernels vs reference.

The extension must be built (CI always builds it): without it these tests fail, unless RIM_FAST_NO_EXT=1
says it was deliberately not built, in which case the kernel tests skip and the fallback tests run."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rim_fast
from rim_fast import _ext, ops
from rim_fast.ops import _cpp, reference
from rim_fast.ops._dispatch import OPS

from conftest import CUDA, assert_error_budget, requires_cuda, tol

NO_EXT = os.environ.get("RIM_FAST_NO_EXT") == "1"
needs_ext = pytest.mark.skipif(NO_EXT, reason="RIM_FAST_NO_EXT=1: rim_fast._C deliberately not built")

BETA_1, BETA_2, EPS = 0.9, 0.999, 1e-7
MOMENT_METHODS = ("adam", "rmsprop", "rmsprop_fixed")
METHODS = ("identity", "arcsinh") + MOMENT_METHODS

# (shape, id): a 1x1 case, odd and non-power-of-two sizes, 1D/2D/3D spatial, batch 1 and more, and one shape
# above the CPU kernels' parallel grain (32768) so that several chunks/threads run.
SHAPES = [
    ((1, 1, 1), "B1-C1-L1"),
    ((3, 1, 17), "B3-C1-L17"),
    ((2, 3, 5, 7), "B2-C3-H5-W7"),
    ((1, 2, 3, 5, 4), "B1-C2-D3-H5-W4"),
    ((3, 1, 129, 131), "B3-C1-H129-W131"),
]
LAYOUTS = ("contiguous", "strided", "offset")
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture
def ext():
    """The loaded extension, with its outputs NaN-poisoned: every kernel output starts as NaN (csrc/outputs.h),
    so an element a kernel fails to write cannot pass as a correct value. A test using it fails when
    rim_fast._C is missing (CI always builds it)."""
    if NO_EXT:
        pytest.skip("RIM_FAST_NO_EXT=1: rim_fast._C deliberately not built")
    module = _ext.module()
    assert module is not None, _ext.missing()
    module._set_test_hooks(True, False)
    yield module
    module._set_test_hooks(False, False)


def make(shape, dtype, device, layout="contiguous", positive=False, requires_grad=False):
    """A random tensor of `shape` with the given memory layout: contiguous, strided (every other element of
    the last dim) or offset (contiguous but starting one element into its storage: unaligned on the GPU)."""
    n = 1
    for s in shape:
        n *= s
    if layout == "contiguous":
        storage = torch.empty(n, dtype=dtype, device=device)
        out = storage.view(shape)
    elif layout == "strided":
        storage = torch.empty(n * 2, dtype=dtype, device=device)
        out = storage.view(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "offset":
        storage = torch.empty(n + 1, dtype=dtype, device=device)
        out = storage[1:].view(shape)
    else:
        raise ValueError(layout)
    t = torch.randn(shape, dtype=torch.float64, device=device)
    out.copy_(t.abs() + 0.1 if positive else t)
    if n > 1:
        assert (layout == "contiguous") == (out.is_contiguous() and out.storage_offset() == 0)
    return out.requires_grad_(requires_grad)


def shapes(fn):
    return pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[i for _, i in SHAPES])(fn)


def dtypes(*ds):
    return pytest.mark.parametrize("dtype", ds, ids=[DTYPE_IDS[d] for d in ds])


def assert_close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual, expected, **tol(dtype), msg=lambda m: f"{msg}: {m}")


def moments_inputs(shape, dtype, device, layout, state_dtype=None):
    state_dtype = state_dtype or dtype
    score = make(shape, dtype, device, layout)
    m = make(shape, state_dtype, device, layout)
    v = make(shape, state_dtype, device, layout, positive=True)
    return score, m, v


# ---- the extension is there, and registered where the build says --------------------------------------

def _expect_cuda_build():
    """setup.py's rule: a CUDA build of torch, an nvcc of the same CUDA major version, no RIM_FAST_NO_CUDA."""
    if not torch.version.cuda or os.environ.get("RIM_FAST_NO_CUDA") == "1":
        return False
    home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    nvcc = next((c for c in candidates if c and os.path.exists(c)), None)
    if nvcc is None:
        return False
    release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True,
                                                            text=True).stdout)
    return release is not None and release.group(1) == torch.version.cuda.split(".")[0]


def test_extension_loaded(ext):
    assert _cpp.missing() is None
    assert _cpp.has_kernel("cpu")


@pytest.mark.parametrize("name", _cpp.OPS)
def test_dispatcher_registration(ext, name):
    qualname = f"rim_fast::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    # the CPU kernel is the C++ one from csrc/register.cpp, not the Python fallback
    assert "register.cpp" in torch._C._dispatch_dump(qualname)
    # tanh is CPU only (GPUs have a fast, accurate tanh), and so are the shifted sums (of the CPU thin convolutions)
    # and the Winograd convolution (cuDNN has its own)
    cpu_only = name in ("tanh", "shift_sum", "shift_stack", "winograd_conv3d", "winograd_conv3d_weight")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA") == (bool(ext.WITH_CUDA) and not cpu_only)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def test_build_has_cuda_kernels_when_it_should(ext):
    if CUDA or _expect_cuda_build():
        assert ext.WITH_CUDA, ("torch is a CUDA build and nvcc is available, but rim_fast._C was built without its "
                               "CUDA kernels (set CUDA_HOME, or RIM_FAST_NO_CUDA=1 if intended)")
    assert _cpp.has_kernel("cuda") == bool(ext.WITH_CUDA)


# ---- preprocessing: forward against the reference ------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
@shapes
@dtypes(torch.float32, torch.float64)
def test_preprocess_matches_reference(ext, device, dtype, shape, layout, method):
    score, m, v = moments_inputs(shape, dtype, device, layout)
    before = [t.clone() for t in (score, m, v)]
    for t in (0, 4):
        expected = reference.preprocess_score(score, m, v, t, method, BETA_1, BETA_2, EPS)
        with ops.trace() as calls, ops.use_backend("kernels"):
            actual = ops.preprocess_score(score, m, v, t, method=method, beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
        assert calls == {("preprocess_score", "cpp"): 1}
        assert len(actual) == len(expected) == 3
        for name, a, e in zip(("out", "m'", "v'"), actual, expected):
            assert a.dtype == e.dtype and a.shape == e.shape
            assert_close(a, e, dtype, f"{method} t={t} {name}")
        if method in ("identity", "arcsinh", "rmsprop"):
            # stateless methods, and rmsprop's never-updated v, hand back the caller's tensors like the reference
            assert actual[2] is v
    for b, t in zip(before, (score, m, v)):
        torch.testing.assert_close(t, b, rtol=0, atol=0, msg="an input was modified")


@pytest.mark.parametrize("method", MOMENT_METHODS)
def test_preprocess_step_as_tensor(ext, device, method):
    score, m, v = moments_inputs((2, 1, 9, 7), torch.float32, device, "contiguous")
    for t in (0, 1, 7, 30):
        expected = reference.preprocess_score(score, m, v, t, method, BETA_1, BETA_2, EPS)
        for step in (torch.tensor(t), torch.tensor(float(t), device=device), torch.tensor([t], device=device)):
            actual = _cpp.preprocess_score(score, m, v, step, method, BETA_1, BETA_2, EPS)
            assert len(actual) == len(expected)
            for a, e in zip(actual, expected):
                assert_close(a, e, torch.float32, f"{method} t={t} step={step}")


@pytest.mark.parametrize("state", ["fp32-moments", "same-moments"])
@pytest.mark.parametrize("method", MOMENT_METHODS + ("arcsinh",))
@dtypes(torch.bfloat16, torch.float16)
def test_preprocess_low_precision(ext, device, dtype, method, state):
    """bf16/fp16 scores, with float32 moments or moments in the same precision: the outputs have the
    reference's dtypes, and the kernel stays within the error budget (conftest) of the reference (which rounds
    intermediate products to the low precision; the kernel does not)."""
    shape = (4, 1, 33, 31)
    score, m, v = moments_inputs(shape, dtype, device, "contiguous",
                                 state_dtype=torch.float32 if state == "fp32-moments" else dtype)
    for t in (0, 5):
        exact = reference.preprocess_score(score.double(), m.double(), v.double(), t, method, BETA_1, BETA_2, EPS)
        ref_low = reference.preprocess_score(score, m, v, t, method, BETA_1, BETA_2, EPS)
        actual = _cpp.preprocess_score(score, m, v, t, method, BETA_1, BETA_2, EPS)
        assert [a.dtype for a in actual] == [r.dtype for r in ref_low]
        assert_error_budget(actual, ref_low, exact, dtype, ("out", "m'", "v'"), what=f"{method} t={t}")


# ---- state update and loss term: forward and backward against the reference ----------------------------

def _update_case(shape, dtype, device, layout, with_loss, with_w, grad_x_true=False):
    x = make(shape, dtype, device, layout, requires_grad=True)
    g = make(shape, dtype, device, layout, requires_grad=True)
    x_true = make(shape, dtype, device, layout, requires_grad=grad_x_true) if with_loss else None
    w = make(shape, dtype, device, layout, positive=True, requires_grad=grad_x_true) if with_w else None
    return x, g, x_true, w


def _outputs_and_grads(fn, x, g, x_true, w, cot_x, cot_loss):
    x_new, loss = fn(x, g, x_true, w)
    total = (x_new * cot_x).sum()
    if loss is not None:
        total = total + loss * cot_loss
    inputs = [t for t in (x, g, x_true, w) if t is not None and t.requires_grad]
    return (x_new, loss), torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("loss", ["no-loss", "loss", "loss-w", "loss-w-grad-all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@shapes
@dtypes(torch.float32, torch.float64)
def test_update_matches_reference(ext, device, dtype, shape, layout, loss):
    x, g, x_true, w = _update_case(shape, dtype, device, layout, loss != "no-loss", "-w" in loss,
                                   grad_x_true=loss.endswith("grad-all"))
    cot_x = torch.randn(shape, dtype=dtype, device=device)
    cot_loss = torch.randn((), dtype=dtype, device=device)
    before = [t.detach().clone() for t in (x, g, x_true, w) if t is not None]
    (e_x, e_loss), e_grads = _outputs_and_grads(reference.update_state, x, g, x_true, w, cot_x, cot_loss)
    with ops.trace() as calls, ops.use_backend("kernels"):
        (a_x, a_loss), a_grads = _outputs_and_grads(ops.update_state, x, g, x_true, w, cot_x, cot_loss)
    assert calls == {("update_state", "cpp"): 1}
    assert_close(a_x, e_x, dtype, "x'")
    if x_true is None:
        assert a_loss is None
    else:
        assert a_loss.shape == () and a_loss.dtype == dtype
        assert_close(a_loss, e_loss, dtype, "loss term")
    assert len(a_grads) == len(e_grads)
    for i, (a, e) in enumerate(zip(a_grads, e_grads)):
        assert_close(a, e, dtype, f"gradient {i}")
    for b, t in zip(before, [t for t in (x, g, x_true, w) if t is not None]):
        torch.testing.assert_close(t.detach(), b, rtol=0, atol=0, msg="an input was modified")


def test_update_loss_only_gradient(ext, device):
    """The loss term alone (x' unused, its gradient materialised as zeros) still gives the right gradients."""
    x, g, x_true, _ = _update_case((2, 1, 11, 5), torch.float64, device, "contiguous", True, False)
    e = torch.autograd.grad(reference.update_state(x, g, x_true)[1], [x, g])
    a = torch.autograd.grad(_cpp.update_state(x, g, x_true)[1], [x, g])
    assert len(a) == len(e)
    for ai, ei in zip(a, e):
        assert_close(ai, ei, torch.float64, "loss-only gradient")


@pytest.mark.parametrize("with_loss", [False, True], ids=["no-loss", "loss"])
@dtypes(torch.bfloat16, torch.float16)
def test_update_low_precision(ext, device, dtype, with_loss):
    shape = (4, 1, 33, 31)
    x, g, x_true, w = _update_case(shape, dtype, device, "contiguous", with_loss, with_loss)
    x, g = x.detach(), g.detach()
    exact = reference.update_state(*(t.double() if t is not None else None for t in (x, g, x_true, w)))
    ref_low = reference.update_state(x, g, x_true, w)
    actual = _cpp.update_state(x, g, x_true, w)
    if not with_loss:
        assert actual[1] is None and exact[1] is None
        actual, ref_low, exact = actual[:1], ref_low[:1], exact[:1]
    assert all(a.dtype == dtype for a in actual)
    assert_error_budget(actual, ref_low, exact, dtype, ("x'", "loss")[:len(actual)])


def test_empty_tensors(ext, device):
    x = torch.randn(2, 0, 3, device=device)
    x_new, loss = _cpp.update_state(x, x, x, x)
    assert x_new.shape == x.shape and loss.item() == 0
    out, m, v = _cpp.preprocess_score(x, x, x, 3, "adam", BETA_1, BETA_2, EPS)
    assert out.shape == m.shape == v.shape == x.shape


def test_auto_policy(ext):
    """auto: the kernels serve eager calls where they fuse work (moment preprocessing, the loss term); the
    reference serves identity and a lone x + g (one PyTorch op already)."""
    x, g, x_true = (torch.randn(2, 1, 5) for _ in range(3))
    v = torch.rand(2, 1, 5)
    with ops.use_backend("auto"), ops.trace() as calls:
        ops.preprocess_score(x, g, v, 1, method="adam", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
        ops.preprocess_score(x, g, v, 1, method="rmsprop", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
        ops.preprocess_score(x, None, None, 1, method="arcsinh", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
        ops.preprocess_score(x, None, None, 1, method="identity", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
        ops.update_state(x, g, x_true)
        ops.update_state(x, g)
    assert calls == {("preprocess_score", "cpp"): 3, ("preprocess_score", "reference"): 1,
                     ("update_state", "cpp"): 1, ("update_state", "reference"): 1}
    # with autograd on CPU tensors the loss term takes the reference (the custom op's backward, registered from
    # Python, costs more host time than the fused pass saves there); a CUDA tensor keeps the kernel
    g.requires_grad_(True)
    with ops.use_backend("auto"), ops.trace() as calls:
        ops.update_state(x, g, x_true)
    assert calls == {("update_state", "reference"): 1}
    assert not _cpp.update_auto(x, g, x_true)
    with torch.no_grad():
        assert _cpp.update_auto(x, g, x_true)


# ---- user errors ----------------------------------------------------------------------------------------

def test_user_errors(ext, device):
    x = torch.randn(2, 1, 5, device=device)
    step = torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="g must have the shape of x"):
        torch.ops.rim_fast.update_state(x, torch.randn(2, 1, 4, device=device))
    with pytest.raises(RuntimeError, match="g must have x's dtype"):
        torch.ops.rim_fast.update_state(x, x.double())
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        torch.ops.rim_fast.update_state(x.int(), x.int())
    with pytest.raises(RuntimeError, match="w must have the shape of x"):
        torch.ops.rim_fast.update_state_loss(x, x, x, x[:1])
    with pytest.raises(RuntimeError, match="m and v must have score's dtype"):
        torch.ops.rim_fast.preprocess_adam(x, x.double(), x.double(), step, BETA_1, BETA_2, EPS)
    with pytest.raises(RuntimeError, match="m and v must share one dtype"):
        torch.ops.rim_fast.preprocess_adam(x.half(), x, x.half(), step, BETA_1, BETA_2, EPS)
    with pytest.raises(RuntimeError, match="step must hold one number"):
        torch.ops.rim_fast.preprocess_adam(x, x, x, torch.zeros(2), BETA_1, BETA_2, EPS)
    with pytest.raises(RuntimeError, match="grad_loss must hold one number"):
        torch.ops.rim_fast.update_state_loss_backward(x, x, x, x, None)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="g must be on x's device"):
            torch.ops.rim_fast.update_state(x, x.cpu())
    # the public function falls back to the reference (auto) for what the kernels do not cover: broadcasting
    w = torch.rand(1, 1, 5, device=device)
    with ops.trace() as calls:
        ops.update_state(x, x, x, w)
    assert calls == {("update_state", "reference"): 1}
    with ops.use_backend("kernels"), pytest.raises(RuntimeError, match="no kernel of op 'update_state'"):
        ops.update_state(x, x, x, w)


def test_preprocess_with_gradients_uses_reference(ext):
    """The preprocessing kernels have no derivative: calls that need one go to the (differentiable)
    reference, and the ops themselves refuse to be differentiated."""
    score = torch.randn(3, 1, 4, requires_grad=True)
    m, v = torch.randn(3, 1, 4), torch.rand(3, 1, 4)
    with ops.trace() as calls:
        out, _, _ = ops.preprocess_score(score, m, v, 2, method="adam", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
    assert calls == {("preprocess_score", "reference"): 1}
    out.sum().backward()
    assert score.grad is not None
    with torch.no_grad(), ops.trace() as calls:
        ops.preprocess_score(score, m, v, 2, method="adam", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
    assert calls == {("preprocess_score", "cpp"): 1}
    out = torch.ops.rim_fast.preprocess_adam(score, m, v, torch.tensor(2.0), BETA_1, BETA_2, EPS)[0]
    with pytest.raises(RuntimeError, match="has no derivative"):
        out.sum().backward()


# ---- opcheck, gradcheck ---------------------------------------------------------------------------------

def _op_samples(device):
    shape = (2, 3, 5)

    def r(requires_grad=False, positive=False, dtype=torch.float64):
        return make(shape, dtype, device, positive=positive, requires_grad=requires_grad)

    step_dev = torch.tensor(3.0, dtype=torch.float64, device=device)
    samples = []
    for name in ("preprocess_adam", "preprocess_rmsprop", "preprocess_rmsprop_fixed"):
        for step in (torch.tensor(2.0, dtype=torch.float64), step_dev):
            samples.append((name, (r(), r(), r(positive=True), step, BETA_1, BETA_2, EPS)))
        samples.append((name, (r(dtype=torch.bfloat16), r(dtype=torch.float32), r(positive=True, dtype=torch.float32),
                               step_dev, BETA_1, BETA_2, EPS)))
    samples.append(("preprocess_arcsinh", (r(),)))
    samples.append(("update_state", (r(True), r(True))))
    samples.append(("update_state", (r(), r())))
    samples.append(("update_state_loss", (r(True), r(True), r(), None)))
    samples.append(("update_state_loss", (r(True), r(True), r(True), r(True, positive=True))))
    samples.append(("update_state_loss", (r(dtype=torch.float32), r(dtype=torch.float32),
                                          r(dtype=torch.float32), None)))
    gl = torch.tensor(0.7, dtype=torch.float64, device=device)
    samples.append(("update_state_loss_backward", (r(True), gl.clone().requires_grad_(), r(True), r(True), None)))
    samples.append(("update_state_loss_backward", (r(), gl, r(), r(), r(positive=True))))
    return samples


@pytest.mark.parametrize("index", range(len(_op_samples("cpu"))),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(_op_samples("cpu"))])
def test_opcheck(ext, device, index):
    name, args = _op_samples(device)[index]
    torch.library.opcheck(getattr(torch.ops.rim_fast, name).default, args)


def test_every_op_has_an_opcheck_sample():
    # tanh, the shifted sums and the Winograd convolution, the extension's ops of the conv family, are checked in
    # tests/test_conv.py
    conv_family = {"tanh", "shift_sum", "shift_stack", "winograd_conv3d", "winograd_conv3d_weight"}
    assert {n for n, _ in _op_samples("cpu")} == set(_cpp.OPS) - conv_family


@pytest.mark.parametrize("index", range(len(_op_samples("cpu"))),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(_op_samples("cpu"))])
def test_a_skipped_write_is_caught(ext, device, index):
    """The poison reaches the kernels' outputs: a kernel made to skip its last element (test hook) leaves a NaN
    there, which the comparisons above would report; without the hook every element is written."""
    name, args = _op_samples(device)[index]
    op = getattr(torch.ops.rim_fast, name)
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert all(not o.isnan().any() for o in outs)
    ext._set_test_hooks(True, True)
    skipped = op(*args)
    skipped = skipped if isinstance(skipped, tuple) else (skipped,)
    for out in skipped:
        if out.dim() > 0:  # the loss term is one value, always written (over the elements written)
            assert out.reshape(-1)[-1].isnan() and not out.reshape(-1)[:-1].isnan().any()


def test_gradcheck_update(ext, device):
    shape = (2, 1, 3, 4)
    x, g, x_true, w = _update_case(shape, torch.float64, device, "strided", True, True, grad_x_true=True)
    torch.autograd.gradcheck(lambda *a: _cpp.update_state(*a)[0], (x, g))
    torch.autograd.gradcheck(lambda *a: _cpp.update_state(*a), (x, g, x_true, w))
    torch.autograd.gradcheck(lambda *a: _cpp.update_state(*a), (x, g, x_true))
    torch.autograd.gradgradcheck(lambda *a: _cpp.update_state(*a), (x, g, x_true, w))


def test_gradcheck_reference_preprocess():
    """gradcheck of the reference (the kernels have no derivative: see test_preprocess_with_gradients...)."""
    score, m = (torch.randn(2, 1, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = (torch.rand(2, 1, 5, dtype=torch.float64) + 0.1).requires_grad_()
    for method in METHODS:
        for t in (0, 3):
            def fn(s, m_, v_):
                return tuple(o for o in reference.preprocess_score(s, m_, v_, t, method, BETA_1, BETA_2, EPS)
                             if o is not None and o.requires_grad)
            torch.autograd.gradcheck(fn, (score, m, v))


# ---- torch.compile: no recompile per step, Inductor equals eager ---------------------------------------

def _compiled_step(score, m, v, t, x, x_true):
    out, m, v = ops.preprocess_score(score, m, v, t, method="adam", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
    x, loss = ops.update_state(x, out, x_true, None)
    return x, m, v, loss


def test_compile_per_step_does_not_recompile(ext):
    """A step function compiled once serves every step: t as a tensor gives one graph; t as an int is
    specialised at most once before automatic dynamic shapes make it symbolic (never one graph per step)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    score, m, v = moments_inputs((2, 1, 6), torch.float32, "cpu", "contiguous")
    x, x_true = torch.randn(2, 1, 6), torch.randn(2, 1, 6)
    ops_in_graph = (torch.ops.rim_fast.preprocess_adam, torch.ops.rim_fast.preprocess_adam.default)
    for as_tensor, max_frames in ((True, 1), (False, 2)):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        step_fn = torch.compile(_compiled_step, backend=counter, fullgraph=True)
        with ops.use_backend("kernels"):
            for t in range(6):
                actual = step_fn(score, m, v, torch.tensor(t) if as_tensor else t, x, x_true)
                expected = _compiled_step(score, m, v, t, x, x_true)
                assert len(actual) == len(expected)
                for a, e in zip(actual, expected):
                    assert_close(a, e, torch.float32, f"compiled step t={t}")
        assert counter.frame_count <= max_frames, f"t as {'tensor' if as_tensor else 'int'}: {counter.frame_count}"
        assert any(node.target in ops_in_graph for graph in counter.graphs for node in graph.graph.nodes)


def test_inductor_equals_eager(ext, device):
    torch._dynamo.reset()
    shape = (2, 1, 9, 7)
    score, m, v = moments_inputs(shape, torch.float32, device, "contiguous")
    x = torch.randn(shape, device=device, requires_grad=True)
    x_true = torch.randn(shape, device=device)

    def run(t):
        with torch.no_grad():
            out, m2, v2 = ops.preprocess_score(score, m, v, t, method="adam", beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS)
        x2, loss = ops.update_state(x, out * x, x_true, None)
        return x2, m2, v2, loss

    with ops.use_backend("kernels"):
        compiled = torch.compile(run, fullgraph=True)
        for t in (0, 2):
            eager = run(t)
            comp = compiled(t)
            assert len(comp) == len(eager)
            for a, e in zip(comp, eager):
                assert_close(a, e, torch.float32, f"inductor t={t}")
            ge = torch.autograd.grad(eager[0].sum() + eager[3], x)
            gc = torch.autograd.grad(comp[0].sum() + comp[3], x)
            assert_close(gc[0], ge[0], torch.float32, "inductor gradient")


# ---- a whole RIM: kernels equal the reference ----------------------------------------------------------

def _rim_run(backend, dims, method, device, monkeypatch):
    torch.manual_seed(3)
    model = rim_fast.Hourglass(1, dimensions=len(dims), nf=4, hidden_units=6).to(device)
    rim = rim_fast.RIM(dims, model, score_fn=lambda x, y: y - x, T=3, score_preprocessing_method=method,
                       device=device)
    y = torch.randn(2, 1, *dims, device=device)
    x_true = torch.randn(2, 1, *dims, device=device)
    with ops.use_backend(backend), ops.trace() as calls:
        trajectory = rim(y)
        loss = rim.loss_fn(y, x_true)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in rim.named_parameters() if p.grad is not None}
    return trajectory, loss, grads, calls


@pytest.mark.parametrize("dims", [(8,), (8, 8)], ids=["1D-8", "2D-8x8"])
@pytest.mark.parametrize("method", ["ADAM", "RMSPROP"])
def test_rim_kernels_equal_reference(ext, device, dims, method, monkeypatch):
    # isolate this extension's ops: every other op (gates, convolutions) runs its reference in both runs
    for op in OPS.values():
        if op.name not in ("preprocess_score", "update_state"):
            monkeypatch.setattr(op, "impls", [])
    ref_traj, ref_loss, ref_grads, ref_calls = _rim_run("reference", dims, method, device, monkeypatch)
    traj, loss, grads, calls = _rim_run("kernels", dims, method, device, monkeypatch)
    # 3 steps in forward() and 3 in loss_fn()
    assert calls[("preprocess_score", "cpp")] == 6 and calls[("update_state", "cpp")] == 6
    assert ("preprocess_score", "reference") not in calls and ("update_state", "reference") not in calls
    assert ref_calls[("preprocess_score", "reference")] == 6
    close = dict(rtol=1e-6, atol=1e-7)
    assert len(traj) == len(ref_traj)
    for a, e in zip(traj, ref_traj):
        torch.testing.assert_close(a, e, **close)
    torch.testing.assert_close(loss, ref_loss, **close)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        # 1e-6 relative to the gradient's scale: elements near zero carry the rounding of the large ones
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=max(1e-7, 1e-6 * scale),
                                   msg=lambda m: f"{name}: {m}")


# ---- CUDA specifics -------------------------------------------------------------------------------------

@requires_cuda
def test_cuda_graph_replay_with_device_step(ext):
    """A captured graph reads t from device memory: replays with a new t give the new bias corrections."""
    shape = (4, 1, 64, 64)
    score, m, v = moments_inputs(shape, torch.float32, "cuda", "contiguous")
    step = torch.zeros((), dtype=torch.float64, device="cuda")
    x, x_true = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _compiled_step(score, m, v, step, x, x_true)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with ops.use_backend("kernels"), torch.cuda.graph(graph):
        outputs = _compiled_step(score, m, v, step, x, x_true)
    for t in (0, 3, 9):
        step.fill_(t)
        graph.replay()
        with ops.use_backend("reference"):
            expected = _compiled_step(score, m, v, t, x, x_true)
        assert len(outputs) == len(expected)
        for a, e in zip(outputs, expected):
            assert_close(a, e, torch.float32, f"graph replay t={t}")


@requires_cuda
def test_cuda_side_stream_and_large(ext):
    """Kernels launch on the current stream (here a side stream), and a tensor larger than the capped grid
    (2048 blocks x 256 threads x 4 floats) is covered by the grid-stride loop (with a 3-element tail after the
    last 16-byte pack); the loss is deterministic."""
    shape = (3, 1, 1023, 1031)
    x, g, x_true, w = (make(shape, torch.float32, "cuda", positive=True) for _ in range(4))
    expected = reference.update_state(x, g, x_true, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        actual = _cpp.update_state(x, g, x_true, w)
        again = _cpp.update_state(x, g, x_true, w)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(actual[0], expected[0], torch.float32, "x'")
    assert_close(actual[1], expected[1], torch.float32, "loss")
    assert torch.equal(actual[1], again[1]), "the loss sum is not deterministic"


@requires_cuda
def test_cuda_on_second_device_guard(ext):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(4, 1, 8, device="cuda:1")
    out, loss = _cpp.update_state(x, x, x * 0.5)
    assert out.device == x.device and loss.device == x.device
    assert_close(out, 2 * x, torch.float32, "x'")


# ---- without the extension ------------------------------------------------------------------------------

def _run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_without_extension_ops_still_work():
    """RIM_FAST_NO_EXT=1: the ops exist (Python kernels), `auto` uses the reference, nothing warns; a broken
    extension import warns once and also falls back."""
    _run_python("""
        import warnings
        warnings.simplefilter("error")
        import torch, rim_fast
        from rim_fast import ops
        from rim_fast.ops import _cpp, reference
        assert _cpp.missing() is not None
        x, g, t = torch.randn(2, 1, 5), torch.randn(2, 1, 5), torch.randn(2, 1, 5)
        v = torch.rand(2, 1, 5)
        out = torch.ops.rim_fast.update_state_loss(x, g, t, None)
        ref = reference.update_state(x, g, t)
        torch.testing.assert_close(out[0], ref[0]); torch.testing.assert_close(out[1], ref[1])
        out = torch.ops.rim_fast.preprocess_adam(x, g, v, torch.tensor(3), 0.9, 0.999, 1e-7)
        ref = reference.preprocess_score(x, g, v, 3, "adam", 0.9, 0.999, 1e-7)
        assert len(out) == len(ref)
        for a, e in zip(out, ref):
            torch.testing.assert_close(a, e)
        torch.library.opcheck(torch.ops.rim_fast.update_state_loss.default, (x, g, t, None))
        # the shifted sums of the CPU thin convolutions: their references, differentiable
        planes, img = torch.randn(1, 9, 2, 4, 5), torch.randn(1, 2, 4, 5)
        assert torch.equal(torch.ops.rim_fast.shift_sum(planes, [3, 3], 1), reference.shift_sum(planes, (3, 3), 1))
        assert torch.equal(torch.ops.rim_fast.shift_stack(img, [3, 3], -1), reference.shift_stack(img, (3, 3), -1))
        # the Winograd convolution: its reference (which the CPU convolutions then never choose)
        xw, ww = torch.randn(1, 16, 3, 4, 5), torch.randn(16, 16, 3, 3, 3)
        uw = reference.winograd_weight(ww)
        assert torch.equal(torch.ops.rim_fast.winograd_conv3d(xw, uw, None), reference.winograd_conv3d(xw, uw, None))
        gw = torch.randn(1, 16, 3, 4, 5)
        assert torch.equal(torch.ops.rim_fast.winograd_conv3d_weight(xw, gw), reference.winograd_conv3d_weight(xw, gw))
        from rim_fast.ops import _cpu
        assert not _cpu._winograd_ok(xw, ww, None, [1, 1, 1], 1, 1)
        xc = torch.randn(2, 5, 6, 7, requires_grad=True)
        w1, b1 = torch.randn(1, 5, 3, 3, requires_grad=True), torch.randn(1, requires_grad=True)
        fast, ref = _cpu.conv(xc, w1, b1), reference.conv(xc, w1, b1)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        for a, e in zip(torch.autograd.grad(fast.sum(), (xc, w1, b1)), torch.autograd.grad(ref.sum(), (xc, w1, b1))):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        with ops.trace() as calls:
            ops.update_state(x, g, t)
        assert calls == {("update_state", "reference"): 1}, calls
        print("ok")
    """, RIM_FAST_NO_EXT="1")
    result = _run_python("""
        import sys, warnings
        sys.modules["rim_fast._C"] = None  # the import of the extension fails
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, rim_fast
            from rim_fast import ops
            with ops.trace() as calls:
                ops.preprocess_score(torch.randn(3), torch.zeros(3), torch.zeros(3), 0, method="adam", beta_1=0.9,
                                     beta_2=0.999, epsilon=1e-7)
        assert calls == {("preprocess_score", "reference"): 1}, calls
        messages = [str(w.message) for w in caught if "rim_fast" in str(w.message)]
        assert len(messages) == 1 and "rim_fast._C could not be loaded" in messages[0], messages
        print("ok")
    """, RIM_FAST_NO_EXT="0")
    assert "ok" in result.stdout


def test_update_step_under_vmap_takes_the_reference(ext, recwarn):
    """Under torch.func transforms the update-step kernels, which have no batching rule (torch would loop over the
    batch in its fallback, with a warning), leave the call to the references: per-sample results equal the batch's."""
    from torch.func import vmap
    s = torch.randn(3, 2, 1, 8)
    m, v = torch.randn_like(s), torch.rand_like(s)
    hyper = dict(method="adam", beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    x, g, x_true = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    with ops.trace() as calls:
        out = vmap(lambda a, b, c: ops.preprocess_score(a, b, c, 1, **hyper)[0])(s, m, v)
        loss = vmap(lambda a, b, c: ops.update_state(a[None], b[None], c[None])[1])(x, g, x_true)
    assert calls[("preprocess_score", "cpp")] == 0 and calls[("preprocess_score", "reference")] > 0
    assert calls[("update_state", "cpp")] == 0 and calls[("update_state", "reference")] > 0
    assert not [w for w in recwarn if "batching rule" in str(w.message)]
    torch.testing.assert_close(out, reference.preprocess_score(s, m, v, 1, **hyper)[0])
    torch.testing.assert_close(loss, ((x + g - x_true) ** 2).sum((1, 2, 3)))
    with ops.trace() as calls:  # outside the transforms the kernels serve the same calls
        ops.preprocess_score(s, m, v, 1, **hyper)
        ops.update_state(x, g, x_true)
    assert calls[("preprocess_score", "cpp")] == 1 and calls[("update_state", "cpp")] == 1
