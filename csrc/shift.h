// Shifted sums of the CPU thin convolutions (rim_fast/ops/_cpu.py: ``_ThinOutConv``, ``_thin_in_input_grad``):
// a "same" convolution with few input or output channels is a matrix product that contracts the channels, giving
// one plane per kernel tap, then the taps' planes summed, each shifted by its offset. These two kernels are that
// last step and its adjoint, in one pass over memory each (the Python references, ``_cpu._shift_sum`` and
// ``_cpu._stack``, take a dozen passes and as many op calls).
//
//   shift_sum(planes [C, K, N, *S], kernel, sign) -> [C, N, *S]:
//       out[c, n, q] = sum_k planes[c, k, n, q + sign * off_k]          (zero where q + sign * off_k is outside)
//   shift_stack(x [C, N, *S], kernel, sign) -> [C, K, N, *S]:
//       out[c, k, n, q] = x[c, n, q - sign * off_k]                     (zero outside)
//
// S has 1 to 3 spatial dims, ``kernel`` one odd size per spatial dim, K = prod(kernel) taps in row-major order
// (a weight's [*kernel] flattened), off_k = tap k's index per axis minus (size - 1) / 2, sign +1 or -1. For one
// sign the two are each other's adjoint. float32 and float64; outputs contiguous.
#pragma once

#include <ATen/core/Tensor.h>

namespace rim_fast {

at::Tensor shift_sum_cpu(const at::Tensor& planes, at::IntArrayRef kernel, int64_t sign);
at::Tensor shift_stack_cpu(const at::Tensor& x, at::IntArrayRef kernel, int64_t sign);

}  // namespace rim_fast
