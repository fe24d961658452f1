"""torch_rim.layers.GRUBlock: two stacked ConvGRUs with a hidden layer between them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..compat import CompatLike, resolve
from ..validation import integer, spatial_dimensions
from .conv_same import same_conv, unobserved
from .gru import GRU


class GRUBlock(nn.Module):
    """Recurrent block with two hidden states (Morningstar et al. 2019), state h = [h_1 | h_2] on channels.

    In compat mode (default) the returned state keeps the *incoming* h_1, as torch_rim's GRUBlock does, so the
    first GRU is stateless; ``compat="fixed"`` (or ``{"stale_gru_state": False}``) returns the updated one.

    ``zero_state`` is a promise by the caller: ``"all"`` = h is exactly zero, ``"first"`` = h_1 is, ``"second"`` =
    h_1 is zero and left out (h holds h_2 alone); cells whose state is known to be zero skip their U convolutions
    (bit-identical). With ``stale_gru_state`` a call promised ``"all"`` or ``"second"`` returns h_2 alone (h_1 stays
    zero: concatenating it back each step would be a copy for nothing). ``zero_state_hint`` gives the promise a
    caller can make, knowing only that the state is the initial zero state or what the block returned."""

    def __init__(self, in_ch: int, hidden_units: int = 32, kernel_size: int = 5, dimensions: int = 0,
                 conv_kernel_size: int = 11, compat: CompatLike = None):
        super().__init__()
        spatial_dimensions(dimensions, allowed=(0, 1, 2, 3))
        self.check_hidden_units(hidden_units)
        for name, value in (("in_ch", in_ch), ("kernel_size", kernel_size), ("conv_kernel_size", conv_kernel_size)):
            integer(name, value, owner="GRUBlock")
        self.dimensions = dimensions
        self.compat = resolve(compat)
        half = hidden_units // 2
        self.gru1 = GRU(in_ch, half, kernel_size, dimensions)
        self.gru2 = GRU(half, half, kernel_size, dimensions)
        self.hidden_layer = same_conv(dimensions, half, half, conv_kernel_size, bias=False)
        self.reshape_layer = same_conv(dimensions, half, in_ch, conv_kernel_size, bias=False)

    @staticmethod
    def check_hidden_units(hidden_units) -> None:
        """hidden_units is split in two halves, one per GRU (torch_rim's message)."""
        integer("hidden_units", hidden_units, owner="GRUBlock")
        if hidden_units % 2:
            raise ValueError(f"hidden units {hidden_units} must be divisible by 2")

    def zero_state_hint(self, previous: Optional[str] = None, *, initial: bool = False) -> Optional[str]:
        """The ``zero_state`` promise for a call: ``initial=True`` when h is the initial zero state (all of it is
        zero); otherwise for the state that a call with hint ``previous`` returned. With ``stale_gru_state`` the
        block returns the h_1 it received, so a zero h_1 stays zero: left out after "all" or "second" ("second"),
        kept after "first" ("first"); otherwise nothing is known."""
        if initial:
            return "all"
        if previous is None or not self.compat.stale_gru_state:
            return None
        return "second" if previous in ("all", "second") else "first"

    def _hidden(self, h1: torch.Tensor) -> torch.Tensor:
        """tanh(hidden_layer(h1)), as ``ops.conv_tanh`` (one oneDNN primitive on the CPU without autograd) where no
        hook could observe the layer's call."""
        layer = self.hidden_layer
        if self.dimensions and layer.padding_mode == "zeros" and unobserved(layer):
            return ops.conv_tanh(h1, layer.weight, layer.bias, padding=layer.padding, dilation=layer.dilation[0],
                                 groups=layer.groups)
        return ops.tanh(layer(h1))

    def forward(self, x: torch.Tensor, h: torch.Tensor, zero_state: Optional[str] = None):
        """x: [B, in_ch, *S], h: [B, hidden_units, *S] -> (out [B, in_ch, *S], h' [B, hidden_units, *S]); h and h'
        hold h_2 alone, [B, hidden_units / 2, *S], where ``zero_state`` says so (see the class docstring)."""
        h_1, h_2 = (None, h) if zero_state == "second" else torch.tensor_split(h, 2, dim=1)
        if zero_state in ("all", "first", "second"):
            h1 = self.gru1.forward_zero_state(x)
        else:
            h1, _ = self.gru1(x, h_1)
        pre_h2 = self._hidden(h1)
        if zero_state == "all":
            h_2 = self.gru2.forward_zero_state(pre_h2)
        else:
            h_2, _ = self.gru2(pre_h2, h_2)
        x = self.reshape_layer(h_2)
        if self.compat.stale_gru_state and zero_state in ("all", "second"):
            return x, h_2
        h = torch.cat([h_1 if self.compat.stale_gru_state else h1, h_2], dim=1)
        return x, h
