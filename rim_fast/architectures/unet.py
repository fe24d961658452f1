"""A U-Net backbone for the RIM (torch_rim's ``Unet`` is an empty stub): skip connections at every level and
a GRUBlock (ConvGRU) state at the bottleneck; the same arguments and model interface as Hourglass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import EncoderDecoder


class Unet(EncoderDecoder):
    """forward(x, y, score, h) -> (g, h').

    Encoder level i: ``num_layers`` convs (act after each), the output kept as skip i, then a stride-2
    downsampling to c * ch_mult[i] channels. Bottleneck: GRUBlock. Decoder level i (reversed): upsampling to
    the skip's channels, combined with skip i (``combine_method`` "cat" then a fusing conv, or "sum"), act,
    then ``num_layers`` convs (act after each). A 1-wide output conv maps to ``channels``."""

    architecture = "unet"

    def _build(self, down, up, ch_mult, kernel_size, conv_kernel_size, input_kernel_size):
        self.input_layer = self._conv(2 * self.channels, self.nf, input_kernel_size)
        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        widths = []
        c = self.nf
        for mult in ch_mult:
            self.encoder.append(nn.ModuleList([self._conv(c, c, kernel_size) for _ in range(self.num_layers)]))
            widths.append(c)
            self.downsample.append(down(c, c * mult, kernel_size))
            c *= mult
        self.gru_layer = self._bottleneck(c, kernel_size, conv_kernel_size)
        self.upsample = nn.ModuleList()
        self.combine = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for skip_c in reversed(widths):
            self.upsample.append(up(c, skip_c, kernel_size))
            c = skip_c
            self.combine.append(self._conv(2 * c, c, kernel_size) if self.combine_method == "cat" else nn.Identity())
            self.decoder.append(nn.ModuleList([self._conv(c, c, kernel_size) for _ in range(self.num_layers)]))
        self.output_layer = self._conv(c, self.channels, 1)

    def forward(self, x: Tensor, y: Tensor, score: Tensor, h: Tensor, zero_state: Optional[str] = None):
        """x, score: [B, C, *S]; y is unused; h: [B, hidden_units, *S / 2**R] -> (g [B, C, *S], h').
        ``zero_state``: the GRUBlock's promise about h (see ``zero_state_hint``)."""
        self._check_inputs(x, score)
        x = self._conv_act(self.input_layer, torch.cat([x, score], dim=1))
        skips = []
        for convs, down in zip(self.encoder, self.downsample):
            for layer in convs:
                x = self._conv_act(layer, x)
            skips.append(x)
            x = down(x)
        x, h = self.gru_layer(x, h, zero_state)
        for up, combine, convs in zip(self.upsample, self.combine, self.decoder):
            x = up(x)
            skip = skips.pop()
            x = (self._conv_act(combine, torch.cat([x, skip], dim=1)) if self.combine_method == "cat"
                 else self.act(x + skip))
            for layer in convs:
                x = self._conv_act(layer, x)
        return self.output_layer(x), h
