"""The fused op: one autograd.Function from LM-head inputs to the preference loss.

forward:  kernel forward (per-token logp [N] and softmax statistics, logits never whole)
          -> sequence reduction l [S] -> objective: loss, closed-form dL/dlogp per sequence [S]
backward: dlogp per token = grad_loss * that factor -> kernel backward (recomputes logit tiles)
Saved for backward: the inputs, the O(N) softmax statistics and the [S] factor. Nothing of size N x V.
That is backward_mode="recompute"; "single_pass" (native backend, the default where it fits) forms
the gradient in the forward instead: mio_kernels/single_pass.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor, nn

from mio_kernels.backends import get_backend, resolve_backend
from mio_kernels.losses import DEFAULT_LOSS
from mio_kernels.objective import (MIOLossOutput, PreferenceConfig, function_outputs, metrics_dict,
                                   preference_objective)
from mio_kernels.reference import reference_preference_loss, reference_token_logprobs
from mio_kernels.sequence import per_token, reduce_sequences, result_dtype
from mio_kernels.single_pass import SinglePassPreferenceLossFunction, check_backward_mode, resolve_backward_mode
from mio_kernels.transform import LogitTransform
from mio_kernels.validation import (check_batch_layout, check_config, check_finite_result, check_linear_inputs,
                                    check_first_order_only, check_packing, check_reference, check_transform)


def _flat(hidden: Tensor, labels: Tensor):
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), labels.reshape(-1).contiguous().long()


def _contiguous(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.contiguous()


def _kernel_token_logprobs(backend: str, hidden, weight, labels, bias, ignore_index, transform: LogitTransform,
                           with_entropy: bool = False):
    """Forward kernel only: per-token log-probs shaped like labels, and softmax_stats [N, 2] ([N, 3] with
    the entropy as its last column)."""
    h, y = _flat(hidden, labels)
    logp, softmax_stats = get_backend(backend).forward(h, weight.contiguous(), y, _contiguous(bias), ignore_index,
                                                       transform, with_entropy)
    return logp.view(labels.shape), softmax_stats


def _kernel_backward(backend: str, ctx, grad_token_logp: Tensor, ignore_index: int, transform: LogitTransform,
                     grad_entropy: Optional[Tensor] = None):
    """-> (d_hidden, d_weight, d_bias) for inputs saved as (hidden, weight, labels, bias, softmax_stats, ...)."""
    hidden, weight, labels, bias, softmax_stats = ctx.saved_tensors[:5]
    h, y = _flat(hidden, labels)
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if grad_entropy is not None:
        grad_entropy = grad_entropy.reshape(-1).to(softmax_stats.dtype)
    d_hidden, d_weight, d_bias = get_backend(backend).backward(
        h, weight.contiguous(), y, _contiguous(bias), softmax_stats,
        grad_token_logp.reshape(-1).to(softmax_stats.dtype), ignore_index, needs_hidden, needs_weight or needs_bias,
        transform, grad_entropy)
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


class FusedPreferenceLossFunction(torch.autograd.Function):
    """(hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg, backend, check_values)
    -> (loss, policy_logps, metrics, policy_sums)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg: PreferenceConfig, backend: str,
                check_values: bool):
        token_logps, softmax_stats = _kernel_token_logprobs(backend, hidden, weight, labels, bias, cfg.ignore_index,
                                                            cfg.transform)
        policy = reduce_sequences(token_logps, labels, cfg.ignore_index, cfg.length_normalized, cu_seqlens)
        if check_values:
            check_finite_result(policy.logps, hidden=hidden, weight=weight, bias=bias)
        objective = preference_objective(policy, ref_logps, cfg)
        ctx.save_for_backward(hidden, weight, labels, bias, softmax_stats, objective.seq_token_grad, cu_seqlens)
        ctx.cfg, ctx.backend = cfg, backend
        outputs = function_outputs(objective, policy, result_dtype(hidden))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_metrics, _grad_sums):
        check_first_order_only()
        labels, seq_token_grad, cu_seqlens = ctx.saved_tensors[2], ctx.saved_tensors[5], ctx.saved_tensors[6]
        grad_token_logp = per_token(grad_loss * seq_token_grad, labels, cu_seqlens)
        with _outside_autocast(labels.device):
            d_hidden, d_weight, d_bias = _kernel_backward(ctx.backend, ctx, grad_token_logp, ctx.cfg.ignore_index,
                                                          ctx.cfg.transform)
        return d_hidden, d_weight, None, d_bias, None, None, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    """(hidden, weight, labels, bias, ignore_index, backend, transform, with_entropy) -> per-token log-probs
    (and entropies), any upstream grad."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index: int, backend: str, transform: LogitTransform,
                with_entropy: bool):
        token_logps, softmax_stats = _kernel_token_logprobs(backend, hidden, weight, labels, bias, ignore_index,
                                                            transform, with_entropy)
        ctx.save_for_backward(hidden, weight, labels, bias, softmax_stats)
        ctx.ignore_index, ctx.backend, ctx.transform = ignore_index, backend, transform
        ctx.set_materialize_grads(False)  # an output without upstream gradient costs nothing in backward
        if not with_entropy:
            return token_logps
        entropy = torch.where(labels != ignore_index, softmax_stats[:, 2].view(labels.shape), 0.0)
        return token_logps, entropy

    @staticmethod
    def backward(ctx, grad_token_logps, grad_entropy=None):
        check_first_order_only()
        if grad_token_logps is None and grad_entropy is None:
            return (None,) * 8
        if grad_token_logps is None:
            grad_token_logps = torch.zeros_like(grad_entropy)
        with _outside_autocast(grad_token_logps.device):
            d_hidden, d_weight, d_bias = _kernel_backward(ctx.backend, ctx, grad_token_logps, ctx.ignore_index,
                                                          ctx.transform, grad_entropy)
        return d_hidden, d_weight, None, d_bias, None, None, None, None


@_op_entry
def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                    ignore_index: int = -100, backend: str = "auto", *, temperature: float = 1.0,
                    logit_scale: float = 1.0, final_logit_softcapping: Optional[float] = None,
                    return_entropy: bool = False, check_values: bool = True):
    """Per-token log-probs of `labels` under the logits z (below), never held whole.

    z = c * tanh(s * x / c) / T with x = hidden @ weight.T (+ bias), c = final_logit_softcapping,
    s = logit_scale, T = temperature (without c: z = s * x / T).
    hidden [..., H] (fp32/bf16/fp16), weight [V, H], labels [...] int -> fp32 [...] (0 where ignored),
    differentiable w.r.t. hidden, weight and bias for any upstream gradient. With return_entropy:
    (log-probs, entropy), the entropy of softmax(z) per token, fp32 [...] (0 where ignored), also
    differentiable; both come from one pass over the logits. check_values: the label range check
    (one host sync); turn off for a sync-free (or torch.compile'd) step.
    """
    check_transform(temperature, logit_scale, final_logit_softcapping)
    check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index, check_label_values=check_values)
    transform = LogitTransform.of(temperature, logit_scale, final_logit_softcapping)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        return reference_token_logprobs(hidden, weight, labels.long(), bias, ignore_index, transform, return_entropy)
    return LinearLogprobsFunction.apply(hidden, weight, labels.long(), bias, ignore_index, backend, transform,
                                        bool(return_entropy))


def _check_preference_inputs(cfg, hidden, weight, labels, bias, cu_seqlens, ref_logps, ref_hidden, ref_weight,
                             ref_bias, check_values: bool) -> None:
    check_config(cfg)
    check_linear_inputs(hidden, weight, labels, bias, ignore_index=cfg.ignore_index, check_label_values=check_values,
                        warn_unscored=True)
    num_sequences = check_packing(hidden, cu_seqlens, check_values)
    check_batch_layout(num_sequences, cfg)
    check_reference(cfg, hidden, weight, ref_logps, ref_hidden, ref_weight, num_sequences)
    if check_values and ref_logps is not None:
        check_finite_result(ref_logps, ref_logps=ref_logps)
    if ref_hidden is not None:
        check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, ignore_index=cfg.ignore_index,
                            hidden_name="ref_hidden", weight_name="ref_weight", bias_name="ref_bias",
                            check_label_values=False)


@torch.no_grad()
def _kernel_reference_sums(backend, ref_hidden, ref_weight, labels, ref_bias, cu_seqlens, cfg,
                           check_values: bool) -> Tensor:
    """The reference model's sequence log-prob sums [S]: the forward kernel only, no autograd."""
    ref_tokens, _ = _kernel_token_logprobs(backend, ref_hidden.detach(), ref_weight.detach(), labels,
                                           None if ref_bias is None else ref_bias.detach(), cfg.ignore_index,
                                           cfg.transform)
    sums = reduce_sequences(ref_tokens, labels, cfg.ignore_index, cfg.length_normalized, cu_seqlens).token_sums
    if check_values:
        check_finite_result(sums, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    return sums


@_op_entry
def fused_mio_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                   cu_seqlens: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                   ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                   ref_bias: Optional[Tensor] = None, loss_type: str = DEFAULT_LOSS, beta: float = 0.1, num_negatives: int = 1,
                   label_smoothing: float = 0.0, average_log_prob: bool = False, reference_free: bool = False,
                   sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
                   logit_scale: float = 1.0, final_logit_softcapping: Optional[float] = None,
                   backend: str = "auto", check_values: bool = True, backward_mode: str = "auto") -> MIOLossOutput:
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
    Returned: policy_logps in the loss's reduction (sum, or mean when length-normalised), policy_sums
    (always sums); ref_logps as sums (what a caller caches and passes back).
    Scored logits: z = c * tanh(s * x / c) / T with x = hidden @ weight.T (+ bias), c =
    final_logit_softcapping, s = logit_scale, T = temperature (without c: z = s * x / T); the same
    transform scores the reference model's states.
    Loss formulas: mio_kernels/losses.py. check_values (two host syncs) checks labels in [0, V) or
    ignore_index (warns once when none is scored), cu_seqlens, ref_logps finite, and every sequence
    log-prob finite (a non-finite one traced to its input); not hidden at ignored positions (the
    triton and reference weight gradients carry a NaN/inf from there: 0 * NaN).
    backward_mode: "auto" | "single_pass" (6 N H V FLOPs instead of 8) | "recompute": mio_kernels/single_pass.py.
    """
    cfg = PreferenceConfig(loss_type=loss_type, beta=beta, num_negatives=num_negatives,
                           label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                           reference_free=reference_free, sft_weight=sft_weight, ignore_index=ignore_index,
                           temperature=temperature, logit_scale=logit_scale,
                           final_logit_softcapping=final_logit_softcapping)
    _check_preference_inputs(cfg, hidden, weight, labels, bias, cu_seqlens, ref_logps, ref_hidden, ref_weight,
                             ref_bias, check_values)
    backend = resolve_backend(backend, hidden.device)
    labels = labels.long()
    backward_mode = resolve_backward_mode(backward_mode, backend, cfg, hidden, weight, labels, bias)
    if backend == "reference":
        out = reference_preference_loss(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ref_logps=ref_logps,
                                        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                        **dataclasses.asdict(cfg))
        if check_values:
            check_finite_result(out.policy_logps, hidden=hidden, weight=weight, bias=bias)
        return out

    if ref_hidden is not None:
        ref_logps = _kernel_reference_sums(backend, ref_hidden, ref_weight, labels, ref_bias, cu_seqlens, cfg,
                                           check_values).to(result_dtype(hidden))
    ref_logps = None if ref_logps is None else ref_logps.detach()
    if backward_mode == "single_pass":
        loss, policy_logps, metrics, policy_sums = SinglePassPreferenceLossFunction.apply(
            hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg, check_values)
    else:
        loss, policy_logps, metrics, policy_sums = FusedPreferenceLossFunction.apply(
            hidden, weight, labels, bias, cu_seqlens, ref_logps, cfg, backend, check_values)
    return MIOLossOutput(loss, policy_logps, ref_logps, metrics_dict(metrics), policy_sums)


class FusedMIOLoss(nn.Module):
    """nn.Module form of `fused_mio_loss`: configure once, call with (hidden, weight, labels, ...)."""

    def __init__(self, loss_type: str = DEFAULT_LOSS, beta: float = 0.1, num_negatives: int = 1,
                 label_smoothing: float = 0.0, average_log_prob: bool = False, reference_free: bool = False,
                 sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
                 logit_scale: float = 1.0, final_logit_softcapping: Optional[float] = None, backend: str = "auto",
                 check_values: bool = True, backward_mode: str = "auto"):
        super().__init__()
        check_backward_mode(backward_mode)
        self.options = dict(loss_type=loss_type, beta=beta, num_negatives=num_negatives,
                            label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                            reference_free=reference_free, sft_weight=sft_weight, ignore_index=ignore_index,
                            temperature=temperature, logit_scale=logit_scale,
                            final_logit_softcapping=final_logit_softcapping, backend=backend,
                            check_values=check_values, backward_mode=backward_mode)
        check_config(PreferenceConfig(**{k: v for k, v in self.options.items()
                                         if k not in ("backend", "check_values", "backward_mode")}))

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None) -> MIOLossOutput:
        return fused_mio_loss(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, ref_logps=ref_logps,
                              ref_hidden=ref_hidden,
                              ref_weight=ref_weight, ref_bias=ref_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
