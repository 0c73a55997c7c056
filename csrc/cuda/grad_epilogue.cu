// CUDA kernel of the single-pass epilogue (see grad_epilogue.h): per row, one sweep for the
// max and sum of exp (online) of the transformed logits, one sweep writing dX over the logits.
#include "grad_epilogue.h"
#include "device_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mio_cuda {
namespace {

// (m, s) <- merge of two (max, sum of exp(z - max)) pairs; -inf maxima carry no mass.
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A om, A os) {
  const A nm = om > m ? om : m;
  if (nm == neg_inf<A>()) return;
  s = (m == neg_inf<A>() ? A(0) : s * exp_acc(m - nm)) + (om == neg_inf<A>() ? A(0) : os * exp_acc(om - nm));
  m = nm;
}

// Block-wide (max, sum) over warps; every thread returns the row's totals.
template <typename A>
__device__ void block_merge(A& m, A& s) {
  __shared__ A sm[32];
  __shared__ A ss[32];
  for (int off = 16; off > 0; off >>= 1)
    merge(m, s, __shfl_xor_sync(kFullMask, m, off), __shfl_xor_sync(kFullMask, s, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    m = lane < n_warps ? sm[lane] : neg_inf<A>();
    s = lane < n_warps ? ss[lane] : A(0);
    for (int off = 16; off > 0; off >>= 1)
      merge(m, s, __shfl_xor_sync(kFullMask, m, off), __shfl_xor_sync(kFullMask, s, off));
    if (lane == 0) { sm[0] = m; ss[0] = s; }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
}

// dX = (onehot - softmax(z)) * dz/dx of row `row` over its own logits row, z = transform(x)
// recomputed per sweep (no extra storage). When TO is narrower than A the first sweep's writes
// land on elements that sweep reads, hence the barrier between its reads and writes; later
// sweeps only overwrite elements read by earlier ones.
template <typename A, typename TO>
__global__ void __launch_bounds__(kThreads)
grad_kernel(A* logits, int64_t vocab, const int64_t* __restrict__ labels, const A* __restrict__ bias, A scale,
            A cap, A* __restrict__ logp) {
  const int64_t row = blockIdx.x;
  const A* z = logits + row * vocab;
  TO* dz = reinterpret_cast<TO*>(logits + row * vocab);
  const int64_t y = labels[row];
  const bool valid = y >= 0 && y < vocab;
  A slope;
  // z[y] is read before the barrier inside block_merge: no thread has written the row yet.
  const A zy = (threadIdx.x == 0 && valid) ? transform(z[y] + (bias != nullptr ? bias[y] : A(0)), scale, cap, &slope)
                                            : A(0);
  A m = neg_inf<A>(), s = A(0);
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const A v = transform(z[j] + (bias != nullptr ? bias[j] : A(0)), scale, cap, &slope);
    if (v > m) {
      s = (m == neg_inf<A>() ? A(0) : s * exp_acc(m - v)) + A(1);
      m = v;
    } else if (m != neg_inf<A>()) {
      s += exp_acc(v - m);
    }
  }
  block_merge(m, s);
  const A log_s = log_acc(s);
  if (threadIdx.x == 0) logp[row] = valid ? (zy - m) - log_s : static_cast<A>(NAN);  // (z - m) - log_s keeps digits
  for (int64_t base = 0; base < vocab; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    A v = A(0);
    if (j < vocab) {
      const A zj = transform(z[j] + (bias != nullptr ? bias[j] : A(0)), scale, cap, &slope);
      v = (-exp_acc((zj - m) - log_s) + (j == y ? A(1) : A(0))) * slope;
    }
    if constexpr (sizeof(TO) < sizeof(A)) __syncthreads();
    if (j < vocab) store(dz + j, v);
  }
}

template <typename A, typename TO>
cudaError_t launch(void* logits, int64_t rows, int64_t vocab, const int64_t* labels, const void* bias, double scale,
                   double cap, void* logp, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  grad_kernel<A, TO><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<A*>(logits), vocab, labels, static_cast<const A*>(bias), static_cast<A>(scale),
      static_cast<A>(cap), static_cast<A*>(logp));
  return cudaGetLastError();
}

}  // namespace

cudaError_t grad_epilogue(void* logits, int64_t rows, int64_t vocab, const int64_t* labels, const void* bias,
                          double scale, double cap, DType acc, DType dz, void* logp, cudaStream_t stream) {
#define MIO_GRAD(A, TO) launch<A, TO>(logits, rows, vocab, labels, bias, scale, cap, logp, stream)
  cudaError_t err = cudaErrorInvalidValue;
  if (acc == DType::kFloat64 && dz == DType::kFloat64) err = MIO_GRAD(double, double);
  if (acc == DType::kFloat32 && dz == DType::kFloat32) err = MIO_GRAD(float, float);
  if (acc == DType::kFloat32 && dz == DType::kBFloat16) err = MIO_GRAD(float, __nv_bfloat16);
  if (acc == DType::kFloat32 && dz == DType::kFloat16) err = MIO_GRAD(float, __half);
#undef MIO_GRAD
  return err;
}

}  // namespace mio_cuda
