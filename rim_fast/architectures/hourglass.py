"""torch_rim's Hourglass: encoder, GRUBlock at the bottleneck, decoder; same parameters and numerics."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import EncoderDecoder


class Hourglass(EncoderDecoder):
    """forward(x, y, score, h) -> (g, h'), torch_rim's arguments (see ``EncoderDecoder``).

    Encoder level i: ``num_layers`` convs (act after each), then a stride-2 downsampling to c * ch_mult[i]
    channels; bottleneck: GRUBlock; decoder level i (reversed): upsampling to c // ch_mult[i] channels, then
    ``num_layers`` convs. torch_rim's activation rule: act after every layer of ``all_modules`` but the last of
    each level; a 1-wide output conv maps to ``channels``."""

    architecture = "hourglass"

    def _build(self, down, up, ch_mult, kernel_size, conv_kernel_size, input_kernel_size):
        self.decoder_index = self.num_resolutions * (self.num_layers + 1)
        self.input_layer = self._conv(2 * self.channels, self.nf, input_kernel_size)
        modules = []
        c = self.nf
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_layers):
                modules.append(self._conv(c, c, kernel_size))
            next_c = c * ch_mult[i_level]
            modules.append(down(c, next_c, kernel_size))
            c = next_c
        self.gru_layer = self._bottleneck(c, kernel_size, conv_kernel_size)
        for i_level in reversed(range(self.num_resolutions)):
            next_c = c // ch_mult[i_level]
            modules.append(up(c, next_c, kernel_size))
            c = next_c
            for _ in range(self.num_layers):
                modules.append(self._conv(c, c, kernel_size))
        self.all_modules = nn.ModuleList(modules)
        self.output_layer = self._conv(c, self.channels, 1)

    def forward(self, x: Tensor, y: Tensor, score: Tensor, h: Tensor, zero_state: Optional[str] = None):
        """x, score: [B, C, *S]; y is unused (as in torch_rim); h: [B, hidden_units, *S / 2**R] -> (g, h').
        ``zero_state``: the GRUBlock's promise about h (see ``zero_state_hint``)."""
        self._check_inputs(x, score)
        x = torch.cat([x, score], dim=1)
        x = self._conv_act(self.input_layer, x)
        period = self.num_layers + 1
        for i_layer, layer in enumerate(self.all_modules[:self.decoder_index]):
            x = self._conv_act(layer, x) if (i_layer + 1) % period != 0 else layer(x)
        x, h = self.gru_layer(x, h, zero_state)
        # torch_rim applies the same index rule in the decoder: act after the upsampling layer and every
        # conv of a level but its last
        for i_layer, layer in enumerate(self.all_modules[self.decoder_index:]):
            x = self._conv_act(layer, x) if (i_layer + 1) % period != 0 else layer(x)
        return self.output_layer(x), h
