// A 3x3x3 convolution of stride 1 and zero padding 1 ("same") by Winograd's minimal filtering F(2x2x2, 3x3x3)
// (Lavin & Gray 2016, in 3D), for the CPU (rim_fast/ops/_cpu.py: ``_winograd``). Each 2x2x2 block of outputs
// (a tile) reads a 4x4x4 block of the padded input; in the transformed domain the 27 multiply-adds per output and
// channel pair become 64 per tile, 8 per output (3.4x fewer):
//
//   y[tile] = A^T ( sum_c  U[:, c, :] * (B^T x[tile, c] B) ) A        (per axis; 64 = 4^3 transformed positions)
//
// with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], and
// the transformed weight U = G w G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] (computed in
// Python: ``reference.winograd_weight``, once per RIM call). The sum over the input channels is, per transformed
// position, a matrix product [tiles x C_in] x [C_in x C_out] (AVX-512 or AVX2 kernels of ours in
// csrc/winograd.cpp; plain loops on other CPUs).
//
//   winograd_conv3d(x [N, C_in, D, H, W], u [64, C_in, C_out], bias [C_out]?) -> [N, C_out, D, H, W]
//
// float32; x in any layout (channels-last is read as it is); the output is channels-last (NDHWC), as oneDNN's
// convolutions give it. C_in and C_out each 16, 32, 64 or 128 (the loops are unrolled per channel count).
// Tiles are processed in chunks of up to 32 (fewer where that keeps every thread busy) that stay in the core's L2
// cache: input transform, the 64 matrix products, output transform. Reference: ``reference.winograd_conv3d`` (the
// same algorithm in torch ops).
#pragma once

#include "cpu_isa.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace rim_fast {

at::Tensor winograd_conv3d_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias);

// The gradient of the transformed weight u: winograd_conv3d_weight(x [N, C_in, D, H, W], grad [N, C_out, D, H, W])
// -> [64, C_in, C_out], du[e] = sum over tiles of (B^T x B)[e]^T (A grad A^T)[e] (the outer products of the
// transformed input and the transformed output gradient; the weight's gradient is then G^T du G per axis,
// ``reference.winograd_weight``'s adjoint). Chunked as the forward; the outer products in AVX-512 or
// AVX2 registers where the CPU has them. float32; C_in and C_out as above.
at::Tensor winograd_conv3d_weight_cpu(const at::Tensor& x, const at::Tensor& grad);

// The kernels (matrix products and transforms) run one instruction set per call, cpu_isa() (cpu_isa.h).

}  // namespace rim_fast
