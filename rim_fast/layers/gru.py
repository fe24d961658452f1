"""Convolutional GRU (torch_rim.layers.GRU): same parameters, computed with merged convolutions and the
fused gate ops (``ops.gru_gates_*``)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..definitions import DTYPE
from ..validation import integer, spatial_dimensions
from .conv_same import same_conv
from .derived import conv_weight, derived


class GRU(nn.Module):
    """Gated Recurrent Unit with convolutional layers (linear layers for dimensions 0).

    z = sigmoid(W_z x + U_z h + b_z), r = sigmoid(W_r x + U_r h + b_r),
    h' = (1 - z) h + z tanh(W_h x + U_h (r h) + b_h). forward(x, h) -> (h', h')."""

    def __init__(self, in_ch: int, hidden_units: int = 32, kernel_size: int = 5, dimensions: int = 0):
        super().__init__()
        spatial_dimensions(dimensions, allowed=(0, 1, 2, 3))
        for name, value in (("in_ch", in_ch), ("hidden_units", hidden_units), ("kernel_size", kernel_size)):
            integer(name, value, owner="GRU")
        self.dimensions = dimensions
        self.bias_broadcast = [1, -1] + [1] * dimensions
        layer = lambda i, o: same_conv(dimensions, i, o, kernel_size, bias=False)  # noqa: E731
        self.w_z = layer(in_ch, hidden_units)
        self.u_z = layer(hidden_units, hidden_units)
        self.bias_z = nn.Parameter(torch.zeros(hidden_units, dtype=DTYPE))
        self.w_r = layer(in_ch, hidden_units)
        self.u_r = layer(hidden_units, hidden_units)
        self.bias_r = nn.Parameter(torch.zeros(hidden_units, dtype=DTYPE))
        self.w_h = layer(in_ch, hidden_units)
        self.u_h = layer(hidden_units, hidden_units)
        self.bias_h = nn.Parameter(torch.zeros(hidden_units, dtype=DTYPE))

    def _conv(self, x, weight):
        return ops.conv(x, weight)

    def forward(self, x: torch.Tensor, h: torch.Tensor):
        """x: [B, in_ch, *S], h: [B, H, *S] -> (h', h')."""
        # [B, 3H, *S] and [B, 2H, *S]: one convolution per input instead of five
        wx = self._conv(x, conv_weight(self, "w_zrh", lambda: torch.cat([self.w_z.weight, self.w_r.weight,
                                                                               self.w_h.weight])))
        uzr = self._conv(h, conv_weight(self, "u_zr", lambda: torch.cat([self.u_z.weight, self.u_r.weight])))
        z, rh = ops.gru_gates_zr(wx, uzr, h, self.bias_z, self.bias_r)
        new_state = ops.gru_gates_h(wx, self._conv(rh, self.u_h.weight), z, h, self.bias_h)
        return new_state, new_state

    def forward_zero_state(self, x: torch.Tensor) -> torch.Tensor:
        """The cell for an incoming state that is exactly zero: the three U convolutions and the reset gate
        drop out (h' = z tanh(W_h x + b_h)). Equal to ``forward(x, 0)[0]``."""
        wzh = self._conv(x, conv_weight(self, "w_zh", lambda: torch.cat([self.w_z.weight, self.w_h.weight])))
        bias_z = self.bias_z
        if torch.is_grad_enabled() and self.bias_r.requires_grad:
            # keep W_r, U_z, U_r, U_h and b_r in the graph with exact zero gradients, as the full cell gives them:
            # optimizers and DDP must see the same parameters used (a term on [H] vectors, not on activations)
            bias_z = derived(self, "bias_z_zero_state", lambda: self.bias_z + 0.0 * (
                self.bias_r.sum() + sum(m.weight.sum() for m in (self.w_r, self.u_z, self.u_r, self.u_h))))
        return ops.gru_gates_zero_state(wzh, bias_z, self.bias_h)
