// The single-pass epilogue (mio_native::grad_epilogue): over one chunk of raw logits rows x
// (bias added), with z = transform(x) (logprob.h),
//   logp = log softmax(z)[y]   and, in place,   x <- (onehot(y) - softmax(z)) * dz/dx
// i.e. the unscaled dlogp/dx of each row. The caller scales rows later (per-sequence
// coefficients are only known once the sequence is scored); see
// mio_kernels/backends/single_pass.py.
#pragma once

#include <cstdint>

#include "logprob.h"  // Transform

namespace mio {

// One row (defined beside the other row kernels in logprob_cpu.cpp, which share its exp and
// transform): returns log softmax(z)[y] and leaves (onehot(y) - softmax(z)) * dz/dx in z.
float softmax_grad_row(float* z, int64_t vocab, int64_t y, const Transform& tf);
double softmax_grad_row(double* z, int64_t vocab, int64_t y, const Transform& tf);

}  // namespace mio
