from .conv_same import (Conv1dSame, Conv2dSame, Conv3dSame, ConvTransposed1dSame, ConvTransposed2dSame,
                        ConvTransposed3dSame, same_conv)
from . import derived
from .derived import per_call_cache
from .gru import GRU
from .gru_block import GRUBlock
from .resample import FIRResample, downsample, naive_downsample, naive_upsample, upsample
from .spectral_norm import SpectralNorm

__all__ = ["GRU", "GRUBlock", "Conv1dSame", "Conv2dSame", "Conv3dSame", "ConvTransposed1dSame",
           "ConvTransposed2dSame", "ConvTransposed3dSame", "upsample", "downsample", "naive_upsample",
           "naive_downsample", "FIRResample", "SpectralNorm", "same_conv", "per_call_cache"]
