"""Convolution, activation and FIR resampling ops. cuDNN / oneDNN serve the convolutions; on the CPU the
``channels_last`` implementations (``cpu_layout``) run them in the layout oneDNN is fastest in."""
import torch

from ._dispatch import Impl, Op
from . import cpu_layout, reference

conv = Op("conv", reference.conv)
conv_same = Op("conv_same", reference.conv_same)
conv_transpose = Op("conv_transpose", reference.conv_transpose)
upfirdn = Op("upfirdn", reference.upfirdn)
tanh = Op("tanh", torch.tanh)
conv_tanh = Op("conv_tanh", reference.conv_tanh)

for _op, _fn in ((conv, cpu_layout.conv), (conv_same, cpu_layout.conv_same),
                 (conv_transpose, cpu_layout.conv_transpose)):
    _op.register(Impl("channels_last", _fn, usable=cpu_layout.usable, auto=cpu_layout.auto, kernel=False))
tanh.register(Impl("sigmoid_form", cpu_layout.tanh, usable=cpu_layout.tanh_usable, auto=cpu_layout.tanh_auto,
                   kernel=False))
conv_tanh.register(Impl("onednn_fused", cpu_layout.conv_tanh, usable=cpu_layout.conv_tanh_usable,
                        auto=cpu_layout.conv_tanh_usable, kernel=False))
conv_tanh.register(Impl("channels_last", cpu_layout.conv_tanh_unfused, usable=cpu_layout.usable,
                        auto=cpu_layout.auto, kernel=False))
