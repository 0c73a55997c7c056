"""The Triton kernel backend (CUDA; on CPU only under TRITON_INTERPRET=1, which the tests use).

Imported lazily by `mio_kernels.backends` (importing this module imports triton)."""
from __future__ import annotations

from typing import Optional

import torch

from mio_kernels.kernels.config import interpreting
from mio_kernels.kernels.logprob_backward import logprob_backward
from mio_kernels.kernels.logprob_forward import logprob_forward
from mio_kernels.transform import IDENTITY, LogitTransform

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        return logprob_forward(hidden, weight, labels, bias, ignore_index, transform, with_entropy)

    def backward(self, hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index,
                 needs_hidden_grad, needs_weight_grad, transform: LogitTransform = IDENTITY, grad_entropy=None):
        """-> (d_hidden | None, d_weight | None, d_bias | None); see mio_kernels.kernels.logprob_backward."""
        return logprob_backward(hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index,
                                needs_hidden_grad, needs_weight_grad, transform, grad_entropy)
