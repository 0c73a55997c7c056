"""The Triton kernel backend (CUDA; on CPU only under TRITON_INTERPRET=1, which the tests use).

The launchers are wrapped as torch.library custom ops (`mio_kernels::triton_logprob_forward`,
`mio_kernels::triton_logprob_backward`, with fake implementations), like the native ones, so a
torch.compile'd step sees two opaque ops instead of tracing into the Triton launch.
Imported lazily by `mio_kernels.backends` (importing this module imports triton)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mio_kernels.kernels.config import interpreting
from mio_kernels.kernels.logprob_backward import logprob_backward
from mio_kernels.kernels.logprob_forward import logprob_forward
from mio_kernels.transform import IDENTITY, LogitTransform

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("mio_kernels::triton_logprob_forward", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                ignore_index: int, scale: float, cap: float, with_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return logprob_forward(hidden, weight, labels, bias, ignore_index, LogitTransform(scale, cap), with_entropy)


@_forward_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, scale, cap, with_entropy):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty((n, 3 if with_entropy else 2),
                                                                      dtype=torch.float32)


# Custom ops cannot return None: a gradient that was not asked for travels as an empty tensor.
@torch.library.custom_op("mio_kernels::triton_logprob_backward", mutates_args=())
def _backward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                 softmax_stats: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                 ignore_index: int, scale: float, cap: float, need_hidden_grad: bool,
                 need_weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = logprob_backward(hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index, need_hidden_grad,
                             need_weight_grad, LogitTransform(scale, cap), grad_entropy)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_backward_op.register_fake
def _(hidden, weight, labels, bias, softmax_stats, grad_logp, grad_entropy, ignore_index, scale, cap,
      need_hidden_grad, need_weight_grad):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden_grad else empty,
            torch.empty_like(weight) if need_weight_grad else empty,
            torch.empty_like(bias) if (need_weight_grad and bias is not None) else empty)


class TritonBackend:
    name = "triton"

    def supports(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)"

    def forward(self, hidden, weight, labels, bias, ignore_index, transform: LogitTransform = IDENTITY,
                with_entropy: bool = False):
        """-> (logp [N] fp32, softmax_stats [N, 2 or 3] fp32); see mio_kernels.kernels.logprob_forward."""
        if hidden.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports hidden/weight dtypes {SUPPORTED_DTYPES}, got {hidden.dtype}")
        return _forward_op(hidden, weight, labels, bias, int(ignore_index), float(transform.scale),
                           float(transform.cap), bool(with_entropy))

    def backward(self, hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index,
                 needs_hidden_grad, needs_weight_grad, transform: LogitTransform = IDENTITY, grad_entropy=None):
        """-> (d_hidden | None, d_weight | None, d_bias | None); see mio_kernels.kernels.logprob_backward."""
        d_hidden, d_weight, d_bias = _backward_op(
            hidden, weight, labels, bias, softmax_stats, grad_logp, grad_entropy, int(ignore_index),
            float(transform.scale), float(transform.cap), bool(needs_hidden_grad), bool(needs_weight_grad))
        return (d_hidden if needs_hidden_grad else None, d_weight if needs_weight_grad else None,
                d_bias if (needs_weight_grad and bias is not None) else None)
