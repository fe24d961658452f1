"""The backbone interface of a RIM (``Model``, torch_rim's) and what the Hourglass and the Unet share
(``EncoderDecoder``: their arguments and checks, ``hyperparameters``, layer factories, hidden state)."""
from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import Module

from .. import ops
from ..compat import Compat, CompatLike, resolve
from ..layers import GRUBlock, same_conv
from ..layers.activation import get_activation
from ..layers.conv_same import (CONV_SAME, CONV_TRANSPOSED_SAME, _ConvNdSame, _ConvTransposedNdSame, _SameConvMixin,
                                unobserved)
from ..layers.derived import conv_weight, derived
from ..layers.spectral_norm import SpectralNorm
from ..layers.resample import FIRResample
from ..validation import choice, integer, integers, spatial_dimensions

#: (in_ch, out_ch, kernel_size) -> module
LayerFactory = Callable[[int, int, int], Module]


class Model(Module, ABC):
    """Interface of a RIM backbone: forward(x, y, score, h) -> (g, h'), and its initial hidden state."""

    @abstractmethod
    def initalize_hidden_states(self, dimensions: Sequence[int], batch_size: int) -> Tensor:
        raise NotImplementedError("")

    def initialize_hidden_states(self, dimensions: Sequence[int], batch_size: int) -> Tensor:
        """Correctly spelt alias of ``initalize_hidden_states`` (torch_rim's name)."""
        return self.initalize_hidden_states(dimensions, batch_size)

    def zero_state_hint(self, previous: Optional[str] = None, *, initial: bool = False) -> Optional[str]:
        """The ``zero_state`` argument for a call of ``forward`` (None: pass none): ``initial=True`` when h is the
        initial state (``initalize_hidden_states``, all zeros), otherwise for the state that a call given
        ``previous`` returned. A model whose forward takes no ``zero_state`` keeps this default."""
        return None


def resampling_layers(dimensions: int, resample_with_conv: bool, fir_kernel,
                      compat: Compat) -> tuple[LayerFactory, LayerFactory]:
    """(downsample_layer, upsample_layer): stride-2 Conv*dSame / ConvTransposed*dSame, or FIR resampling
    followed by a "same" conv with ``resample_with_conv=False``."""
    if resample_with_conv:
        down = lambda i, o, k: CONV_SAME[dimensions](i, o, k, stride=2,  # noqa: E731
                                                     axis_swap=compat.conv_same_axis_swap)
        # score_models' transposed conv gives 2n+1 samples for even kernels: crop to 2n
        up = lambda i, o, k: CONV_TRANSPOSED_SAME[dimensions](i, o, k, stride=2,  # noqa: E731
                                                              crop_to_stride_multiple=True)
    else:
        down = lambda i, o, k: FIRResample(i, o, k, dimensions, fir_kernel, up=False)  # noqa: E731
        up = lambda i, o, k: FIRResample(i, o, k, dimensions, fir_kernel, up=True)  # noqa: E731
    return down, up


def _check_fir_kernel(fir_kernel) -> None:
    try:
        taps = [float(v) for v in fir_kernel]
    except (TypeError, ValueError):
        taps = None
    if not taps or sum(taps) == 0:
        raise ValueError(f"fir_kernel must be a non-empty 1-D sequence of numbers with a non-zero sum (the "
                         f"separable FIR filter of resample_with_conv=False), got {fir_kernel!r}")


#: keys that torch_rim writes into model_hparams.json beside the network's own (the RIM's settings), which
#: load_architecture passes to the network: accepted and ignored, as torch_rim's Hourglass(**kwargs) did
TORCH_RIM_SAVED_KEYS = frozenset({"architecture", "score_preprocessing_method", "initialization_method", "T",
                                  "epsilon", "beta_1", "beta_2"})


def _check_unknown_keywords(cls, kwargs: dict) -> None:
    """A TypeError naming the keyword arguments no layer knows (``hiden_units``) and the closest valid ones."""
    unknown = [k for k in kwargs if k not in TORCH_RIM_SAVED_KEYS]
    if not unknown:
        return
    valid = [name for name, p in inspect.signature(cls.__init__).parameters.items()
             if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    raise TypeError(f"{cls.__name__}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(parts)}; valid ones: {', '.join(valid)}")


def _check_arguments(channels, dimensions, nf, ch_mult, hidden_units, num_layers, kernel_size, conv_kernel_size,
                     input_kernel_size, condition_on_observation, resample_with_conv, fir_kernel,
                     combine_method) -> tuple:
    """The checks of the Hourglass/Unet arguments; returns ch_mult as a tuple of ints."""
    spatial_dimensions(dimensions)
    for name, value in (("channels", channels), ("nf", nf), ("kernel_size", kernel_size)):
        integer(name, value)
    GRUBlock.check_hidden_units(hidden_units)
    integer("num_layers", num_layers, minimum=0)
    ch_mult = integers("ch_mult", ch_mult)
    for name, value in (("conv_kernel_size", conv_kernel_size), ("input_kernel_size", input_kernel_size)):
        integer(name, value, optional=True, note=" (None = kernel_size; square kernels only)")
    choice("combine_method", combine_method, ("cat", "sum"))
    if condition_on_observation:
        raise ValueError("condition_on_observation=True is not currently supported")
    if not resample_with_conv:
        _check_fir_kernel(fir_kernel)
    return ch_mult


class EncoderDecoder(Model):
    """What the Hourglass and the Unet share: torch_rim's Hourglass arguments, their checks and
    ``hyperparameters``; the zero state at the bottleneck's resolution (spatial sizes must survive len(ch_mult)
    halvings); a "same" conv followed by the activation as ``ops.conv_tanh`` when the activation is tanh.

    A subclass names its ``architecture`` (the key of ``rim_fast.architectures.ARCHITECTURES``) and builds its
    layers in ``_build``, with a ``gru_layer`` (GRUBlock) at the bottleneck."""

    architecture: str
    gru_layer: GRUBlock

    def __init__(self, channels, dimensions=1, nf=32, ch_mult=(2, 2), hidden_units=32, num_layers=2,
                 kernel_size=3, conv_kernel_size=None, input_kernel_size=None, condition_on_observation=False,
                 resample_with_conv=True, fir_kernel=(1, 3, 3, 1), combine_method="cat", activation="tanh",
                 compat: CompatLike = None, **kwargs):
        super().__init__()
        _check_unknown_keywords(type(self), kwargs)
        ch_mult = _check_arguments(channels, dimensions, nf, ch_mult, hidden_units, num_layers, kernel_size,
                                   conv_kernel_size, input_kernel_size, condition_on_observation,
                                   resample_with_conv, fir_kernel, combine_method)
        conv_kernel_size = kernel_size if conv_kernel_size is None else conv_kernel_size
        input_kernel_size = kernel_size if input_kernel_size is None else input_kernel_size
        self.compat = resolve(compat)
        self.hyperparameters = {
            "channels": channels, "architecture": self.architecture, "nf": nf, "ch_mult": ch_mult,
            "dimensions": dimensions, "num_layers": num_layers, "resample_with_conv": resample_with_conv,
            "fir_kernel": tuple(fir_kernel), "combine_method": combine_method,
            "condition_on_observation": condition_on_observation, "kernel_size": kernel_size,
            "conv_kernel_size": conv_kernel_size, "input_kernel_size": input_kernel_size,
            "activation": activation,
            # torch_rim did not save hidden_units, so its models reloaded with the default; its
            # Hourglass(**hparams) accepts both keys
            "hidden_units": hidden_units, "compat": self.compat.name,
        }
        self.nf = nf
        self.channels = channels
        self.dimensions = dimensions
        self.act = get_activation(activation)
        self.num_resolutions = len(ch_mult)
        self.num_layers = num_layers
        self.hidden_units = hidden_units
        self.condition_on_observation = condition_on_observation
        self.combine_method = combine_method
        down, up = resampling_layers(dimensions, resample_with_conv, fir_kernel, self.compat)
        self._build(down, up, ch_mult, kernel_size, conv_kernel_size, input_kernel_size)

    @abstractmethod
    def _build(self, down: LayerFactory, up: LayerFactory, ch_mult: tuple, kernel_size: int, conv_kernel_size: int,
               input_kernel_size: int) -> None:
        """Create the layers (in torch_rim's order: the order of ``parameters()`` that optimizer files follow)."""

    def _conv(self, in_ch: int, out_ch: int, kernel_size: int) -> Module:
        """A stride-1 "same" conv of this network's dimensions (torch_rim's ``nn.ConvNd(..., padding="same")``)."""
        return same_conv(self.dimensions, in_ch, out_ch, kernel_size)

    def _bottleneck(self, channels: int, kernel_size: int, conv_kernel_size: int) -> GRUBlock:
        return GRUBlock(channels, self.hidden_units, kernel_size, self.dimensions, conv_kernel_size,
                        compat=self.compat)

    def zero_state_hint(self, previous: Optional[str] = None, *, initial: bool = False) -> Optional[str]:
        """The bottleneck GRUBlock's hint (see ``GRUBlock.zero_state_hint``): h is its state."""
        return self.gru_layer.zero_state_hint(previous, initial=initial)

    def _check_spatial(self, spatial: Sequence[int], what: str) -> None:
        spatial = tuple(int(n) for n in spatial)
        if len(spatial) != self.dimensions:
            raise ValueError(f"{what}: {type(self).__name__}(dimensions={self.dimensions}) needs "
                             f"{self.dimensions} spatial sizes, got {spatial}")
        step = 2 ** self.num_resolutions
        if any(n < step or n % step for n in spatial):
            raise ValueError(f"{what}: {type(self).__name__} with len(ch_mult)={self.num_resolutions} needs every "
                             f"spatial size to be a positive multiple of {step} (it halves them "
                             f"{self.num_resolutions} times and doubles them back), got {spatial}")

    def _check_inputs(self, x: Tensor, score: Tensor) -> None:
        if x.dim() != self.dimensions + 2 or x.shape[1] != self.channels:
            raise ValueError(f"x must be [B, {self.channels}, *spatial] with {self.dimensions} spatial dims, got "
                             f"shape {tuple(x.shape)}")
        if score.shape != x.shape:
            raise ValueError(f"score must have the shape of x {tuple(x.shape)}, got {tuple(score.shape)}")
        self._check_spatial(x.shape[2:], "x")

    def initalize_hidden_states(self, dimensions: Sequence[int], batch_size: int, device=None,
                                dtype=torch.float32) -> Tensor:
        """Zero state [batch_size, hidden_units, *(n // 2**len(ch_mult) for n in dimensions)].

        torch_rim used dimensions[0] for every axis (non-square inputs crashed); equal for square inputs."""
        self._check_spatial(dimensions, "dimensions")
        step = 2 ** self.num_resolutions
        return torch.zeros(batch_size, self.hidden_units, *[int(n) // step for n in dimensions], device=device,
                           dtype=dtype)

    def _conv_act(self, layer, x: Tensor) -> Tensor:
        """act(layer(x)) for a stride-1 "same" conv or an upsampling layer; conv + tanh as one op (fused by
        oneDNN on the CPU; on CUDA the convolution without its bias, then bias + tanh in one kernel).

        The layer's module call is skipped only when no forward hook could observe it (the layer's own or
        global ones): hooks keep seeing the conv's output."""
        if self.act is ops.tanh and unobserved(layer):
            if isinstance(layer, _SameConvMixin) and layer.padding_mode == "zeros":
                return ops.conv_tanh(x, layer.weight, layer.bias, padding=layer.padding,
                                     dilation=layer.dilation[0], groups=layer.groups)
            if isinstance(layer, _ConvTransposedNdSame):
                return layer.forward_tanh(x)
        return self.act(layer(x))


#: the pre-activation of the extra channel of ``fold_next_bias``: tanh(30) is 1 exactly in float16 to float64
_ONE_PRE_ACTIVATION = 30.0


def _tap(left_pad: int, kernel_size: int, dilation: int) -> Optional[int]:
    # the kernel tap that reads the input sample at the output's own position (stride 1) or at stride * i: it is
    # inside the input for every output, so a constant-1 channel weighted there alone adds b to every output
    if left_pad < 0 or left_pad % dilation or left_pad // dilation >= kernel_size:
        return None
    return left_pad // dilation


def fold_next_bias(first: Module, second: Module, x: Tensor, weight2: Optional[Tensor] = None,
                   bias2: Optional[Tensor] = None) -> Optional[Tensor]:
    """second(tanh(first(x))) with second's bias carried by the convolution itself, or None where it does not
    apply (``ops.folds_bias``: on CUDA, where the bias add would be a kernel of its own, in CUDA graphs and under
    torch.compile).

    first (a "same" conv with a bias) gets one more output channel with zero weights and bias 30, so that its conv
    + tanh writes [tanh(first(x)) | 1]; second's kernel gets one more input channel holding its bias at the tap
    that reads each output's own position (always inside the input), so the convolution adds the bias in its
    own sums (exactly, up to the order of the sum); its zero padding pads the 1-channel as it pads the others.
    ``second``: a stride-1 "same" conv, or a strided Conv*dSame (no spectral norm); ``weight2``/``bias2``
    replace second's parameters (the Hourglass' merged output conv). Derived weights are built once per RIM call
    (``layers.derived``)."""
    # ``ops.folds_bias`` first: on the CPU it says no at once, before the checks below (every conv + tanh pair of
    # every step asks)
    if not (isinstance(first, _SameConvMixin) and ops.folds_bias(x, first.weight, first.bias, first.padding,
                                                                 first.dilation[0], 1)):
        return None
    if not (first.padding_mode == "zeros" and first.groups == 1 and unobserved(first, second)):
        return None
    n = x.dim() - 2
    if isinstance(second, _SameConvMixin):
        conv2 = second
        k, d = conv2.kernel_size, conv2.dilation
        if conv2.padding_mode != "zeros" or conv2.groups != 1 or conv2.stride != (1,) * n:
            return None
        # torch's "same": the left pad of an axis is d (k - 1) // 2
        left = [d[j] * (k[j] - 1) // 2 for j in range(n)] if conv2.padding == "same" else list(conv2.padding)
        taps = [_tap(left[j], k[j], d[j]) for j in range(n)]
    elif isinstance(second, _ConvNdSame) and not isinstance(second.conv, SpectralNorm):
        conv2 = second.conv
        if conv2.padding_mode != "zeros" or conv2.groups != 1:
            return None
        pads = ops.reference.conv_same_pads(tuple(x.shape[2:]), second.kernel_size, second.stride, second.dilation,
                                            second.axis_swap)
        taps = [_tap(pads[2 * (n - 1 - j)], second.kernel_size, second.dilation) for j in range(n)]
    else:
        return None
    weight2 = conv2.weight if weight2 is None else weight2
    bias2 = conv2.bias if bias2 is None else bias2
    if bias2 is None or any(t is None for t in taps):
        return None

    def first_weight():  # one more output channel, all zeros
        return torch.nn.functional.pad(first.weight, [0, 0] * (first.weight.dim() - 1) + [0, 1])

    def first_bias():
        return torch.nn.functional.pad(first.bias, (0, 1), value=_ONE_PRE_ACTIVATION)

    def second_weight():  # one more input channel: the bias at the taps, zeros elsewhere
        pads = []
        for j in reversed(range(n)):
            pads += [taps[j], weight2.shape[2 + j] - 1 - taps[j]]
        column = torch.nn.functional.pad(bias2.to(weight2.dtype).view(-1, 1, *[1] * n), pads)
        return torch.cat([weight2, column], dim=1)

    key = ("fold_next_bias", tuple(taps), weight2 is conv2.weight)
    y = ops.conv_tanh(x, conv_weight(first, "fold_next_bias_weight", first_weight),
                      derived(first, "fold_next_bias_bias", first_bias), padding=first.padding,
                      dilation=first.dilation[0], groups=1)
    w2 = conv_weight(second, key, second_weight)
    if isinstance(second, _SameConvMixin):
        return ops.conv(y, w2, None, padding=second.padding, dilation=second.dilation[0])
    return ops.conv_same(y, w2, None, kernel_size=second.kernel_size, stride=second.stride,
                         dilation=second.dilation, groups=1, axis_swap=second.axis_swap)
