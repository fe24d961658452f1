from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .. import ops
from ..layers.conv_same import _SameConvMixin


class Model(Module, ABC):
    """Interface of a RIM backbone: forward(x, y, score, h) -> (g, h'), and its initial hidden state."""

    #: rim_fast models accept the ``zero_state`` hint (see GRUBlock); a RIM passes it only to these
    supports_zero_state_hint = False

    @abstractmethod
    def initalize_hidden_states(self, dimensions: Sequence[int], batch_size: int) -> Tensor:
        raise NotImplementedError("")

    def initialize_hidden_states(self, dimensions: Sequence[int], batch_size: int) -> Tensor:
        """Correctly spelt alias of ``initalize_hidden_states`` (torch_rim's name)."""
        return self.initalize_hidden_states(dimensions, batch_size)


class EncoderDecoder(Model):
    """Shared parts of the Hourglass and the Unet: spatial sizes must survive len(ch_mult) halvings; a
    "same" conv followed by the activation goes through ``ops.conv_tanh`` when the activation is tanh."""

    dimensions: int
    num_resolutions: int
    hidden_units: int
    channels: int

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
        """act(layer(x)) for a stride-1 "same" conv; conv + tanh as one op (fused by oneDNN on the CPU).

        The layer's module call is skipped only when no forward hook could observe it (the layer's own or
        global ones): hooks keep seeing the conv's output."""
        if (self.act is ops.tanh and isinstance(layer, _SameConvMixin) and layer.padding_mode == "zeros"
                and not (layer._forward_hooks or layer._forward_pre_hooks or _global_forward_hooks
                         or _global_forward_pre_hooks)):
            return ops.conv_tanh(x, layer.weight, layer.bias, padding=layer.padding, dilation=layer.dilation[0],
                                 groups=layer.groups)
        return self.act(layer(x))
