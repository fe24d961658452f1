// CPU kernels of the RIM update step: score preprocessing (adam, rmsprop, rmsprop_fixed, arcsinh), the state
// update x' = x + g, its fused squared-error loss term, and that term's backward.
//
// Each kernel is one pass over contiguous memory, split by at::parallel_for; the inner loops are plain
// element loops over C10_RESTRICT pointers that the compiler vectorises (float/double). The loss sum is
// deterministic whatever the thread count: fixed chunks of kLossChunk elements, each summed in kLanes
// independent accumulators of the compute type, then chunk sums added in order, in double.
#include "update_step.h"

#include "checks.h"
#include "outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace rim_fast {
namespace {

// Elements per at::parallel_for task: below this a loop runs on the calling thread.
constexpr int64_t kGrain = 32768;
constexpr int64_t kLossChunk = 4096;
constexpr int kLanes = 16;

double read_step(const Tensor& step) { return step.item<double>(); }

template <Moments mode, typename scalar_t, typename state_t>
void preprocess_moments_loop(const scalar_t* C10_RESTRICT s, const state_t* C10_RESTRICT m,
                             const state_t* C10_RESTRICT v, state_t* C10_RESTRICT out,
                             state_t* C10_RESTRICT m_out, state_t* C10_RESTRICT v_out, int64_t n, double beta_1,
                             double beta_2, double epsilon, double step) {
  using T = at::opmath_type<state_t>;
  const MomentCoefs<T> c = moment_coefs<T>(beta_1, beta_2, epsilon);
  const T bc1 = static_cast<T>(bias_correction(beta_1, step));
  const T bc2 = static_cast<T>(bias_correction(beta_2, step));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T o, m_new, v_new;
      preprocess_moments_element<mode, T>(static_cast<T>(s[i]), static_cast<T>(m[i]), static_cast<T>(v[i]), c,
                                          bc1, bc2, o, m_new, v_new);
      out[i] = static_cast<state_t>(o);
      m_out[i] = static_cast<state_t>(m_new);
      if (mode != Moments::kRmsprop) {
        v_out[i] = static_cast<state_t>(v_new);
      }
    }
  });
}

// Returns (out, m', v'); v' is undefined for kRmsprop (v is not updated).
template <Moments mode>
TensorTriple preprocess_moments_cpu(const Tensor& score_, const Tensor& m_, const Tensor& v_, const Tensor& step,
                                    double beta_1, double beta_2, double epsilon, const char* op) {
  check_moments(score_, m_, v_, step, op);
  TORCH_CHECK(score_.device().is_cpu(), "rim_fast::", op, ": the CPU kernel got score on ", text(score_.device()));
  const Tensor score = score_.contiguous(), m = m_.contiguous(), v = v_.contiguous();
  const double t = read_step(step);
  Tensor out = new_output(score.sizes(), m.options());
  Tensor m_out = new_output(score.sizes(), m.options());
  Tensor v_out = mode == Moments::kRmsprop ? Tensor() : new_output(score.sizes(), v.options());
  const int64_t n = elements_to_write(score.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, score.scalar_type(), "preprocess_moments_cpu", [&] {
    const bool float_state = m.scalar_type() != score.scalar_type();
    if (float_state) {
      using state_t = float;
      preprocess_moments_loop<mode, scalar_t, state_t>(
          score.const_data_ptr<scalar_t>(), m.const_data_ptr<state_t>(), v.const_data_ptr<state_t>(),
          out.mutable_data_ptr<state_t>(), m_out.mutable_data_ptr<state_t>(),
          mode == Moments::kRmsprop ? nullptr : v_out.mutable_data_ptr<state_t>(), n, beta_1, beta_2, epsilon,
          t);
    } else {
      using state_t = scalar_t;
      preprocess_moments_loop<mode, scalar_t, state_t>(
          score.const_data_ptr<scalar_t>(), m.const_data_ptr<state_t>(), v.const_data_ptr<state_t>(),
          out.mutable_data_ptr<state_t>(), m_out.mutable_data_ptr<state_t>(),
          mode == Moments::kRmsprop ? nullptr : v_out.mutable_data_ptr<state_t>(), n, beta_1, beta_2, epsilon,
          t);
    }
  });
  return {out, m_out, v_out};
}

template <bool kHasW, typename scalar_t>
double update_state_loss_loop(const scalar_t* C10_RESTRICT x, const scalar_t* C10_RESTRICT g,
                              const scalar_t* C10_RESTRICT x_true, const scalar_t* C10_RESTRICT w,
                              scalar_t* C10_RESTRICT x_out, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n_chunks = (n + kLossChunk - 1) / kLossChunk;
  std::vector<double> partial(n_chunks, 0.0);
  at::parallel_for(0, n_chunks, std::max<int64_t>(1, kGrain / kLossChunk), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kLossChunk;
      const int64_t end = std::min(n, begin + kLossChunk);
      // acc is only ever indexed by the unrolled constant l, so it stays in vector registers
      T acc[kLanes] = {};
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const T x_new = update_state_element<T>(static_cast<T>(x[i + l]), static_cast<T>(g[i + l]));
          x_out[i + l] = static_cast<scalar_t>(x_new);
          const T wi = kHasW ? static_cast<T>(w[i + l]) : T(1);
          acc[l] += squared_error_element<T>(x_new, static_cast<T>(x_true[i + l]), wi);
        }
      }
      T tail = T(0);
      for (; i < end; ++i) {
        const T x_new = update_state_element<T>(static_cast<T>(x[i]), static_cast<T>(g[i]));
        x_out[i] = static_cast<scalar_t>(x_new);
        const T wi = kHasW ? static_cast<T>(w[i]) : T(1);
        tail += squared_error_element<T>(x_new, static_cast<T>(x_true[i]), wi);
      }
      double sum = static_cast<double>(tail);
      for (int l = 0; l < kLanes; ++l) {
        sum += static_cast<double>(acc[l]);
      }
      partial[c] = sum;
    }
  });
  double total = 0.0;
  for (const double p : partial) {
    total += p;
  }
  return total;
}

}  // namespace

TensorTriple preprocess_adam_cpu(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                 double beta_1, double beta_2, double epsilon) {
  return preprocess_moments_cpu<Moments::kAdam>(score, m, v, step, beta_1, beta_2, epsilon, "preprocess_adam");
}

TensorPair preprocess_rmsprop_cpu(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                  double beta_1, double beta_2, double epsilon) {
  auto r = preprocess_moments_cpu<Moments::kRmsprop>(score, m, v, step, beta_1, beta_2, epsilon,
                                                     "preprocess_rmsprop");
  return {std::get<0>(r), std::get<1>(r)};
}

TensorTriple preprocess_rmsprop_fixed_cpu(const Tensor& score, const Tensor& m, const Tensor& v,
                                          const Tensor& step, double beta_1, double beta_2, double epsilon) {
  return preprocess_moments_cpu<Moments::kRmspropFixed>(score, m, v, step, beta_1, beta_2, epsilon,
                                                        "preprocess_rmsprop_fixed");
}

Tensor preprocess_arcsinh_cpu(const Tensor& score_) {
  check_float(score_, "preprocess_arcsinh", "score");
  const Tensor score = score_.contiguous();
  Tensor out = new_output(score.sizes(), score.options());
  const int64_t n = elements_to_write(score.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, score.scalar_type(), "preprocess_arcsinh_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* C10_RESTRICT s = score.const_data_ptr<scalar_t>();
    scalar_t* C10_RESTRICT o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        o[i] = static_cast<scalar_t>(preprocess_arcsinh_element<T>(static_cast<T>(s[i])));
      }
    });
  });
  return out;
}

Tensor update_state_cpu(const Tensor& x_, const Tensor& g_) {
  check_update(x_, g_, nullptr, std::nullopt, "update_state");
  const Tensor x = x_.contiguous(), g = g_.contiguous();
  Tensor out = new_output(x.sizes(), x.options());
  const int64_t n = elements_to_write(x.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "update_state_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* C10_RESTRICT xp = x.const_data_ptr<scalar_t>();
    const scalar_t* C10_RESTRICT gp = g.const_data_ptr<scalar_t>();
    scalar_t* C10_RESTRICT o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        o[i] = static_cast<scalar_t>(update_state_element<T>(static_cast<T>(xp[i]), static_cast<T>(gp[i])));
      }
    });
  });
  return out;
}

TensorPair update_state_loss_cpu(const Tensor& x_, const Tensor& g_, const Tensor& x_true_,
                                 const std::optional<Tensor>& w_) {
  check_update(x_, g_, &x_true_, w_, "update_state_loss");
  const Tensor x = x_.contiguous(), g = g_.contiguous(), x_true = x_true_.contiguous();
  const Tensor w = w_.has_value() ? w_->contiguous() : Tensor();
  Tensor out = new_output(x.sizes(), x.options());
  Tensor loss = new_output({}, x.options());
  const int64_t n = elements_to_write(x.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "update_state_loss_cpu", [&] {
    const double total =
        w.defined()
            ? update_state_loss_loop<true, scalar_t>(x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                                     x_true.const_data_ptr<scalar_t>(),
                                                     w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                     n)
            : update_state_loss_loop<false, scalar_t>(x.const_data_ptr<scalar_t>(),
                                                      g.const_data_ptr<scalar_t>(),
                                                      x_true.const_data_ptr<scalar_t>(), nullptr,
                                                      out.mutable_data_ptr<scalar_t>(), n);
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
  return {out, loss};
}

Tensor update_state_loss_backward_cpu(const Tensor& grad_out_, const Tensor& grad_loss, const Tensor& x_new_,
                                      const Tensor& x_true_, const std::optional<Tensor>& w_) {
  check_update_backward(grad_out_, grad_loss, x_new_, x_true_, w_, "update_state_loss_backward");
  const Tensor grad_out = grad_out_.contiguous(), x_new = x_new_.contiguous(), x_true = x_true_.contiguous();
  const Tensor w = w_.has_value() ? w_->contiguous() : Tensor();
  Tensor grad = new_output(x_new.sizes(), x_new.options());
  const int64_t n = elements_to_write(x_new.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x_new.scalar_type(), "update_state_loss_backward_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const T gl = static_cast<T>(*grad_loss.const_data_ptr<scalar_t>());
        const scalar_t* C10_RESTRICT go = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* C10_RESTRICT xn = x_new.const_data_ptr<scalar_t>();
        const scalar_t* C10_RESTRICT xt = x_true.const_data_ptr<scalar_t>();
        const scalar_t* C10_RESTRICT wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* C10_RESTRICT o = grad.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          if (wp != nullptr) {
            for (int64_t i = begin; i < end; ++i) {
              o[i] = static_cast<scalar_t>(update_state_loss_grad_element<T>(
                  static_cast<T>(go[i]), gl, static_cast<T>(xn[i]), static_cast<T>(xt[i]), static_cast<T>(wp[i])));
            }
          } else {
            for (int64_t i = begin; i < end; ++i) {
              o[i] = static_cast<scalar_t>(update_state_loss_grad_element<T>(
                  static_cast<T>(go[i]), gl, static_cast<T>(xn[i]), static_cast<T>(xt[i]), T(1)));
            }
          }
        });
      });
  return grad;
}

}  // namespace rim_fast
