// tanh for the CPU kernel (tanh.cpp; GPUs have a fast accurate tanh), in the compute type T (float), in two regions:
//
//   |x| < 1:      x + x u S(u), u = x^2, S a polynomial of degree 7: the leading x is exact, so the result keeps
//                 float32's relative accuracy (<= 9e-8, 1.5 ulp) down to the smallest x, where 2 sigmoid(2x) - 1
//                 loses every digit; S(0) is -1/3 rounded to float32, and every coefficient is a float32 fitted
//                 with the others rounded, so that the error has no bias (mean signed error <= 1.5e-10 below
//                 |x| = 0.5): a bias, unlike rounding noise, adds up in the gradient of a bias parameter;
//   1 <= |x| < 9: x P(u) / Q(u), P of degree 6, Q of degree 3 (<= 3.5e-7, 3 ulp);
//   |x| >= 9:     +-1 (tanh(9) rounds to 1 in float32).
//
// The coefficients are our fits, minimising the relative error (Lawson's iteration on a linearised least-squares
// problem): S on [0, 1] to 7e-9, P/Q on [0, 9] to 6.6e-9 in exact arithmetic. Both regions are computed and one
// is selected, so the loop has no branches and vectorises (multiplies, adds, one divide, compares). Rounding in
// the small region is what a whole RIM's gradients are sensitive to (tests/test_error_budget.py).
// NaN stays NaN, -0 stays -0, +-inf give +-1.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

namespace rim_fast {

template <typename T>
C10_ALWAYS_INLINE T tanh_rational(T x) {  // inlined into each instruction set's loop (tanh.cpp)
  const T bound = T(9);
  // comparisons written so that a NaN falls through to itself
  const T xc = x < -bound ? -bound : (x > bound ? bound : x);
  const T u = xc * xc;
  // |x| < 1
  T s = T(0.00013105972902849317);
  s = s * u + T(-0.000880786101333797);
  s = s * u + T(0.003145551076158881);
  s = s * u + T(-0.00865437462925911);
  s = s * u + T(0.021814005449414253);
  s = s * u + T(-0.05396100878715515);
  s = s * u + T(0.13333305716514587);
  s = s * u + T(-0.3333333432674408);
  const T small = xc + xc * (u * s);
  // 1 <= |x| < 9
  T p = T(-8.4888469763367366e-14);
  p = p * u + T(5.2780023891568918e-11);
  p = p * u + T(-2.0225339541875957e-08);
  p = p * u + T(1.1154336677415792e-05);
  p = p * u + T(0.0031039589531597096);
  p = p * u + T(0.13084012559595984);
  p = p * u + T(0.9999999933926661);
  T q = T(0.00025461491948706858);
  q = q * u + T(0.024495189325106373);
  q = q * u + T(0.46417339662688933);
  q = q * u + T(1);
  const T large = xc * p / q;
  const T y = u < T(1) ? small : large;
  const T clipped = x >= bound ? T(1) : (x <= -bound ? T(-1) : (y < T(-1) ? T(-1) : (y > T(1) ? T(1) : y)));
  // tanh is odd: the sign of x (x + x u S(u) would turn -0 into +0)
  return std::copysign(clipped, x);
}

// Entry point (registered in register.cpp): float32/bfloat16 CPU tensors, the output in x's layout.
at::Tensor tanh_cpu(const at::Tensor& x);

}  // namespace rim_fast
