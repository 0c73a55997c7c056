// The single-pass epilogue (mio_native::grad_epilogue): over one chunk of logits rows,
//   logp = log softmax(z)[y]   and, in place,   z <- onehot(y) - softmax(z)
// i.e. the unscaled dlogp/dz of each row. The caller scales rows later (per-sequence
// coefficients are only known once the sequence is scored); see
// mio_kernels/backends/single_pass.py.
#pragma once

#include <cstdint>

namespace mio {

// One row (defined beside the other row kernels in logprob_cpu.cpp, which share its exp):
// returns log softmax(z)[y] and leaves onehot(y) - softmax(z) in z.
float softmax_grad_row(float* z, int64_t vocab, int64_t y);
double softmax_grad_row(double* z, int64_t vocab, int64_t y);

}  // namespace mio
