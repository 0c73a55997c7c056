// Entry points of mio_kernels._C: argument checks, then the CPU or CUDA path.
// torch/python.h (pybind11 + tensor casters) rather than torch/extension.h, which also pulls
// in the whole C++ frontend and doubles the build time.
#include <ATen/core/Tensor.h>
#include <torch/python.h>

#include "logprob.h"

#include <cmath>

namespace {

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                  const mio::OptTensor& bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden [N, H] and weight [V, H] disagree on H: ",
              hidden.size(1), " vs ", weight.size(1));
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one vocabulary row");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "hidden and weight must be contiguous");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must share a dtype, got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "native backend supports float32, bfloat16, float16 and float64, got ", dt);
  TORCH_CHECK(hidden.device() == weight.device() && labels.device() == hidden.device(),
              "hidden, weight and labels must be on one device");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "labels must be a contiguous int64 [N] tensor");
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous(),
                "bias must be a contiguous [V] tensor");
    TORCH_CHECK(bias->scalar_type() == dt && bias->device() == hidden.device(),
                "bias must match weight's dtype and device");
  }
}

void check_labels_cpu(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    TORCH_CHECK(lab[i] == ignore_index || (lab[i] >= 0 && lab[i] < vocab), "label ", lab[i],
                " at token ", i, " is outside [0, ", vocab, ") and is not ignore_index ", ignore_index);
}

mio::Transform transform_of(double scale, double cap) {
  TORCH_CHECK(std::isfinite(scale) && scale != 0.0, "logit transform scale must be finite and nonzero, got ", scale);
  TORCH_CHECK(std::isfinite(cap) && cap >= 0.0, "logit transform cap must be finite and >= 0 (0: none), got ", cap);
  return mio::Transform{scale, cap};
}

std::vector<at::Tensor> logprob_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                        const at::Tensor& labels, const mio::OptTensor& bias,
                                        int64_t ignore_index, double scale, double cap, bool with_entropy,
                                        int64_t budget_bytes) {
  check_inputs(hidden, weight, labels, bias);
  const mio::Transform tf = transform_of(scale, cap);
  if (hidden.is_cuda()) {
#ifdef MIO_WITH_CUDA
    return mio::forward_cuda(hidden, weight, labels, bias, ignore_index, tf, with_entropy, budget_bytes);
#else
    TORCH_CHECK(false, "mio_kernels._C was built without its CUDA sources");
#endif
  }
  TORCH_CHECK(hidden.is_cpu(), "native backend runs on cpu and cuda, got ", hidden.device());
  check_labels_cpu(labels, weight.size(0), ignore_index);
  return mio::forward_cpu(hidden, weight, labels, bias, ignore_index, tf, with_entropy, budget_bytes);
}

std::vector<at::Tensor> logprob_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                         const at::Tensor& labels, const mio::OptTensor& bias,
                                         const at::Tensor& stats, const at::Tensor& grad_logp,
                                         const mio::OptTensor& grad_entropy, int64_t ignore_index, double scale,
                                         double cap, bool need_dh, bool need_dw, int64_t budget_bytes) {
  check_inputs(hidden, weight, labels, bias);
  const mio::Transform tf = transform_of(scale, cap);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == hidden.size(0) && (stats.size(1) == 2 || stats.size(1) == 3),
              "softmax stats must be the [N, 2] (or [N, 3], with the entropy) tensor that logprob_forward returned");
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == hidden.size(0), "grad_logp must be [N]");
  if (grad_entropy) {
    TORCH_CHECK(stats.size(1) == 3, "grad_entropy needs the [N, 3] softmax stats of a forward with_entropy");
    TORCH_CHECK(grad_entropy->dim() == 1 && grad_entropy->size(0) == hidden.size(0) &&
                    grad_entropy->device() == hidden.device() && at::isFloatingType(grad_entropy->scalar_type()),
                "grad_entropy must be a floating [N] tensor on hidden's device");
  }
  TORCH_CHECK(stats.device() == hidden.device() && grad_logp.device() == hidden.device(),
              "softmax stats and grad_logp must be on hidden's device");
  TORCH_CHECK(at::isFloatingType(stats.scalar_type()) && at::isFloatingType(grad_logp.scalar_type()),
              "softmax stats and grad_logp must be floating point");
  if (hidden.is_cuda()) {
#ifdef MIO_WITH_CUDA
    return mio::backward_cuda(hidden, weight, labels, bias, stats, grad_logp, grad_entropy, ignore_index, tf,
                              need_dh, need_dw, budget_bytes);
#else
    TORCH_CHECK(false, "mio_kernels._C was built without its CUDA sources");
#endif
  }
  TORCH_CHECK(hidden.is_cpu(), "native backend runs on cpu and cuda, got ", hidden.device());
  check_labels_cpu(labels, weight.size(0), ignore_index);
  return mio::backward_cpu(hidden, weight, labels, bias, stats, grad_logp, grad_entropy, ignore_index, tf,
                           need_dh, need_dw, budget_bytes);
}

pybind11::dict last_workspace() {
  const mio::WorkspaceStats& s = mio::last_stats();
  pybind11::dict d;
  d["chunk_rows"] = s.chunk_rows;
  d["num_chunks"] = s.num_chunks;
  d["rows_skipped"] = s.rows_skipped;
  d["logits_bytes"] = s.logits_bytes;
  d["workspace_bytes"] = s.workspace_bytes;
  return d;
}

// out [n, V] = hidden [n, H] @ weight [V, H]^T on CPU (the single pass's logits GEMM; the
// recompute passes call mio::chunk_logits directly).
void logits_into(at::Tensor out, const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK(out.is_cpu() && hidden.is_cpu() && weight.is_cpu(), "logits_into: tensors must be on cpu");
  TORCH_CHECK(out.dim() == 2 && hidden.dim() == 2 && weight.dim() == 2 && out.size(0) == hidden.size(0) &&
                  out.size(1) == weight.size(0) && hidden.size(1) == weight.size(1),
              "logits_into: expected out [n, V], hidden [n, H], weight [V, H], got ", out.sizes(), ", ",
              hidden.sizes(), ", ", weight.sizes());
  TORCH_CHECK(out.is_contiguous(), "logits_into: out must be contiguous");
  TORCH_CHECK(out.scalar_type() == hidden.scalar_type() && hidden.scalar_type() == weight.scalar_type(),
              "logits_into: out, hidden and weight must share a dtype");
  mio::chunk_logits(out, hidden, weight, at::Tensor());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mio-kernels native backend: chunked LM-head log-probs (CPU, and CUDA when built with it)";
  m.def("logprob_forward", &logprob_forward, "-> [logp [N], softmax stats [N, 2 or 3 with the entropy]]",
        py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("ignore_index"),
        py::arg("scale"), py::arg("cap"), py::arg("with_entropy"), py::arg("budget_bytes"));
  m.def("logprob_backward", &logprob_backward, "-> [dH | None, dW | None, db | None]",
        py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("softmax_stats"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("ignore_index"), py::arg("scale"), py::arg("cap"),
        py::arg("need_hidden_grad"), py::arg("need_weight_grad"), py::arg("budget_bytes"));
  m.def("logits_into", &logits_into, "out = hidden @ weight^T (CPU, in vocabulary blocks)", py::arg("out"),
        py::arg("hidden"), py::arg("weight"));
  m.def("last_workspace", &last_workspace, "what the last call allocated (bytes, chunk rows)");
#ifdef MIO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
