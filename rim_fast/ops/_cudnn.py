"""cuDNN convolutions in channels-last layout (``cudnn_channels_last``): chosen by timing, per CUDA graph.

``RIM_FAST_CUDA_LAYOUT=channels_last`` (or ``use_cuda_layout("channels_last")``) runs the eager CUDA convolutions
(``conv``, ``conv_same``, ``conv_transpose``, and through them conv + tanh) on channels-last inputs and weights, as
the CPU backend (``_cpu``) does for oneDNN: the first convolution converts its input once, the outputs stay
channels-last, and so do the ops between them (the Triton gates and ``bias_tanh`` keep their input's layout,
aten's element-wise ops too), so that cuDNN runs its NHWC kernels without converting each convolution's input and
output (the first GPU run counted about 84 kernels per S2 step under CUDA graphs where 47 ops run: cuDNN's layout
conversions are the suspects). A "same" convolution keeps ``symmetric_padding`` (no pad kernel). Each weight is
laid out once per RIM call (``layers.derived``). 1D inputs run as [B, C, 1, L] 2D convolutions. No bias is folded
into an extra channel (``ops.folds_bias``): 33 channels would misalign cuDNN's NHWC tensor-core kernels.

``contiguous`` is the reference's path (NCHW convolutions). The default, ``auto``, runs eager calls as
``contiguous`` and lets a RIM's CUDA graph choose: its first call records the loop in both layouts and keeps the
faster graph, timed on the GPU at hand (``RIM.cuda_graph_variants``, ``cuda_graphs.GraphCache``), since which one
wins depends on the GPU, the shapes and cuDNN's version (PyTorch's Inductor found channels-last faster for most
convolutions on its benchmarks, and slower for some). Not under torch.compile (Inductor chooses its layouts) nor
torch.func transforms.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from . import _cpu
from ._dispatch import functorch_active

Tensor = torch.Tensor
LAYOUTS = ("auto", "contiguous", "channels_last")
#: float64 is not among them: aten runs cuDNN's float64 convolutions in NCHW whatever the input's layout
#: (``cudnn_conv_suggest_memory_format``), so the layout would only add conversions
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _read_layout() -> str:
    value = os.environ.get("RIM_FAST_CUDA_LAYOUT", "auto").strip().lower() or "auto"
    if value not in LAYOUTS:
        raise ValueError(f"RIM_FAST_CUDA_LAYOUT={value!r} is not one of {LAYOUTS}")
    return value


#: RIM_FAST_CUDA_LAYOUT, read at import: every thread's layout until ``use_cuda_layout`` sets its own
_DEFAULT = _read_layout()
_THREAD = threading.local()


def cuda_layout() -> str:
    """The memory layout of CUDA convolutions in this thread: ``use_cuda_layout``'s, else ``RIM_FAST_CUDA_LAYOUT``
    (read at import; default ``auto``). ``auto``: eager calls in ``contiguous``, each CUDA graph in the faster of
    the two."""
    return getattr(_THREAD, "layout", _DEFAULT)


@contextlib.contextmanager
def use_cuda_layout(name: str) -> Iterator[None]:
    """Temporarily select the layout of CUDA convolutions in this thread, as ``torch.autocast`` and grad mode are
    per thread (tests, benchmarks, a RIM's graph variants: a recording in another thread does not change this
    one's). A RIM's CUDA graphs are recorded per setting."""
    if name not in LAYOUTS:
        raise ValueError(f"layout {name!r} is not one of {LAYOUTS}")
    old = cuda_layout()
    _THREAD.layout = name
    try:
        yield
    finally:
        _THREAD.layout = old


def usable(x, *args) -> bool:
    """CUDA tensors of 1 to 3 spatial dims and a float dtype, eagerly (or recorded into a CUDA graph), when the
    channels-last layout is selected."""
    return (cuda_layout() == "channels_last" and x.is_cuda and x.dtype in _FLOATS and x.dim() in (3, 4, 5)
            and not torch.compiler.is_compiling() and not functorch_active())


def why_not(x, *args) -> str:
    layout = cuda_layout()
    if layout != "channels_last":
        return (f"RIM_FAST_CUDA_LAYOUT is {layout!r}" + (": eager calls run contiguous, a CUDA graph the faster "
                                                        "layout" if layout == "auto" else ""))
    if not x.is_cuda:
        return "CUDA tensors only"
    if torch.compiler.is_compiling():
        return "not under torch.compile (Inductor chooses the layout)"
    if functorch_active():
        return "not under torch.func transforms"
    if x.dtype == torch.float64:
        return "float64: aten runs cuDNN's float64 convolutions in NCHW whatever the layout"
    return f"{x.dtype} / {x.dim() - 2} spatial dims not covered"


# the CPU backend's channels-last convolutions serve CUDA tensors as they are (their thin paths, oneDNN
# workarounds, take CPU tensors only)
conv = _cpu.conv
conv_transpose = _cpu.conv_transpose


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: int, stride: int, dilation: int,
              groups: int, axis_swap: bool = True) -> Tensor:
    """``symmetric_padding`` in channels-last (dilation 1); else the CPU backend's pad and valid convolution."""
    from ..layers.derived import derived
    from .reference import conv_same_pads, symmetric_padding
    if dilation != 1:
        return _cpu.conv_same(x, weight, bias, kernel_size, stride, dilation, groups, axis_swap)
    one_d = x.dim() == 3
    pads = conv_same_pads(tuple(x.shape[2:]), kernel_size, stride, dilation, axis_swap)
    padding, weight_pads = symmetric_padding(pads, x.dim() - 2)
    w = derived(weight, ("zero_taps_channels_last", tuple(weight_pads)),
                lambda: _cpu._to_cl(F.pad(weight, weight_pads)))
    xc = _cpu._to_cl(x)
    out = (F.conv2d if xc.dim() == 4 else F.conv3d)(xc, w, bias, _cpu._pair(stride, one_d, 1),
                                                   (0, padding[0]) if one_d else padding, 1, groups)
    return out.squeeze(2) if one_d else out
