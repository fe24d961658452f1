// RIM_FAST_SIMD_CLONES: a function attribute that compiles a CPU loop for AVX-512, AVX2 and the baseline, the
// variant chosen at load time (GCC/Clang target_clones, x86-64 Linux), since the extension is built without
// -march flags. Elsewhere it is empty: the baseline build. Templates cannot take it: put it on plain functions.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define RIM_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef RIM_FAST_SIMD_CLONES
#define RIM_FAST_SIMD_CLONES
#endif
