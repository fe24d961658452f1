"""A U-Net backbone for the RIM (torch_rim's ``Unet`` is an empty stub): skip connections at every level and
a GRUBlock (ConvGRU) state at the bottleneck; the same model interface as Hourglass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..compat import CompatLike, resolve
from ..layers import GRUBlock, same_conv
from ..utils import get_activation
from .base import EncoderDecoder
from .hourglass import resampling_layers, setup_common


class Unet(EncoderDecoder):
    """forward(x, y, score, h) -> (g, h').

    Encoder level i: ``num_layers`` convs (act after each), the output kept as skip i, then a stride-2
    downsampling to c * ch_mult[i] channels. Bottleneck: GRUBlock. Decoder level i (reversed): upsampling to
    the skip's channels, combined with skip i (``combine_method`` "cat" then a fusing conv, or "sum"), act,
    then ``num_layers`` convs (act after each). A 1-wide output conv maps to ``channels``."""

    supports_zero_state_hint = True

    def __init__(self, channels, dimensions=1, nf=32, ch_mult=(2, 2), hidden_units=32, num_layers=2,
                 kernel_size=3, conv_kernel_size=None, input_kernel_size=None, condition_on_observation=False,
                 resample_with_conv=True, fir_kernel=(1, 3, 3, 1), combine_method="cat", activation="tanh",
                 compat: CompatLike = None, **kwargs):
        super().__init__()
        ch_mult, conv_kernel_size, input_kernel_size = setup_common(
            self, "unet", channels, dimensions, nf, ch_mult, hidden_units, num_layers, kernel_size,
            conv_kernel_size, input_kernel_size, condition_on_observation, resample_with_conv, fir_kernel,
            combine_method, activation, compat)
        down, up = resampling_layers(dimensions, resample_with_conv, fir_kernel, self.compat)
        conv = lambda i, o, k=kernel_size: same_conv(dimensions, i, o, k)  # noqa: E731

        self.input_layer = conv(2 * channels, nf, input_kernel_size)
        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        widths = []
        c = nf
        for mult in ch_mult:
            self.encoder.append(nn.ModuleList([conv(c, c) for _ in range(num_layers)]))
            widths.append(c)
            self.downsample.append(down(c, c * mult, kernel_size))
            c *= mult
        self.gru_layer = GRUBlock(c, hidden_units, kernel_size, dimensions, conv_kernel_size, compat=self.compat)
        self.upsample = nn.ModuleList()
        self.combine = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for skip_c in reversed(widths):
            self.upsample.append(up(c, skip_c, kernel_size))
            c = skip_c
            self.combine.append(conv(2 * c, c) if combine_method == "cat" else nn.Identity())
            self.decoder.append(nn.ModuleList([conv(c, c) for _ in range(num_layers)]))
        self.output_layer = conv(c, channels, 1)

    def forward(self, x: Tensor, y: Tensor, score: Tensor, h: Tensor, zero_state: Optional[str] = None):
        """x, score: [B, C, *S]; y is unused; h: [B, hidden_units, *S / 2**R] -> (g [B, C, *S], h')."""
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
