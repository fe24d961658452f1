"""rim_fast: a drop-in, faster torch_rim (Recurrent Inference Machines).

``from rim_fast import RIM, Hourglass, Unet`` replaces ``from rim import ...``; same arguments, checkpoints and
(by default) numbers. See README.md, "Differences from torch_rim"."""
from . import ops
from .architectures import Hourglass, Model, Unet
from .compat import FIXED, TORCH_RIM, Compat
from .layers import (GRU, Conv1dSame, Conv2dSame, Conv3dSame, ConvTransposed1dSame, ConvTransposed2dSame,
                     ConvTransposed3dSame, GRUBlock, downsample, upsample)
from .rim import RIM
from .utils import NullEMA, get_activation, load_architecture

__version__ = "0.1.0"

__all__ = ["RIM", "Hourglass", "Unet", "Model", "GRU", "GRUBlock", "Conv1dSame", "Conv2dSame", "Conv3dSame",
           "ConvTransposed1dSame", "ConvTransposed2dSame", "ConvTransposed3dSame", "upsample", "downsample",
           "NullEMA", "get_activation", "load_architecture", "Compat", "TORCH_RIM", "FIXED", "ops"]
