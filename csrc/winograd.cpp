// CPU kernel of rim_fast::winograd_conv3d (winograd.h).
#include "winograd.h"

#include "checks.h"
#include "outputs.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

// The AVX-512 and AVX2 kernels: x86-64 with GCC or Clang (cpu_isa.h)
#ifdef RIM_FAST_CPU_SIMD
#include <immintrin.h>
#endif

namespace rim_fast {

namespace {

constexpr int64_t kTransformed = 64;  // 4^3 positions of a transformed tile
constexpr int64_t kChunk = 32;        // tiles per chunk at most: its transformed input and products stay in L2
constexpr int64_t kMinChunk = 8;      // at least (fewer tiles make the matrix products inefficient)
// Padding of a tile's row of 64 C-vectors in the chunk buffers: a power-of-two stride there maps the rows onto a
// few cache sets (measured standalone, one core, S3's [4, 32, 16^3]: the input transform 1.7 -> 1.0 ms).
constexpr int64_t kRowPad = 16;

struct Geometry {
  int64_t n, d, h, w;     // input (= output) sizes
  int64_t td, th, tw;     // tiles per axis
  int64_t tiles;          // n * td * th * tw
};

// B^T along one axis: four C-vectors at stride s in, at stride os out (distinct memory, declared restrict, so that
// the loop vectorises without an overlap check).
template <int C>
C10_ALWAYS_INLINE void input_axis(const float* C10_RESTRICT p, int64_t s, float* C10_RESTRICT o, int64_t os) {
  for (int c = 0; c < C; ++c) {
    const float v0 = p[c], v1 = p[s + c], v2 = p[2 * s + c], v3 = p[3 * s + c];
    o[c] = v0 - v2;
    o[os + c] = v1 + v2;
    o[2 * os + c] = v2 - v1;
    o[3 * os + c] = v1 - v3;
  }
}

// A^T along one axis: four C-vectors at stride s in, two at stride os out.
template <int C>
C10_ALWAYS_INLINE void output_axis(const float* C10_RESTRICT p, int64_t s, float* C10_RESTRICT o, int64_t os) {
  for (int c = 0; c < C; ++c) {
    const float v1 = p[s + c], v2 = p[2 * s + c];
    o[c] = p[c] + v1 + v2;
    o[os + c] = v1 - v2 - p[3 * s + c];
  }
}

struct TileIndex {
  int64_t n, td, th, tw;
};

inline TileIndex tile_index(const Geometry& g, int64_t t) {
  TileIndex i{};
  i.tw = t % g.tw;
  t /= g.tw;
  i.th = t % g.th;
  t /= g.th;
  i.td = t % g.td;
  i.n = t / g.td;
  return i;
}

// The transformed input of tile t into v[64][C] (row e = 16 i + 4 j + k for the tile's offsets i, j, k along D,
// H, W). x: NDHWC. Positions outside the input are the zero padding. `work`: 128 * C, the passes' buffers.
template <int C>
C10_ALWAYS_INLINE void input_tile(const float* C10_RESTRICT x, float* C10_RESTRICT v, float* C10_RESTRICT work,
                                  const Geometry& g, int64_t t) {
  const TileIndex ti = tile_index(g, t);
  const int64_t w0 = 2 * ti.tw - 1;
  const bool inside_w = w0 >= 0 && w0 + 3 < g.w;
  float* const along_w = work;
  float* const along_h = work + 64 * C;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      const int64_t d = 2 * ti.td - 1 + i, h = 2 * ti.th - 1 + j;
      float* row = along_w + (i * 16 + j * 4) * C;
      if (d < 0 || d >= g.d || h < 0 || h >= g.h) {
        std::fill(row, row + 4 * C, 0.f);
        continue;
      }
      const float* in = x + (((ti.n * g.d + d) * g.h + h) * g.w) * C;
      if (inside_w) {
        input_axis<C>(in + w0 * C, C, row, C);  // the W axis on the way in
      } else {
        float edge[4 * C];
        for (int k = 0; k < 4; ++k) {
          const int64_t w = w0 + k;
          if (w < 0 || w >= g.w) {
            std::fill(edge + k * C, edge + (k + 1) * C, 0.f);
          } else {
            std::copy(in + w * C, in + (w + 1) * C, edge + k * C);
          }
        }
        input_axis<C>(edge, C, row, C);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {  // H
    for (int k = 0; k < 4; ++k) {
      input_axis<C>(along_w + (i * 16 + k) * C, 4 * C, along_h + (i * 16 + k) * C, 4 * C);
    }
  }
  for (int jk = 0; jk < 16; ++jk) {  // D
    input_axis<C>(along_h + jk * C, 16 * C, v + jk * C, 16 * C);
  }
}

// Tile t of the output from its transformed products m[64][C], plus the bias; writes only outputs inside the
// volume, and none at or past `limit` (elements in memory order: the test hook that skips the last write).
template <int C>
C10_ALWAYS_INLINE void output_tile(const float* C10_RESTRICT m, float* C10_RESTRICT y, const float* C10_RESTRICT bias,
                                   float* C10_RESTRICT scratch, const Geometry& g, int64_t t, int64_t limit) {
  const TileIndex ti = tile_index(g, t);
  for (int jk = 0; jk < 16; ++jk) {  // D: [4][16] -> [2][16]
    output_axis<C>(m + jk * C, 16 * C, scratch + jk * C, 16 * C);
  }
  float* hw = scratch + 32 * C;  // H: [2][4][4] -> [2][2][4]
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      output_axis<C>(scratch + (i * 16 + k) * C, 4 * C, hw + (i * 8 + k) * C, 4 * C);
    }
  }
  const bool second_w = 2 * ti.tw + 1 < g.w;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t d = 2 * ti.td + i, h = 2 * ti.th + j;
      if (d >= g.d || h >= g.h) {
        continue;
      }
      float pair[2 * C];
      output_axis<C>(hw + (i * 8 + j * 4) * C, C, pair, C);  // W
      if (bias != nullptr) {
        for (int c = 0; c < C; ++c) {
          pair[c] += bias[c];
          pair[C + c] += bias[c];
        }
      }
      const int64_t offset = (((ti.n * g.d + d) * g.h + h) * g.w + 2 * ti.tw) * C;
      const int64_t count = std::min<int64_t>((second_w ? 2 : 1) * C, limit - offset);
      if (count > 0) {
        std::copy(pair, pair + count, y + offset);
      }
    }
  }
}

// A along one axis (the adjoint of A^T): two C-vectors at stride s in, four at stride os out.
template <int C>
C10_ALWAYS_INLINE void output_adjoint_axis(const float* C10_RESTRICT p, int64_t s, float* C10_RESTRICT o,
                                          int64_t os) {
  for (int c = 0; c < C; ++c) {
    const float v0 = p[c], v1 = p[s + c];
    o[c] = v0;
    o[os + c] = v0 + v1;
    o[2 * os + c] = v0 - v1;
    o[3 * os + c] = -v1;
  }
}

// The adjoint of ``output_tile`` (without the bias): tile t's output gradient dy (NDHWC; zero outside the volume)
// to its transformed products' gradient m[64][C]. `scratch`: 48 * C.
template <int C>
C10_ALWAYS_INLINE void output_adjoint_tile(const float* C10_RESTRICT dy, float* C10_RESTRICT m,
                                           float* C10_RESTRICT scratch, const Geometry& g, int64_t t) {
  const TileIndex ti = tile_index(g, t);
  float* hw = scratch + 32 * C;  // [2][2][4]: W expanded
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t d = 2 * ti.td + i, h = 2 * ti.th + j, w = 2 * ti.tw;
      float pair[2 * C];
      if (d >= g.d || h >= g.h) {
        std::fill(pair, pair + 2 * C, 0.f);
      } else {
        const float* in = dy + (((ti.n * g.d + d) * g.h + h) * g.w + w) * C;
        std::copy(in, in + C, pair);
        if (w + 1 < g.w) {
          std::copy(in + C, in + 2 * C, pair + C);
        } else {
          std::fill(pair + C, pair + 2 * C, 0.f);
        }
      }
      output_adjoint_axis<C>(pair, C, hw + (i * 8 + j * 4) * C, C);
    }
  }
  for (int i = 0; i < 2; ++i) {  // H: [2][2][4] -> [2][4][4] in scratch (row i * 16 + j * 4 + k)
    for (int k = 0; k < 4; ++k) {
      output_adjoint_axis<C>(hw + (i * 8 + k) * C, 4 * C, scratch + (i * 16 + k) * C, 4 * C);
    }
  }
  for (int jk = 0; jk < 16; ++jk) {  // D: [2][16] -> [4][16] into m
    output_adjoint_axis<C>(scratch + jk * C, 16 * C, m + jk * C, 16 * C);
  }
}

// The two matrix products per transformed position e, over a chunk's `count` tiles (rows i at strides ld_v, ld_m):
//   products:       m[i][o] = sum_c v[i][c] u[c][o]           (forward; u: u[e], [C][CO] contiguous)
//   outer products: du[c][o] += sum_i v[i][c] m[i][o]         (the weight gradient; du: [C][CO] contiguous)
// With AVX-512 in registers: 16 accumulators of 16 floats, a block of rows of the result at a time, each a
// broadcast element times a row of 16-float vectors (measured alone, one core, 32 -> 32: 146 GFLOP/s (products)
// and 140 (outer products)). With AVX2 and FMA the same in 8-float vectors, at most 12 accumulators (AVX2 has 16
// vector registers), 32 columns of the result at a time. Else plain loops (the compiler's vectorisation).
#ifdef RIM_FAST_CPU_SIMD
template <int C, int CO>
RIM_FAST_TARGET_avx512 void products_avx512(const float* v, int64_t ld_v, const float* u,
                                            int64_t count, float* m, int64_t ld_m) {
  constexpr int kVectors = CO / 16;
  constexpr int kRows = kVectors >= 4 ? 4 : (16 / kVectors > 8 ? 8 : 16 / kVectors);
  int64_t i0 = 0;
  for (; i0 + kRows <= count; i0 += kRows) {
    __m512 acc[kRows][kVectors];
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kVectors; ++j) {
        acc[r][j] = _mm512_setzero_ps();
      }
    }
    for (int c = 0; c < C; ++c) {
      __m512 row[kVectors];
      for (int j = 0; j < kVectors; ++j) {
        row[j] = _mm512_loadu_ps(u + c * CO + 16 * j);
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512 a = _mm512_set1_ps(v[(i0 + r) * ld_v + c]);
        for (int j = 0; j < kVectors; ++j) {
          acc[r][j] = _mm512_fmadd_ps(a, row[j], acc[r][j]);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kVectors; ++j) {
        _mm512_storeu_ps(m + (i0 + r) * ld_m + 16 * j, acc[r][j]);
      }
    }
  }
  for (; i0 < count; ++i0) {  // the last rows, one at a time
    __m512 acc[kVectors];
    for (int j = 0; j < kVectors; ++j) {
      acc[j] = _mm512_setzero_ps();
    }
    for (int c = 0; c < C; ++c) {
      const __m512 a = _mm512_set1_ps(v[i0 * ld_v + c]);
      for (int j = 0; j < kVectors; ++j) {
        acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(u + c * CO + 16 * j), acc[j]);
      }
    }
    for (int j = 0; j < kVectors; ++j) {
      _mm512_storeu_ps(m + i0 * ld_m + 16 * j, acc[j]);
    }
  }
}

template <int C, int CO>
RIM_FAST_TARGET_avx512 void outer_products_avx512(const float* v, int64_t ld_v, const float* m,
                                                  int64_t ld_m, int64_t count, float* du) {
  constexpr int kVectors = CO / 16;
  constexpr int kRows = 16 / kVectors < C ? 16 / kVectors : C;
  for (int c0 = 0; c0 < C; c0 += kRows) {
    __m512 acc[kRows][kVectors];
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kVectors; ++j) {
        acc[r][j] = _mm512_loadu_ps(du + (c0 + r) * CO + 16 * j);
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      __m512 row[kVectors];
      for (int j = 0; j < kVectors; ++j) {
        row[j] = _mm512_loadu_ps(m + i * ld_m + 16 * j);
      }
      const float* vi = v + i * ld_v + c0;
      for (int r = 0; r < kRows; ++r) {
        const __m512 a = _mm512_set1_ps(vi[r]);
        for (int j = 0; j < kVectors; ++j) {
          acc[r][j] = _mm512_fmadd_ps(a, row[j], acc[r][j]);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kVectors; ++j) {
        _mm512_storeu_ps(du + (c0 + r) * CO + 16 * j, acc[r][j]);
      }
    }
  }
}

// AVX2 + FMA: column blocks of up to 4 vectors (32 floats); 2 rows of 4 vectors or 4-6 rows of 2, so that the
// accumulators, the block's row of u and a broadcast fit in 16 registers.
template <int C, int CO>
RIM_FAST_TARGET_avx2 void products_avx2(const float* v, int64_t ld_v, const float* u, int64_t count,
                                        float* m, int64_t ld_m) {
  constexpr int kBlock = CO / 8 < 4 ? CO / 8 : 4;  // vectors per column block
  constexpr int kRows = kBlock == 4 ? 2 : 6;
  for (int o0 = 0; o0 < CO; o0 += 8 * kBlock) {
    int64_t i0 = 0;
    for (; i0 + kRows <= count; i0 += kRows) {
      __m256 acc[kRows][kBlock];
      for (int r = 0; r < kRows; ++r) {
        for (int j = 0; j < kBlock; ++j) {
          acc[r][j] = _mm256_setzero_ps();
        }
      }
      for (int c = 0; c < C; ++c) {
        __m256 row[kBlock];
        for (int j = 0; j < kBlock; ++j) {
          row[j] = _mm256_loadu_ps(u + c * CO + o0 + 8 * j);
        }
        for (int r = 0; r < kRows; ++r) {
          const __m256 a = _mm256_broadcast_ss(v + (i0 + r) * ld_v + c);
          for (int j = 0; j < kBlock; ++j) {
            acc[r][j] = _mm256_fmadd_ps(a, row[j], acc[r][j]);
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        for (int j = 0; j < kBlock; ++j) {
          _mm256_storeu_ps(m + (i0 + r) * ld_m + o0 + 8 * j, acc[r][j]);
        }
      }
    }
    for (; i0 < count; ++i0) {  // the last rows, one at a time
      __m256 acc[kBlock];
      for (int j = 0; j < kBlock; ++j) {
        acc[j] = _mm256_setzero_ps();
      }
      for (int c = 0; c < C; ++c) {
        const __m256 a = _mm256_broadcast_ss(v + i0 * ld_v + c);
        for (int j = 0; j < kBlock; ++j) {
          acc[j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(u + c * CO + o0 + 8 * j), acc[j]);
        }
      }
      for (int j = 0; j < kBlock; ++j) {
        _mm256_storeu_ps(m + i0 * ld_m + o0 + 8 * j, acc[j]);
      }
    }
  }
}

template <int C, int CO>
RIM_FAST_TARGET_avx2 void outer_products_avx2(const float* v, int64_t ld_v, const float* m,
                                              int64_t ld_m, int64_t count, float* du) {
  constexpr int kBlock = CO / 8 < 4 ? CO / 8 : 4;
  constexpr int kRows = kBlock == 4 ? 2 : 4;  // divides C (16 to 128)
  for (int o0 = 0; o0 < CO; o0 += 8 * kBlock) {
    for (int c0 = 0; c0 < C; c0 += kRows) {
      __m256 acc[kRows][kBlock];
      for (int r = 0; r < kRows; ++r) {
        for (int j = 0; j < kBlock; ++j) {
          acc[r][j] = _mm256_loadu_ps(du + (c0 + r) * CO + o0 + 8 * j);
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        __m256 row[kBlock];
        for (int j = 0; j < kBlock; ++j) {
          row[j] = _mm256_loadu_ps(m + i * ld_m + o0 + 8 * j);
        }
        const float* vi = v + i * ld_v + c0;
        for (int r = 0; r < kRows; ++r) {
          const __m256 a = _mm256_broadcast_ss(vi + r);
          for (int j = 0; j < kBlock; ++j) {
            acc[r][j] = _mm256_fmadd_ps(a, row[j], acc[r][j]);
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        for (int j = 0; j < kBlock; ++j) {
          _mm256_storeu_ps(du + (c0 + r) * CO + o0 + 8 * j, acc[r][j]);
        }
      }
    }
  }
}
#endif

template <int C, int CO>
void products_plain(const float* v, int64_t ld_v, const float* u, int64_t count, float* m, int64_t ld_m) {
  for (int64_t i = 0; i < count; ++i) {
    float acc[CO] = {};
    for (int c = 0; c < C; ++c) {
      const float a = v[i * ld_v + c];
      for (int o = 0; o < CO; ++o) {
        acc[o] += a * u[c * CO + o];
      }
    }
    std::copy(acc, acc + CO, m + i * ld_m);
  }
}

template <int C, int CO>
void outer_products_plain(const float* v, int64_t ld_v, const float* m, int64_t ld_m, int64_t count, float* du) {
  for (int64_t i = 0; i < count; ++i) {
    for (int c = 0; c < C; ++c) {
      const float a = v[i * ld_v + c];
      for (int o = 0; o < CO; ++o) {
        du[c * CO + o] += a * m[i * ld_m + o];
      }
    }
  }
}

using ProductsFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);
using OuterFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*);

struct ProductFns {
  ProductsFn products = nullptr;
  OuterFn outer = nullptr;
};

template <int C, int CO>
ProductFns product_fns_for(int isa) {
#ifdef RIM_FAST_CPU_SIMD
  if (isa == kIsaAvx512) {
    return {&products_avx512<C, CO>, &outer_products_avx512<C, CO>};
  }
  if (isa == kIsaAvx2) {
    return {&products_avx2<C, CO>, &outer_products_avx2<C, CO>};
  }
#endif
  return {&products_plain<C, CO>, &outer_products_plain<C, CO>};
}

template <int C>
ProductFns product_fns_c(int64_t c_out, int isa) {
  switch (c_out) {
    case 16: return product_fns_for<C, 16>(isa);
    case 32: return product_fns_for<C, 32>(isa);
    case 64: return product_fns_for<C, 64>(isa);
    case 128: return product_fns_for<C, 128>(isa);
    default: return {};
  }
}

ProductFns product_fns(int64_t c_in, int64_t c_out, int isa) {
  switch (c_in) {
    case 16: return product_fns_c<16>(c_out, isa);
    case 32: return product_fns_c<32>(c_out, isa);
    case 64: return product_fns_c<64>(c_out, isa);
    case 128: return product_fns_c<128>(c_out, isa);
    default: return {};
  }
}

// One chunk of tiles [t0, t0 + count): transform, multiply per transformed position, transform back (the forward),
// or transform the input and the output gradient (the weight gradient).
struct Chunk {
  const float* x;
  const float* u;
  const float* bias;
  float* y;
  const float* grad;  // the weight gradient's output gradient
  float* v;        // [kChunk][64 * C_in + kRowPad]
  float* m;        // [kChunk][64 * C_out + kRowPad]
  float* scratch;  // 48 * C_out
  float* work;     // 128 * C_in
  int64_t c_in, c_out, ld_v, ld_m, limit;
};

// A thread's chunk buffers, and the chunk description pointing at them.
struct ChunkBuffers {
  std::vector<float> v, m, scratch, work;
  Chunk k;
  ChunkBuffers(const Chunk& base, int64_t tiles)
      : v(tiles * base.ld_v), m(tiles * base.ld_m), scratch(48 * base.c_out), work(128 * base.c_in), k(base) {
    k.v = v.data();
    k.m = m.data();
    k.scratch = scratch.data();
    k.work = work.data();
  }
};

using InputFn = void (*)(const Chunk&, const Geometry&, int64_t, int64_t);
using OutputFn = void (*)(const Chunk&, const Geometry&, int64_t, int64_t);

template <int C>
C10_ALWAYS_INLINE void input_chunk(const Chunk& k, const Geometry& g, int64_t t0, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    input_tile<C>(k.x, k.v + i * k.ld_v, k.work, g, t0 + i);
  }
}

template <int C>
C10_ALWAYS_INLINE void output_chunk(const Chunk& k, const Geometry& g, int64_t t0, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    output_tile<C>(k.m + i * k.ld_m, k.y, k.bias, k.scratch, g, t0 + i, k.limit);
  }
}

template <int C>
C10_ALWAYS_INLINE void output_adjoint_chunk(const Chunk& k, const Geometry& g, int64_t t0, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    output_adjoint_tile<C>(k.grad, k.m + i * k.ld_m, k.scratch, g, t0 + i);
  }
}

// The transforms compiled once per channel count and instruction set (the compiler vectorises their loops for
// it), chosen with the matrix products (cpu_isa).
struct TransformFns {
  InputFn input = nullptr;
  OutputFn output = nullptr;
  OutputFn adjoint = nullptr;
};

#define RIM_FAST_WINOGRAD_TRANSFORMS(C, ISA)                                                                  \
  RIM_FAST_TARGET_##ISA void input_chunk_##C##_##ISA(const Chunk& k, const Geometry& g, int64_t t0,         \
                                                     int64_t n) {                                            \
    input_chunk<C>(k, g, t0, n);                                                                              \
  }                                                                                                           \
  RIM_FAST_TARGET_##ISA void output_chunk_##C##_##ISA(const Chunk& k, const Geometry& g, int64_t t0,        \
                                                      int64_t n) {                                           \
    output_chunk<C>(k, g, t0, n);                                                                             \
  }                                                                                                           \
  RIM_FAST_TARGET_##ISA void output_adjoint_chunk_##C##_##ISA(const Chunk& k, const Geometry& g, int64_t t0, \
                                                              int64_t n) {                                   \
    output_adjoint_chunk<C>(k, g, t0, n);                                                                     \
  }                                                                                                           \
  constexpr TransformFns transforms_##C##_##ISA{&input_chunk_##C##_##ISA, &output_chunk_##C##_##ISA,         \
                                                &output_adjoint_chunk_##C##_##ISA};
#define RIM_FAST_WINOGRAD_CHANNELS(ISA)      \
  RIM_FAST_WINOGRAD_TRANSFORMS(16, ISA)      \
  RIM_FAST_WINOGRAD_TRANSFORMS(32, ISA)      \
  RIM_FAST_WINOGRAD_TRANSFORMS(64, ISA)      \
  RIM_FAST_WINOGRAD_TRANSFORMS(128, ISA)     \
  TransformFns transforms_##ISA(int64_t c) { \
    switch (c) {                             \
      case 16: return transforms_16_##ISA;   \
      case 32: return transforms_32_##ISA;   \
      case 64: return transforms_64_##ISA;   \
      case 128: return transforms_128_##ISA; \
      default: return {};                    \
    }                                        \
  }
RIM_FAST_WINOGRAD_CHANNELS(plain)
#ifdef RIM_FAST_CPU_SIMD
RIM_FAST_WINOGRAD_CHANNELS(avx512)
RIM_FAST_WINOGRAD_CHANNELS(avx2)
#endif
#undef RIM_FAST_WINOGRAD_CHANNELS
#undef RIM_FAST_WINOGRAD_TRANSFORMS

TransformFns transform_fns(int64_t c, int isa) {
#ifdef RIM_FAST_CPU_SIMD
  if (isa == kIsaAvx512) {
    return transforms_avx512(c);
  }
  if (isa == kIsaAvx2) {
    return transforms_avx2(c);
  }
#endif
  return transforms_plain(c);
}

constexpr const char* kOp = "winograd_conv3d";
constexpr const char* kWeightOp = "winograd_conv3d_weight";

void check_channels(int64_t c, const char* name, const char* op = kOp) {
  TORCH_CHECK(c == 16 || c == 32 || c == 64 || c == 128, "rim_fast::", op, ": ", name,
              " must be 16, 32, 64 or 128, got ", text(c));
}

Geometry geometry_of(const at::Tensor& x) {
  Geometry g{x.size(0), x.size(2), x.size(3), x.size(4), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2,
             (x.size(4) + 1) / 2, 0};
  g.tiles = g.n * g.td * g.th * g.tw;
  return g;
}

// Tiles per chunk: up to kChunk, fewer where that keeps every thread busy (S3's GRU at 4^3: 32 tiles)
int64_t chunk_tiles_for(const Geometry& g) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>((g.tiles + 2 * threads - 1) / (2 * threads), kMinChunk, kChunk);
}

// What both kernels derive from their shapes: the tiles, their chunks, the chunk rows' strides, the input's and
// the output's transforms and the matrix-product kernels (for the instruction set of isa_here).
struct Plan {
  Geometry g;
  InputFn input;
  TransformFns out;  // output and output_adjoint: the transforms of C_out channels
  ProductFns fns;
  int64_t ld_v, ld_m, chunk_tiles, chunks;
  Plan(const at::Tensor& x, int64_t c_in, int64_t c_out, int isa = cpu_isa())
      : g(geometry_of(x)),
        input(transform_fns(c_in, isa).input),
        out(transform_fns(c_out, isa)),
        fns(product_fns(c_in, c_out, isa)),
        ld_v(kTransformed * c_in + kRowPad),
        ld_m(kTransformed * c_out + kRowPad),
        chunk_tiles(chunk_tiles_for(g)),
        chunks((g.tiles + chunk_tiles - 1) / chunk_tiles) {}
};

}  // namespace

at::Tensor winograd_conv3d_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && u.device().is_cpu(), "rim_fast::", kOp, ": x and u must be CPU tensors, got ",
              text(x.device()), " and ", text(u.device()));
  TORCH_CHECK(x.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat, "rim_fast::", kOp,
              ": x and u must be float32, got ", x.scalar_type(), " and ", u.scalar_type());
  TORCH_CHECK(x.dim() == 5, "rim_fast::", kOp, ": x must be [N, C_in, D, H, W], got shape ", text(x.sizes()));
  TORCH_CHECK(u.dim() == 3 && u.size(0) == kTransformed && u.size(1) == x.size(1), "rim_fast::", kOp,
              ": u must be [64, C_in, C_out] with C_in = x.shape[1] = ", text(x.size(1)), ", got shape ",
              text(u.sizes()));
  const int64_t c_in = x.size(1), c_out = u.size(2);
  check_channels(c_in, "C_in (x.shape[1])");
  check_channels(c_out, "C_out (u.shape[2])");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == c_out,
                "rim_fast::", kOp, ": bias must be a float32 CPU tensor of shape [", text(c_out), "], got ",
                bias->scalar_type(), " ", text(bias->sizes()), " on ", text(bias->device()));
  }
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor uc = u.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = poisoned(at::empty({x.size(0), c_out, x.size(2), x.size(3), x.size(4)},
                                    x.options().memory_format(at::MemoryFormat::ChannelsLast3d)));
  if (y.numel() == 0) {
    return y;
  }
  const Plan plan(x, c_in, c_out);
  const Geometry& g = plan.g;
  Chunk base{xc.data_ptr<float>(), uc.data_ptr<float>(), bias.has_value() ? bc.data_ptr<float>() : nullptr,
             y.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, nullptr, c_in, c_out, plan.ld_v, plan.ld_m,
             elements_to_write(y.numel())};
  at::parallel_for(0, plan.chunks, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers buffers(base, plan.chunk_tiles);
    const Chunk& k = buffers.k;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t t0 = chunk * plan.chunk_tiles, count = std::min(plan.chunk_tiles, g.tiles - t0);
      plan.input(k, g, t0, count);
      for (int64_t e = 0; e < kTransformed; ++e) {  // m[:, e] = v[:, e] @ u[e]: C_in -> C_out per tile
        plan.fns.products(k.v + e * c_in, plan.ld_v, k.u + e * c_in * c_out, count, k.m + e * c_out, plan.ld_m);
      }
      plan.out.output(k, g, t0, count);
    }
  });
  return y;
}

at::Tensor winograd_conv3d_weight_cpu(const at::Tensor& x, const at::Tensor& grad) {
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu(), "rim_fast::", kWeightOp,
              ": x and grad must be CPU tensors, got ", text(x.device()), " and ", text(grad.device()));
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat, "rim_fast::", kWeightOp,
              ": x and grad must be float32, got ", x.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(x.dim() == 5, "rim_fast::", kWeightOp, ": x must be [N, C_in, D, H, W], got shape ",
              text(x.sizes()));
  TORCH_CHECK(grad.dim() == 5 && grad.size(0) == x.size(0) && grad.size(2) == x.size(2) &&
                  grad.size(3) == x.size(3) && grad.size(4) == x.size(4),
              "rim_fast::", kWeightOp, ": grad must be [N, C_out, D, H, W] with x's N, D, H, W ",
              text(x.sizes()), ", got shape ", text(grad.sizes()));
  const int64_t c_in = x.size(1), c_out = grad.size(1);
  check_channels(c_in, "C_in (x.shape[1])", kWeightOp);
  check_channels(c_out, "C_out (grad.shape[1])", kWeightOp);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor gc = grad.contiguous(at::MemoryFormat::ChannelsLast3d);
  at::Tensor du = new_output({kTransformed, c_in, c_out}, x.options());
  const int64_t elements = du.numel(), limit = elements_to_write(elements);
  const Plan plan(x, c_in, c_out);
  const Geometry& g = plan.g;
  Chunk base{xc.data_ptr<float>(), nullptr, nullptr, nullptr, gc.data_ptr<float>(), nullptr, nullptr, nullptr,
             nullptr, c_in, c_out, plan.ld_v, plan.ld_m, 0};
  // each thread sums its chunks' outer products; du is then the sum of those partial sums
  std::mutex guard;
  std::vector<std::vector<float>> partials;
  at::parallel_for(0, plan.chunks, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers buffers(base, plan.chunk_tiles);
    const Chunk& k = buffers.k;
    std::vector<float> partial(elements, 0.f);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t t0 = chunk * plan.chunk_tiles, count = std::min(plan.chunk_tiles, g.tiles - t0);
      plan.input(k, g, t0, count);
      plan.out.adjoint(k, g, t0, count);
      for (int64_t e = 0; e < kTransformed; ++e) {
        plan.fns.outer(k.v + e * c_in, plan.ld_v, k.m + e * c_out, plan.ld_m, count,
                       partial.data() + e * c_in * c_out);
      }
    }
    const std::lock_guard<std::mutex> lock(guard);
    partials.push_back(std::move(partial));
  });
  float* out = du.data_ptr<float>();
  for (int64_t i = 0; i < limit; ++i) {
    float total = 0.f;
    for (const auto& partial : partials) {
      total += partial[i];
    }
    out[i] = total;
  }
  return du;
}

}  // namespace rim_fast
