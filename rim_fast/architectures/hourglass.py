"""torch_rim's Hourglass: encoder, GRUBlock at the bottleneck, decoder; same parameters and numerics."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..layers.derived import conv_weight, derived
from ..layers.conv_same import _SameConvMixin
from .base import EncoderDecoder, fold_next_bias, unobserved


def _exact(t: Tensor) -> Tensor:
    """``t`` in float64, for a product of parameters rounded once to their dtype; where float64 is not available
    (MPS), in ``t``'s own dtype."""
    return t if t.device.type == "mps" else t.double()


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
        layers = list(self.all_modules)  # sliced as a list: a ModuleList's slice builds a new ModuleList
        x = self._levels(layers[:self.decoder_index], x, period)
        x, h = self.gru_layer(x, h, zero_state)
        merged = self._merged_output()
        x = self._levels(layers[self.decoder_index:], x, period, merged)
        return (x if merged is not None else self.output_layer(x)), h

    def _levels(self, layers, x: Tensor, period: int, merged: Optional[tuple] = None) -> Tensor:
        """The encoder's or the decoder's layers: torch_rim's index rule, act after every layer of a level but its
        last (in the decoder: after the upsampling layer and every conv but the last). A conv + tanh followed by a
        layer without activation carries that layer's bias (``fold_next_bias``) where that saves a kernel. With
        ``merged`` (``_merged_output``), the last layer and the output conv run as that one convolution."""
        i, n = 0, len(layers)
        while i < n:
            layer, act = layers[i], (i + 1) % period != 0
            weight, bias = merged if merged is not None and i + 1 == n - 1 else (None, None)
            if act and i + 1 < n and (i + 2) % period == 0:
                y = fold_next_bias(layer, layers[i + 1], x, weight, bias)
                if y is not None:
                    x, i = y, i + 2
                    continue
            if merged is not None and i == n - 1:
                return ops.conv(x, *merged, padding=layer.padding, dilation=layer.dilation[0])
            x = self._conv_act(layer, x) if act else layer(x)
            i += 1
        return x

    def _merged_output(self) -> Optional[tuple]:
        """(weight, bias) of one convolution computing the decoder's last conv and the 1-wide output conv, or None.

        Both are linear (no activation between them), so output(last(x)) = conv(x, W_out W_last, W_out b_last +
        b_out): the same products summed in another order, for channels/nf of the last conv's multiply-adds and
        no nf-wide intermediate. Built once per RIM call (``layers.derived``); with autograd, backward maps the
        merged kernel's summed gradient to both layers once per call. In training this removes one nf -> nf
        convolution's forward and backward per step: measured, training step against torch_rim, alternated in one
        process (2-core Xeon with AVX-512, 2026-12-03): 1.19x -> 1.26x (S1), 1.17x -> 1.24x (S2), 1.07x -> 1.15x
        (S3). Within the whole-RIM error budget (tests/test_error_budget.py; worst use 0.79 of it with 1 or 2
        threads; the first try, commit 6694712, went over it in 3D, before the tanh and conv + tanh paths changed).
        The merged weight and bias are computed in float64 and rounded once (``_exact``): rounded at every product
        and sum in float32, their errors are the same at every position of the output, and sums over positions add
        them up instead of averaging them out. That made the gradient of the output bias (C = 1: the sum of the
        output's gradient over every position and step) 12x the reference's error, rms over 20 draws of weights and
        data, and 3.4x in float64 against the 2.7x of the reference summed in another order
        (``python -m bench.error_budget --seeds``; bench/results/error-budget-seeds-*).
        On the CPU, with C = 1, the merged conv runs as ``ops._cpu._ThinOutConv`` (in 3D without autograd,
        ``ops._cpu._thin_out_depthwise``).
        None where the layers are not plain convs, hooks could observe them, or with ``RIM_FAST_BACKEND=reference``
        (``ops.rewrites``: torch_rim's computation)."""
        if self.num_layers == 0 or not ops.rewrites():
            return None
        last, out = self.all_modules[-1], self.output_layer
        if not (type(last) is type(out) and isinstance(last, _SameConvMixin)
                and last.padding_mode == out.padding_mode == "zeros" and last.groups == out.groups == 1
                and all(k == 1 for k in out.kernel_size) and unobserved(last, out)):
            return None

        def weight():
            with torch.autocast(last.weight.device.type, enabled=False):
                w_out = _exact(out.weight).reshape(out.weight.shape[0], -1)
                w = w_out @ _exact(last.weight).reshape(last.weight.shape[0], -1)
                return w.reshape(w_out.shape[0], *last.weight.shape[1:]).to(last.weight.dtype)

        def bias():
            if last.bias is None:
                return out.bias
            with torch.autocast(last.weight.device.type, enabled=False):
                w_out, b_last = _exact(out.weight).reshape(out.weight.shape[0], -1), _exact(last.bias)
                b = torch.mv(w_out, b_last) if out.bias is None else torch.addmv(_exact(out.bias), w_out, b_last)
                return b.to(last.bias.dtype)

        return conv_weight(self, "merged_output_weight", weight), derived(self, "merged_output_bias", bias)
