// The op mio_native::grad_epilogue and its CPU kernel (the CUDA kernel is registered by
// cuda/grad_epilogue_cuda.cpp). Registered through the dispatcher, so Python reaches it as
// torch.ops.mio_native.grad_epilogue once mio_kernels._C is loaded.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "grad_epilogue.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace mio {
namespace {

// Rows per parallel task: at least 32k logits per thread (as in the other CPU epilogues).
int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, V)); }

template <typename acc_t>
void grad_rows(acc_t* Z, int64_t n, int64_t V, const int64_t* labels, const acc_t* bias, const Transform& tf,
               acc_t* logp) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* z = Z + i * V;
      if (bias != nullptr)
        for (int64_t j = 0; j < V; ++j) z[j] += bias[j];
      logp[i] = softmax_grad_row(z, V, labels[i], tf);
    }
  });
}

// logits [n, V] fp32/fp64 (bias not yet added), labels [n] int64 in [0, V), bias [V] | None in
// logits' dtype, transform (scale, cap) -> logp [n] of z = transform(logits + bias); logits become
// (onehot(labels) - softmax(z)) * dz/dx. dz_dtype must be logits' dtype on CPU (the CPU path
// computes in fp32 or fp64).
at::Tensor grad_epilogue_cpu(at::Tensor logits, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                             at::ScalarType dz_dtype, double scale, double cap) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "grad_epilogue: logits must be a contiguous [n, V] tensor");
  const at::ScalarType acc = logits.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "grad_epilogue: logits must be float32 or float64 on CPU, got ",
              acc);
  TORCH_CHECK(dz_dtype == acc, "grad_epilogue: on CPU dZ is written in the logits' dtype ", acc, ", got dz_dtype ",
              dz_dtype);
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "grad_epilogue: labels must be a contiguous int64 [n] tensor");
  const bool has_bias = bias && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->scalar_type() == acc && bias->is_contiguous(),
                "grad_epilogue: bias must be a contiguous [V] tensor in the logits' dtype");
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(lab[i] >= 0 && lab[i] < V, "grad_epilogue: label ", lab[i], " of row ", i, " is outside [0, ", V, ")");
  at::Tensor logp = at::empty({n}, logits.options());
  const Transform tf{scale, cap};
  if (acc == at::kDouble)
    grad_rows<double>(logits.data_ptr<double>(), n, V, lab, has_bias ? bias->data_ptr<double>() : nullptr, tf,
                      logp.data_ptr<double>());
  else
    grad_rows<float>(logits.data_ptr<float>(), n, V, lab, has_bias ? bias->data_ptr<float>() : nullptr, tf,
                     logp.data_ptr<float>());
  return logp;
}

}  // namespace
}  // namespace mio

TORCH_LIBRARY_FRAGMENT(mio_native, m) {
  m.def(
      "grad_epilogue(Tensor(a!) logits, Tensor labels, Tensor? bias, ScalarType dz_dtype, float scale=1.0, "
      "float cap=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(mio_native, CPU, m) { m.impl("grad_epilogue", &mio::grad_epilogue_cpu); }
