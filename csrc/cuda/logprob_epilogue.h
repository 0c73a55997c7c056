// Row epilogues of the CUDA path, behind a raw-pointer API that needs only the CUDA runtime
// (so logprob_epilogue.cu compiles with plain nvcc; the ATen launcher is logprob_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mio_cuda {

// dtype of hidden / weight / bias. The logits buffer, stats, logp and grad are in the
// accumulation type: double for kFloat64, float otherwise. stats is [rows, 2]: each row's max
// m and log sum exp(z - m), kept apart because m + log-sum in one fp32 number loses ~5e-4 at
// logits of ~1e4.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Row stride, in elements of the parameter dtype, of the dZ that backward_epilogue writes
// over the logits buffer: a 2-byte dZ row fills the first half of its fp32 logits row.
inline int64_t dz_row_stride(int64_t vocab, DType param) {
  return (param == DType::kFloat16 || param == DType::kBFloat16) ? 2 * vocab : vocab;
}

// One block per row of logits [rows, vocab]: z = logits + bias, stats = (max, log-sum),
// logp = (z[label] - max) - log-sum (0 at ignore_index, NaN for a label outside [0, vocab)).
cudaError_t forward_epilogue(const void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                             const void* bias, DType param, int64_t ignore_index, void* logp,
                             void* stats, cudaStream_t stream);

// One block per row: dZ = grad * (onehot(label) - exp((z - max) - log-sum)) from forward's
// stats (one read of the row), written in the parameter dtype over the logits buffer (row
// stride dz_row_stride); rows with a zero grad or an ignored label get dZ = 0.
cudaError_t backward_epilogue(void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                              const void* bias, DType param, int64_t ignore_index,
                              const void* stats, const void* grad, cudaStream_t stream);

}  // namespace mio_cuda
