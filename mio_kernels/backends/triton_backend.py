"""The Triton kernel backend (CUDA; on CPU only under TRITON_INTERPRET=1, which the tests use)."""
from __future__ import annotations

from typing import Optional

import torch

from mio_kernels.kernels.config import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonBackend:
    name = "triton"

    def __init__(self):
        from mio_kernels.kernels import logprob_backward, logprob_forward  # needs triton
        self._forward = logprob_forward.logprob_forward
        self._backward = logprob_backward.logprob_backward

    def supports(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)"

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports hidden/weight dtypes {SUPPORTED_DTYPES}, got {dtype}")

    def forward(self, hidden, weight, bias, labels, ignore_index):
        self.check_dtype(hidden.dtype)
        return self._forward(hidden, weight, bias, labels, ignore_index)

    def backward(self, hidden, weight, bias, labels, lse, grad_logp, ignore_index,
                 needs_hidden_grad, needs_weight_grad):
        return self._backward(hidden, weight, bias, labels, lse, grad_logp, ignore_index,
                              needs_hidden_grad, needs_weight_grad)
