// CUDA row epilogues of the native backend (see logprob_epilogue.h). One block per row of
// the chunk's logits; the GEMMs around them are cuBLAS calls made by the ATen launcher.
#include "logprob_epilogue.h"
#include "device_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mio_cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Merge two (max m, sum exp(z - m), moment sum exp(z - m) (z - m)) triples; -inf maxima carry
// no mass. The moment (for the entropy) is moved to the new max as exp(m - nm) (w + (m - nm) s).
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A& w, A om, A os, A ow) {
  const A nm = om > m ? om : m;
  if (nm == neg_inf<A>()) return;  // both empty
  const A a = m == neg_inf<A>() ? A(0) : exp_acc(m - nm), b = om == neg_inf<A>() ? A(0) : exp_acc(om - nm);
  w = (a == A(0) ? A(0) : a * (w + (m - nm) * s)) + (b == A(0) ? A(0) : b * (ow + (om - nm) * os));
  s = a * s + b * os;
  m = nm;
}

template <typename A>
__device__ __forceinline__ void warp_merge(A& m, A& s, A& w) {
  for (int off = 16; off > 0; off >>= 1)
    merge(m, s, w, __shfl_xor_sync(kFullMask, m, off), __shfl_xor_sync(kFullMask, s, off),
          __shfl_xor_sync(kFullMask, w, off));
}

// Block-wide (max, sumexp, moment) reduction; every thread returns the row's totals.
template <typename A>
__device__ void block_max_sum(A& m, A& s, A& w) {
  __shared__ A sm[32];
  __shared__ A ss[32];
  __shared__ A sw[32];
  warp_merge(m, s, w);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; sw[warp] = w; }
  __syncthreads();
  if (warp == 0) {
    m = lane < n_warps ? sm[lane] : neg_inf<A>();
    s = lane < n_warps ? ss[lane] : A(0);
    w = lane < n_warps ? sw[lane] : A(0);
    warp_merge(m, s, w);
    if (lane == 0) { sm[0] = m; ss[0] = s; sw[0] = w; }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
  w = sw[0];
}

template <typename A, typename TB, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const A* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
               const TB* __restrict__ bias, int64_t ignore_index, A scale, A cap, A* __restrict__ logp,
               A* __restrict__ stats) {
  constexpr int kCols = kEntropy ? 3 : 2;
  const int64_t row = blockIdx.x;
  const A* z = logits + row * vocab;
  A slope;
  // Online max / sum-exp (/ moment): one read of the row.
  A m = neg_inf<A>(), s = A(0), w = A(0);
  bool has_nan = false;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const A v = transform(z[j] + (bias != nullptr ? static_cast<A>(to_acc(bias[j])) : A(0)), scale, cap, &slope);
    has_nan |= v != v;
    if (v > m) {
      if constexpr (kEntropy) w = m == neg_inf<A>() ? A(0) : exp_acc(m - v) * (w + (m - v) * s);
      s = (m == neg_inf<A>() ? A(0) : s * exp_acc(m - v)) + A(1);
      m = v;
    } else if (m != neg_inf<A>()) {
      const A e = exp_acc(v - m);
      s += e;
      if constexpr (kEntropy) w += e * (v - m);
    }
  }
  has_nan = __syncthreads_or(has_nan);
  block_max_sum(m, s, w);
  if (threadIdx.x == 0) {
    const A log_s = m == neg_inf<A>() ? A(0) : log_acc(s);
    const int64_t y = labels[row];
    stats[kCols * row] = has_nan ? static_cast<A>(NAN) : m;  // NaN logits give NaN, as in torch
    stats[kCols * row + 1] = log_s;
    if constexpr (kEntropy) stats[kCols * row + 2] = y == ignore_index ? A(0) : log_s - w / s;
    A out;
    if (y == ignore_index) {
      out = A(0);
    } else if (has_nan) {
      out = static_cast<A>(NAN);
    } else if (y < 0 || y >= vocab) {
      out = static_cast<A>(NAN);  // callers validate labels; poison rather than read out of bounds
    } else {
      // (z - m) - log_s keeps the digits that m + log_s would lose for large logits
      out = (transform(z[y] + (bias != nullptr ? static_cast<A>(to_acc(bias[y])) : A(0)), scale, cap, &slope) - m) - log_s;
    }
    logp[row] = out;
  }
}

// dX of row `row` over its own logits row: dz/dx * (g (onehot - p) - ge p ((z - m) - mu)), mu =
// E_p[z - m] = log-sum - entropy (stats' third column; ge == nullptr: no entropy term). When TO
// is narrower than A the writes of one sweep land on elements read in the same sweep (the first
// one only), hence the barrier between reading and writing; later sweeps read past everything
// written so far.
template <typename A, typename TB, typename TO>
__global__ void __launch_bounds__(kThreads)
backward_kernel(A* logits, int64_t vocab, const int64_t* __restrict__ labels,
                const TB* __restrict__ bias, int64_t ignore_index, A scale, A cap,
                const A* __restrict__ stats, int stats_cols, const A* __restrict__ grad,
                const A* __restrict__ grad_entropy) {
  const int64_t row = blockIdx.x;
  const A* z = logits + row * vocab;
  TO* dz = reinterpret_cast<TO*>(logits + row * vocab);
  const int64_t y = labels[row];
  const A g = grad[row], ge = grad_entropy != nullptr ? grad_entropy[row] : A(0);
  const bool active = y != ignore_index && y >= 0 && y < vocab && (g != A(0) || ge != A(0));
  const A m = stats[stats_cols * row], log_s = stats[stats_cols * row + 1];
  const A mu = ge != A(0) ? log_s - stats[stats_cols * row + 2] : A(0);
  for (int64_t base = 0; base < vocab; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    A v = A(0);
    if (active && j < vocab) {
      A slope;
      const A x = transform(z[j] + (bias != nullptr ? static_cast<A>(to_acc(bias[j])) : A(0)), scale, cap, &slope);
      const A p = exp_acc((x - m) - log_s);
      v = -p * (g + ge * ((x - m) - mu));
      if (j == y) v += g;
      v *= slope;
    }
    if constexpr (sizeof(TO) < sizeof(A)) __syncthreads();
    if (j < vocab) store(dz + j, v);
  }
}

template <typename A, typename TB>
cudaError_t launch_forward(const void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                           const void* bias, int64_t ignore_index, double scale, double cap, bool with_entropy,
                           void* logp, void* stats, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  auto kernel = with_entropy ? forward_kernel<A, TB, true> : forward_kernel<A, TB, false>;
  kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const A*>(logits), vocab, labels, static_cast<const TB*>(bias), ignore_index,
      static_cast<A>(scale), static_cast<A>(cap), static_cast<A*>(logp), static_cast<A*>(stats));
  return cudaGetLastError();
}

template <typename A, typename T>
cudaError_t launch_backward(void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                            const void* bias, int64_t ignore_index, double scale, double cap, const void* stats,
                            int stats_cols, const void* grad, const void* grad_entropy, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  backward_kernel<A, T, T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<A*>(logits), vocab, labels, static_cast<const T*>(bias), ignore_index, static_cast<A>(scale),
      static_cast<A>(cap), static_cast<const A*>(stats), stats_cols, static_cast<const A*>(grad),
      static_cast<const A*>(grad_entropy));
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward_epilogue(const void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                             const void* bias, DType param, int64_t ignore_index, double scale, double cap,
                             bool with_entropy, void* logp, void* stats, cudaStream_t stream) {
#define MIO_FORWARD(A, TB) \
  launch_forward<A, TB>(logits, rows, vocab, labels, bias, ignore_index, scale, cap, with_entropy, logp, stats, stream)
  switch (param) {
    case DType::kFloat32: return MIO_FORWARD(float, float);
    case DType::kFloat16: return MIO_FORWARD(float, __half);
    case DType::kBFloat16: return MIO_FORWARD(float, __nv_bfloat16);
    case DType::kFloat64: return MIO_FORWARD(double, double);
  }
#undef MIO_FORWARD
  return cudaErrorInvalidValue;
}

cudaError_t backward_epilogue(void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                              const void* bias, DType param, int64_t ignore_index, double scale, double cap,
                              const void* stats, int stats_cols, const void* grad, const void* grad_entropy,
                              cudaStream_t stream) {
#define MIO_BACKWARD(A, T)                                                                              \
  launch_backward<A, T>(logits, rows, vocab, labels, bias, ignore_index, scale, cap, stats, stats_cols, grad, \
                        grad_entropy, stream)
  switch (param) {
    case DType::kFloat32: return MIO_BACKWARD(float, float);
    case DType::kFloat16: return MIO_BACKWARD(float, __half);
    case DType::kBFloat16: return MIO_BACKWARD(float, __nv_bfloat16);
    case DType::kFloat64: return MIO_BACKWARD(double, double);
  }
#undef MIO_BACKWARD
  return cudaErrorInvalidValue;
}

}  // namespace mio_cuda
