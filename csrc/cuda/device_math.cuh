// Device helpers shared by the CUDA epilogues: accumulation-precision exp/log, stores into the
// logits' dtype, -inf (a row or split that has seen no logit yet) and the logit transform.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mio_cuda {

constexpr int kThreads = 512;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// The logit transform (uniform branch): z = cap * tanh(scale * x) when cap > 0, else scale * x.
// With e = exp(-2|u|), u = scale * x: tanh(u) = sign(u) (1 - e) / (1 + e) and dz/dx =
// scale * cap * 4e / (1 + e)^2, exact where tanh saturates. Returns z, writes dz/dx to *slope.
// One reciprocal, not two divisions: fp64 division is a subroutine call, whose ABI made the
// single-pass kernel spill on sm_90.
template <typename A>
__device__ __forceinline__ A transform(A x, A scale, A cap, A* slope) {
  if (cap > A(0)) {
    const A u = scale * x, e = exp_acc(A(-2) * fabs(u)), r = A(1) / (A(1) + e);
    *slope = A(4) * scale * cap * e * r * r;
    return cap * copysign((A(1) - e) * r, u);
  }
  *slope = scale;
  return scale * x;
}

}  // namespace mio_cuda
