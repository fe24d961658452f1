"""The op layer: every module computes through these functions, grouped by the op family they compute.

- ``conv``: ``conv``, ``conv_same``, ``conv_transpose``, ``tanh``, ``conv_tanh``, ``conv_transpose_tanh``,
  ``bias_tanh``, ``upfirdn`` (and ``rewrites``, ``folds_bias``: when layers may be merged or carry the next
  one's bias, ``architectures``);
- ``gru_gates``: ``gru_gates_zr``, ``gru_gates_h``, ``gru_gates_zero_state`` (the element-wise halves of a ConvGRU);
- ``update_step``: ``preprocess_score``, ``update_state`` (the RIM's score preprocessing and state update).

Each op has a pure-PyTorch reference (``reference``: the spec, the fallback, the baseline of every test and
benchmark) and may have faster implementations, which live in private modules named by backend, each with its
``usable``/``auto`` rules next to them: ``_triton`` (Triton kernels, ``rim_fast.kernels``), ``_cpp`` (the
C++/CUDA extension ``rim_fast._C``, csrc/), ``_cpu`` (CPU layouts and oneDNN), ``_cudnn`` (cuDNN in
channels-last). ``RIM_FAST_BACKEND`` chooses (``_dispatch``: ``auto``, ``reference``, ``kernels``); ``trace()``
shows what served each call, and ``python -m rim_fast.info`` what ``auto`` picks on this machine. What ``auto``
picks, and why:

=====================  =================  =================================================================
op                     auto picks         where, and why
=====================  =================  =================================================================
conv, conv_same,       ``channels_last``  CPU, float32/64, bfloat16: oneDNN runs NHWC 2-20x faster than the
conv_transpose                            reference's NCHW (1D as [B, C, 1, L]); for batches and one sample above
                                          ``_cpu.ONEDNN_MIN_NUMEL`` elements (below, aten's native kernels, the
                                          reference's, beat oneDNN's 50-70 us a call; a float32/bfloat16 3D
                                          sample that aten would give them runs as two depth halves, a batch
                                          of two that aten gives oneDNN: ``_cpu._depth_split``); elsewhere the
                                          reference (cuDNN),
                                          except ``conv_same`` on CUDA in CUDA graphs and in eager calls
                                          below 2^23 input elements: ``symmetric_padding`` (no pad kernel: the
                                          larger pad on both sides and zero taps in the kernel, built once per
                                          RIM call);
                                          ``cudnn_channels_last`` on CUDA where
                                          ``RIM_FAST_CUDA_LAYOUT=channels_last`` asks for it, and in a RIM's
                                          CUDA graph recorded in both layouts whose timing chose it (``auto``,
                                          the default; ``_cudnn``)
tanh                   ``cpp``            CPU float32/bfloat16, eager: one vectorised pass, accurate near 0;
                                          reference (torch.tanh) under torch.compile (Inductor fuses it), on
                                          GPUs, and for float32 on Intel CPUs with AVX-512, where torch.tanh is
                                          MKL's vsTanh at 2.7x the kernel's speed (``_cpp.mkl_tanh_is_faster``)
conv_tanh              ``onednn_fused``   CPU float32: the tanh rides on the conv's output. Without autograd
                                          eager and under torch.compile (an extern kernel there); with autograd
                                          eager the channels-last conv, then tanh in place (autograd's C++
                                          nodes cost less host time than a Python Function), but for the thin
                                          input conv (fused forward, tanh' from the output, then the conv's
                                          backward with the thin input gradient);
                                          ``triton_bias_tanh`` on CUDA where ``bias_tanh`` picks
                                          ``triton`` (the conv without its bias, then ``bias_tanh``: 2 kernels,
                                          not cuDNN's conv + bias add + tanh = 3); else ``unfused``: the
                                          dispatched conv, then the dispatched tanh; the reference on one
                                          CPU sample's small inputs (``_cpu.onednn_pays``)
conv_transpose_tanh    ``unfused``        the dispatched transposed conv, then the dispatched tanh;
                                          ``triton_bias_tanh`` where ``conv_tanh`` picks it (the transposed conv
                                          without its bias, then ``bias_tanh``). Its ``onednn_fused`` (CPU,
                                          float32, no autograd, eager) measured slower than ``unfused`` here:
                                          ``kernels`` only
bias_tanh              ``triton``         CUDA under CUDA-graph capture, and eager calls of >= 2^23 elements (the
                                          gates' threshold); never under torch.compile (Inductor fuses the add
                                          and the tanh itself); the reference on the CPU
upfirdn                reference          -
gru_gates_*            ``triton``         CUDA under torch.compile or CUDA-graph capture, and eager calls of
                                          >= 2^23 elements (small eager calls are launch-bound: the reference's
                                          few kernels are faster); the reference on the CPU
preprocess_score       ``cpp``            eager, a method that computes (adam, rmsprop, arcsinh), no autograd,
                                          on a device the extension was built for; reference under
                                          torch.compile (Inductor fuses its element-wise ops with their
                                          neighbours, which an opaque custom op prevents)
update_state           ``cpp``            eager with a loss term (x_true): one fused pass instead of four ops
                                          and their autograd nodes; a lone x + g is one PyTorch op already; on
                                          the CPU not with autograd (its Python-registered backward costs more
                                          host time than the fused pass saves)
=====================  =================  =================================================================
"""
import torch

from . import _triton, reference
from ._cudnn import LAYOUTS as CUDA_LAYOUTS, cuda_layout, use_cuda_layout
from ._dispatch import BACKENDS, backend, graph_region, trace, use_backend
from .conv import (bias_tanh, conv, conv_same, conv_tanh, conv_transpose, conv_transpose_tanh, folds_bias, rewrites,
                   tanh, upfirdn)
from .gru_gates import gru_gates_h, gru_gates_zero_state, gru_gates_zr
from .update_step import PREPROCESSING, preprocess_score, update_state



def check_compilable(device: torch.device) -> None:
    """Raise a RuntimeError, before anything is traced, when ``RIM_FAST_BACKEND=kernels`` cannot run the op layer
    inside torch.compile on this device (the kernels backend runs the kernels or raises)."""
    if backend() != "kernels":
        return
    problem = _triton.compile_why_not(torch.device(device))
    if problem is not None:
        raise RuntimeError(f"RIM_FAST_BACKEND=kernels cannot run under torch.compile on {device}: {problem}. Compile "
                           f"with RIM_FAST_BACKEND=auto (or reference), or run eagerly.")


__all__ = [
    "BACKENDS", "backend", "check_compilable", "graph_region", "trace", "use_backend", "reference", "PREPROCESSING",
    "CUDA_LAYOUTS", "cuda_layout", "use_cuda_layout",
    "conv", "conv_same", "conv_tanh", "bias_tanh", "conv_transpose", "conv_transpose_tanh", "folds_bias", "rewrites",
    "tanh", "upfirdn",
    "gru_gates_zr", "gru_gates_h", "gru_gates_zero_state",
    "preprocess_score", "update_state",
]
