"""Backends of the per-token log-prob op, behind one dispatch.

A kernel backend computes, for flattened tokens (N = S*T),

    forward(hidden [N, H], weight [V, H], labels [N] int64, bias [V] | None, ignore_index,
            transform=IDENTITY, with_entropy=False)
        -> logp [N] fp32 (fp64 for fp64 inputs where a backend accepts them; 0 where labels ==
           ignore_index), softmax_stats [N, 2] in logp's dtype: each row's max m and
           log sum exp(z - m); with_entropy a third column, the row's entropy (0 where ignored)

    backward(hidden, weight, labels, bias, softmax_stats, grad_logp [N] (softmax_stats' dtype), ignore_index,
             needs_hidden_grad, needs_weight_grad, transform=IDENTITY, grad_entropy=None)
        -> d_hidden [N, H] (hidden's dtype) | None, d_weight [V, H] (weight's dtype) | None,
           d_bias [V] (bias's dtype) | None

with the gradient of sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * entropy[t]):
    X = hidden @ weight.T + bias,  Z = transform(X)  (mio_kernels.transform.LogitTransform: two floats),
    dZ = grad_logp[:, None] * (onehot(labels) - P) - grad_entropy[:, None] * P * (Z - E_P[Z]),  P = softmax(Z),
    dX = dZ * dZ/dX,  d_hidden = dX @ weight,  d_weight = dX.T @ hidden,  d_bias = dX.sum(0),
without ever holding Z whole. grad_logp is 0 at ignored tokens. softmax_stats is what the
backend's forward saved to rebuild softmax(Z) tiles, in one layout for every backend: the row
max and log-sum-exp(Z - max) kept apart (two numbers per token), since one fp32
lse = max + log(...) loses ~5e-4 at logits ~1e4.

"reference" is not a kernel backend: it is plain PyTorch autograd over full logits
(`mio_kernels.reference`), the oracle for tests and the naive baseline for benchmarks.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Protocol, Tuple

import torch

from mio_kernels.transform import IDENTITY, LogitTransform

BACKEND_NAMES = ("auto", "triton", "native", "reference")


class KernelBackend(Protocol):
    name: str

    def supports(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on `device`, else the reason it cannot."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: Optional[torch.Tensor], ignore_index: int, transform: LogitTransform = IDENTITY,
                with_entropy: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (logp [N], softmax_stats [N, 2], or [N, 3] with the entropy)."""

    def backward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 bias: Optional[torch.Tensor], softmax_stats: torch.Tensor, grad_logp: torch.Tensor,
                 ignore_index: int, needs_hidden_grad: bool, needs_weight_grad: bool,
                 transform: LogitTransform = IDENTITY, grad_entropy: Optional[torch.Tensor] = None
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """-> (d_hidden | None, d_weight | None, d_bias | None)."""


_LOADERS: Dict[str, Callable[[], KernelBackend]] = {}


def register_backend(name: str, loader: Callable[[], KernelBackend]) -> None:
    """Register a lazily constructed kernel backend (imports happen on first use)."""
    _LOADERS[name] = loader


def get_backend(name: str) -> KernelBackend:
    if name not in _LOADERS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return _LOADERS[name]()


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why kernel backend `name` cannot run on `device` (None when it can)."""
    try:
        backend = get_backend(name)
    except (ImportError, RuntimeError) as err:
        return str(err)
    return backend.supports(device)


_warned_reference_fallback = False


def _warn_reference_fallback(reason: str) -> None:
    """backend='auto' found no kernel backend: say so once per process, since the reference
    holds the whole N x V logits (and autograd keeps them again)."""
    global _warned_reference_fallback
    if _warned_reference_fallback:
        return
    _warned_reference_fallback = True
    warnings.warn("backend='auto' falls back to the full-logits reference backend (N x V memory) because the "
                  f"native backend is unavailable: {reason}. Build the extension with "
                  "`pip install --no-build-isolation -e .` (or pass backend= explicitly).",
                  RuntimeWarning, stacklevel=3)


def resolve_backend(name: str, device: torch.device) -> str:
    """Map a user's backend choice to a concrete one for tensors on `device`.

    auto: the native extension when it is built for `device` (on CUDA: cuBLAS chunks with a fused
    epilogue, the path that has the single-pass backward); else triton on CUDA; else the
    full-logits reference, with a warning (once per process) naming why native is unavailable.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        reason = unavailable_reason("native", device)
        if reason is None:
            return "native"
        if device.type == "cuda" and unavailable_reason("triton", device) is None:
            return "triton"
        _warn_reference_fallback(reason)
        return "reference"
    if name != "reference":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} is not available for {device.type} tensors: {reason}")
    return name


def available_kernel_backends(device: torch.device) -> Tuple[str, ...]:
    return tuple(n for n in _LOADERS if unavailable_reason(n, device) is None)


def _load_triton() -> KernelBackend:
    from mio_kernels.backends.triton_backend import TritonBackend
    return TritonBackend()


def _load_native() -> KernelBackend:
    from mio_kernels.backends.native_backend import NativeBackend
    return NativeBackend()


register_backend("triton", _load_triton)
register_backend("native", _load_native)
