// CPU kernels of rim_fast::shift_sum and rim_fast::shift_stack (shift.h). Both run over planes (the last two
// spatial axes of one channel, sample and outer position), split across threads by at::parallel_for; each tap is
// one contiguous loop over a plane (below), which vectorises (compiled for AVX-512, AVX2 and the baseline, chosen at
// load time, as tanh.cpp).
#include "shift.h"

#include "checks.h"
#include "outputs.h"
#include "cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace rim_fast {
namespace {

// at least this many elements read or written per thread's chunk of items
constexpr int64_t kGrainElements = 16384;

// The spatial dims as three (outer ones 1 where S has fewer), the kernel likewise.
struct Geometry {
  int64_t lead = 1;  // C (shift_sum's output, shift_stack's input) rows
  int64_t taps = 1;  // K
  int64_t n = 1;
  std::array<int64_t, 3> size{1, 1, 1};    // D, H, W
  std::array<int64_t, 3> kernel{1, 1, 1};  // kd, kh, kw
  int64_t row_elements() const { return size[2]; }
  int64_t rows_per_image() const { return size[0] * size[1]; }
};

// t: [C, K, N, *S] (with_taps) or [C, N, *S]
Geometry geometry(const at::Tensor& t, at::IntArrayRef kernel, int64_t sign, bool with_taps, const char* op,
                  const char* name) {
  const int64_t lead_dims = with_taps ? 3 : 2;
  const int64_t spatial = t.dim() - lead_dims;
  TORCH_CHECK(t.device().is_cpu(), "rim_fast::", op, ": ", name, " must be a CPU tensor, got ", text(t.device()));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "rim_fast::", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(spatial >= 1 && spatial <= 3, "rim_fast::", op, ": ", name, " must be ",
              with_taps ? "[C, K, N, *S]" : "[C, N, *S]", " with 1 to 3 spatial dims, got shape ", text(t.sizes()));
  TORCH_CHECK(static_cast<int64_t>(kernel.size()) == spatial, "rim_fast::", op, ": kernel must have one size per "
              "spatial dim (", text(spatial), "), got ", text(kernel));
  TORCH_CHECK(sign == 1 || sign == -1, "rim_fast::", op, ": sign must be 1 or -1, got ", text(sign));
  Geometry g;
  int64_t taps = 1;
  for (int64_t i = 0; i < spatial; ++i) {
    TORCH_CHECK(kernel[i] >= 1 && kernel[i] % 2 == 1, "rim_fast::", op, ": kernel sizes must be odd and positive, got ",
                text(kernel));
    taps *= kernel[i];
    g.size[3 - spatial + i] = t.size(lead_dims + i);
    g.kernel[3 - spatial + i] = kernel[i];
  }
  g.lead = t.size(0);
  if (with_taps) {
    TORCH_CHECK(t.size(1) == taps, "rim_fast::", op, ": ", name, " must hold prod(kernel) = ", text(taps),
                " taps in dim 1, got shape ", text(t.sizes()));
  }
  g.taps = taps;
  g.n = t.size(lead_dims - 1);
  return g;
}

// The loops, inlined into one function per dtype and instruction set (cpu_isa.h: RIM_FAST_SIMD_FUNCTION).
// Both run over whole planes (H x W elements): a tap shifts the rows by rs and the columns by s, and in memory
// that is one offset, rs W + s, for every element, so each tap is one long loop that vectorises (a loop per row of
// S3's 16 elements costs more than its work). The elements the offset wraps into a neighbouring row (the first or
// last |s| columns) are then set right: restored (shift_sum) or zeroed (shift_stack).

// One parallel item of shift_sum: an output plane (c, n, d), accumulated in `acc` tap after tap, then stored (up
// to `to_write`, the test hook's limit). `edge` holds the |s| wrapped columns of every row (kernel width / 2 each).
template <typename T>
C10_ALWAYS_INLINE void shift_sum_plane(const T* C10_RESTRICT planes, T* C10_RESTRICT out, T* C10_RESTRICT acc,
                                       T* C10_RESTRICT edge, const Geometry& g, int64_t sign, int64_t to_write,
                                       int64_t item) {
  const int64_t width = g.row_elements(), height = g.size[1];
  const int64_t plane = height * width;
  const int64_t image = g.size[0] * plane;  // one sample's elements per channel (and tap)
  const int64_t cd = (g.kernel[0] - 1) / 2, ch = (g.kernel[1] - 1) / 2, cw = (g.kernel[2] - 1) / 2;
  const int64_t d = item % g.size[0];
  const int64_t n = (item / g.size[0]) % g.n;
  const int64_t c = item / (g.size[0] * g.n);
  for (int64_t j = 0; j < plane; ++j) {
    acc[j] = T(0);
  }
  for (int64_t a = 0; a < g.kernel[0]; ++a) {
    const int64_t dd = d + sign * (a - cd);
    if (dd < 0 || dd >= g.size[0]) {
      continue;
    }
    for (int64_t b = 0; b < g.kernel[1]; ++b) {
      const int64_t rs = sign * (b - ch);  // output row h reads source row h + rs
      const int64_t h0 = std::max<int64_t>(0, -rs), h1 = height - std::max<int64_t>(0, rs);
      if (h0 >= h1) {
        continue;
      }
      for (int64_t e = 0; e < g.kernel[2]; ++e) {
        const int64_t tap = (a * g.kernel[1] + b) * g.kernel[2] + e;
        const int64_t shift = sign * (e - cw);
        // the source plane, read at offset rs W + shift from each output element (indices, not a pointer moved
        // out of the tensor)
        const T* src = planes + ((c * g.taps + tap) * g.n + n) * image + dd * plane;
        const int64_t offset = rs * width + shift;
        // the columns this tap must leave alone: [0, -shift) or [width - shift, width), kept aside
        const int64_t e0 = shift < 0 ? 0 : std::max<int64_t>(0, width - shift);
        const int64_t e1 = shift < 0 ? std::min(width, -shift) : width;
        int64_t kept = 0;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = e0; w < e1; ++w) {
            edge[kept++] = acc[h * width + w];
          }
        }
        // acc[j] += source[j + rs W + shift] over rows h0..h1, less the first / last element (they are edge
        // columns, and reading them would leave the source plane)
        const int64_t j0 = h0 * width + std::max<int64_t>(0, -shift), j1 = h1 * width - std::max<int64_t>(0, shift);
        for (int64_t j = j0; j < j1; ++j) {
          acc[j] += src[j + offset];
        }
        kept = 0;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = e0; w < e1; ++w) {
            acc[h * width + w] = edge[kept++];
          }
        }
      }
    }
  }
  const int64_t first = item * plane;  // out is [C, N, D, H, W]: item (c, n, d) in that order
  const int64_t count = std::min(plane, to_write - first);
  for (int64_t j = 0; j < count; ++j) {
    out[first + j] = acc[j];
  }
}

// One parallel item of shift_stack: an output image (c, tap, n), plane by plane: the source plane its tap reads,
// shifted, zero outside (the rows without a source, and the wrapped columns).
template <typename T>
C10_ALWAYS_INLINE void shift_stack_image(const T* C10_RESTRICT x, T* C10_RESTRICT out, const Geometry& g,
                                         int64_t sign, int64_t to_write, int64_t item) {
  const int64_t width = g.row_elements(), height = g.size[1];
  const int64_t plane = height * width;
  const int64_t image = g.size[0] * plane;
  const int64_t n = item % g.n;
  const int64_t tap = (item / g.n) % g.taps;
  const int64_t c = item / (g.n * g.taps);
  const int64_t a = tap / (g.kernel[1] * g.kernel[2]);
  const int64_t b = (tap / g.kernel[2]) % g.kernel[1];
  const int64_t e = tap % g.kernel[2];
  // output (d, h, w) reads source (d + ds, h + rs, w + shift)
  const int64_t ds = -sign * (a - (g.kernel[0] - 1) / 2), rs = -sign * (b - (g.kernel[1] - 1) / 2);
  const int64_t shift = -sign * (e - (g.kernel[2] - 1) / 2);
  const int64_t h0 = std::min(height, std::max<int64_t>(0, -rs));
  const int64_t h1 = std::max(h0, height - std::max<int64_t>(0, rs));
  const int64_t e0 = shift < 0 ? 0 : std::max<int64_t>(0, width - shift);
  const int64_t e1 = shift < 0 ? std::min(width, -shift) : width;
  T* C10_RESTRICT o = out + item * image;  // out is [C, K, N, *S]: item (c, tap, n) in that order
  const int64_t limit = to_write - item * image;  // elements of this image to write (the test hook)
  for (int64_t d = 0; d < g.size[0]; ++d, o += plane) {
    const int64_t offset = d * plane;
    if (offset >= limit) {
      return;
    }
    const int64_t count = std::min(plane, limit - offset);
    const int64_t dd = d + ds;
    if (dd < 0 || dd >= g.size[0] || h0 >= h1) {
      for (int64_t j = 0; j < count; ++j) {
        o[j] = T(0);
      }
      continue;
    }
    const T* src = x + (c * g.n + n) * image + dd * plane;
    const int64_t source_offset = rs * width + shift;
    const int64_t j0 = h0 * width + std::max<int64_t>(0, -shift);
    const int64_t j1 = std::max(j0, h1 * width - std::max<int64_t>(0, shift));
    for (int64_t j = 0; j < std::min(j0, count); ++j) {
      o[j] = T(0);
    }
    for (int64_t j = j0; j < std::min(j1, count); ++j) {
      o[j] = src[j + source_offset];
    }
    for (int64_t j = j1; j < count; ++j) {
      o[j] = T(0);
    }
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = e0; w < e1 && h * width + w < count; ++w) {
        o[h * width + w] = T(0);
      }
    }
  }
}

template <typename T>
C10_ALWAYS_INLINE void shift_sum_items(const T* planes, T* out, T* acc, T* edge, const Geometry& g, int64_t sign,
                                       int64_t to_write, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    shift_sum_plane(planes, out, acc, edge, g, sign, to_write, item);
  }
}

template <typename T>
C10_ALWAYS_INLINE void shift_stack_items(const T* x, T* out, const Geometry& g, int64_t sign, int64_t to_write,
                                         int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    shift_stack_image(x, out, g, sign, to_write, item);
  }
}

RIM_FAST_SIMD_FUNCTION(shift_sum_range, shift_sum_items,
                       (const float* planes, float* out, float* acc, float* edge, const Geometry& g, int64_t sign,
                        int64_t to_write, int64_t begin, int64_t end),
                       (planes, out, acc, edge, g, sign, to_write, begin, end))
RIM_FAST_SIMD_FUNCTION(shift_sum_range, shift_sum_items,
                       (const double* planes, double* out, double* acc, double* edge, const Geometry& g,
                        int64_t sign, int64_t to_write, int64_t begin, int64_t end),
                       (planes, out, acc, edge, g, sign, to_write, begin, end))
RIM_FAST_SIMD_FUNCTION(shift_stack_range, shift_stack_items,
                       (const float* x, float* out, const Geometry& g, int64_t sign, int64_t to_write, int64_t begin,
                        int64_t end),
                       (x, out, g, sign, to_write, begin, end))
RIM_FAST_SIMD_FUNCTION(shift_stack_range, shift_stack_items,
                       (const double* x, double* out, const Geometry& g, int64_t sign, int64_t to_write,
                        int64_t begin, int64_t end),
                       (x, out, g, sign, to_write, begin, end))

template <typename T>
void shift_sum_kernel(const T* planes, T* out, const Geometry& g, int64_t sign, int64_t to_write) {
  const int64_t items = g.lead * g.n * g.size[0];  // output planes (c, n, d)
  const int64_t per_item = g.rows_per_image() / g.size[0] * g.row_elements() * g.taps;  // elements read
  at::parallel_for(0, items, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, per_item)),
                   [&](int64_t begin, int64_t end) {
    // a plane's sum, and the wrapped columns of its rows (at most (kernel width - 1) / 2 per row)
    std::vector<T> acc(g.size[1] * g.row_elements());
    std::vector<T> edge(g.size[1] * std::max<int64_t>(1, (g.kernel[2] - 1) / 2));
    shift_sum_range(planes, out, acc.data(), edge.data(), g, sign, to_write, begin, end);
  });
}

template <typename T>
void shift_stack_kernel(const T* x, T* out, const Geometry& g, int64_t sign, int64_t to_write) {
  const int64_t items = g.lead * g.taps * g.n;  // output images (c, tap, n)
  const int64_t per_item = g.rows_per_image() * g.row_elements();
  at::parallel_for(0, items, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, per_item)),
                   [&](int64_t begin, int64_t end) { shift_stack_range(x, out, g, sign, to_write, begin, end); });
}

}  // namespace

at::Tensor shift_sum_cpu(const at::Tensor& planes_, at::IntArrayRef kernel, int64_t sign) {
  const Geometry g = geometry(planes_, kernel, sign, true, "shift_sum", "planes");
  const at::Tensor planes = planes_.contiguous();
  std::vector<int64_t> sizes{planes.size(0)};
  for (int64_t i = 2; i < planes.dim(); ++i) {
    sizes.push_back(planes.size(i));
  }
  at::Tensor out = new_output(sizes, planes.options());
  const int64_t to_write = elements_to_write(out.numel());
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "rim_fast::shift_sum", [&] {
    shift_sum_kernel<scalar_t>(planes.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, sign,
                               to_write);
  });
  return out;
}

at::Tensor shift_stack_cpu(const at::Tensor& x_, at::IntArrayRef kernel, int64_t sign) {
  const Geometry g = geometry(x_, kernel, sign, false, "shift_stack", "x");
  const at::Tensor x = x_.contiguous();
  std::vector<int64_t> sizes{x.size(0), g.taps};
  for (int64_t i = 1; i < x.dim(); ++i) {
    sizes.push_back(x.size(i));
  }
  at::Tensor out = new_output(sizes, x.options());
  const int64_t to_write = elements_to_write(out.numel());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rim_fast::shift_stack", [&] {
    shift_stack_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, sign, to_write);
  });
  return out;
}

}  // namespace rim_fast
