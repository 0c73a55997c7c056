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

// The logit transform: z = cap * tanh(scale * (logits + bias)) when cap > 0, else
// scale * (logits + bias).

// One block per row of logits [rows, vocab]: z = transform, stats = (max, log-sum[, entropy:
// with_entropy, 0 at ignore_index]) ([rows, 3] with the entropy, else [rows, 2]),
// logp = (z[label] - max) - log-sum (0 at ignore_index, NaN for a label outside [0, vocab)).
cudaError_t forward_epilogue(const void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                             const void* bias, DType param, int64_t ignore_index, double scale, double cap,
                             bool with_entropy, void* logp, void* stats, cudaStream_t stream);

// One block per row: dX = dz/dx * (grad * (onehot(label) - p) - grad_entropy * p * (z - E_p[z])),
// p = exp((z - max) - log-sum), from forward's stats ([rows, stats_cols]; the entropy column is
// read only with grad_entropy, which may be nullptr), one read of the row, written in the
// parameter dtype over the logits buffer (row stride dz_row_stride); rows with zero grads or an
// ignored label get dX = 0.
cudaError_t backward_epilogue(void* logits, int64_t rows, int64_t vocab, const int64_t* labels,
                              const void* bias, DType param, int64_t ignore_index, double scale, double cap,
                              const void* stats, int stats_cols, const void* grad, const void* grad_entropy,
                              cudaStream_t stream);

}  // namespace mio_cuda
