"""torch_rim's activation names (``get_activation``), tanh through the op layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..validation import choice

# tanh goes through the op layer (a faster CPU implementation; torch.tanh is its reference)
ACTIVATIONS = {"elu": F.elu, "relu": F.relu, "tanh": ops.tanh, "swish": F.silu, "silu": F.silu,
               "sigmoid": torch.sigmoid}


def get_activation(activation: str):
    """The activation function of a name in ``ACTIVATIONS`` (any case)."""
    return ACTIVATIONS[choice("activation", activation, ACTIVATIONS, ignore_case=True)]
