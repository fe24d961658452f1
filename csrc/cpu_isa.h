// The instruction sets of rim_fast's CPU loops (tanh.cpp, shift.cpp, winograd.cpp), chosen at run time since the
// extension is built without -march flags: each loop is compiled once per instruction set, and a call runs the
// best one the CPU has, up to a cap, cpu_max_isa() (rim_fast._C._set_cpu_isa). rim_fast.ops._cpu sets the cap to
// torch's own CPU capability at import, so that ATEN_CPU_CAPABILITY=avx2 caps torch and rim_fast alike
// (bench/results/cpu-avx2-*: a stand-in for a CPU without AVX-512); tests set it to cover every variant on one CPU.
// x86-64 with GCC or Clang (function target attributes); elsewhere, or with -DRIM_FAST_NO_SIMD (which checks that
// build on x86-64), the loops are compiled once, for the baseline.
#pragma once

#include <atomic>

namespace rim_fast {

// Best last.
enum CpuIsa : int { kIsaPlain = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline std::atomic<int>& cpu_max_isa() {
  static std::atomic<int> isa{kIsaAvx512};
  return isa;
}

// The instruction set the loops run now: the best the CPU has, up to cpu_max_isa().
inline int cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(RIM_FAST_NO_SIMD)
  const int cap = cpu_max_isa().load(std::memory_order_relaxed);
  if (cap >= kIsaAvx512 && __builtin_cpu_supports("avx512f")) {
    return kIsaAvx512;
  }
  if (cap >= kIsaAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return kIsaAvx2;
  }
#endif
  return kIsaPlain;
}

}  // namespace rim_fast

#if defined(__x86_64__) && defined(__GNUC__) && !defined(RIM_FAST_NO_SIMD)
#define RIM_FAST_CPU_SIMD 1
#define RIM_FAST_TARGET_avx512 __attribute__((target("avx512f")))
#define RIM_FAST_TARGET_avx2 __attribute__((target("avx2,fma")))
#endif
#define RIM_FAST_TARGET_plain

// RIM_FAST_SIMD_FUNCTION(name, impl, (params), (args)): `void name(params)`, which runs `impl(args)` compiled for
// cpu_isa()'s instruction set. `impl` must be inlined into the variants (C10_ALWAYS_INLINE, or a template whose
// inner calls are): the loops vectorise where they land. Overloads: one use per parameter list.
#ifdef RIM_FAST_CPU_SIMD
#define RIM_FAST_SIMD_FUNCTION(name, impl, params, args)        \
  RIM_FAST_TARGET_avx512 void name##_avx512 params { impl args; } \
  RIM_FAST_TARGET_avx2 void name##_avx2 params { impl args; }     \
  void name##_plain params { impl args; }                          \
  void name params {                                               \
    switch (::rim_fast::cpu_isa()) {                               \
      case ::rim_fast::kIsaAvx512: name##_avx512 args; return;     \
      case ::rim_fast::kIsaAvx2: name##_avx2 args; return;         \
      default: name##_plain args; return;                          \
    }                                                              \
  }
#else
#define RIM_FAST_SIMD_FUNCTION(name, impl, params, args) \
  void name params { impl args; }
#endif
