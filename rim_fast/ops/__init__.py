"""The op layer: every module computes through these functions.

Each public op has a pure-PyTorch reference (``rim_fast.ops.reference``) and, where one exists, compiled
implementations (Triton kernels in ``rim_fast.kernels``, the C++/CUDA extension ``rim_fast._C``), chosen by
``RIM_FAST_BACKEND`` (see ``_dispatch``). ``trace()`` shows which implementation served each call.
"""
from ._dispatch import BACKENDS, Impl, Op, backend, trace, use_backend
from . import reference
from .conv import conv, conv_same, conv_tanh, conv_transpose, tanh, upfirdn
from .gates import gru_gates_h, gru_gates_zero_state, gru_gates_zr
from .update import preprocess_score, update_state

__all__ = [
    "BACKENDS", "Impl", "Op", "backend", "trace", "use_backend", "reference",
    "conv", "conv_same", "conv_tanh", "conv_transpose", "tanh", "upfirdn",
    "gru_gates_zr", "gru_gates_h", "gru_gates_zero_state",
    "preprocess_score", "update_state",
]
