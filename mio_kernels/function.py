"""The fused op: one autograd.Function from LM-head inputs to the preference loss.

forward:  kernel forward (per-token logp [N] and softmax statistics, logits never whole)
          -> sequence reduction l [S] -> objective: loss, closed-form dL/dlogp per sequence [S]
backward: dlogp per token = grad_loss * that factor -> kernel backward (recomputes logit tiles)
Saved for backward: the inputs, the O(N) softmax statistics and the [S] factor. Nothing of size N x V.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor, nn

from mio_kernels.backends import get_backend, resolve_backend
from mio_kernels.losses import DEFAULT_LOSS
from mio_kernels.objective import MIOLossOutput, PreferenceConfig, metrics_dict, preference_objective
from mio_kernels.reference import reference_preference_loss, reference_token_logprobs
from mio_kernels.sequence import per_token, reduce_sequences, result_dtype
from mio_kernels.validation import (check_batch_layout, check_config, check_finite_result, check_linear_inputs,
                                    check_packing, check_reference)


def _flat(hidden: Tensor, labels: Tensor):
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), labels.reshape(-1).contiguous().long()


def _contiguous(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.contiguous()


def _kernel_token_logprobs(backend: str, hidden, weight, labels, bias, ignore_index):
    """Forward kernel only: per-token log-probs shaped like labels, and softmax_stats [N, 2]."""
    h, y = _flat(hidden, labels)
    logp, softmax_stats = get_backend(backend).forward(h, weight.contiguous(), y, _contiguous(bias), ignore_index)
    return logp.view(labels.shape), softmax_stats


def _kernel_backward(backend: str, ctx, grad_token_logp: Tensor, ignore_index: int):
    """-> (d_hidden, d_weight, d_bias) for inputs saved as (hidden, weight, labels, bias, softmax_stats, ...)."""
    hidden, weight, labels, bias, softmax_stats = ctx.saved_tensors[:5]
    h, y = _flat(hidden, labels)
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    d_hidden, d_weight, d_bias = get_backend(backend).backward(
        h, weight.contiguous(), y, _contiguous(bias), softmax_stats,
        grad_token_logp.reshape(-1).to(softmax_stats.dtype), ignore_index, needs_hidden, needs_weight or needs_bias)
    if d_hidden is not None:
        d_hidden = d_hidden.view(hidden.shape)
    return d_hidden, (d_weight if needs_weight else None), (d_bias if needs_bias else None)


def _outside_autocast(device: torch.device):
    """The op picks its own precisions (fp32 softmax statistics and accumulation): an enclosing
    torch.autocast must not recast the GEMMs inside it, in the forward or in the backward."""
    return torch.autocast(device.type, enabled=False)


def _op_entry(fn):
    """Public entry points take `hidden` first; they run outside any enclosing autocast."""
    @functools.wraps(fn)
    def run(hidden, *args, **kwargs):
        if not isinstance(hidden, Tensor):
            return fn(hidden, *args, **kwargs)  # validation names the argument
        with _outside_autocast(hidden.device):
            return fn(hidden, *args, **kwargs)
    return run


def _refuse_double_backward() -> None:
    # Autograd enables grad mode inside backward only for create_graph=True.
    if torch.is_grad_enabled():
        raise RuntimeError("second derivatives of the fused kernels are not supported (backward with "
                           "create_graph=True); use backend='reference' if you need them")


class FusedPreferenceLossFunction(torch.autograd.Function):
    """(hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg, backend, check_values)
    -> (loss, policy_logps, metrics)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg: PreferenceConfig, backend: str,
                check_values: bool):
        token_logps, softmax_stats = _kernel_token_logprobs(backend, hidden, weight, labels, bias, cfg.ignore_index)
        policy = reduce_sequences(token_logps, labels, cfg.ignore_index, cfg.length_normalized, cu_seqlens)
        if check_values:
            check_finite_result(policy.logps, hidden=hidden, weight=weight, bias=bias)
        objective = preference_objective(policy, ref_logps, cfg)
        ctx.save_for_backward(hidden, weight, labels, bias, softmax_stats, objective.seq_token_grad, cu_seqlens)
        ctx.cfg, ctx.backend = cfg, backend
        out_dtype = result_dtype(hidden)
        policy_logps, metrics = policy.logps.to(out_dtype), objective.metrics.to(out_dtype)
        ctx.mark_non_differentiable(policy_logps, metrics)
        return objective.loss.to(out_dtype), policy_logps, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_metrics):
        _refuse_double_backward()
        labels, seq_token_grad, cu_seqlens = ctx.saved_tensors[2], ctx.saved_tensors[5], ctx.saved_tensors[6]
        grad_token_logp = per_token(grad_loss * seq_token_grad, labels, cu_seqlens)
        with _outside_autocast(labels.device):
            d_hidden, d_weight, d_bias = _kernel_backward(ctx.backend, ctx, grad_token_logp, ctx.cfg.ignore_index)
        return d_hidden, d_weight, None, d_bias, None, None, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    """(hidden, weight, labels, bias, ignore_index, backend) -> per-token log-probs, any upstream grad."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index: int, backend: str):
        token_logps, softmax_stats = _kernel_token_logprobs(backend, hidden, weight, labels, bias, ignore_index)
        ctx.save_for_backward(hidden, weight, labels, bias, softmax_stats)
        ctx.ignore_index, ctx.backend = ignore_index, backend
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        _refuse_double_backward()
        with _outside_autocast(grad_token_logps.device):
            d_hidden, d_weight, d_bias = _kernel_backward(ctx.backend, ctx, grad_token_logps, ctx.ignore_index)
        return d_hidden, d_weight, None, d_bias, None, None


@_op_entry
def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                    ignore_index: int = -100, backend: str = "auto") -> Tensor:
    """Per-token log-probs of `labels` under logits hidden @ weight.T (+ bias), never held whole.

    hidden [..., H] (fp32/bf16/fp16), weight [V, H], labels [...] int -> fp32 [...] (0 where ignored),
    differentiable w.r.t. hidden, weight and bias for any upstream gradient.
    """
    check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        return reference_token_logprobs(hidden, weight, labels.long(), bias, ignore_index)
    return LinearLogprobsFunction.apply(hidden, weight, labels.long(), bias, ignore_index, backend)


@_op_entry
def fused_mio_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                   cu_seqlens: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                   ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                   loss_type: str = DEFAULT_LOSS, beta: float = 0.1, num_negatives: int = 1,
                   label_smoothing: float = 0.0, average_log_prob: bool = False, reference_free: bool = False,
                   sft_weight: float = 0.0, ignore_index: int = -100, backend: str = "auto",
                   check_values: bool = True) -> MIOLossOutput:
    """Preference loss straight from LM-head inputs, without materialising the logits.

    hidden [S, T, H] policy final hidden states (fp32/bf16/fp16), weight [V, H], labels [S, T] int
    (already shifted; ignore_index = not scored). Rows: P chosen, then K = num_negatives blocks of P
    rejected (S = P * (1 + K); K = 1 is TRL's/Liger's concatenated layout).
    Padding-free: hidden [N, H], labels [N] and cu_seqlens [S+1] (int32/int64, flash-attention's
    convention: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]), sequences in the same row order,
    labels shifted within each sequence (its last token ignore_index); ref_hidden packed the same way.
    Reference: ref_logps [S], reference sequence log-prob SUMS for every loss type (TRL's
    convention; the op gives them the policy's reduction itself, a per-token mean for ipo and
    average_log_prob=True), or the reference model's ref_hidden [S, T, H_ref] + ref_weight
    [V, H_ref] (+ ref_bias), scored forward-only; neither with reference_free=True.
    Returned: policy_logps in the loss's reduction (sum, or mean when length-normalised), ref_logps as sums.
    Loss formulas: mio_kernels/losses.py. check_values: label range and NaN/inf checks, which cost two host
    syncs; turn off for a sync-free step once the data pipeline is trusted.
    """
    cfg = PreferenceConfig(loss_type=loss_type, beta=beta, num_negatives=num_negatives,
                           label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                           reference_free=reference_free, sft_weight=sft_weight, ignore_index=ignore_index)
    check_config(cfg)
    check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index, check_label_values=check_values)
    num_sequences = check_packing(hidden, cu_seqlens, check_values)
    check_batch_layout(num_sequences, cfg)
    check_reference(cfg, hidden, weight, ref_logps, ref_hidden, ref_weight, num_sequences)
    if check_values and ref_logps is not None:
        check_finite_result(ref_logps, ref_logps=ref_logps)
    if ref_hidden is not None:
        check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index,
                            hidden_name="ref_hidden", weight_name="ref_weight", bias_name="ref_bias",
                            check_label_values=False)
    backend = resolve_backend(backend, hidden.device)
    labels = labels.long()

    if backend == "reference":
        out = reference_preference_loss(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ref_logps=ref_logps,
                                        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                        **dataclasses.asdict(cfg))
        if check_values:
            check_finite_result(out.policy_logps, hidden=hidden, weight=weight, bias=bias)
        return out

    if ref_hidden is not None:
        with torch.no_grad():  # the reference model runs the forward kernel only
            ref_tokens, _ = _kernel_token_logprobs(backend, ref_hidden.detach(), ref_weight.detach(), labels,
                                                   None if ref_bias is None else ref_bias.detach(), ignore_index)
            ref_logps = reduce_sequences(ref_tokens, labels, ignore_index, cfg.length_normalized, cu_seqlens).token_sums
            ref_logps = ref_logps.to(result_dtype(hidden))
            if check_values:
                check_finite_result(ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    loss, policy_logps, metrics = FusedPreferenceLossFunction.apply(
        hidden, weight, labels, bias, cu_seqlens, None if ref_logps is None else ref_logps.detach(), cfg, backend,
        check_values)
    return MIOLossOutput(loss, policy_logps, None if ref_logps is None else ref_logps.detach(), metrics_dict(metrics))


class FusedMIOLoss(nn.Module):
    """nn.Module form of `fused_mio_loss`: configure once, call with (hidden, weight, labels, ...)."""

    def __init__(self, loss_type: str = DEFAULT_LOSS, beta: float = 0.1, num_negatives: int = 1,
                 label_smoothing: float = 0.0, average_log_prob: bool = False, reference_free: bool = False,
                 sft_weight: float = 0.0, ignore_index: int = -100, backend: str = "auto",
                 check_values: bool = True):
        super().__init__()
        self.options = dict(loss_type=loss_type, beta=beta, num_negatives=num_negatives,
                            label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                            reference_free=reference_free, sft_weight=sft_weight, ignore_index=ignore_index,
                            backend=backend, check_values=check_values)
        check_config(PreferenceConfig(**{k: v for k, v in self.options.items()
                                         if k not in ("backend", "check_values")}))

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None) -> MIOLossOutput:
        return fused_mio_loss(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ref_logps=ref_logps,
                              ref_hidden=ref_hidden,
                              ref_weight=ref_weight, ref_bias=ref_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
