"""`backward_mode` of fused_mio_loss: where the LM-head gradient is formed.

"recompute"   the forward keeps O(N) softmax statistics; the backward recomputes every logits
              chunk: 8 N H V FLOPs (forward GEMM, recompute GEMM, dH and dW GEMMs).
"single_pass" the gradient is formed in the forward while each chunk's logits are in memory
              (mio_kernels/backends/single_pass.py); the backward only scales the saved dH, dW,
              db by the incoming scalar gradient: 6 N H V FLOPs, hidden and weight read once.
              Any logit transform (temperature, logit_scale, final_logit_softcapping) is applied
              in its epilogue, dz/dx included. Native backend only (the Triton kernels stream the
              vocabulary with an online logsumexp, so no pass holds a row's dZ).
              Memory: the logits chunk keeps the native chunk budget (`chunk_budget_bytes`):
                  R = clamp(budget // (V * p), 1, N) rows,   p = 4 bytes (8 for fp64)
              and the single pass adds accumulators, which are gradient memory, not chunk memory:
                  bytes = slots * (V * H [weight grad] + V [bias grad]) * p
              slots (`coefficient_groups`):
                  1       separable losses (mio, bco_pair, sppo_hard, apo_zero), any K, any SFT weight
                  1       difference losses (dpo, ipo, hinge, robust) at K = 1 without SFT term
                  1 + K   otherwise (dpo / ipo / hinge / robust with K > 1 or sft_weight > 0)
              and 0 when the weight and bias need no gradient (only dH: 4 N H V FLOPs).
"auto"        single_pass when a gradient is needed, the backend is native, the call is not being
              traced by torch.compile, the accumulators are at most one weight gradient in the
              accumulation precision ((V * H + V) * p: every one-slot loss, at any V and H) and,
              on CUDA, accumulators + logits chunk fit in free device memory (free + cached by
              torch's allocator) with DEVICE_MEMORY_MARGIN to spare; else recompute. An explicit
              "single_pass" takes any number of slots (the free-memory check still applies).
Forward-only calls (no input requires grad, or under torch.no_grad) never do gradient work.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mio_kernels import _native
from mio_kernels.backends.single_pass import accumulator_bytes, chunk_rows, single_pass
from mio_kernels.objective import (CoefficientGroups, PreferenceConfig, accumulator_slots, coefficient_groups,
                                   function_outputs, preference_objective)
from mio_kernels.sequence import reduce_sequences, result_dtype
from mio_kernels.validation import check_finite_result, check_first_order_only

BACKWARD_MODES = ("auto", "single_pass", "recompute")
SINGLE_PASS_BACKENDS = ("native",)


def check_backward_mode(backward_mode) -> None:
    if backward_mode not in BACKWARD_MODES:
        raise ValueError(f"backward_mode must be one of {BACKWARD_MODES}, got {backward_mode!r}")


# Left free on the device beyond the single pass's accumulators and logits chunk: cuBLAS
# workspaces, allocator rounding, the next layer's activations.
DEVICE_MEMORY_MARGIN = 1 << 30


def _budget_bytes(device: torch.device) -> int:
    from mio_kernels.backends.native_backend import chunk_budget_bytes
    return chunk_budget_bytes(device)


def free_device_bytes(device: torch.device) -> int:
    """Bytes a CUDA allocation on `device` can take now: free on the device plus what torch's
    caching allocator holds unused."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def accumulator_blocker(slots: int, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                        explicit: bool, why_slots: str) -> Optional[str]:
    """None when a single pass with `slots` accumulators may run (module docstring), else why not.
    An explicit backward_mode='single_pass' may take more than one weight gradient's accumulators;
    why_slots says where the slot count comes from."""
    vocab, width = weight.shape
    needs_weight, needs_bias = weight.requires_grad, bias is not None and bias.requires_grad
    acc = accumulator_bytes(slots, vocab, width, hidden.dtype, needs_weight, needs_bias)
    one_gradient = accumulator_bytes(1, vocab, width, hidden.dtype, True, needs_bias)
    if acc > one_gradient and not explicit:
        return (f"its {slots} accumulators of [V={vocab}, H={width}] take {acc} bytes, more than one weight "
                f"gradient ({one_gradient} bytes; {why_slots})")
    if hidden.is_cuda and acc > 0:
        elem = _native.accumulation_dtype(hidden.dtype).itemsize
        need = acc + chunk_rows(_budget_bytes(hidden.device), vocab, hidden.dtype, labels.numel()) * vocab * elem
        free = free_device_bytes(hidden.device)
        if need + DEVICE_MEMORY_MARGIN > free:
            return (f"its accumulators and logits chunk need {need} bytes but {hidden.device} has {free} bytes "
                    f"free, less than that plus a margin of {DEVICE_MEMORY_MARGIN} bytes")
    return None


def single_pass_blocker(cfg: PreferenceConfig, hidden: Tensor, weight: Tensor, labels: Tensor,
                        bias: Optional[Tensor], explicit: bool = False) -> Optional[str]:
    """`accumulator_blocker` for a preference loss's slots (from the options: no host sync here)."""
    return accumulator_blocker(accumulator_slots(cfg), hidden, weight, labels, bias, explicit,
                               f"loss_type={cfg.loss_type!r} with num_negatives={cfg.num_negatives} and "
                               f"sft_weight={cfg.sft_weight} needs 1 + K slots")


def single_pass_candidate(backward_mode: str, backend: str, hidden: Tensor, weight: Tensor,
                          bias: Optional[Tensor]) -> bool:
    """Whether a call may take the single pass, before any loss-specific check: False for
    "recompute", forward-only calls, other backends under "auto" and calls traced by
    torch.compile under "auto"; an explicit "single_pass" that cannot run raises saying why."""
    check_backward_mode(backward_mode)
    if backward_mode == "recompute":
        return False
    if backward_mode == "single_pass" and backend not in SINGLE_PASS_BACKENDS:
        raise ValueError(f"backward_mode='single_pass' cannot run: backend={backend!r} has no single-pass backward "
                         f"(only {SINGLE_PASS_BACKENDS}: the Triton kernels stream the vocabulary with an online "
                         "logsumexp, so no pass holds a row's dZ); use backward_mode='auto' or 'recompute'")
    if torch.compiler.is_compiling():  # the chunk schedule is read from the labels on the host
        if backward_mode == "single_pass":
            raise ValueError("backward_mode='single_pass' cannot run: torch.compile cannot trace it (data-dependent "
                             "schedule); use backward_mode='auto'")
        return False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return needs_grad and backend in SINGLE_PASS_BACKENDS   # forward only: no gradient work in either mode


def resolve_backward_mode(backward_mode: str, backend: str, cfg: PreferenceConfig, hidden: Tensor, weight: Tensor,
                          labels: Tensor, bias: Optional[Tensor]) -> str:
    """-> "single_pass" or "recompute" for this call (see the module docstring)."""
    if not single_pass_candidate(backward_mode, backend, hidden, weight, bias):
        return "recompute"
    reason = single_pass_blocker(cfg, hidden, weight, labels, bias, explicit=backward_mode == "single_pass")
    if reason is None:
        return "single_pass"
    if backward_mode == "single_pass":
        raise ValueError(f"backward_mode='single_pass' cannot run: {reason}")
    return "recompute"


class SinglePassPreferenceLossFunction(torch.autograd.Function):
    """(hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg, check_values) -> (loss, policy_logps,
    metrics, policy_sums); the gradient is formed in forward, backward scales it by grad_loss."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg: PreferenceConfig, check_values: bool):
        def reduce(token_logps: Tensor):
            return reduce_sequences(token_logps.view(labels.shape), labels, cfg.ignore_index, cfg.length_normalized,
                                    cu_seqlens)

        def coefficients(token_logps: Tensor) -> Tensor:
            return preference_objective(reduce(token_logps), ref_logps, cfg).seq_token_grad

        groups: CoefficientGroups = coefficient_groups(cfg, labels, cu_seqlens)
        result = single_pass(hidden, weight, labels, bias, cu_seqlens, cfg.ignore_index, groups.members,
                             groups.shared_factor, groups.accumulator_slots, coefficients, ctx.needs_input_grad[0],
                             ctx.needs_input_grad[1], ctx.needs_input_grad[3], _budget_bytes(hidden.device),
                             cfg.transform)
        policy = reduce(result.token_logps)
        if check_values:
            check_finite_result(policy.logps, hidden=hidden, weight=weight, bias=bias)
        objective = preference_objective(policy, ref_logps, cfg)
        ctx.save_for_backward(result.d_hidden, result.d_weight, result.d_bias)
        outputs = function_outputs(objective, policy, result_dtype(hidden))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_metrics, _grad_sums):
        check_first_order_only()

        def scaled(grad: Optional[Tensor]) -> Optional[Tensor]:
            return None if grad is None else grad * grad_loss.to(grad.dtype)

        d_hidden, d_weight, d_bias = ctx.saved_tensors
        return scaled(d_hidden), scaled(d_weight), None, scaled(d_bias), None, None, None, None
