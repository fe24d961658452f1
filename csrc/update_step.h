// RIM update step: the element-wise math shared by the CPU kernel (update_step.cpp) and the CUDA kernel
// (update_step.cu). Every function is C10_HOST_DEVICE, templated on the compute type T (float for
// float/bfloat16/half inputs, double for double), and follows rim_fast/ops/reference.py operation for
// operation (same order, same roundings) so that the CPU kernel matches the reference to the last bit
// where the compiler does not contract a*b+c into an FMA.
#pragma once

#include <c10/macros/Macros.h>

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace rim_fast {

// Score preprocessing modes with optimiser moments; the stateless ones (identity, arcsinh) have no mode.
//   kAdam:          m' = b1 m + (1-b1) s, v' = b2 v + (1-b2) s^2, out = (m'/bc1) / (sqrt(v'/bc2) + eps)
//   kRmsprop:       torch_rim compat: v' = v (never updated), out = s / (sqrt(v/bc2) + eps)
//   kRmspropFixed:  v' = b2 v + (1-b2) s^2, out = s / (sqrt(v'/bc2) + eps)
// with bc_i = 1 - b_i^(t+1). m' is updated by every mode (the reference returns it).
enum class Moments : int { kAdam = 0, kRmsprop = 1, kRmspropFixed = 2 };

C10_HOST_DEVICE inline float sqrt_(float x) { return sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_(double x) { return sqrt(x); }
C10_HOST_DEVICE inline float asinh_(float x) { return asinhf(x); }
C10_HOST_DEVICE inline double asinh_(double x) { return asinh(x); }

// Step-independent coefficients, rounded to T once, as PyTorch rounds a Python float multiplying a T tensor.
template <typename T>
struct MomentCoefs {
  T beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, epsilon;
};

template <typename T>
C10_HOST_DEVICE inline MomentCoefs<T> moment_coefs(double beta_1, double beta_2, double epsilon) {
  return {static_cast<T>(beta_1), static_cast<T>(1.0 - beta_1), static_cast<T>(beta_2),
          static_cast<T>(1.0 - beta_2), static_cast<T>(epsilon)};
}

// Bias correction 1 - beta^(t+1), computed in double like the reference's Python float.
C10_HOST_DEVICE inline double bias_correction(double beta, double step) {
  return 1.0 - pow(beta, step + 1.0);
}

// One element of a moment-based preprocessing; bc1, bc2 are the bias corrections rounded to T.
template <Moments mode, typename T>
C10_HOST_DEVICE inline void preprocess_moments_element(T s, T m, T v, const MomentCoefs<T>& c, T bc1, T bc2,
                                                       T& out, T& m_new, T& v_new) {
  m_new = c.beta_1 * m + c.one_minus_beta_1 * s;
  if (mode == Moments::kRmsprop) {
    v_new = v;
  } else {
    v_new = c.beta_2 * v + c.one_minus_beta_2 * (s * s);
  }
  const T denom = sqrt_(v_new / bc2) + c.epsilon;
  if (mode == Moments::kAdam) {
    out = (m_new / bc1) / denom;
  } else {
    out = s / denom;
  }
}

template <typename T>
C10_HOST_DEVICE inline T preprocess_arcsinh_element(T s) {
  return asinh_(s);
}

// x' = x + g
template <typename T>
C10_HOST_DEVICE inline T update_state_element(T x, T g) {
  return x + g;
}

// This element's loss term w (x' - x_true)^2 (w = 1 without weights); the reference rounds each
// product to the input precision, the kernels keep T.
template <typename T>
C10_HOST_DEVICE inline T squared_error_element(T x_new, T x_true, T w) {
  const T d = x_new - x_true;
  return w * (d * d);
}

// Gradient of x (and of g) for one element: grad_out + (grad_loss w) (2 (x' - x_true)), in autograd's order
// of operations for the reference (sum, then w *, then pow 2).
template <typename T>
C10_HOST_DEVICE inline T update_state_loss_grad_element(T grad_out, T grad_loss, T x_new, T x_true, T w) {
  return grad_out + (grad_loss * w) * (static_cast<T>(2) * (x_new - x_true));
}

// ---- entry points (registered in register.cpp) ------------------------------------------------------
// Schemas live in rim_fast/ops/cpp_update.py. `step` is a 0-dim tensor holding t (any real dtype) on the
// CPU or on the inputs' device; outputs are new tensors, inputs are never written.
using at::Tensor;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;
using TensorPair = std::tuple<Tensor, Tensor>;

TensorTriple preprocess_adam_cpu(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                 double beta_1, double beta_2, double epsilon);
TensorPair preprocess_rmsprop_cpu(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                  double beta_1, double beta_2, double epsilon);
TensorTriple preprocess_rmsprop_fixed_cpu(const Tensor& score, const Tensor& m, const Tensor& v,
                                          const Tensor& step, double beta_1, double beta_2, double epsilon);
Tensor preprocess_arcsinh_cpu(const Tensor& score);
Tensor update_state_cpu(const Tensor& x, const Tensor& g);
TensorPair update_state_loss_cpu(const Tensor& x, const Tensor& g, const Tensor& x_true,
                                 const std::optional<Tensor>& w);
Tensor update_state_loss_backward_cpu(const Tensor& grad_out, const Tensor& grad_loss, const Tensor& x_new,
                                      const Tensor& x_true, const std::optional<Tensor>& w);

TensorTriple preprocess_adam_cuda(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                  double beta_1, double beta_2, double epsilon);
TensorPair preprocess_rmsprop_cuda(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                   double beta_1, double beta_2, double epsilon);
TensorTriple preprocess_rmsprop_fixed_cuda(const Tensor& score, const Tensor& m, const Tensor& v,
                                           const Tensor& step, double beta_1, double beta_2, double epsilon);
Tensor preprocess_arcsinh_cuda(const Tensor& score);
Tensor update_state_cuda(const Tensor& x, const Tensor& g);
TensorPair update_state_loss_cuda(const Tensor& x, const Tensor& g, const Tensor& x_true,
                                  const std::optional<Tensor>& w);
Tensor update_state_loss_backward_cuda(const Tensor& grad_out, const Tensor& grad_loss, const Tensor& x_new,
                                       const Tensor& x_true, const std::optional<Tensor>& w);

}  // namespace rim_fast
