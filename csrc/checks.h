// Argument checks shared by the CPU and CUDA entry points: one TORCH_CHECK with a clear message per user
// error. Every entry point then makes its inputs contiguous (a no-op when they already are).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace rim_fast {

// Numbers, shapes and devices in messages, formatted without std::ostream's number output: on the H200 image
// (torch 2.11, built there with its gcc) streaming an integer from this extension crashed the process inside
// libstdc++'s num_put (a segfault at the first shape error, test_update_step.py::test_user_errors[cuda]).
inline std::string text(int64_t n) { return std::to_string(n); }

inline std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + "]";
}

inline std::string text(const c10::Device& device) { return device.str(); }

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kBFloat16 || t == c10::kHalf;
}

inline bool is_reduced_float(c10::ScalarType t) { return t == c10::kBFloat16 || t == c10::kHalf; }

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "rim_fast::", op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// `other` must have the shape, dtype and device of `ref`.
inline void check_like(const at::Tensor& ref, const at::Tensor& other, const char* op, const char* ref_name,
                       const char* name, bool same_dtype = true) {
  TORCH_CHECK(other.sizes() == ref.sizes(), "rim_fast::", op, ": ", name, " must have the shape of ", ref_name,
              " ", text(ref.sizes()), ", got ", text(other.sizes()), " (the compiled kernels do not broadcast)");
  TORCH_CHECK(other.device() == ref.device(), "rim_fast::", op, ": ", name, " must be on ", ref_name,
              "'s device ", text(ref.device()), ", got ", text(other.device()));
  if (same_dtype) {
    TORCH_CHECK(other.scalar_type() == ref.scalar_type(), "rim_fast::", op, ": ", name, " must have ",
                ref_name, "'s dtype ", ref.scalar_type(), ", got ", other.scalar_type());
  }
}

// score, m, v of a moment-based preprocessing. m and v share one dtype: score's, or float32 when score is
// bfloat16/float16 (float32 moments for low-precision scores).
inline void check_moments(const at::Tensor& score, const at::Tensor& m, const at::Tensor& v,
                          const at::Tensor& step, const char* op) {
  check_float(score, op, "score");
  check_like(score, m, op, "score", "m", /*same_dtype=*/false);
  check_like(score, v, op, "score", "v", /*same_dtype=*/false);
  TORCH_CHECK(m.scalar_type() == v.scalar_type(), "rim_fast::", op, ": m and v must share one dtype, got ",
              m.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(m.scalar_type() == score.scalar_type() ||
                  (m.scalar_type() == c10::kFloat && is_reduced_float(score.scalar_type())),
              "rim_fast::", op, ": m and v must have score's dtype ", score.scalar_type(),
              " (or float32 for a bfloat16/float16 score), got ", m.scalar_type());
  TORCH_CHECK(step.numel() == 1, "rim_fast::", op, ": step must hold one number (the step index t), got ",
              text(step.numel()), " elements");
  TORCH_CHECK(step.device().is_cpu() || step.device() == score.device(), "rim_fast::", op,
              ": step must be on the CPU or on score's device ", text(score.device()), ", got ", text(step.device()));
  TORCH_CHECK(!step.is_complex() && step.scalar_type() != c10::kBool, "rim_fast::", op,
              ": step must be a real number, got ", step.scalar_type());
}

inline void check_update(const at::Tensor& x, const at::Tensor& g, const at::Tensor* x_true,
                         const std::optional<at::Tensor>& w, const char* op) {
  check_float(x, op, "x");
  check_like(x, g, op, "x", "g");
  if (x_true != nullptr) {
    check_like(x, *x_true, op, "x", "x_true");
  }
  if (w.has_value()) {
    check_like(x, *w, op, "x", "w");
  }
}

inline void check_update_backward(const at::Tensor& grad_out, const at::Tensor& grad_loss,
                                  const at::Tensor& x_new, const at::Tensor& x_true,
                                  const std::optional<at::Tensor>& w, const char* op) {
  check_float(x_new, op, "x_new");
  check_like(x_new, grad_out, op, "x_new", "grad_out");
  check_like(x_new, x_true, op, "x_new", "x_true");
  if (w.has_value()) {
    check_like(x_new, *w, op, "x_new", "w");
  }
  TORCH_CHECK(grad_loss.numel() == 1, "rim_fast::", op, ": grad_loss must hold one number, got ",
              text(grad_loss.numel()), " elements");
  TORCH_CHECK(grad_loss.device() == x_new.device(), "rim_fast::", op, ": grad_loss must be on x_new's device ",
              text(x_new.device()), ", got ", text(grad_loss.device()));
  TORCH_CHECK(grad_loss.scalar_type() == x_new.scalar_type(), "rim_fast::", op,
              ": grad_loss must have x_new's dtype ", x_new.scalar_type(), ", got ", grad_loss.scalar_type());
}

}  // namespace rim_fast
