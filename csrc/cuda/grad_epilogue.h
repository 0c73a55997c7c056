// The single-pass epilogue on CUDA (raw-pointer API on the CUDA runtime only, so
// grad_epilogue.cu compiles with plain nvcc; the op is registered by grad_epilogue_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "logprob_epilogue.h"  // DType

namespace mio_cuda {

// One block per row of raw logits x [rows, vocab] (acc: kFloat32 or kFloat64; bias [vocab] | null
// in acc's type, added on read), z = cap * tanh(scale * x) when cap > 0, else scale * x:
// logp[row] = log softmax(z)[label] (NaN for a label outside [0, vocab)), and over the same row,
// in dz's type (acc's, or kBFloat16 / kFloat16 for fp32 logits: the first half of each row, row
// stride dz_row_stride), dX = (onehot(label) - softmax(z)) * dz/dx.
cudaError_t grad_epilogue(void* logits, int64_t rows, int64_t vocab, const int64_t* labels, const void* bias,
                          double scale, double cap, DType acc, DType dz, void* logp, cudaStream_t stream);

}  // namespace mio_cuda
