"""The C++/CUDA backend (``rim_fast._C``, csrc/) of the update-step family (``update_step``), of tanh and of the
thin convolutions' shifted sums (``conv``, ``_cpu``): schemas, fakes, autograd, fallbacks, and the ``cpp``
implementations with their ``usable``/``auto`` rules.

Ops (namespace ``rim_fast``), all functional (new outputs; inputs are never written):

- ``preprocess_adam(score, m, v, step, beta_1, beta_2, epsilon) -> (out, m', v')``
- ``preprocess_rmsprop(...) -> (out, m')``: torch_rim's RMSprop, v is read but never updated, so it is not
  returned (an output may not alias an input);
- ``preprocess_rmsprop_fixed(...) -> (out, m', v')``
- ``preprocess_arcsinh(score) -> out``
- ``update_state(x, g) -> x + g``
- ``update_state_loss(x, g, x_true, w?) -> (x + g, sum(w (x + g - x_true)^2))``
- ``update_state_loss_backward(grad_out, grad_loss, x_new, x_true, w?) -> grad of x (and of g)``
- ``tanh(x) -> tanh(x)``: CPU only (float32, bfloat16), a rational approximation that keeps float32's relative
  accuracy near 0 (csrc/tanh.h), in one vectorised pass; the output keeps x's layout. Backward: tanh_backward.
- ``shift_sum(planes, kernel, sign)``, ``shift_stack(x, kernel, sign)``: CPU only (float32, float64), the shifted
  sums of the CPU thin convolutions (``_cpu._ThinOutConv``) and their adjoint, one pass each (csrc/shift.h;
  references ``reference.shift_sum`` / ``reference.shift_stack``). Backward: each other.
- ``winograd_conv3d(x, u, bias?)``: CPU only (float32), a 3x3x3 convolution of stride 1 and padding 1 by
  Winograd's F(2x2x2, 3x3x3) from the transformed weight ``u = reference.winograd_weight(w)`` (csrc/winograd.h;
  reference ``reference.winograd_conv3d``); channels-last output. Its own autograd goes through the reference;
  ``_cpu._Winograd`` differentiates the convolutions.
- ``winograd_conv3d_weight(x, grad)``: the gradient of that convolution's transformed weight ``u`` [64, C_in,
  C_out] from its input and output gradient (reference ``reference.winograd_conv3d_weight``). Its own autograd goes
  through the reference (the convolutions take oneDNN's weight gradient under create_graph).

One op per mode, so no output is ever optional. score, m, v, x, g, x_true, w: same shape [B, C, *S] (no
broadcasting), float32/float64/bfloat16/float16; the moments m, v have score's dtype, or float32 for a
bfloat16/float16 score (outputs then float32, as the reference's type promotion gives).

The step index is a 0-dim tensor ``step`` holding t, on the CPU or on the inputs' device, never a Python
number in the schema: torch.compile guards on Python numbers, so a per-step compiled loop would recompile at
every t, and a CUDA graph would freeze it. The kernels compute the bias corrections 1 - beta^(t+1) from it in
double. ``preprocess_score`` accepts t as an int or as such a tensor: eagerly an int becomes a cached CPU
scalar (read on the host, no device work); under torch.compile it becomes a device scalar made in the graph.
An int t remains an input of the caller's compiled frame (dynamo specialises it once, then makes it symbolic:
at most one recompile, see tests/test_update_step.py); a tensor t gives one graph for every step, and a CUDA
graph that reads the step from device memory at every replay.

``auto`` uses these kernels eagerly where they fuse work (moment preprocessing, arcsinh, the loss term) and the
reference under torch.compile, where Inductor fuses the reference's element-wise ops itself (and into their
neighbours, which an opaque custom op prevents); ``RIM_FAST_BACKEND=kernels`` uses them everywhere.

The ops exist whether or not ``rim_fast._C`` is built: without it, Python kernels with the same semantics are
registered for CPU and CUDA, and the ``cpp`` implementation reports itself missing so that ``auto`` uses the
reference.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from . import reference
from ._dispatch import functorch_active, needs_grad

NAMESPACE = "rim_fast"
METHODS = ("identity", "arcsinh", "adam", "rmsprop", "rmsprop_fixed")
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCED = (torch.bfloat16, torch.float16)

_MOMENTS_ARGS = "Tensor score, Tensor m, Tensor v, Tensor step, float beta_1, float beta_2, float epsilon"
SCHEMAS = {
    "preprocess_adam": f"({_MOMENTS_ARGS}) -> (Tensor, Tensor, Tensor)",
    "preprocess_rmsprop": f"({_MOMENTS_ARGS}) -> (Tensor, Tensor)",
    "preprocess_rmsprop_fixed": f"({_MOMENTS_ARGS}) -> (Tensor, Tensor, Tensor)",
    "preprocess_arcsinh": "(Tensor score) -> Tensor",
    "update_state": "(Tensor x, Tensor g) -> Tensor",
    "update_state_loss": "(Tensor x, Tensor g, Tensor x_true, Tensor? w) -> (Tensor, Tensor)",
    "update_state_loss_backward": ("(Tensor grad_out, Tensor grad_loss, Tensor x_new, Tensor x_true, Tensor? w) "
                                   "-> Tensor"),
    "tanh": "(Tensor x) -> Tensor",
    "shift_sum": "(Tensor planes, int[] kernel, int sign) -> Tensor",
    "shift_stack": "(Tensor x, int[] kernel, int sign) -> Tensor",
    "winograd_conv3d": "(Tensor x, Tensor u, Tensor? bias) -> Tensor",
    "winograd_conv3d_weight": "(Tensor x, Tensor grad) -> Tensor",
}
OPS = tuple(SCHEMAS)

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"{NAMESPACE}::{_name}", _schema)

_ops = torch.ops.rim_fast


# ---- fakes (shapes only: outputs from new_empty, no device literals) ------------------------------------

@torch.library.register_fake(f"{NAMESPACE}::preprocess_adam")
def _preprocess_adam_fake(score, m, v, step, beta_1, beta_2, epsilon):
    return m.new_empty(score.shape), m.new_empty(score.shape), v.new_empty(score.shape)


@torch.library.register_fake(f"{NAMESPACE}::preprocess_rmsprop")
def _preprocess_rmsprop_fake(score, m, v, step, beta_1, beta_2, epsilon):
    return m.new_empty(score.shape), m.new_empty(score.shape)


@torch.library.register_fake(f"{NAMESPACE}::preprocess_rmsprop_fixed")
def _preprocess_rmsprop_fixed_fake(score, m, v, step, beta_1, beta_2, epsilon):
    return m.new_empty(score.shape), m.new_empty(score.shape), v.new_empty(score.shape)


@torch.library.register_fake(f"{NAMESPACE}::preprocess_arcsinh")
def _preprocess_arcsinh_fake(score):
    return score.new_empty(score.shape)


@torch.library.register_fake(f"{NAMESPACE}::update_state")
def _update_state_fake(x, g):
    torch._check(x.shape == g.shape, lambda: f"rim_fast::update_state: g {g.shape} must have x's shape {x.shape}")
    return x.new_empty(x.shape)


@torch.library.register_fake(f"{NAMESPACE}::update_state_loss")
def _update_state_loss_fake(x, g, x_true, w):
    torch._check(x.shape == g.shape, lambda: f"rim_fast::update_state_loss: g {g.shape} must have x's shape {x.shape}")
    return x.new_empty(x.shape), x.new_empty(())


@torch.library.register_fake(f"{NAMESPACE}::update_state_loss_backward")
def _update_state_loss_backward_fake(grad_out, grad_loss, x_new, x_true, w):
    return x_new.new_empty(x_new.shape)


@torch.library.register_fake(f"{NAMESPACE}::tanh")
def _tanh_fake(x):
    return torch.empty_like(x)  # x's layout, as the kernel's empty_like


@torch.library.register_fake(f"{NAMESPACE}::shift_sum")
def _shift_sum_fake(planes, kernel, sign):
    return planes.new_empty((planes.shape[0], *planes.shape[2:]))


@torch.library.register_fake(f"{NAMESPACE}::shift_stack")
def _shift_stack_fake(x, kernel, sign):
    return x.new_empty((x.shape[0], math.prod(kernel), *x.shape[1:]))


# ---- autograd ------------------------------------------------------------------------------------------

def _no_derivative(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"rim_fast::{name} has no derivative (score preprocessing runs under no_grad in the "
                           f"RIM); differentiate rim_fast.ops.reference.preprocess_score instead")
    return backward


for _name in ("preprocess_adam", "preprocess_rmsprop", "preprocess_rmsprop_fixed", "preprocess_arcsinh"):
    torch.library.register_autograd(f"{NAMESPACE}::{_name}", _no_derivative(_name))


def _update_state_backward(ctx, grad_out):
    return grad_out, grad_out


torch.library.register_autograd(f"{NAMESPACE}::update_state", _update_state_backward)


def _update_state_loss_setup(ctx, inputs, output):
    _, _, x_true, w = inputs
    ctx.has_w = w is not None
    ctx.save_for_backward(output[0], x_true, w)


def _update_state_loss_bwd(ctx, grad_out, grad_loss):
    x_new, x_true, w = ctx.saved_tensors
    need_x, need_g, need_x_true, need_w = ctx.needs_input_grad
    grad_x = grad_x_true = grad_w = None
    if need_x or need_g:
        grad_x = _ops.update_state_loss_backward(grad_out, grad_loss, x_new, x_true, w)
    if need_x_true or need_w:
        diff = x_new - x_true
        if need_x_true:
            # -(grad_loss w) (2 d), computed directly: grad_out - grad_x would cancel catastrophically
            scale = grad_loss if w is None else grad_loss * w
            grad_x_true = -(scale * (2 * diff))
        if need_w:
            grad_w = grad_loss * diff ** 2
    return grad_x, (grad_x if need_g else None), grad_x_true, grad_w


torch.library.register_autograd(f"{NAMESPACE}::update_state_loss", _update_state_loss_bwd,
                                setup_context=_update_state_loss_setup)


def _loss_backward_setup(ctx, inputs, output):
    _, grad_loss, x_new, x_true, w = inputs
    ctx.save_for_backward(grad_loss, x_new, x_true, w)


def _loss_backward_bwd(ctx, gg):
    # double backward of grad = grad_out + (grad_loss w) (2 (x_new - x_true)), in plain torch ops
    grad_loss, x_new, x_true, w = ctx.saved_tensors
    need_go, need_gl, need_xn, need_xt, need_w = ctx.needs_input_grad
    two_d = 2 * (x_new - x_true)
    w_ = 1 if w is None else w
    g_go = gg if need_go else None
    g_gl = (gg * w_ * two_d).sum().reshape(grad_loss.shape) if need_gl else None
    g_xn = 2 * gg * grad_loss * w_ if (need_xn or need_xt) else None
    g_xt = -g_xn if need_xt else None
    g_w = gg * grad_loss * two_d if need_w else None
    return g_go, g_gl, (g_xn if need_xn else None), g_xt, g_w


torch.library.register_autograd(f"{NAMESPACE}::update_state_loss_backward", _loss_backward_bwd,
                                setup_context=_loss_backward_setup)


def _tanh_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _tanh_bwd(ctx, grad):
    y, = ctx.saved_tensors
    return torch.ops.aten.tanh_backward(grad, y)  # grad (1 - y^2), one fused pass


torch.library.register_autograd(f"{NAMESPACE}::tanh", _tanh_bwd, setup_context=_tanh_setup)


def _shift_setup(ctx, inputs, output):
    ctx.kernel, ctx.sign = inputs[1], inputs[2]


# each other's adjoint: the gradient of one is the other (differentiable, so double backward works too)
def _shift_sum_bwd(ctx, grad):
    return _ops.shift_stack(grad, ctx.kernel, ctx.sign), None, None


def _shift_stack_bwd(ctx, grad):
    return _ops.shift_sum(grad, ctx.kernel, ctx.sign), None, None


torch.library.register_autograd(f"{NAMESPACE}::shift_sum", _shift_sum_bwd, setup_context=_shift_setup)
torch.library.register_autograd(f"{NAMESPACE}::shift_stack", _shift_stack_bwd, setup_context=_shift_setup)


@torch.library.register_fake(f"{NAMESPACE}::winograd_conv3d")
def _winograd_conv3d_fake(x, u, bias):
    return x.new_empty((x.shape[0], u.shape[2], *x.shape[2:])).contiguous(memory_format=torch.channels_last_3d)


@torch.library.register_fake(f"{NAMESPACE}::winograd_conv3d_weight")
def _winograd_conv3d_weight_fake(x, grad):
    return x.new_empty((64, x.shape[1], grad.shape[1]))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _through_reference(reference_fn):
    """An op's backward through its reference's torch ops (differentiable, so double backward works too): the
    Winograd ops' own gradients. The convolutions differentiate them in ``_cpu._Winograd`` instead."""
    def backward(ctx, grad):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = reference_fn(*leaves)
            wanted = [t for t, need in zip(leaves, ctx.needs_input_grad) if t is not None and need]
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=torch.is_grad_enabled()))
        return tuple(next(grads) if t is not None and need else None
                     for t, need in zip(leaves, ctx.needs_input_grad))
    return backward


torch.library.register_autograd(f"{NAMESPACE}::winograd_conv3d", _through_reference(reference.winograd_conv3d),
                                setup_context=_save_inputs)
# bilinear in x and the output gradient
torch.library.register_autograd(f"{NAMESPACE}::winograd_conv3d_weight",
                                _through_reference(reference.winograd_conv3d_weight), setup_context=_save_inputs)


# ---- Python kernels used when rim_fast._C is not loaded -------------------------------------------------

def _bias_corrected(step: Tensor):
    """t as a float64 0-dim tensor: beta ** (t + 1) is then evaluated in double, as the reference does."""
    return step.reshape(()).to(torch.float64)


def _py_moments(method):
    def kernel(score, m, v, step, beta_1, beta_2, epsilon):
        out, m_new, v_new = reference.preprocess_score(score, m, v, _bias_corrected(step), method, beta_1,
                                                       beta_2, epsilon)
        if method == "rmsprop":
            return out.to(m.dtype), m_new
        return out.to(m.dtype), m_new, v_new
    return kernel


_PY_KERNELS = {
    "preprocess_adam": _py_moments("adam"),
    "preprocess_rmsprop": _py_moments("rmsprop"),
    "preprocess_rmsprop_fixed": _py_moments("rmsprop_fixed"),
    "preprocess_arcsinh": lambda score: torch.arcsinh(score),
    "update_state": lambda x, g: x + g,
    "update_state_loss": lambda x, g, x_true, w: reference.update_state(x, g, x_true, w),
    "update_state_loss_backward": lambda grad_out, grad_loss, x_new, x_true, w: (
        grad_out + (grad_loss if w is None else grad_loss * w) * (2 * (x_new - x_true))),
    "tanh": lambda x: torch.tanh(x),
    "shift_sum": lambda planes, kernel, sign: reference.shift_sum(planes, tuple(kernel), sign),
    "shift_stack": lambda x, kernel, sign: reference.shift_stack(x, tuple(kernel), sign),
    "winograd_conv3d": lambda x, u, bias: reference.winograd_conv3d(x, u, bias).contiguous(
        memory_format=torch.channels_last_3d),
    "winograd_conv3d_weight": lambda x, grad: reference.winograd_conv3d_weight(x, grad),
}

if _ext.module() is None:
    for _name, _kernel in _PY_KERNELS.items():
        torch.library.register_kernel(f"{NAMESPACE}::{_name}", ("cpu", "cuda"), _kernel)


# ---- the `cpp` implementation of the public update-step ops --------------------------------------------

def missing() -> Optional[str]:
    """None when the compiled kernels are loaded, else why not."""
    return _ext.missing()


def _registered(device_type: str) -> bool:
    if _ext.module() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::update_state", key)


# read once (a plain dict, which torch.compile traces as a constant)
_HAS_KERNEL = {device_type: _registered(device_type) for device_type in ("cpu", "cuda")}


def has_kernel(device_type: str) -> bool:
    """Whether rim_fast._C registered kernels for this device type ("cpu", "cuda")."""
    return _HAS_KERNEL.get(device_type, False)


def runs_on(device: torch.device) -> bool:
    """Whether the compiled kernels can run on this device: registered for its type and, on a GPU, built for its
    compute capability and CUDA major version (else ``rim_fast._ext`` warns once for the device)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _ext.cuda_problem(index) is None and has_kernel("cuda")
    return has_kernel(device.type)


@functools.lru_cache(maxsize=4096)
def _host_step(t: int) -> Tensor:
    return torch.tensor(float(t), dtype=torch.float64)


def step_tensor(t, like: Tensor) -> Tensor:
    """The ``step`` argument for step t (an int, or a 0-dim tensor that is passed through)."""
    if isinstance(t, Tensor):
        return t
    if torch.compiler.is_compiling():
        return torch.full((), t, dtype=torch.float64, device=like.device)
    return _host_step(int(t))


def _is_step(t, like: Tensor) -> bool:
    if isinstance(t, Tensor):
        return (t.numel() == 1 and not t.is_complex() and t.dtype != torch.bool
                and (t.device.type == "cpu" or t.device == like.device))
    return (isinstance(t, int) and not isinstance(t, bool)) or isinstance(t, torch.SymInt)


def _same(ref: Tensor, t, dtype: bool = True) -> bool:
    return (isinstance(t, Tensor) and t.shape == ref.shape and t.device == ref.device
            and (not dtype or t.dtype == ref.dtype))


def preprocess_applies(score, m, v, t, method, beta_1, beta_2, epsilon) -> bool:
    """Whether the kernels cover these arguments (device, dtype, shapes), installed or not."""
    if method not in METHODS or not isinstance(score, Tensor) or score.device.type not in ("cpu", "cuda"):
        return False
    if method == "identity":
        return True
    if score.dtype not in _FLOATS:
        return False
    if method == "arcsinh":
        return True
    if not (_same(score, m, dtype=False) and _same(score, v, dtype=False) and m.dtype == v.dtype):
        return False
    if not (m.dtype == score.dtype or (m.dtype == torch.float32 and score.dtype in _REDUCED)):
        return False
    return _is_step(t, score)


def preprocess_auto(score, m, v, t, method, beta_1, beta_2, epsilon) -> bool:
    """Whether ``auto`` should use the kernels: eagerly, for a method that computes something, when they cover
    the arguments, the extension was loaded (a missing one was reported once, at import) and no gradient is
    needed (the reference serves those, by design). Under torch.compile the reference is preferred: Inductor
    fuses its element-wise ops into one kernel of the same traffic, and into their neighbours, which an
    opaque custom op would prevent (``RIM_FAST_BACKEND=kernels`` still compiles the custom ops)."""
    return (_ext.module() is not None and not torch.compiler.is_compiling() and not functorch_active()
            and method != "identity" and preprocess_applies(score, m, v, t, method, beta_1, beta_2, epsilon)
            and not needs_grad(score, m, v) and runs_on(score.device))


def preprocess_usable(score, m, v, t, method, beta_1, beta_2, epsilon) -> bool:
    """Whether the kernels can run these arguments now: installed for the device, and no gradient needed
    (the preprocessing ops have no derivative; the reference, which has, serves such calls)."""
    return (preprocess_applies(score, m, v, t, method, beta_1, beta_2, epsilon)
            and (method == "identity" or runs_on(score.device))
            and not needs_grad(score, m, v))


def _device_why_not(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        problem = _ext.cuda_problem(index)
        if problem is not None:
            return problem
    if not has_kernel(device.type):
        return f"rim_fast._C has no {device.type} kernels"
    return ""


def preprocess_why_not(score, m, v, t, method, beta_1, beta_2, epsilon) -> str:
    if not preprocess_applies(score, m, v, t, method, beta_1, beta_2, epsilon):
        return "arguments outside the kernels' cover (device, dtypes, shapes of score/m/v, or t)"
    if needs_grad(score, m, v):
        return "a gradient is needed (the kernels have no derivative; the reference serves such calls)"
    return _device_why_not(score.device) or "cannot run these inputs"


def preprocess_score(score, m, v, t, method, beta_1, beta_2, epsilon):
    """``reference.preprocess_score`` through the C++/CUDA kernels; returns (out, m', v')."""
    if method == "identity":
        return score, m, v
    if method == "arcsinh":
        return _ops.preprocess_arcsinh(score), m, v
    step = step_tensor(t, score)
    if method == "adam":
        return _ops.preprocess_adam(score, m, v, step, beta_1, beta_2, epsilon)
    if method == "rmsprop":
        out, m_new = _ops.preprocess_rmsprop(score, m, v, step, beta_1, beta_2, epsilon)
        return out, m_new, v
    if method == "rmsprop_fixed":
        return _ops.preprocess_rmsprop_fixed(score, m, v, step, beta_1, beta_2, epsilon)
    raise ValueError(f"unknown preprocessing method {method!r}; expected one of {METHODS}")


def update_applies(x, g, x_true=None, w=None) -> bool:
    """Whether the kernels cover these arguments (same shape, dtype and device; no broadcasting)."""
    if not (isinstance(x, Tensor) and x.device.type in ("cpu", "cuda") and x.dtype in _FLOATS and _same(x, g)):
        return False
    if x_true is None:
        return True
    return _same(x, x_true) and (w is None or _same(x, w))


def update_auto(x, g, x_true=None, w=None) -> bool:
    """Whether ``auto`` should use the kernels: eagerly, for the fused loss term (one pass instead of four ops
    and their autograd nodes). A lone x + g is one PyTorch op already (the custom op only adds its call
    overhead); under torch.compile Inductor fuses the reference (see ``preprocess_auto``). Not for CPU tensors
    with autograd: there the custom op's backward (registered from Python) costs more host time than the fused
    pass saves. Measured, training step with and without it, alternated in one process (2-core Xeon, 2026-12-04):
    1D 256 B=1 27.4 ms without against 29.1 with, 2D 16x16 B=1 37.8 / 40.1, 3D 4^3 B=1 42.1 / 44.6, S1 240 / 245
    ms, S2 and S3 equal within 0.5%."""
    return (_ext.module() is not None and not torch.compiler.is_compiling() and not functorch_active()
            and x_true is not None and update_applies(x, g, x_true, w) and runs_on(x.device)
            and not (x.device.type == "cpu" and needs_grad(x, g, x_true, w)))


def update_usable(x, g, x_true=None, w=None) -> bool:
    return update_applies(x, g, x_true, w) and runs_on(x.device)


def update_why_not(x, g, x_true=None, w=None) -> str:
    if not update_applies(x, g, x_true, w):
        return "x, g, x_true, w must share shape, dtype and device (no broadcasting), floating point"
    return _device_why_not(x.device) or "cannot run these inputs"


def update_state(x, g, x_true=None, w=None):
    """``reference.update_state`` through the C++/CUDA kernels; returns (x + g, loss term or None)."""
    if x_true is None:
        return _ops.update_state(x, g), None
    x_new, loss = _ops.update_state_loss(x, g, x_true, w)
    return x_new, loss


_TANH_DTYPES = (torch.float32, torch.bfloat16)


def tanh_usable(x) -> bool:
    """CPU float32/bfloat16 tensors, with the extension's CPU kernel registered."""
    return isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype in _TANH_DTYPES and has_kernel("cpu")


def mkl_tanh_is_faster(vendor: str, capability: str, mkl: bool, mkl_instructions: Optional[str]) -> bool:
    """Whether torch.tanh outruns the C++ kernel on float32 CPU tensors. torch.tanh there is MKL's vsTanh, whose
    speed is MKL's choice of code path: measured one thread, 2^21 elements, on a Xeon with AVX-512 (2026-12-03),
    MKL 0.28 ns per element with AVX-512, 1.33 capped at AVX2 (MKL_ENABLE_INSTRUCTIONS), 2.1 at SSE4.2, against
    the kernel's 0.75 (AVX-512) and 1.27 (AVX2); on AMD CPUs MKL takes its generic paths, and the kernel measured
    faster than torch.tanh there (2026-12-02). So: yes on Intel CPUs where torch runs AVX-512 code and MKL is
    not capped below it."""
    capped = mkl_instructions is not None and mkl_instructions.strip().upper() not in ("", "AVX512", "AVX512_E1",
                                                                                     "AVX512_E2", "AVX512_E3",
                                                                                     "AVX512_E4", "AVX512_E5")
    return mkl and vendor == "GenuineIntel" and capability.upper().startswith("AVX512") and not capped


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _capability() -> str:
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get is not None else "unknown"


#: decided once per process from this CPU and torch's build (``mkl_tanh_is_faster``)
MKL_TANH_FASTER = mkl_tanh_is_faster(_cpu_vendor(), _capability(), torch.backends.mkl.is_available(),
                                     os.environ.get("MKL_ENABLE_INSTRUCTIONS"))


def tanh_auto(x) -> bool:
    """Eagerly on the CPU: one vectorised pass, faster than torch.tanh except for float32 where MKL's AVX-512
    vsTanh serves torch.tanh (``mkl_tanh_is_faster``). Under torch.compile Inductor generates its own tanh, fused
    with its neighbours; CUDA's tanh is already one fast pass."""
    if MKL_TANH_FASTER and isinstance(x, Tensor) and x.dtype == torch.float32:
        return False
    return (_ext.module() is not None and not torch.compiler.is_compiling() and not functorch_active()
            and tanh_usable(x))


def tanh_why_not(x) -> str:
    if x.device.type != "cpu":
        return "CPU tensors only (CUDA's own tanh is one fast pass)"
    if x.dtype not in _TANH_DTYPES:
        return f"{x.dtype}: the kernel takes float32 and bfloat16"
    return "rim_fast._C has no CPU kernels"


def tanh(x: Tensor) -> Tensor:
    """tanh(x) through the C++ CPU kernel (float32 math; bfloat16 stored after it)."""
    return _ops.tanh(x)


def shift_sum(planes: Tensor, kernel: tuple, sign: int) -> Tensor:
    """``reference.shift_sum`` through the C++ CPU kernel (the reference itself where rim_fast._C is not built)."""
    return _ops.shift_sum(planes, list(kernel), sign)


def shift_stack(x: Tensor, kernel: tuple, sign: int) -> Tensor:
    """``reference.shift_stack`` through the C++ CPU kernel (the reference itself where rim_fast._C is not built)."""
    return _ops.shift_stack(x, list(kernel), sign)


def winograd_conv3d_weight(x: Tensor, grad: Tensor) -> Tensor:
    """``reference.winograd_conv3d_weight`` through the C++ CPU kernel (the reference itself where rim_fast._C is
    not built)."""
    return _ops.winograd_conv3d_weight(x, grad)


def winograd_conv3d(x: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``reference.winograd_conv3d`` through the C++ CPU kernel (the reference itself where rim_fast._C is not
    built)."""
    return _ops.winograd_conv3d(x, u, bias)
