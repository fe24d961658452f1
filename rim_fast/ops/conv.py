"""Convolution and FIR resampling ops (reference only: cuDNN / oneDNN already serve them)."""
from ._dispatch import Op
from . import reference

conv = Op("conv", reference.conv)
conv_same = Op("conv_same", reference.conv_same)
conv_transpose = Op("conv_transpose", reference.conv_transpose)
upfirdn = Op("upfirdn", reference.upfirdn)
