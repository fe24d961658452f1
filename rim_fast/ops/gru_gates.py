"""The ConvGRU gate family: the element-wise halves of a ConvGRU cell, between its convolutions.

A cell computes wx = [W_z; W_r; W_h] * x (one convolution), then ``gru_gates_zr``, then uh = U_h * (r h), then
``gru_gates_h``; a cell whose incoming state is exactly zero runs ``gru_gates_zero_state`` instead. Shapes:
h, z [B, H, *S]; wx [B, 3H, *S]; uzr [B, 2H, *S]; biases [H]. Implementations: the references, and the fused
Triton kernels (``_triton``; forward and backward).
"""
from __future__ import annotations

import torch

from . import _triton, reference
from ._dispatch import Impl, Op

Tensor = torch.Tensor

_zr = Op("gru_gates_zr", reference.gru_gates_zr)
_h = Op("gru_gates_h", reference.gru_gates_h)
_zero_state = Op("gru_gates_zero_state", reference.gru_gates_zero_state)


def gru_gates_zr(wx: Tensor, uzr: Tensor, h: Tensor, bias_z: Tensor, bias_r: Tensor) -> tuple[Tensor, Tensor]:
    """z = sigmoid(W_z x + U_z h + b_z) and r h, with r = sigmoid(W_r x + U_r h + b_r).

    wx: [B, 3H, *S] (its first 2H channels are read), uzr: [B, 2H, *S] = [U_z h; U_r h], h: [B, H, *S],
    bias_z, bias_r: [H]. Returns (z, r h), both [B, H, *S]."""
    return _zr(wx, uzr, h, bias_z, bias_r)


def gru_gates_h(wx: Tensor, uh: Tensor, z: Tensor, h: Tensor, bias_h: Tensor) -> Tensor:
    """h' = (1 - z) h + z tanh(W_h x + U_h (r h) + b_h).

    wx: [B, 3H, *S] (its last H channels are read), uh: [B, H, *S] = U_h (r h), z, h: [B, H, *S], bias_h: [H].
    Returns h', [B, H, *S]."""
    return _h(wx, uh, z, h, bias_h)


def gru_gates_zero_state(wzh: Tensor, bias_z: Tensor, bias_h: Tensor) -> Tensor:
    """The cell with h = 0: h' = sigmoid(W_z x + b_z) tanh(W_h x + b_h).

    wzh: [B, 2H, *S] = [W_z x; W_h x], bias_z, bias_h: [H]. Returns h', [B, H, *S]."""
    return _zero_state(wzh, bias_z, bias_h)


for _op, _fn in ((_zr, _triton.gru_gates_zr), (_h, _triton.gru_gates_h), (_zero_state, _triton.gru_gates_zero_state)):
    _op.register(Impl("triton", _fn, usable=_triton.usable, auto=_triton.auto, missing=_triton.missing,
                      why_not=_triton.why_not))
