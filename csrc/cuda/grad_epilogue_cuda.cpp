// CUDA kernel of the op mio_native::grad_epilogue (declared in ../grad_epilogue.cpp):
// checks, then the kernel of grad_epilogue.cu on the current stream. No host synchronisation.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "grad_epilogue.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace mio {
namespace {

mio_cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return mio_cuda::DType::kFloat32;
    case at::kHalf: return mio_cuda::DType::kFloat16;
    case at::kBFloat16: return mio_cuda::DType::kBFloat16;
    case at::kDouble: return mio_cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "grad_epilogue: unsupported dtype ", t);
  }
}

// logits [n, V] fp32/fp64 (bias not yet added), labels [n] int64, bias [V] | None in logits'
// dtype, transform (scale, cap) -> logp [n] of z = transform(logits + bias); dX = (onehot -
// softmax(z)) * dz/dx over the logits in dz_dtype (logits' dtype, or bf16/fp16 for fp32 logits:
// the first half of each fp32 row).
at::Tensor grad_epilogue_cuda(at::Tensor logits, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                              at::ScalarType dz_dtype, double scale, double cap) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "grad_epilogue: logits must be a contiguous [n, V] tensor");
  const at::ScalarType acc = logits.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "grad_epilogue: logits must be float32 or float64, got ", acc);
  TORCH_CHECK(dz_dtype == acc || (acc == at::kFloat && (dz_dtype == at::kBFloat16 || dz_dtype == at::kHalf)),
              "grad_epilogue: dz_dtype must be the logits' dtype, or bfloat16/float16 for float32 logits; got ",
              dz_dtype);
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous() && labels.device() == logits.device(),
              "grad_epilogue: labels must be a contiguous int64 [n] tensor on the logits' device");
  const bool has_bias = bias && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->scalar_type() == acc && bias->is_contiguous() &&
                    bias->device() == logits.device(),
                "grad_epilogue: bias must be a contiguous [V] tensor in the logits' dtype and device");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor logp = at::empty({n}, logits.options());
  C10_CUDA_CHECK(mio_cuda::grad_epilogue(logits.data_ptr(), n, V, labels.data_ptr<int64_t>(),
                                         has_bias ? bias->data_ptr() : nullptr, scale, cap, cuda_dtype(acc),
                                         cuda_dtype(dz_dtype), logp.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return logp;
}

}  // namespace
}  // namespace mio

TORCH_LIBRARY_IMPL(mio_native, CUDA, m) { m.impl("grad_epilogue", &mio::grad_epilogue_cuda); }
