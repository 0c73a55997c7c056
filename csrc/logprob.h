// Native backend of the fused LM-head log-prob op (mio_kernels._C).
//
//   forward:  X = hidden @ weight^T (+ bias), Z = transform(X), lse = logsumexp(Z, -1),
//             logp = Z[label] - lse, and optionally the entropy H = lse - sum_j p_j Z_j
//   backward: dZ = g * (onehot(label) - p) - gH * p * (Z - E_p[Z]), dX = dZ * dZ/dX,
//             dH = dX @ W, dW = dX^T @ H, db = sum_t dX          (p = softmax(Z))
// transform: Z = cap * tanh(scale * X) when cap > 0, else scale * X (mio_kernels/transform.py).
//
// Both walk the tokens in chunks of rows whose logits fit a byte budget, so the extra
// memory is O(chunk_rows * V + V * H) and never O(N * V).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mio {

// What the last call in this process allocated (for tests and benchmarks).
struct WorkspaceStats {
  int64_t chunk_rows = 0;       // token rows per chunk
  int64_t num_chunks = 0;       // chunks computed
  int64_t rows_skipped = 0;     // backward: rows with zero gradient, never recomputed
  int64_t logits_bytes = 0;     // the chunk logits buffer (the budgeted temporary)
  int64_t workspace_bytes = 0;  // every temporary the call allocated, summed (>= its peak)
};

WorkspaceStats& last_stats();

// Rows per chunk: as many as fit `budget_bytes` of logits, at least 1, at most `n_rows`.
int64_t chunk_rows_for(int64_t budget_bytes, int64_t vocab, int64_t elem_size, int64_t n_rows);

using OptTensor = std::optional<at::Tensor>;

// The logit transform: z = cap * tanh(scale * x) when cap > 0, else scale * x.
struct Transform {
  double scale = 1.0;
  double cap = 0.0;
  bool identity() const { return cap == 0.0 && scale == 1.0; }
};

// Returns {logp [N], stats [N, 2 or 3]} in the accumulation dtype (fp64 for fp64 inputs, else
// fp32); stats holds each row's max m and log sum exp(z - m) apart (m + log-sum in one fp32
// number loses ~5e-4 at logits of ~1e4), and with_entropy the row's entropy as a third column.
std::vector<at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                    const at::Tensor& labels, const OptTensor& bias,
                                    int64_t ignore_index, const Transform& tf, bool with_entropy,
                                    int64_t budget_bytes);

// Returns {dH | undefined, dW | undefined, db | undefined} in the parameters' dtypes, the
// gradients of sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * H[t] when given).
// The CPU path recomputes each row's statistics (cheap next to the GEMMs) instead of
// reading `stats`; the CUDA path reads them (the entropy from stats' third column).
std::vector<at::Tensor> backward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& labels, const OptTensor& bias,
                                     const at::Tensor& stats, const at::Tensor& grad_logp,
                                     const OptTensor& grad_entropy, int64_t ignore_index,
                                     const Transform& tf, bool need_dh, bool need_dw,
                                     int64_t budget_bytes);

// Z [n, V] = Hc [n, H] @ W^T (+ b [V] when defined), CPU, all in one dtype (fp32 or fp64): the
// logits GEMM of every CPU pass (recompute and single pass).
void chunk_logits(at::Tensor& Z, const at::Tensor& Hc, const at::Tensor& Wa, const at::Tensor& ba);

#ifdef MIO_WITH_CUDA
std::vector<at::Tensor> forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& labels, const OptTensor& bias,
                                     int64_t ignore_index, const Transform& tf, bool with_entropy,
                                     int64_t budget_bytes);

std::vector<at::Tensor> backward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& labels, const OptTensor& bias,
                                      const at::Tensor& stats, const at::Tensor& grad_logp,
                                      const OptTensor& grad_entropy, int64_t ignore_index,
                                      const Transform& tf, bool need_dh, bool need_dw,
                                      int64_t budget_bytes);
#endif

}  // namespace mio
