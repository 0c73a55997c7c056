// CUDA row epilogues of the native backend (see logprob_epilogue.h). One block per row of
// the chunk's logits; the GEMMs around them are cuBLAS calls made by the ATen launcher.
#include "logprob_epilogue.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mio_cuda {
namespace {

constexpr int kThreads = 512;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// Merge two (max, sum of exp(z - max)) pairs; -inf maxima carry no mass.
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A om, A os) {
  const A nm = om > m ? om : m;
  if (nm == neg_inf<A>()) return;  // both empty
  s = (m == neg_inf<A>() ? A(0) : s * exp_acc(m - nm)) + (om == neg_inf<A>() ? A(0) : os * exp_acc(om - nm));
  m = nm;
}

// Block-wide (max, sumexp) reduction; every thread returns the row's totals.
template <typename A>
__device__ void block_max_sum(A& m, A& s) {
  __shared__ A sm[32];
  __shared__ A ss[32];
  for (int off = 16; off > 0; off >>= 1) merge(m, s, __shfl_xor_sync(kFullMask, m, off), __shfl_xor_sync(kFullMask, s, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    m = lane < n_warps ? sm[lane] : neg_inf<A>();
    s = lane < n_warps ? ss[lane] : A(0);
    for (int off = 16; off > 0; off >>= 1) merge(m, s, __shfl_xor_sync(kFullMask, m, off), __shfl_xor_sync(kFullMask, s, off));
    if (lane == 0) { sm[0] = m; ss[0] = s; }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
}

template <typename A, typename TB>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const A* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
               const TB* __restrict__ bias, int64_t ignore_index, A* __restrict__ logp,
               A* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  const A* z = logits + row * vocab;
  // Online max / sum-exp: one read of the row.
  A m = neg_inf<A>(), s = A(0);
  bool has_nan = false;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const A v = z[j] + (bias != nullptr ? static_cast<A>(to_acc(bias[j])) : A(0));
    has_nan |= v != v;
    if (v > m) {
      s = (m == neg_inf<A>() ? A(0) : s * exp_acc(m - v)) + A(1);
      m = v;
    } else if (m != neg_inf<A>()) {
      s += exp_acc(v - m);
    }
  }
  has_nan = __syncthreads_or(has_nan);
  block_max_sum(m, s);
  if (threadIdx.x == 0) {
    const A log_s = m == neg_inf<A>() ? A(0) : log_acc(s);
    stats[2 * row] = has_nan ? static_cast<A>(NAN) : m;  // NaN logits give NaN, as in torch
    stats[2 * row + 1] = log_s;
    const int64_t y = labels[row];
    A out;
    if (y == ignore_index) {
      out = A(0);
    } else if (has_nan) {
      out = static_cast<A>(NAN);
    } else if (y < 0 || y >= vocab) {
      out = static_cast<A>(NAN);  // callers validate labels; poison rather than read out of bounds
    } else {
      // (z - m) - log_s keeps the digits that m + log_s would lose for large logits
      out = (z[y] + (bias != nullptr ? static_cast<A>(to_acc(bias[y])) : A(0)) - m) - log_s;
    }
    logp[row] = out;
  }
}

// dZ of row `row` over its own logits row. When TO is narrower than A the writes of one
// sweep land on elements read in the same sweep (the first one only), hence the barrier
// between reading and writing; later sweeps read past everything written so far.
template <typename A, typename TB, typename TO>
__global__ void __launch_bounds__(kThreads)
backward_kernel(A* logits, int64_t vocab, const int64_t* __restrict__ labels,
                const TB* __restrict__ bias, int64_t ignore_index,
                const A* __restrict__ stats, const A* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const A* z = logits + row * vocab;
  TO* dz = reinterpret_cast<TO*>(logits + row * vocab);
  const int64_t y = labels[row];
  const A g = grad[row];
  const bool active = y != ignore_index && y >= 0 && y < vocab && g != A(0);
  const A m = stats[2 * row], log_s = stats[2 * row + 1];
  for (int64_t base = 0; base < vocab; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    A v = A(0);
    if (active && j < vocab) {
      const A x = z[j] + (bias != nullptr ? static_cast<A>(to_acc(bias[j])) : A(0));
      v = -g * exp_acc((x - m) - log_s);
      if (j == y) v += g;
    }
    if constexpr (sizeof(TO) < sizeof(A)) __syncthreads();
    if (j < vocab) store(dz + j, v);
  }
}

template <typename A, typename TB>
cudaError_t launch_forward(const void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                           const void* bias, int64_t ignore_index, void* logp, void* stats,
                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  forward_kernel<A, TB><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const A*>(logits), vocab, labels, static_cast<const TB*>(bias), ignore_index,
      static_cast<A*>(logp), static_cast<A*>(stats));
  return cudaGetLastError();
}

template <typename A, typename T>
cudaError_t launch_backward(void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                            const void* bias, int64_t ignore_index, const void* stats,
                            const void* grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  backward_kernel<A, T, T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<A*>(logits), vocab, labels, static_cast<const T*>(bias), ignore_index,
      static_cast<const A*>(stats), static_cast<const A*>(grad));
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward_epilogue(const void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                             const void* bias, DType param, int64_t ignore_index, void* logp,
                             void* stats, cudaStream_t stream) {
  switch (param) {
    case DType::kFloat32: return launch_forward<float, float>(logits, rows, vocab, labels, bias, ignore_index, logp, stats, stream);
    case DType::kFloat16: return launch_forward<float, __half>(logits, rows, vocab, labels, bias, ignore_index, logp, stats, stream);
    case DType::kBFloat16: return launch_forward<float, __nv_bfloat16>(logits, rows, vocab, labels, bias, ignore_index, logp, stats, stream);
    case DType::kFloat64: return launch_forward<double, double>(logits, rows, vocab, labels, bias, ignore_index, logp, stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward_epilogue(void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                              const void* bias, DType param, int64_t ignore_index,
                              const void* stats, const void* grad, cudaStream_t stream) {
  switch (param) {
    case DType::kFloat32: return launch_backward<float, float>(logits, rows, vocab, labels, bias, ignore_index, stats, grad, stream);
    case DType::kFloat16: return launch_backward<float, __half>(logits, rows, vocab, labels, bias, ignore_index, stats, grad, stream);
    case DType::kBFloat16: return launch_backward<float, __nv_bfloat16>(logits, rows, vocab, labels, bias, ignore_index, stats, grad, stream);
    case DType::kFloat64: return launch_backward<double, double>(logits, rows, vocab, labels, bias, ignore_index, stats, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mio_cuda
