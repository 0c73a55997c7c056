"""Backends of the per-token log-prob op, behind one dispatch.

A kernel backend computes, for flattened tokens (N = S*T),

    forward(hidden [N, H], weight [V, H], bias [V] | None, labels [N] int64, ignore_index)
        -> logp [N] fp32 (fp64 for fp64 inputs where a backend accepts them; 0 where labels ==
           ignore_index), softmax_stats (O(N), opaque to callers)

    backward(hidden, weight, bias, labels, softmax_stats, grad_logp [N] (softmax_stats' dtype), ignore_index,
             needs_hidden_grad, needs_weight_grad)
        -> d_hidden [N, H] (hidden's dtype) | None, d_weight [V, H] (weight's dtype) | None,
           d_bias [V] (bias's dtype) | None

with the gradient of sum_t grad_logp[t] * logp[t]:
    dZ = grad_logp[:, None] * (onehot(labels) - softmax(Z)),  Z = hidden @ weight.T + bias,
    d_hidden = dZ @ weight,  d_weight = dZ.T @ hidden,  d_bias = dZ.sum(0),
without ever holding Z whole. grad_logp is 0 at ignored tokens. softmax_stats is whatever the
backend's forward saved to rebuild softmax(Z) tiles: keep the row max and log-sum-exp(Z - max)
apart (two fp32 numbers per token), since one fp32 lse = max + log(...) loses ~5e-4 at logits ~1e4.

"reference" is not a kernel backend: it is plain PyTorch autograd over full logits
(`mio_kernels.reference`), the oracle for tests and the naive baseline for benchmarks.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol, Tuple

import torch

BACKEND_NAMES = ("auto", "triton", "native", "reference")


class KernelBackend(Protocol):
    name: str

    def supports(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on `device`, else the reason it cannot."""

    def forward(self, hidden, weight, bias, labels, ignore_index) -> Tuple[torch.Tensor, torch.Tensor]:
        ...

    def backward(self, hidden, weight, bias, labels, lse, grad_logp, ignore_index,
                 needs_hidden_grad, needs_weight_grad):
        ...


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


def resolve_backend(name: str, device: torch.device) -> str:
    """Map a user's backend choice to a concrete one for tensors on `device`.

    auto: triton on CUDA; on CPU the native extension when it is built, else reference.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and unavailable_reason("triton", device) is None:
            return "triton"
        if unavailable_reason("native", device) is None:
            return "native"
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
