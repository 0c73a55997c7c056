"""The one place that imports the compiled extension `mio_kernels._C` (csrc/, built by setup.py).

Its two entry points are wrapped as torch.library custom ops (`mio_kernels::native_logprob_forward`
and `mio_kernels::native_logprob_backward`, with fake implementations) so they compose with
torch.compile. When the extension is missing or fails to load, `unavailable_reason()` says why
and calling an op raises RuntimeError with that reason.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

try:
    from mio_kernels import _C
except (ImportError, OSError) as err:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: Optional[str] = (
        f"the native extension mio_kernels._C is not available ({err}); build it with "
        "`pip install --no-build-isolation -e .` in an environment where torch is installed"
    )
else:
    _IMPORT_ERROR = None


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why it is not."""
    return _IMPORT_ERROR


def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA sources."""
    return _C is not None and bool(_C.with_cuda)


def last_workspace() -> Dict[str, int]:
    """What the last native call in this process allocated: chunk_rows, num_chunks,
    rows_skipped, logits_bytes (the budgeted chunk buffer), workspace_bytes (all temporaries)."""
    return dict(_require().last_workspace())


def _require():
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _C


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (softmax statistics, gradient accumulators) dtype for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("mio_kernels::native_logprob_forward", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: Optional[torch.Tensor], ignore_index: int, scale: float, cap: float, with_entropy: bool,
                budget_bytes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    logp, stats = _require().logprob_forward(hidden, weight, labels, bias, ignore_index, scale, cap, with_entropy,
                                             budget_bytes)
    return logp, stats


@_forward_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, scale, cap, with_entropy, budget_bytes):
    acc = accumulation_dtype(hidden.dtype)
    cols = 3 if with_entropy else 2
    return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty((hidden.shape[0], cols), dtype=acc)


# Custom ops cannot return None: a gradient that was not asked for travels as an empty tensor.
@torch.library.custom_op("mio_kernels::native_logprob_backward", mutates_args=())
def _backward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 bias: Optional[torch.Tensor], softmax_stats: torch.Tensor, grad_logp: torch.Tensor,
                 grad_entropy: Optional[torch.Tensor], ignore_index: int, scale: float, cap: float,
                 need_hidden_grad: bool, need_weight_grad: bool,
                 budget_bytes: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _require().logprob_backward(hidden, weight, labels, bias, softmax_stats, grad_logp, grad_entropy,
                                        ignore_index, scale, cap, need_hidden_grad, need_weight_grad, budget_bytes)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_backward_op.register_fake
def _(hidden, weight, labels, bias, softmax_stats, grad_logp, grad_entropy, ignore_index, scale, cap,
      need_hidden_grad, need_weight_grad, budget_bytes):
    empty = hidden.new_empty(0)
    d_hidden = torch.empty_like(hidden) if need_hidden_grad else empty
    d_weight = torch.empty_like(weight) if need_weight_grad else empty
    d_bias = torch.empty_like(bias) if (need_weight_grad and bias is not None) else hidden.new_empty(0)
    return d_hidden, d_weight, d_bias


def logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    bias: Optional[torch.Tensor], ignore_index: int, budget_bytes: int, scale: float = 1.0,
                    cap: float = 0.0, with_entropy: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], labels [N] int64, bias [V] | None -> (logp [N], softmax_stats [N, 2])
    in fp32 (fp64 for fp64 inputs) of the logits z = cap * tanh(scale * x) (cap > 0) or scale * x;
    logp is 0 at ignore_index; softmax_stats[:, 0] is each row's max m and [:, 1] is log sum
    exp(z - m), so lse = m + log-sum; with_entropy adds [:, 2], the row's entropy."""
    _require()
    return _forward_op(hidden, weight, labels, bias, int(ignore_index), float(scale), float(cap), bool(with_entropy),
                       int(budget_bytes))


def logprob_backward(hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index: int,
                     need_hidden_grad: bool, need_weight_grad: bool, budget_bytes: int, scale: float = 1.0,
                     cap: float = 0.0, grad_entropy: Optional[torch.Tensor] = None):
    """Gradients of sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * entropy[t]): (d_hidden | None,
    d_weight | None, d_bias | None) in the parameters' dtypes."""
    _require()
    d_hidden, d_weight, d_bias = _backward_op(hidden, weight, labels, bias, softmax_stats, grad_logp, grad_entropy,
                                              int(ignore_index), float(scale), float(cap),
                                              bool(need_hidden_grad), bool(need_weight_grad), int(budget_bytes))
    return (d_hidden if need_hidden_grad else None,
            d_weight if need_weight_grad else None,
            d_bias if (need_weight_grad and bias is not None) else None)


def logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """out [n, V] = hidden [n, H] @ weight [V, H]^T, CPU, one dtype: the CPU passes' logits GEMM
    (in vocabulary blocks that keep W in cache, csrc/logprob_cpu.cpp chunk_logits)."""
    _require().logits_into(out, hidden, weight)


def grad_epilogue(logits: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                  dz_dtype: torch.dtype, scale: float = 1.0, cap: float = 0.0) -> torch.Tensor:
    """The single-pass epilogue, in place over the raw logits x [n, V] (fp32, fp64 for fp64 inputs;
    bias not yet added), z = cap * tanh(scale * (x + bias)) (cap > 0) or scale * (x + bias): returns
    logp [n] of labels [n] (all scored, in [0, V)) in z and leaves dX = (onehot(labels) - softmax(z))
    * dz/dx in the buffer, in dz_dtype: the logits' dtype, or on CUDA bf16/fp16, written into the
    first half of each fp32 row."""
    _require()
    return torch.ops.mio_native.grad_epilogue(logits, labels, bias, dz_dtype, float(scale), float(cap))
