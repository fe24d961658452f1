"""The Triton backend of the ConvGRU gate family (``gru_gates``) and of the convolution epilogue ``bias_tanh``
(``conv``), with their ``usable``/``auto`` rules: the kernels of ``rim_fast.kernels.gru_gates`` and
``rim_fast.kernels.bias_tanh`` as torch.compile-visible ops: ``rim_fast::gru_gates_zr``,
``rim_fast::gru_gates_h``, ``rim_fast::gru_gates_zero_state``, ``rim_fast::bias_tanh`` (and their ``*_backward``
ops).

Each op is a ``torch.library.triton_op`` whose body launches the kernels of ``rim_fast.kernels.gru_gates``
through ``wrap_triton``, so Inductor sees (and schedules) the kernels; fakes come from ``new_empty``;
autograd (``register_autograd``) calls the backward triton ops, so the compiled backward sees them too.

Importing this module never fails: without Triton (or with a torch older than 2.6) no op is registered and
``missing()`` says why.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import in_graph_region, needs_grad

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _import_kernels(name: str = "gru_gates"):
    """``rim_fast.kernels.<name>``: installed (setup.py maps ``rim_fast.kernels`` to ``kernels/``), or, in
    a source tree, ``<repo>/kernels`` mounted as the ``rim_fast.kernels`` package (never a top-level
    ``kernels`` module: that name belongs to another project)."""
    try:
        return importlib.import_module(f"rim_fast.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("rim_fast.kernels", f"rim_fast.kernels.{name}"):
            raise
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")
    init = os.path.join(root, "__init__.py")
    if "rim_fast.kernels" not in sys.modules and os.path.isfile(init):
        spec = importlib.util.spec_from_file_location("rim_fast.kernels", init, submodule_search_locations=[root])
        package = importlib.util.module_from_spec(spec)
        sys.modules["rim_fast.kernels"] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules["rim_fast.kernels"]
            raise
    return importlib.import_module(f"rim_fast.kernels.{name}")


_MISSING: Optional[str] = None
K = None
KB = None
try:
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        raise ImportError(f"torch {torch.__version__} has no torch.library.triton_op/wrap_triton (needs >= 2.6)")
    K = _import_kernels()
    KB = _import_kernels("bias_tanh")
except Exception as err:  # noqa: BLE001 - any failure to load Triton only disables these kernels
    _MISSING = f"Triton gate kernels unavailable ({type(err).__name__}: {err})"


def missing() -> Optional[str]:
    """None when the Triton gate kernels are installed, else why not."""
    return _MISSING


def _tensors(args):
    return [a for a in args if isinstance(a, Tensor)]


def usable(*args) -> bool:
    """The kernels can run these arguments: CUDA tensors, or CPU fp32 tensors through the Triton interpreter
    (eager only: the interpreter cannot run on torch.compile's fake tensors); fp32/fp16/bf16, one device."""
    if _MISSING is not None:
        return False
    tensors = _tensors(args)
    device = tensors[0].device
    if any(t.device != device or t.dtype not in _DTYPES for t in tensors):
        return False
    # one activation dtype (autocast can hand bf16 conv outputs with a float32 state): else the reference
    if len({t.dtype for t in tensors if t.dim() >= 2}) > 1:
        return False
    if device.type == "cuda":
        return not K.INTERPRETED
    if device.type == "cpu" and K.INTERPRETED:
        return not torch.compiler.is_compiling() and all(t.dtype == torch.float32 for t in tensors)
    return False


def why_not(*args) -> str:
    """Why ``usable`` refuses these arguments."""
    if _MISSING is not None:
        return _MISSING
    tensors = _tensors(args)
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return "tensors on several devices"
    if any(t.dtype not in _DTYPES for t in tensors):
        return f"dtypes {sorted({str(t.dtype) for t in tensors})}: the kernels take float32, float16, bfloat16"
    if len({t.dtype for t in tensors if t.dim() >= 2}) > 1:
        return "mixed activation dtypes (autocast convolutions with a float32 state)"
    if device.type == "cuda":
        return "the Triton kernels were loaded for the interpreter (TRITON_INTERPRET=1), which runs CPU tensors only"
    if device.type != "cpu":
        return f"{device.type} tensors"
    if not K.INTERPRETED:
        return "CPU tensors run the Triton kernels only through the interpreter (TRITON_INTERPRET=1, for tests)"
    if torch.compiler.is_compiling():
        return ("the Triton interpreter cannot run inside torch.compile (CPU tensors); compile with "
                "RIM_FAST_BACKEND=auto, or run eagerly")
    return "the interpreter runs float32 only"


def compile_why_not(device: torch.device) -> Optional[str]:
    """Why the kernels cannot run inside torch.compile on this device type (None when they can)."""
    if _MISSING is not None:
        return _MISSING
    if device.type == "cpu":
        return ("on CPU tensors the Triton gate kernels run only through the interpreter, which cannot run inside "
                "torch.compile")
    if device.type == "cuda" and K.INTERPRETED:
        return "the Triton kernels were loaded for the interpreter (TRITON_INTERPRET=1), which runs CPU tensors only"
    return None


#: eager calls on CUDA use the kernels from this many elements in the largest input on: below it the host's
#: launch cost (one Triton launch ~ several aten launches) outweighs the bytes saved. Measured on an H100 VM
#: (bench/bench_gru_gates.py, torch 2.11, Triton 3.6): eager reference faster for the standard cells up to
#: [32, 16, 64x64] (wx: 6.3M elements), kernels 1.1-2.7x faster from [32, 16, 128x128] (25M) on.
AUTO_EAGER_MIN_ELEMENTS = 1 << 23


def auto(*args) -> bool:
    """``auto`` prefers the kernels for CUDA tensors of a supported dtype (on CPU the reference is faster):
    always under torch.compile and CUDA-graph capture (kernel time is what counts there: 1.4-2x faster than
    the eager reference's kernels, on par with Inductor's own fusion of it), in eager mode for large inputs."""
    tensors = _tensors(args)
    if not _on_cuda(tensors):
        return False
    if torch.compiler.is_compiling() or in_graph_region():
        return True
    return max(t.numel() for t in tensors) >= AUTO_EAGER_MIN_ELEMENTS


def bias_tanh_usable(x, bias) -> bool:
    """``usable`` for ``bias_tanh(x, bias)``: the gates' rule (CUDA, or CPU fp32 eagerly through the interpreter)."""
    return usable(x, bias)


def bias_tanh_why_not(x, bias) -> str:
    return why_not(x, bias)


def _on_cuda(tensors) -> bool:
    # CUDA tensors of the kernels' dtypes (a loop that stops at the first CPU tensor: ``auto`` asks on every call)
    for t in tensors:
        if not t.is_cuda or t.dtype not in _DTYPES:
            return False
    return True


def _bias_tanh_auto_rule(tensors, numel) -> bool:
    if not _on_cuda(tensors):
        return False
    # under torch.compile Inductor fuses the bias add and the tanh itself (and into their neighbours), which an
    # opaque op would prevent
    if torch.compiler.is_compiling():
        return False
    if in_graph_region():
        return True
    return numel >= AUTO_EAGER_MIN_ELEMENTS


def bias_tanh_auto(x, bias) -> bool:
    """``auto`` prefers the kernel for CUDA tensors under CUDA-graph capture (its launch cost then disappears:
    one pass instead of two) and for eager calls of >= 2^23 elements (the gates' threshold: below it one Triton
    launch costs the host more than the aten kernels it replaces); never under torch.compile, where Inductor fuses
    the bias add and the tanh itself."""
    return _bias_tanh_auto_rule(_tensors((x, bias)), x.numel())


def conv_tanh_usable(x, weight, bias, padding, dilation, groups) -> bool:
    """conv_tanh as the convolution without its bias, then ``bias_tanh``: a bias, and the kernel usable."""
    return bias is not None and usable(x, bias)


def conv_tanh_why_not(x, weight, bias, padding, dilation, groups) -> str:
    return "no bias to fuse" if bias is None else why_not(x, bias)


def conv_tanh_auto(x, weight, bias, padding, dilation, groups) -> bool:
    """As ``bias_tanh_auto``, on the convolution's output ([B, C_out, *S] for a "same" convolution), with a bias."""
    if bias is None or not x.is_cuda:  # the rule's first condition, before the output's size
        return False
    numel = x.shape[0] * weight.shape[0]
    for size in x.shape[2:]:
        numel *= size
    return _bias_tanh_auto_rule(_tensors((x, weight, bias)), numel)


def conv_transpose_tanh_usable(x, weight, bias, *args) -> bool:
    """conv_transpose_tanh as the transposed convolution without its bias, then ``bias_tanh``: inference only.
    With autograd it put the whole-RIM error budget over its limit together with the Hourglass' merged output conv
    (tests/test_error_budget.py, 3D, kernels: a gate gradient 2.1e-6 against a budget of 1.7e-6; 1.3e-6 without
    it), so training keeps cuDNN's transposed conv with its bias, then tanh."""
    return bias is not None and not needs_grad(x, weight, bias) and usable(x, bias)


def conv_transpose_tanh_why_not(x, weight, bias, *args) -> str:
    if bias is None:
        return "no bias to fuse"
    return "inference only (no autograd)" if needs_grad(x, weight, bias) else why_not(x, bias)


def conv_transpose_tanh_auto(x, weight, bias, stride, padding, output_padding, groups, dilation, crop) -> bool:
    """As ``conv_tanh_auto``, on the output (about [B, C_out, *S * stride])."""
    if bias is None or not x.is_cuda or needs_grad(x, weight, bias):
        return False
    numel = x.numel() // max(x.shape[1], 1) * weight.shape[1] * groups * stride ** (x.dim() - 2)
    return _bias_tanh_auto_rule(_tensors((x, weight, bias)), numel)


def _pad_channels(g: Tensor, before: int, after: int) -> Tensor:
    # grad of a channel slice of wx: zeros elsewhere (torch ops, so Inductor can fuse it with the
    # accumulation of the two gate ops' contributions)
    return F.pad(g, [0, 0] * (g.dim() - 2) + [before, after])


if _MISSING is None:
    from torch.library import triton_op

    @triton_op("rim_fast::gru_gates_zr", mutates_args=())
    def _zr(wx: Tensor, uzr: Tensor, h: Tensor, bias_z: Tensor, bias_r: Tensor) -> tuple[Tensor, Tensor]:
        return K.gru_gates_zr_fwd(wx, uzr, h, bias_z, bias_r)

    @triton_op("rim_fast::gru_gates_h", mutates_args=())
    def _h(wx: Tensor, uh: Tensor, z: Tensor, h: Tensor, bias_h: Tensor) -> Tensor:
        return K.gru_gates_h_fwd(wx, uh, z, h, bias_h)

    @triton_op("rim_fast::gru_gates_zero_state", mutates_args=())
    def _zero_state(wzh: Tensor, bias_z: Tensor, bias_h: Tensor) -> Tensor:
        return K.gru_gates_zero_state_fwd(wzh, bias_z, bias_h)

    @triton_op("rim_fast::gru_gates_zr_backward", mutates_args=())
    def _zr_backward(gz: Tensor, grh: Tensor, wx: Tensor, uzr: Tensor, h: Tensor, z: Tensor,
                     bias_r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return K.gru_gates_zr_bwd(gz, grh, wx, uzr, h, z, bias_r)

    @triton_op("rim_fast::gru_gates_h_backward", mutates_args=())
    def _h_backward(g: Tensor, wx: Tensor, uh: Tensor, z: Tensor, h: Tensor,
                    bias_h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return K.gru_gates_h_bwd(g, wx, uh, z, h, bias_h)

    @triton_op("rim_fast::gru_gates_zero_state_backward", mutates_args=())
    def _zero_state_backward(g: Tensor, wzh: Tensor, bias_z: Tensor, bias_h: Tensor) -> tuple[Tensor, Tensor]:
        return K.gru_gates_zero_state_bwd(g, wzh, bias_z, bias_h)

    # fakes: the launchers' layouts (``K.out_shape_order``: wx's or wzh's, channels-last or contiguous) and dtypes
    # (as the launchers and the references promote them)
    def _out(inner: bool, like: Tensor, shape, dtype) -> Tensor:
        alloc, move = K.out_shape_order(inner, shape)
        out = like.new_empty(alloc, dtype=dtype)
        return out.movedim(-1, 1) if move else out

    @_zr.register_fake
    def _(wx, uzr, h, bias_z, bias_r):
        inner = K.channels_last(wx)
        return (_out(inner, wx, h.shape, K._dtype(wx, uzr, bias_z)),
                _out(inner, wx, h.shape, K._dtype(wx, uzr, bias_r, h)))

    @_h.register_fake
    def _(wx, uh, z, h, bias_h):
        return _out(K.channels_last(wx), wx, h.shape, K._dtype(z, h, wx, uh, bias_h))

    @_zero_state.register_fake
    def _(wzh, bias_z, bias_h):
        return _out(K.channels_last(wzh), wzh, (wzh.shape[0], wzh.shape[1] // 2, *wzh.shape[2:]),
                    K._dtype(wzh, bias_z, bias_h))

    @_zr_backward.register_fake
    def _(gz, grh, wx, uzr, h, z, bias_r):
        H, inner = h.shape[1], K.channels_last(wx)
        return (_out(inner, wx, (h.shape[0], 2 * H, *h.shape[2:]), K._dtype(wx, uzr)),
                _out(inner, wx, h.shape, h.dtype), h.new_empty(2 * H, dtype=torch.float32))

    @_h_backward.register_fake
    def _(g, wx, uh, z, h, bias_h):
        inner = K.channels_last(wx)
        return (_out(inner, wx, h.shape, K._dtype(wx, uh)), _out(inner, wx, h.shape, z.dtype),
                _out(inner, wx, h.shape, h.dtype), h.new_empty(h.shape[1], dtype=torch.float32))

    @_zero_state_backward.register_fake
    def _(g, wzh, bias_z, bias_h):
        return (_out(K.channels_last(wzh), wzh, wzh.shape, wzh.dtype),
                wzh.new_empty(wzh.shape[1], dtype=torch.float32))

    # autograd: saved are the inputs and z (the backward kernels recompute r and tanh, see the kernel module)
    def _zr_setup(ctx, inputs, output):
        wx, uzr, h, bias_z, bias_r = inputs
        ctx.save_for_backward(wx, uzr, h, output[0], bias_r)
        ctx.bias_z_dtype = bias_z.dtype

    def _zr_grad(ctx, gz, grh):
        wx, uzr, h, z, bias_r = ctx.saved_tensors
        gz = torch.zeros_like(z) if gz is None else gz
        grh = torch.zeros_like(h) if grh is None else grh
        g_zr, g_h, g_b = torch.ops.rim_fast.gru_gates_zr_backward(gz, grh, wx, uzr, h, z, bias_r)
        H = h.shape[1]
        return (_pad_channels(g_zr, 0, H).to(wx.dtype), g_zr.to(uzr.dtype), g_h,
                g_b[:H].to(ctx.bias_z_dtype), g_b[H:].to(bias_r.dtype))

    _zr.register_autograd(_zr_grad, setup_context=_zr_setup)

    def _h_setup(ctx, inputs, output):
        wx, uh, z, h, bias_h = inputs
        ctx.save_for_backward(wx, uh, z, h, bias_h)

    def _h_grad(ctx, g):
        wx, uh, z, h, bias_h = ctx.saved_tensors
        g_a, g_z, g_h, g_b = torch.ops.rim_fast.gru_gates_h_backward(g, wx, uh, z, h, bias_h)
        H = h.shape[1]
        return (_pad_channels(g_a, 2 * H, 0).to(wx.dtype), g_a.to(uh.dtype), g_z, g_h, g_b.to(bias_h.dtype))

    _h.register_autograd(_h_grad, setup_context=_h_setup)

    def _zero_state_setup(ctx, inputs, output):
        wzh, bias_z, bias_h = inputs
        ctx.save_for_backward(wzh, bias_z, bias_h)

    def _zero_state_grad(ctx, g):
        wzh, bias_z, bias_h = ctx.saved_tensors
        g_w, g_b = torch.ops.rim_fast.gru_gates_zero_state_backward(g, wzh, bias_z, bias_h)
        H = wzh.shape[1] // 2
        return g_w, g_b[:H].to(bias_z.dtype), g_b[H:].to(bias_h.dtype)

    _zero_state.register_autograd(_zero_state_grad, setup_context=_zero_state_setup)

    @triton_op("rim_fast::bias_tanh", mutates_args=())
    def _bias_tanh(x: Tensor, bias: Tensor) -> Tensor:
        return KB.bias_tanh_fwd(x, bias)

    @triton_op("rim_fast::bias_tanh_backward", mutates_args=())
    def _bias_tanh_backward(grad: Tensor, y: Tensor) -> Tensor:
        return KB.bias_tanh_bwd(grad, y)

    # fakes: the launchers' layouts (x's strides where x is dense, else contiguous)
    @_bias_tanh.register_fake
    def _(x, bias):
        KB.check_args(x, bias)
        return x.new_empty_strided(x.shape, KB.out_strides(x), dtype=torch.promote_types(x.dtype, bias.dtype))

    @_bias_tanh_backward.register_fake
    def _(grad, y):
        return y.new_empty_strided(y.shape, KB.out_strides(y))

    # autograd: the output is saved (the backward reads y, not x); the bias gradient is torch's sum of grad_x
    def _bias_tanh_setup(ctx, inputs, output):
        x, bias = inputs
        ctx.save_for_backward(output)
        ctx.dtypes = x.dtype, bias.dtype

    def _bias_tanh_grad(ctx, g):
        y, = ctx.saved_tensors
        g_x = torch.ops.rim_fast.bias_tanh_backward(g, y)
        g_b = g_x.sum([0, *range(2, y.dim())], dtype=torch.float32)
        return g_x.to(ctx.dtypes[0]), g_b.to(ctx.dtypes[1])

    _bias_tanh.register_autograd(_bias_tanh_grad, setup_context=_bias_tanh_setup)


def gru_gates_zr(wx: Tensor, uzr: Tensor, h: Tensor, bias_z: Tensor, bias_r: Tensor):
    """``reference.gru_gates_zr`` through the Triton kernels: (z, rh), [B, H, *S]."""
    return torch.ops.rim_fast.gru_gates_zr(wx, uzr, h, bias_z, bias_r)


def gru_gates_h(wx: Tensor, uh: Tensor, z: Tensor, h: Tensor, bias_h: Tensor) -> Tensor:
    """``reference.gru_gates_h`` through the Triton kernels: h', [B, H, *S]."""
    return torch.ops.rim_fast.gru_gates_h(wx, uh, z, h, bias_h)


def gru_gates_zero_state(wzh: Tensor, bias_z: Tensor, bias_h: Tensor) -> Tensor:
    """``reference.gru_gates_zero_state`` through the Triton kernels: h', [B, H, *S]."""
    return torch.ops.rim_fast.gru_gates_zero_state(wzh, bias_z, bias_h)


def bias_tanh(x: Tensor, bias: Tensor) -> Tensor:
    """``reference.bias_tanh`` through the Triton kernel: tanh(x + bias[c]), [B, C, *S] in x's layout."""
    return torch.ops.rim_fast.bias_tanh(x, bias)
