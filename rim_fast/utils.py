"""torch_rim.utils: NullEMA, get_activation, load_architecture."""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Union

import torch
import torch.nn.functional as F
from torch.nn import Module

from . import ops
from .definitions import DEVICE


class NullEMA:
    """An EMA emulator that does nothing so that ema_decay=0 can be supported."""

    def update(self, parameters=None):
        pass

    def copy_to(self, parameters=None):
        pass

    def store(self, parameters=None):
        pass

    def restore(self, parameters=None):
        pass

    def average_parameters(self, parameters=None):
        return contextlib.nullcontext()

    def to(self, device=None, dtype=None):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


# tanh goes through the op layer (a faster CPU implementation; torch.tanh is its reference)
_ACTIVATIONS = {"elu": F.elu, "relu": F.relu, "tanh": ops.tanh, "swish": F.silu, "silu": F.silu,
                "sigmoid": torch.sigmoid}


def get_activation(activation: str):
    if not isinstance(activation, str) or activation.lower() not in _ACTIVATIONS:
        raise ValueError(f"activation {activation} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[activation.lower()]


def load_architecture(checkpoints_directory, model: Union[str, Module] = None, dimensions=1,
                      hyperparameters=None, device=DEVICE) -> tuple:
    """Build (or take) the model of a checkpoints directory and load its latest checkpoint.

    Returns (model, hparams). ``model`` may be None (read ``model_hparams.json``), an architecture name
    ("hourglass", "unet") or a module; ``hyperparameters`` override the saved ones."""
    from . import checkpoints
    from .architectures import ARCHITECTURES
    if not isinstance(checkpoints_directory, (str, os.PathLike)) or not os.path.isdir(checkpoints_directory):
        raise ValueError(f"checkpoints_directory {checkpoints_directory!r} is not an existing directory")
    hyperparameters = dict(hyperparameters or {})
    hparams_path = os.path.join(checkpoints_directory, "model_hparams.json")
    if model is None or isinstance(model, str):
        if os.path.exists(hparams_path):
            hparams = checkpoints.read_json(hparams_path)
        elif model is None:
            raise ValueError(f"checkpoints_directory {checkpoints_directory!r} has no model_hparams.json; pass "
                             f"the model")
        else:
            hparams = {}
        hparams.update(hyperparameters)
        if "dimensions" not in hparams:
            hparams["dimensions"] = dimensions
        name = (model or hparams.get("architecture", "hourglass")).lower()
        if name not in ARCHITECTURES:
            raise ValueError(f"{name} not supported; expected one of {sorted(ARCHITECTURES)}")
        model = ARCHITECTURES[name](**hparams).to(device)
    else:
        hparams = getattr(model, "hyperparameters", {})
    found = checkpoints.list_checkpoints(checkpoints_directory)
    for files in reversed(found):
        try:
            state = checkpoints.load_file(files.model, map_location=device)
        except RuntimeError as e:
            warnings.warn(f"{e}; trying the previous checkpoint", RuntimeWarning)
            continue
        model.load_state_dict(state)
        break
    else:
        if found:
            raise RuntimeError(f"no readable checkpoint in {checkpoints_directory!r}")
    return model, hparams
