// CPU kernel of rim_fast::tanh: tanh_rational (tanh.h) over the tensor's memory in one pass, split by
// at::parallel_for. The loop has no branches (compares become selects) and vectorises; on x86-64 it is compiled
// for AVX-512, AVX2 and the baseline, chosen per call (cpu_isa.h). The output has x's layout (channels-last stays
// channels-last).
#include "tanh.h"

#include "outputs.h"
#include "cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace rim_fast {
namespace {

constexpr int64_t kGrain = 32768;

template <typename T>
C10_ALWAYS_INLINE void tanh_loop_impl(const T* C10_RESTRICT x, T* C10_RESTRICT y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = static_cast<T>(tanh_rational<float>(static_cast<float>(x[i])));
  }
}

RIM_FAST_SIMD_FUNCTION(tanh_loop, tanh_loop_impl, (const float* x, float* y, int64_t n), (x, y, n))
RIM_FAST_SIMD_FUNCTION(tanh_loop, tanh_loop_impl, (const c10::BFloat16* x, c10::BFloat16* y, int64_t n), (x, y, n))

}  // namespace

at::Tensor tanh_cpu(const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16,
              "rim_fast::tanh: x must be float32 or bfloat16, got ", x_.scalar_type());
  // a dense tensor is read and written as its memory block, whatever its strides; others are made contiguous
  const at::Tensor x = x_.is_non_overlapping_and_dense() ? x_ : x_.contiguous();
  at::Tensor y = new_output_like(x);
  const int64_t n = elements_to_write(x.numel());
  AT_DISPATCH_SWITCH(x.scalar_type(), "rim_fast::tanh",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { tanh_loop(xp + begin, yp + begin, end - begin); });
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { tanh_loop(xp + begin, yp + begin, end - begin); });
      }));
  return y;
}

}  // namespace rim_fast
