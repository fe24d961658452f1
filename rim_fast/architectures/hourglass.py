"""torch_rim's Hourglass: encoder, GRUBlock at the bottleneck, decoder; same parameters and numerics."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..compat import CompatLike, resolve
from ..layers import GRUBlock, same_conv
from ..layers.conv_same import CONV_SAME, CONV_TRANSPOSED_SAME
from ..layers.resample import FIRResample
from ..utils import get_activation
from .base import EncoderDecoder


def resampling_layers(dimensions: int, resample_with_conv: bool, fir_kernel, compat):
    """(downsample_layer, upsample_layer) factories (in_ch, out_ch, k) -> module."""
    if resample_with_conv:
        down = lambda i, o, k: CONV_SAME[dimensions](i, o, k, stride=2,  # noqa: E731
                                                     axis_swap=compat.conv_same_axis_swap)
        # even kernels give 2n+1 samples in score_models; crop to 2n (torch_rim bug 7)
        up = lambda i, o, k: CONV_TRANSPOSED_SAME[dimensions](i, o, k, stride=2,  # noqa: E731
                                                              crop_to_stride_multiple=True)
    else:
        down = lambda i, o, k: FIRResample(i, o, k, dimensions, fir_kernel, up=False)  # noqa: E731
        up = lambda i, o, k: FIRResample(i, o, k, dimensions, fir_kernel, up=True)  # noqa: E731
    return down, up


def check_common(dimensions, channels, nf, ch_mult, hidden_units, num_layers, kernel_size, combine_method,
                 condition_on_observation):
    if dimensions not in (1, 2, 3):
        raise ValueError(f"The dimensions {dimensions} is not supported. Only 1, 2 and 3 dimensional input (not "
                         f"including channels) are.")
    for name, value in (("channels", channels), ("nf", nf), ("hidden_units", hidden_units),
                        ("kernel_size", kernel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    if len(ch_mult) < 1 or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
    if hidden_units % 2:
        raise ValueError(f"hidden_units must be even (GRUBlock splits it in two), got {hidden_units}")
    if combine_method not in ("cat", "sum"):
        raise ValueError(f"combine_method must be 'cat' or 'sum', got {combine_method!r}")
    if condition_on_observation:
        raise ValueError("condition_on_observation=True is not currently supported")


def check_kernels(conv_kernel_size, input_kernel_size, resample_with_conv, fir_kernel):
    """The optional kernel sizes and the FIR kernel, named in the error (the layers would only say kernel_size)."""
    for name, value in (("conv_kernel_size", conv_kernel_size), ("input_kernel_size", input_kernel_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None (= kernel_size) or a positive int (square kernels only), got "
                             f"{value!r}")
    if not resample_with_conv:
        try:
            taps = [float(v) for v in fir_kernel]
        except (TypeError, ValueError):
            taps = None
        if not taps or sum(taps) == 0:
            raise ValueError(f"fir_kernel must be a non-empty 1-D sequence of numbers with a non-zero sum (the "
                             f"separable FIR filter of resample_with_conv=False), got {fir_kernel!r}")


def setup_common(model: EncoderDecoder, architecture: str, channels, dimensions, nf, ch_mult, hidden_units,
                 num_layers, kernel_size, conv_kernel_size, input_kernel_size, condition_on_observation,
                 resample_with_conv, fir_kernel, combine_method, activation, compat):
    """Checks, attributes and ``hyperparameters`` shared by Hourglass and Unet.
    Returns (ch_mult, conv_kernel_size, input_kernel_size) with the kernel-size defaults resolved."""
    ch_mult = tuple(ch_mult)
    check_common(dimensions, channels, nf, ch_mult, hidden_units, num_layers, kernel_size, combine_method,
                 condition_on_observation)
    check_kernels(conv_kernel_size, input_kernel_size, resample_with_conv, fir_kernel)
    conv_kernel_size = kernel_size if conv_kernel_size is None else conv_kernel_size
    input_kernel_size = kernel_size if input_kernel_size is None else input_kernel_size
    model.compat = resolve(compat)
    model.hyperparameters = {
        "channels": channels, "architecture": architecture, "nf": nf, "ch_mult": ch_mult,
        "dimensions": dimensions, "num_layers": num_layers, "resample_with_conv": resample_with_conv,
        "fir_kernel": tuple(fir_kernel), "combine_method": combine_method,
        "condition_on_observation": condition_on_observation, "kernel_size": kernel_size,
        "conv_kernel_size": conv_kernel_size, "input_kernel_size": input_kernel_size,
        "activation": activation,
        # not saved by torch_rim (bug 4); torch_rim's Hourglass(**hparams) accepts both keys
        "hidden_units": hidden_units, "compat": model.compat.name,
    }
    model.nf = nf
    model.channels = channels
    model.dimensions = dimensions
    model.act = get_activation(activation)
    model.num_resolutions = len(ch_mult)
    model.num_layers = num_layers
    model.hidden_units = hidden_units
    model.condition_on_observation = condition_on_observation
    model.combine_method = combine_method
    return ch_mult, conv_kernel_size, input_kernel_size


class Hourglass(EncoderDecoder):
    supports_zero_state_hint = True

    def __init__(self, channels, dimensions=1, nf=32, ch_mult=(2, 2), hidden_units=32, num_layers=2,
                 kernel_size=3, conv_kernel_size=None, input_kernel_size=None, condition_on_observation=False,
                 resample_with_conv=True, fir_kernel=(1, 3, 3, 1), combine_method="cat", activation="tanh",
                 compat: CompatLike = None, **kwargs):
        super().__init__()
        ch_mult, conv_kernel_size, input_kernel_size = setup_common(
            self, "hourglass", channels, dimensions, nf, ch_mult, hidden_units, num_layers, kernel_size,
            conv_kernel_size, input_kernel_size, condition_on_observation, resample_with_conv, fir_kernel,
            combine_method, activation, compat)
        layer = lambda i, o, k: same_conv(dimensions, i, o, k)  # noqa: E731
        downsample_layer, upsample_layer = resampling_layers(dimensions, resample_with_conv, fir_kernel,
                                                             self.compat)
        self.decoder_index = self.num_resolutions * (num_layers + 1)

        self.input_layer = layer(2 * channels, nf, input_kernel_size)
        modules = []
        c = nf
        for i_level in range(self.num_resolutions):
            for _ in range(num_layers):
                modules.append(layer(c, c, kernel_size))
            next_c = c * ch_mult[i_level]
            modules.append(downsample_layer(c, next_c, kernel_size))
            c = next_c
        self.gru_layer = GRUBlock(c, hidden_units, kernel_size, dimensions, conv_kernel_size, compat=self.compat)
        for i_level in reversed(range(self.num_resolutions)):
            next_c = c // ch_mult[i_level]
            modules.append(upsample_layer(c, next_c, kernel_size))
            c = next_c
            for _ in range(num_layers):
                modules.append(layer(c, c, kernel_size))
        self.all_modules = nn.ModuleList(modules)
        self.output_layer = layer(c, channels, 1)

    def forward(self, x: Tensor, y: Tensor, score: Tensor, h: Tensor, zero_state: Optional[str] = None):
        """x, score: [B, C, *S]; y is unused (as in torch_rim); h: [B, hidden_units, *S / 2**R] -> (g, h')."""
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
