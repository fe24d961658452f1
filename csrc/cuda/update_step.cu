// CUDA kernels of the RIM update step (the CPU twins are in ../update_step.cpp, the math in ../update_step.h;
// this file sits in cuda/ because setuptools names objects by basename: update_step.cpp and .cu would clash).
//
// Every kernel is a grid-stride loop over packs of VEC elements (16-byte loads and stores when every
// pointer is aligned, else VEC = 1) followed by the < VEC tail, launched on the current stream under a
// device guard. The grid is capped at kMaxBlocks whatever the GPU, so the loss term is deterministic: each
// block writes its partial sum (tree reduction in registers and shared memory, no atomics) and one block
// adds the partials in a fixed order. Only ATen/c10 core headers are included, to keep nvcc fast.
#include "../update_step.h"

#include "../checks.h"
#include "../outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace rim_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 2048;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* C10_RESTRICT p, int64_t pack) {
  return reinterpret_cast<const Pack<T, N>*>(p)[pack];
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* C10_RESTRICT p, int64_t pack, const Pack<T, N>& x) {
  reinterpret_cast<Pack<T, N>*>(p)[pack] = x;
}

bool aligned_for(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

int64_t blocks_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// The step index t, either read on the host (then the bias corrections come precomputed) or read by the
// kernel from a device scalar (graph-capturable: the value may change between replays).
struct StepArg {
  const double* device_step;
  double bc1, bc2;
};

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  return v;
}

// ---- preprocessing -------------------------------------------------------------------------------------

template <int VEC, Moments mode, typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kThreads)
    preprocess_moments_kernel(const scalar_t* C10_RESTRICT s, const state_t* C10_RESTRICT m,
                              const state_t* C10_RESTRICT v, state_t* C10_RESTRICT out,
                              state_t* C10_RESTRICT m_out, state_t* C10_RESTRICT v_out, int64_t n,
                              MomentCoefs<at::opmath_type<state_t>> c, StepArg step, double beta_1,
                              double beta_2) {
  using T = at::opmath_type<state_t>;
  // one thread per block evaluates the two pow() in double
  __shared__ T corrections[2];
  if (threadIdx.x == 0) {
    if (step.device_step != nullptr) {
      const double t = *step.device_step;
      corrections[0] = static_cast<T>(bias_correction(beta_1, t));
      corrections[1] = static_cast<T>(bias_correction(beta_2, t));
    } else {
      corrections[0] = static_cast<T>(step.bc1);
      corrections[1] = static_cast<T>(step.bc2);
    }
  }
  __syncthreads();
  const T bc1 = corrections[0], bc2 = corrections[1];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / VEC;
  for (int64_t p = first; p < n_packs; p += stride) {
    const Pack<scalar_t, VEC> sp = load_pack<VEC>(s, p);
    const Pack<state_t, VEC> mp = load_pack<VEC>(m, p);
    const Pack<state_t, VEC> vp = load_pack<VEC>(v, p);
    Pack<state_t, VEC> op, mo, vo;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      T o, m_new, v_new;
      preprocess_moments_element<mode, T>(static_cast<T>(sp.val[k]), static_cast<T>(mp.val[k]),
                                          static_cast<T>(vp.val[k]), c, bc1, bc2, o, m_new, v_new);
      op.val[k] = static_cast<state_t>(o);
      mo.val[k] = static_cast<state_t>(m_new);
      vo.val[k] = static_cast<state_t>(v_new);
    }
    store_pack<VEC>(out, p, op);
    store_pack<VEC>(m_out, p, mo);
    if (mode != Moments::kRmsprop) {
      store_pack<VEC>(v_out, p, vo);
    }
  }
  for (int64_t i = n_packs * VEC + first; i < n; i += stride) {
    T o, m_new, v_new;
    preprocess_moments_element<mode, T>(static_cast<T>(s[i]), static_cast<T>(m[i]), static_cast<T>(v[i]), c,
                                        bc1, bc2, o, m_new, v_new);
    out[i] = static_cast<state_t>(o);
    m_out[i] = static_cast<state_t>(m_new);
    if (mode != Moments::kRmsprop) {
      v_out[i] = static_cast<state_t>(v_new);
    }
  }
}

template <int VEC, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    preprocess_arcsinh_kernel(const scalar_t* C10_RESTRICT s, scalar_t* C10_RESTRICT out, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / VEC;
  for (int64_t p = first; p < n_packs; p += stride) {
    const Pack<scalar_t, VEC> sp = load_pack<VEC>(s, p);
    Pack<scalar_t, VEC> op;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      op.val[k] = static_cast<scalar_t>(preprocess_arcsinh_element<T>(static_cast<T>(sp.val[k])));
    }
    store_pack<VEC>(out, p, op);
  }
  for (int64_t i = n_packs * VEC + first; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(preprocess_arcsinh_element<T>(static_cast<T>(s[i])));
  }
}

// ---- state update and loss -----------------------------------------------------------------------------

template <int VEC, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_state_kernel(const scalar_t* C10_RESTRICT x, const scalar_t* C10_RESTRICT g,
                        scalar_t* C10_RESTRICT out, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / VEC;
  for (int64_t p = first; p < n_packs; p += stride) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, p);
    const Pack<scalar_t, VEC> gp = load_pack<VEC>(g, p);
    Pack<scalar_t, VEC> op;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      op.val[k] = static_cast<scalar_t>(update_state_element<T>(static_cast<T>(xp.val[k]), static_cast<T>(gp.val[k])));
    }
    store_pack<VEC>(out, p, op);
  }
  for (int64_t i = n_packs * VEC + first; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(update_state_element<T>(static_cast<T>(x[i]), static_cast<T>(g[i])));
  }
}

// x' = x + g and one partial loss sum per block (partial[blockIdx.x]).
template <int VEC, bool kHasW, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_state_loss_kernel(const scalar_t* C10_RESTRICT x, const scalar_t* C10_RESTRICT g,
                             const scalar_t* C10_RESTRICT x_true, const scalar_t* C10_RESTRICT w,
                             scalar_t* C10_RESTRICT out, at::opmath_type<scalar_t>* C10_RESTRICT partial,
                             int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / VEC;
  T acc = T(0);
  for (int64_t p = first; p < n_packs; p += stride) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, p);
    const Pack<scalar_t, VEC> gp = load_pack<VEC>(g, p);
    const Pack<scalar_t, VEC> tp = load_pack<VEC>(x_true, p);
    Pack<scalar_t, VEC> wp;
    if (kHasW) {
      wp = load_pack<VEC>(w, p);
    }
    Pack<scalar_t, VEC> op;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T x_new = update_state_element<T>(static_cast<T>(xp.val[k]), static_cast<T>(gp.val[k]));
      op.val[k] = static_cast<scalar_t>(x_new);
      acc += squared_error_element<T>(x_new, static_cast<T>(tp.val[k]), kHasW ? static_cast<T>(wp.val[k]) : T(1));
    }
    store_pack<VEC>(out, p, op);
  }
  for (int64_t i = n_packs * VEC + first; i < n; i += stride) {
    const T x_new = update_state_element<T>(static_cast<T>(x[i]), static_cast<T>(g[i]));
    out[i] = static_cast<scalar_t>(x_new);
    acc += squared_error_element<T>(x_new, static_cast<T>(x_true[i]), kHasW ? static_cast<T>(w[i]) : T(1));
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = acc;
  }
}

// One block: loss = sum of the partials, in a fixed order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_state_loss_finalize_kernel(const at::opmath_type<scalar_t>* C10_RESTRICT partial, int64_t n_partial,
                                      scalar_t* C10_RESTRICT loss) {
  using T = at::opmath_type<scalar_t>;
  T acc = T(0);
  for (int64_t i = threadIdx.x; i < n_partial; i += blockDim.x) {
    acc += partial[i];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    *loss = static_cast<scalar_t>(acc);
  }
}

template <int VEC, bool kHasW, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_state_loss_backward_kernel(const scalar_t* C10_RESTRICT grad_out,
                                      const scalar_t* C10_RESTRICT grad_loss, const scalar_t* C10_RESTRICT x_new,
                                      const scalar_t* C10_RESTRICT x_true, const scalar_t* C10_RESTRICT w,
                                      scalar_t* C10_RESTRICT grad, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const T gl = static_cast<T>(*grad_loss);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / VEC;
  for (int64_t p = first; p < n_packs; p += stride) {
    const Pack<scalar_t, VEC> gop = load_pack<VEC>(grad_out, p);
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x_new, p);
    const Pack<scalar_t, VEC> tp = load_pack<VEC>(x_true, p);
    Pack<scalar_t, VEC> wp;
    if (kHasW) {
      wp = load_pack<VEC>(w, p);
    }
    Pack<scalar_t, VEC> op;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      op.val[k] = static_cast<scalar_t>(update_state_loss_grad_element<T>(
          static_cast<T>(gop.val[k]), gl, static_cast<T>(xp.val[k]), static_cast<T>(tp.val[k]),
          kHasW ? static_cast<T>(wp.val[k]) : T(1)));
    }
    store_pack<VEC>(grad, p, op);
  }
  for (int64_t i = n_packs * VEC + first; i < n; i += stride) {
    grad[i] = static_cast<scalar_t>(update_state_loss_grad_element<T>(
        static_cast<T>(grad_out[i]), gl, static_cast<T>(x_new[i]), static_cast<T>(x_true[i]),
        kHasW ? static_cast<T>(w[i]) : T(1)));
  }
}

// ---- host side -----------------------------------------------------------------------------------------

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rim_fast::", op, ": the CUDA kernel got ", name, " on ", text(t.device()));
}

// Launches kernel<VEC> when every pointer is aligned to VEC elements of its type, else kernel<1>.
template <typename LaunchVec, typename LaunchScalar>
void launch_vectorized(bool aligned, const LaunchVec& launch_vec, const LaunchScalar& launch_scalar) {
  if (aligned) {
    launch_vec();
  } else {
    launch_scalar();
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Moments mode>
TensorTriple preprocess_moments_cuda(const Tensor& score_, const Tensor& m_, const Tensor& v_, const Tensor& step,
                                     double beta_1, double beta_2, double epsilon, const char* op) {
  check_moments(score_, m_, v_, step, op);
  check_cuda(score_, op, "score");
  const c10::cuda::CUDAGuard guard(score_.device());
  const Tensor score = score_.contiguous(), m = m_.contiguous(), v = v_.contiguous();
  StepArg step_arg{nullptr, 0.0, 0.0};
  Tensor step_device;
  if (step.is_cuda()) {
    step_device = step.to(at::kDouble).contiguous();
    step_arg.device_step = step_device.const_data_ptr<double>();
  } else {
    const double t = step.item<double>();
    step_arg.bc1 = bias_correction(beta_1, t);
    step_arg.bc2 = bias_correction(beta_2, t);
  }
  Tensor out = new_output(score.sizes(), m.options());
  Tensor m_out = new_output(score.sizes(), m.options());
  Tensor v_out = mode == Moments::kRmsprop ? Tensor() : new_output(score.sizes(), v.options());
  const int64_t n = elements_to_write(score.numel());
  if (n == 0) {
    return {out, m_out, v_out};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, score.scalar_type(), "preprocess_moments_cuda", [&] {
    auto run = [&](auto state_tag) {
      using state_t = decltype(state_tag);
      using T = at::opmath_type<state_t>;
      constexpr int kVec = 16 / static_cast<int>(std::max(sizeof(scalar_t), sizeof(state_t)));
      const MomentCoefs<T> c = moment_coefs<T>(beta_1, beta_2, epsilon);
      const scalar_t* sp = score.const_data_ptr<scalar_t>();
      const state_t* mp = m.const_data_ptr<state_t>();
      const state_t* vp = v.const_data_ptr<state_t>();
      state_t* op_ = out.mutable_data_ptr<state_t>();
      state_t* mo = m_out.mutable_data_ptr<state_t>();
      state_t* vo = mode == Moments::kRmsprop ? nullptr : v_out.mutable_data_ptr<state_t>();
      const bool aligned = aligned_for(sp, kVec * sizeof(scalar_t)) && aligned_for(mp, kVec * sizeof(state_t)) &&
                           aligned_for(vp, kVec * sizeof(state_t)) && aligned_for(op_, kVec * sizeof(state_t)) &&
                           aligned_for(mo, kVec * sizeof(state_t)) && aligned_for(vo, kVec * sizeof(state_t));
      launch_vectorized(
          aligned,
          [&] {
            preprocess_moments_kernel<kVec, mode, scalar_t, state_t>
                <<<blocks_for(n / kVec), kThreads, 0, stream>>>(sp, mp, vp, op_, mo, vo, n, c, step_arg, beta_1,
                                                                beta_2);
          },
          [&] {
            preprocess_moments_kernel<1, mode, scalar_t, state_t>
                <<<blocks_for(n), kThreads, 0, stream>>>(sp, mp, vp, op_, mo, vo, n, c, step_arg, beta_1, beta_2);
          });
    };
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
      if (m.scalar_type() != score.scalar_type()) {
        run(float{});
        return;
      }
    }
    run(scalar_t{});
  });
  return {out, m_out, v_out};
}

}  // namespace

TensorTriple preprocess_adam_cuda(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                  double beta_1, double beta_2, double epsilon) {
  return preprocess_moments_cuda<Moments::kAdam>(score, m, v, step, beta_1, beta_2, epsilon, "preprocess_adam");
}

TensorPair preprocess_rmsprop_cuda(const Tensor& score, const Tensor& m, const Tensor& v, const Tensor& step,
                                   double beta_1, double beta_2, double epsilon) {
  auto r = preprocess_moments_cuda<Moments::kRmsprop>(score, m, v, step, beta_1, beta_2, epsilon,
                                                      "preprocess_rmsprop");
  return {std::get<0>(r), std::get<1>(r)};
}

TensorTriple preprocess_rmsprop_fixed_cuda(const Tensor& score, const Tensor& m, const Tensor& v,
                                           const Tensor& step, double beta_1, double beta_2, double epsilon) {
  return preprocess_moments_cuda<Moments::kRmspropFixed>(score, m, v, step, beta_1, beta_2, epsilon,
                                                         "preprocess_rmsprop_fixed");
}

Tensor preprocess_arcsinh_cuda(const Tensor& score_) {
  check_float(score_, "preprocess_arcsinh", "score");
  check_cuda(score_, "preprocess_arcsinh", "score");
  const c10::cuda::CUDAGuard guard(score_.device());
  const Tensor score = score_.contiguous();
  Tensor out = new_output(score.sizes(), score.options());
  const int64_t n = elements_to_write(score.numel());
  if (n == 0) {
    return out;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, score.scalar_type(), "preprocess_arcsinh_cuda", [&] {
    constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
    const scalar_t* sp = score.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    launch_vectorized(
        aligned_for(sp, 16) && aligned_for(op, 16),
        [&] { preprocess_arcsinh_kernel<kVec, scalar_t><<<blocks_for(n / kVec), kThreads, 0, stream>>>(sp, op, n); },
        [&] { preprocess_arcsinh_kernel<1, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(sp, op, n); });
  });
  return out;
}

Tensor update_state_cuda(const Tensor& x_, const Tensor& g_) {
  check_update(x_, g_, nullptr, std::nullopt, "update_state");
  check_cuda(x_, "update_state", "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), g = g_.contiguous();
  Tensor out = new_output(x.sizes(), x.options());
  const int64_t n = elements_to_write(x.numel());
  if (n == 0) {
    return out;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "update_state_cuda", [&] {
    constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    launch_vectorized(
        aligned_for(xp, 16) && aligned_for(gp, 16) && aligned_for(op, 16),
        [&] { update_state_kernel<kVec, scalar_t><<<blocks_for(n / kVec), kThreads, 0, stream>>>(xp, gp, op, n); },
        [&] { update_state_kernel<1, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(xp, gp, op, n); });
  });
  return out;
}

TensorPair update_state_loss_cuda(const Tensor& x_, const Tensor& g_, const Tensor& x_true_,
                                  const std::optional<Tensor>& w_) {
  check_update(x_, g_, &x_true_, w_, "update_state_loss");
  check_cuda(x_, "update_state_loss", "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), g = g_.contiguous(), x_true = x_true_.contiguous();
  const Tensor w = w_.has_value() ? w_->contiguous() : Tensor();
  Tensor out = new_output(x.sizes(), x.options());
  Tensor loss = new_output({}, x.options());
  const int64_t n = elements_to_write(x.numel());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "update_state_loss_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* tp = x_true.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool aligned = aligned_for(xp, 16) && aligned_for(gp, 16) && aligned_for(tp, 16) &&
                         aligned_for(wp, 16) && aligned_for(op, 16);
    const int64_t blocks = aligned ? blocks_for(n / kVec) : blocks_for(n);
    // one partial per block, written by every block (an empty x gives zeros), so no memset is needed
    Tensor partial = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
    T* pp = partial.mutable_data_ptr<T>();
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      if (wp != nullptr) {
        update_state_loss_kernel<V, true, scalar_t><<<blocks, kThreads, 0, stream>>>(xp, gp, tp, wp, op, pp, n);
      } else {
        update_state_loss_kernel<V, false, scalar_t><<<blocks, kThreads, 0, stream>>>(xp, gp, tp, wp, op, pp, n);
      }
    };
    launch_vectorized(
        aligned, [&] { launch(std::integral_constant<int, kVec>{}); },
        [&] { launch(std::integral_constant<int, 1>{}); });
    update_state_loss_finalize_kernel<scalar_t>
        <<<1, kThreads, 0, stream>>>(pp, blocks, loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, loss};
}

Tensor update_state_loss_backward_cuda(const Tensor& grad_out_, const Tensor& grad_loss_, const Tensor& x_new_,
                                       const Tensor& x_true_, const std::optional<Tensor>& w_) {
  check_update_backward(grad_out_, grad_loss_, x_new_, x_true_, w_, "update_state_loss_backward");
  check_cuda(x_new_, "update_state_loss_backward", "x_new");
  const c10::cuda::CUDAGuard guard(x_new_.device());
  const Tensor grad_out = grad_out_.contiguous(), grad_loss = grad_loss_.contiguous();
  const Tensor x_new = x_new_.contiguous(), x_true = x_true_.contiguous();
  const Tensor w = w_.has_value() ? w_->contiguous() : Tensor();
  Tensor grad = new_output(x_new.sizes(), x_new.options());
  const int64_t n = elements_to_write(x_new.numel());
  if (n == 0) {
    return grad;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x_new.scalar_type(), "update_state_loss_backward_cuda", [&] {
        constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
        const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* glp = grad_loss.const_data_ptr<scalar_t>();
        const scalar_t* xp = x_new.const_data_ptr<scalar_t>();
        const scalar_t* tp = x_true.const_data_ptr<scalar_t>();
        const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* op = grad.mutable_data_ptr<scalar_t>();
        const bool aligned = aligned_for(gop, 16) && aligned_for(xp, 16) && aligned_for(tp, 16) &&
                             aligned_for(wp, 16) && aligned_for(op, 16);
        auto launch = [&](auto vec_tag) {
          constexpr int V = decltype(vec_tag)::value;
          const int64_t blocks = blocks_for(n / V);
          if (wp != nullptr) {
            update_state_loss_backward_kernel<V, true, scalar_t>
                <<<blocks, kThreads, 0, stream>>>(gop, glp, xp, tp, wp, op, n);
          } else {
            update_state_loss_backward_kernel<V, false, scalar_t>
                <<<blocks, kThreads, 0, stream>>>(gop, glp, xp, tp, wp, op, n);
          }
        };
        launch_vectorized(
            aligned, [&] { launch(std::integral_constant<int, kVec>{}); },
            [&] { launch(std::integral_constant<int, 1>{}); });
      });
  return grad;
}

}  // namespace rim_fast
