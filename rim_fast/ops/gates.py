"""ConvGRU gate ops. Compiled implementations register themselves here (see rim_fast.kernels)."""
from ._dispatch import Op
from . import reference

gru_gates_zr = Op("gru_gates_zr", reference.gru_gates_zr)
gru_gates_h = Op("gru_gates_h", reference.gru_gates_h)
gru_gates_zero_state = Op("gru_gates_zero_state", reference.gru_gates_zero_state)
