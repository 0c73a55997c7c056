// CUDA path: the CPU path's chunk loop with cuBLAS GEMMs through ATen and the row
// epilogues of logprob_epilogue.cu. No host synchronisation: rows with a zero gradient are
// zeroed by the epilogue instead of being skipped.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers: a much faster build
#include "../logprob.h"
#include "logprob_epilogue.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace mio {
namespace {

mio_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mio_cuda::DType::kFloat32;
    case at::kHalf: return mio_cuda::DType::kFloat16;
    case at::kBFloat16: return mio_cuda::DType::kBFloat16;
    case at::kDouble: return mio_cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

bool is_half_like(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Z = Hc @ W^T into the accumulation-dtype buffer (fp32 output for fp16/bf16 operands).
void chunk_logits(at::Tensor& Z, const at::Tensor& Hc, const at::Tensor& weight) {
  if (is_half_like(weight))
    at::mm_out(Z, Hc, weight.t(), at::kFloat);
  else
    at::mm_out(Z, Hc, weight.t());
}

const void* bias_ptr(const OptTensor& bias) {
  return bias && bias->defined() ? bias->data_ptr() : nullptr;
}

// Address of row r0 of a per-token tensor ([N] or [N, cols]); nullptr for an undefined one.
const void* rows_ptr(const at::Tensor& t, int64_t r0) {
  return t.defined() ? t.narrow(0, r0, 1).data_ptr() : nullptr;
}

// dW_acc += dZ^T @ Hc. 16-bit dZ (slab defined) goes through fp32 slabs of dW rows: ATen's
// addmm cannot accumulate an fp32 output from 16-bit operands.
void accumulate_weight_grad(at::Tensor& dW_acc, at::Tensor& slab, const at::Tensor& dZ, const at::Tensor& Hc) {
  if (!slab.defined()) {
    dW_acc.addmm_(dZ.t(), Hc);
    return;
  }
  const int64_t V = dW_acc.size(0), slab_rows = slab.size(0);
  for (int64_t v0 = 0; v0 < V; v0 += slab_rows) {
    const int64_t vs = std::min(slab_rows, V - v0);
    at::Tensor part = slab.narrow(0, 0, vs);
    at::mm_out(part, dZ.narrow(1, v0, vs).t(), Hc, at::kFloat);
    dW_acc.narrow(0, v0, vs).add_(part);
  }
}

// The fp32 slab of dW rows that accumulate_weight_grad needs for 16-bit parameters, within the
// chunk budget; adds it and the fp32 dW (db) accumulators to *workspace_bytes.
at::Tensor weight_grad_slab(const at::Tensor& weight, bool has_bias, int64_t budget_bytes,
                            int64_t* workspace_bytes) {
  constexpr int64_t f32 = sizeof(float);
  const int64_t V = weight.size(0), H = weight.size(1);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(V, budget_bytes / std::max<int64_t>(1, H * f32)));
  at::Tensor slab = at::empty({rows, H}, weight.options().dtype(at::kFloat));
  *workspace_bytes += (weight.numel() + slab.numel() + (has_bias ? V : 0)) * f32;
  return slab;
}

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& labels, const OptTensor& bias,
                                     int64_t ignore_index, const Transform& tf, bool with_entropy,
                                     int64_t budget_bytes) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(acc));
  at::Tensor logp = at::empty({N}, hidden.options().dtype(acc));
  at::Tensor stats = at::empty({N, with_entropy ? 3 : 2}, hidden.options().dtype(acc));
  WorkspaceStats ws;
  ws.chunk_rows = chunk_rows_for(budget_bytes, V, elem, N);
  at::Tensor buf = at::empty({ws.chunk_rows, V}, hidden.options().dtype(acc));
  ws.logits_bytes = ws.workspace_bytes = buf.numel() * elem;
  for (int64_t r0 = 0; r0 < N; r0 += ws.chunk_rows) {
    const int64_t n = std::min(ws.chunk_rows, N - r0);
    at::Tensor Z = buf.narrow(0, 0, n);
    chunk_logits(Z, hidden.narrow(0, r0, n), weight);
    C10_CUDA_CHECK(mio_cuda::forward_epilogue(
        Z.data_ptr(), n, V, labels.data_ptr<int64_t>() + r0, bias_ptr(bias), dtype_of(weight), ignore_index,
        tf.scale, tf.cap, with_entropy, logp.narrow(0, r0, n).data_ptr(), stats.narrow(0, r0, n).data_ptr(), stream));
    ++ws.num_chunks;
  }
  last_stats() = ws;
  return {logp, stats};
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& labels, const OptTensor& bias,
                                      const at::Tensor& stats_in, const at::Tensor& grad_in,
                                      const OptTensor& grad_entropy_in, int64_t ignore_index,
                                      const Transform& tf, bool need_dh, bool need_dw, int64_t budget_bytes) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(acc));
  const bool has_bias = bias && bias->defined();
  const bool narrow_dz = is_half_like(weight);
  WorkspaceStats ws;
  at::Tensor dH, dW, db;
  if (!need_dh && !need_dw) {
    last_stats() = ws;
    return {dH, dW, db};
  }
  const at::Tensor stats = stats_in.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  const at::Tensor grad_entropy = grad_entropy_in ? grad_entropy_in->to(acc).contiguous() : at::Tensor();
  if (need_dh) dH = at::empty_like(hidden);  // every row is written, zero-gradient rows with 0
  at::Tensor dW_acc, db_acc, slab;
  if (need_dw) {
    dW_acc = at::zeros(weight.sizes(), weight.options().dtype(acc));
    if (has_bias) db_acc = at::zeros({V}, weight.options().dtype(acc));
    if (narrow_dz) slab = weight_grad_slab(weight, has_bias, budget_bytes, &ws.workspace_bytes);
  }
  ws.chunk_rows = chunk_rows_for(budget_bytes, V, elem, N);
  at::Tensor buf = at::empty({ws.chunk_rows, V}, hidden.options().dtype(acc));
  ws.logits_bytes = buf.numel() * elem;
  ws.workspace_bytes += ws.logits_bytes;
  for (int64_t r0 = 0; r0 < N; r0 += ws.chunk_rows) {
    const int64_t n = std::min(ws.chunk_rows, N - r0);
    const at::Tensor Hc = hidden.narrow(0, r0, n);
    at::Tensor Z = buf.narrow(0, 0, n);
    chunk_logits(Z, Hc, weight);
    C10_CUDA_CHECK(mio_cuda::backward_epilogue(
        Z.data_ptr(), n, V, labels.data_ptr<int64_t>() + r0, bias_ptr(bias), dtype_of(weight), ignore_index,
        tf.scale, tf.cap, rows_ptr(stats, r0), static_cast<int>(stats.size(1)), rows_ptr(grad, r0),
        rows_ptr(grad_entropy, r0), stream));
    // dZ [n, V] in the parameter dtype; a 16-bit row sits in the first half of its fp32 row.
    const at::Tensor dZ = narrow_dz ? Z.view(weight.scalar_type()).narrow(1, 0, V) : Z;
    if (need_dh) {
      at::Tensor out = dH.narrow(0, r0, n);
      at::mm_out(out, dZ, weight);
    }
    if (need_dw) {
      accumulate_weight_grad(dW_acc, slab, dZ, Hc);
      if (has_bias) db_acc.add_(at::sum(dZ, {0}, false, acc));
    }
    ++ws.num_chunks;
  }
  if (need_dw) {
    dW = dW_acc.scalar_type() == weight.scalar_type() ? dW_acc : dW_acc.to(weight.scalar_type());
    if (has_bias) db = db_acc.scalar_type() == bias->scalar_type() ? db_acc : db_acc.to(bias->scalar_type());
  }
  last_stats() = ws;
  return {dH, dW, db};
}

}  // namespace mio
