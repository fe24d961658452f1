// Allocation of every kernel output, and two test hooks that show that tests see exactly what the kernels write
// (tests/test_update_step.py, tests/test_conv.py): with `poison` on, outputs start as NaN instead of whatever
// memory the allocator hands out; with `skip_last_write` on, the kernels leave the last element of their outputs
// unwritten, so a test run with poison on must see a NaN there (the self-test that a skipped write is caught).
// Both are off unless a test sets them: rim_fast._C._set_test_hooks(poison, skip_last_write).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fill.h>

#include <atomic>
#include <cstdint>
#include <limits>

namespace rim_fast {

struct TestHooks {
  std::atomic<bool> poison{false};
  std::atomic<bool> skip_last_write{false};
};

inline TestHooks& test_hooks() {
  static TestHooks hooks;
  return hooks;
}

inline at::Tensor poisoned(at::Tensor t) {
  if (test_hooks().poison.load(std::memory_order_relaxed) && t.numel() > 0) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

// A kernel output of these sizes (contiguous), NaN-filled under the poison hook.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poisoned(at::empty(sizes, options));
}

// A kernel output with x's sizes and layout, NaN-filled under the poison hook.
inline at::Tensor new_output_like(const at::Tensor& x) { return poisoned(at::empty_like(x)); }

// How many of an output's n elements a kernel writes: n, or n - 1 under the skip_last_write hook.
inline int64_t elements_to_write(int64_t n) {
  return n > 0 && test_hooks().skip_last_write.load(std::memory_order_relaxed) ? n - 1 : n;
}

}  // namespace rim_fast
