"""ConvGRU gate ops. Compiled implementations register themselves here: the fused Triton kernels
(``rim_fast.kernels.gru_gates`` through the ``rim_fast::gru_gates_*`` ops of ``triton_gates``)."""
from ._dispatch import Impl, Op
from . import reference, triton_gates

gru_gates_zr = Op("gru_gates_zr", reference.gru_gates_zr)
gru_gates_h = Op("gru_gates_h", reference.gru_gates_h)
gru_gates_zero_state = Op("gru_gates_zero_state", reference.gru_gates_zero_state)

for _op, _fn in ((gru_gates_zr, triton_gates.gru_gates_zr), (gru_gates_h, triton_gates.gru_gates_h),
                 (gru_gates_zero_state, triton_gates.gru_gates_zero_state)):
    _op.register(Impl("triton", _fn, usable=triton_gates.usable, auto=triton_gates.auto,
                      missing=triton_gates.missing))
