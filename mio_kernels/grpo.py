"""The fused GRPO-family op: LM-head inputs -> TRL 1.16's GRPO losses, the N x V logits never whole.

Layers: kernel forward (per-token log-probs, entropies) -> token layout (`TokenBatch`: completion
of each token, aggregation weights) -> losses (mio_kernels/grpo_losses.py) -> the backward.

backward_mode:
"recompute"   `GRPOLossFunction`: the backend's forward keeps O(N) softmax statistics; the losses
              give dL/dlogp_t and dL/dentropy_t per token; the backend's backward recomputes the
              logits chunks: 8 N H V FLOPs. Every kernel backend (native, triton).
"single_pass" `GRPOSinglePassFunction` (native backend), 6 N H V FLOPs:
              token-level importance sampling: dL/dlogp_t depends only on token t's own log-prob
              and inputs known before the forward, so the gradient is formed in the token's own
              chunk (mio_kernels/backends/token_pass.py): no [V, H] accumulator, memory one logits
              chunk at any V and H.
              sequence level (GSPO; luspo's setting): without a KL term, entropy bonus or cispo,
              dL/dlogp_t is one number c_s per completion, known once the completion is scored:
              the per-sequence single pass of fused_mio_loss (mio_kernels/backends/single_pass.py,
              each completion its own group) with one [V, H] accumulator slot for the completion
              left open across chunks (none when the weight is frozen). Otherwise an explicit
              "single_pass" raises ValueError saying why, and "auto" recomputes.
"auto"        single_pass when a gradient is needed, the backend is native, the options allow it
              (above), the accumulator fits (mio_kernels/single_pass.py: on CUDA, free memory) and
              the call is not traced by torch.compile; else recompute.
Forward-only calls (no input requires grad, or under torch.no_grad) do no gradient work.
backend="reference" is plain autograd over the full logits (the test oracle).

TRL options that need the whole batch before any token's coefficient is known
(`top_entropy_quantile`, `off_policy_mask_threshold`, `loss_type="vespo"`) are not options of
this op.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from mio_kernels.backends import resolve_backend
from mio_kernels.function import _kernel_backward, _kernel_token_logprobs, _op_entry, _outside_autocast
from mio_kernels.grpo_losses import (GRPOConfig, TokenBatch, aggregation_weights, check_grpo_config, grpo_loss,
                                     grpo_metrics, grpo_objective, sequence_coefficients, sequence_pass_blocker,
                                     token_coefficients, zero_coefficient_tokens)
from mio_kernels.reference import reference_token_logprobs
from mio_kernels.sequence import result_dtype
from mio_kernels.single_pass import _budget_bytes, accumulator_blocker, check_backward_mode, single_pass_candidate
from mio_kernels.transform import LogitTransform
from mio_kernels.validation import (check_finite_result, check_first_order_only, check_linear_inputs, check_packing,
                                    check_transform)


@dataclass
class GRPOLossOutput:
    loss: Tensor                          # scalar (fp32, fp64 for fp64 inputs), differentiable
    token_logps: Tensor                   # labels' shape, detached per-token log-probs (0 where ignored)
    metrics: Dict[str, Tensor]            # detached 0-dim tensors, TRL's names
    token_entropy: Optional[Tensor] = None  # labels' shape, detached, when computed (entropy_coef != 0 or log_entropy)


# ----------------------------------------------------------------------------------------- inputs

def _check_per_token(name: str, t, labels: Tensor, scored: Tensor, hidden: Tensor, num_sequences: int,
                     allow_per_sequence: bool, check_values: bool) -> None:
    """labels' shape (or [B] when allow_per_sequence), floating, hidden's device; finite at scored tokens."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = [tuple(labels.shape)] + ([(num_sequences,)] if allow_per_sequence else [])
    if tuple(t.shape) not in shapes:
        expected = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name} must be {expected} (per token, labels' shape"
                         f"{'; or one per completion' if allow_per_sequence else ''}), got {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if check_values:
        values = t if t.shape != labels.shape else t.masked_select(scored)
        if not bool(torch.isfinite(values).all()):   # one host sync
            raise ValueError(f"{name} contains non-finite values (nan or inf) at scored tokens")


def _check_number(name: str, value, minimum_exclusive: float = 0.0) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {list(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > minimum_exclusive) \
            or value != value or value == float("inf"):
        raise ValueError(f"{name} must be None or a finite number > {minimum_exclusive:g}, got {value!r}")


def _check_grpo_inputs(cfg: GRPOConfig, hidden, weight, labels, bias, cu_seqlens, advantages, old_logps, ref_logps,
                       importance_weights, max_completion_length, num_items_in_batch, ignore_index: int,
                       check_values: bool, backward_mode: str) -> int:
    check_grpo_config(cfg)
    check_backward_mode(backward_mode)
    check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index, check_label_values=check_values)
    num_sequences = check_packing(hidden, cu_seqlens, check_values)
    if cu_seqlens is None and labels.dim() != 2:
        raise ValueError(f"labels must be [B, T] (or packed [N] with cu_seqlens), got {list(labels.shape)}")
    scored = labels != ignore_index
    if advantages is None:
        raise ValueError("advantages is required: [B] (one per completion) or per token (labels' shape)")
    _check_per_token("advantages", advantages, labels, scored, hidden, num_sequences, True, check_values)
    if old_logps is not None:
        _check_per_token("old_logps", old_logps, labels, scored, hidden, num_sequences, False, check_values)
    if cfg.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps (per-token reference log-probs, labels' shape) is needed when beta = {cfg.beta} > 0")
    if ref_logps is not None:
        _check_per_token("ref_logps", ref_logps, labels, scored, hidden, num_sequences, False, check_values)
    if importance_weights is not None:
        _check_per_token("importance_weights", importance_weights, labels, scored, hidden, num_sequences, True,
                         check_values)
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) \
                or max_completion_length < 1:
            raise ValueError(f"max_completion_length must be None or an integer >= 1, got {max_completion_length!r}")
    if num_items_in_batch is not None:
        _check_number("num_items_in_batch", num_items_in_batch)
    return num_sequences


def token_batch(cfg: GRPOConfig, labels: Tensor, cu_seqlens: Optional[Tensor], num_sequences: int,
                advantages: Tensor, old_logps: Optional[Tensor], ref_logps: Optional[Tensor],
                importance_weights: Optional[Tensor], max_completion_length, num_items_in_batch,
                ignore_index: int) -> TokenBatch:
    """The per-token layout the losses read: padded [B, T] flattened, or packed [N] (cu_seqlens)."""
    device = labels.device
    flat_labels = labels.reshape(-1)
    n = flat_labels.numel()
    if cu_seqlens is None:
        seq_len = labels.shape[1]
        seq = torch.arange(num_sequences, device=device).repeat_interleave(seq_len)
        default_length = seq_len
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.arange(num_sequences, device=device).repeat_interleave(lengths, output_size=n)
        default_length = lengths.max()
    scored = flat_labels != ignore_index
    mask = scored.to(torch.float64)

    def per_token(t: Optional[Tensor], zero_unscored: bool = True) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.detach().to(torch.float64)
        if t.shape == (num_sequences,) and t.shape != labels.shape:
            return t[seq]
        t = t.reshape(-1)
        return torch.where(scored, t, 0.0) if zero_unscored else t

    per_sequence_adv = advantages.shape == (num_sequences,) and advantages.shape != labels.shape
    return TokenBatch(
        seq=seq, mask=mask, advantages=per_token(advantages), old_logps=per_token(old_logps),
        ref_logps=per_token(ref_logps) if cfg.beta != 0.0 else None,
        importance_weights=per_token(importance_weights),
        weight=aggregation_weights(cfg.loss_type, mask, seq, num_sequences,
                                   default_length if max_completion_length is None else max_completion_length,
                                   num_items_in_batch),
        entropy_weight=mask / mask.sum().clamp(min=1.0),
        num_sequences=num_sequences, advantages_per_sequence=per_sequence_adv,
        sequence_advantages=advantages.detach().to(torch.float64) if per_sequence_adv else None)


def resolve_grpo_backward_mode(backward_mode: str, backend: str, cfg: GRPOConfig, hidden: Tensor, weight: Tensor,
                               labels: Tensor, bias: Optional[Tensor]) -> str:
    """-> "single_pass" or "recompute" for this call (module docstring); an explicit "single_pass"
    that cannot run raises ValueError saying why."""
    if not single_pass_candidate(backward_mode, backend, hidden, weight, bias):
        return "recompute"
    if cfg.token_level:
        return "single_pass"
    reason = sequence_pass_blocker(cfg) or accumulator_blocker(
        1, hidden, weight, labels, bias, backward_mode == "single_pass", "one completion open across chunks")
    if reason is None:
        return "single_pass"
    if backward_mode == "single_pass":
        raise ValueError(f"backward_mode='single_pass' cannot run with importance_sampling_level='sequence': "
                         f"{reason}; use backward_mode='auto' or 'recompute'")
    return "recompute"


# -------------------------------------------------------------------------------- autograd glue

def _outputs(loss: Tensor, token_logps: Tensor, entropy: Optional[Tensor], labels: Tensor, hidden: Tensor):
    out = result_dtype(hidden)
    ent = None if entropy is None else entropy.reshape(labels.shape).to(out)
    return loss.to(out), token_logps.reshape(labels.shape).to(out), ent


class GRPOLossFunction(torch.autograd.Function):
    """Recompute path: (hidden, weight, labels, bias, batch, cfg, transform, ignore_index, backend,
    with_entropy, check_values) -> (loss, token_logps, entropy | None, metrics)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, batch: TokenBatch, cfg: GRPOConfig, transform: LogitTransform,
                ignore_index: int, backend: str, with_entropy: bool, check_values: bool):
        token_logps, stats = _kernel_token_logprobs(backend, hidden, weight, labels, bias, ignore_index, transform,
                                                    with_entropy)
        logps = token_logps.reshape(-1)
        if check_values:
            check_finite_result(logps, hidden=hidden, weight=weight, bias=bias)
        entropy = torch.where(batch.mask > 0, stats[:, 2], 0.0) if with_entropy else None
        needs_grad = any(ctx.needs_input_grad)
        objective = grpo_objective(cfg, logps, entropy, batch, needs_grad)
        ctx.save_for_backward(hidden, weight, labels, bias, stats, objective.grad_logps, objective.grad_entropy)
        ctx.backend, ctx.transform, ctx.ignore_index = backend, transform, ignore_index
        loss, token_logps, entropy = _outputs(objective.loss, logps, entropy, labels, hidden)
        ctx.mark_non_differentiable(*(t for t in (token_logps, entropy) if t is not None))
        return loss, token_logps, entropy, objective.metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        check_first_order_only()
        labels, grad_logps, grad_entropy = ctx.saved_tensors[2], ctx.saved_tensors[5], ctx.saved_tensors[6]
        grad_loss = grad_loss.to(torch.float64)
        with _outside_autocast(labels.device):
            d_hidden, d_weight, d_bias = _kernel_backward(
                ctx.backend, ctx, (grad_loss * grad_logps).view(labels.shape), ctx.ignore_index, ctx.transform,
                None if grad_entropy is None else grad_loss * grad_entropy)
        return d_hidden, d_weight, None, d_bias, None, None, None, None, None, None, None


def _sequence_single_pass(hidden, weight, labels, bias, batch: TokenBatch, cfg: GRPOConfig,
                          transform: LogitTransform, ignore_index: int, cu_seqlens, with_entropy: bool, needs,
                          budget: int):
    """The per-sequence single pass (each completion its own coefficient group, one accumulator slot)
    over the completions that may have a gradient; those known to have none (every scored token's
    advantage 0: `zero_coefficient_tokens`) get their log-probs (and entropies) from the token pass,
    without gradient work."""
    from mio_kernels.backends.single_pass import single_pass
    from mio_kernels.backends.token_pass import token_pass

    scored = batch.mask > 0
    live_tokens = scored & ~zero_coefficient_tokens(cfg, batch)   # not None: no KL term or entropy bonus
    live = torch.zeros(batch.num_sequences, device=scored.device).index_add_(0, batch.seq, live_tokens.float()) > 0
    members = torch.nonzero(live.cpu()).flatten()[:, None]
    result = single_pass(hidden, weight, labels, bias, cu_seqlens, ignore_index, members, None, 1,
                         lambda logps: sequence_coefficients(cfg, logps, batch), *needs, budget, transform,
                         with_entropy)
    value_tokens = scored & ~live[batch.seq]
    if not bool(value_tokens.any()):
        return result
    flat = labels.reshape(-1).masked_fill(~value_tokens, ignore_index)
    values = token_pass(hidden.reshape(-1, hidden.shape[-1]), weight, flat, bias, ignore_index, None, None,
                        with_entropy, False, False, False, budget, transform, torch.ones_like(value_tokens))
    entropy = None if values.entropy is None else result.entropy + values.entropy   # disjoint rows
    return result._replace(token_logps=result.token_logps + values.token_logps, entropy=entropy)


class GRPOSinglePassFunction(torch.autograd.Function):
    """Single pass (native): the gradient is formed in the forward, by the token-level pass or, at
    sequence-level importance sampling, the per-sequence one; backward scales it by the incoming
    scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, batch: TokenBatch, cfg: GRPOConfig, transform: LogitTransform,
                ignore_index: int, cu_seqlens: Optional[Tensor], with_entropy: bool, check_values: bool):
        from mio_kernels.backends.token_pass import token_pass

        needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        budget = _budget_bytes(hidden.device)
        if cfg.token_level:
            def coefficients(rows: Tensor, logps: Tensor) -> Tensor:
                return token_coefficients(cfg, logps, rows, batch)

            entropy_grad = -cfg.entropy_coef * batch.entropy_weight if cfg.entropy_coef != 0.0 else None
            result = token_pass(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), bias, ignore_index,
                                coefficients, entropy_grad, with_entropy, *needs, budget, transform,
                                zero_coefficient_tokens(cfg, batch))
        else:
            result = _sequence_single_pass(hidden, weight, labels, bias, batch, cfg, transform, ignore_index,
                                           cu_seqlens, with_entropy, needs, budget)
        entropy = result.entropy
        if check_values:
            check_finite_result(result.token_logps, hidden=hidden, weight=weight, bias=bias)
        objective = grpo_objective(cfg, result.token_logps, entropy, batch, needs_grad=False)
        d_hidden = None if result.d_hidden is None else result.d_hidden.view(hidden.shape)
        ctx.save_for_backward(d_hidden, result.d_weight, result.d_bias)
        loss, token_logps, entropy = _outputs(objective.loss, result.token_logps, entropy, labels, hidden)
        ctx.mark_non_differentiable(*(t for t in (token_logps, entropy) if t is not None))
        return loss, token_logps, entropy, objective.metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        check_first_order_only()

        def scaled(grad: Optional[Tensor]) -> Optional[Tensor]:
            return None if grad is None else grad * grad_loss.to(grad.dtype)

        d_hidden, d_weight, d_bias = ctx.saved_tensors
        return scaled(d_hidden), scaled(d_weight), None, scaled(d_bias), None, None, None, None, None, None, None


def _reference(hidden, weight, labels, bias, batch: TokenBatch, cfg: GRPOConfig, transform: LogitTransform,
               ignore_index: int, with_entropy: bool):
    """Plain autograd over the full logits (N x V)."""
    out = reference_token_logprobs(hidden, weight, labels, bias, ignore_index, transform, with_entropy)
    token_logps, entropy = out if with_entropy else (out, None)
    logps = token_logps.reshape(-1).to(torch.float64)
    ent = None if entropy is None else entropy.reshape(-1).to(torch.float64)
    loss, policy, terms, log_weights = grpo_loss(cfg, logps, ent, batch)
    metrics = grpo_metrics(cfg, terms, log_weights.detach(), None if ent is None else ent.detach(), batch,
                           policy.detach())
    loss, _, _ = _outputs(loss, logps, None, labels, hidden)
    logps_out, ent_out = _outputs(loss, token_logps.detach(), None if entropy is None else entropy.detach(), labels,
                                  hidden)[1:]
    return loss, logps_out, ent_out, metrics


# ------------------------------------------------------------------------------------------- op

@_op_entry
def fused_grpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, advantages: Tensor,
                    old_logps: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None, loss_type: str = "dapo",
                    epsilon_low: float = 0.2, epsilon_high: Optional[float] = None, delta: Optional[float] = None,
                    beta: float = 0.0, importance_sampling_level: str = "token", entropy_coef: float = 0.0,
                    importance_weights: Optional[Tensor] = None, max_completion_length: Optional[int] = None,
                    num_items_in_batch=None, temperature: float = 1.0, logit_scale: float = 1.0,
                    final_logit_softcapping: Optional[float] = None, ignore_index: int = -100,
                    backend: str = "auto", backward_mode: str = "auto", check_values: bool = True,
                    use_bias_correction_kl: bool = True, sapo_temperature_pos: float = 1.0,
                    sapo_temperature_neg: float = 1.05, log_entropy: bool = False) -> GRPOLossOutput:
    """GRPO-family loss (TRL 1.16 `GRPOTrainer._compute_loss`) straight from LM-head inputs.

    hidden [B, T, H] (fp32/bf16/fp16/fp64) final hidden states of the completions' positions, weight
    [V, H], labels [B, T] int (already shifted; ignore_index = not scored: prompt, padding, tool
    output), bias [V] | None. Packed: hidden [N, H], labels [N], cu_seqlens [B+1].
    advantages [B] (one per completion) or per token (labels' shape); old_logps per token (None:
    on-policy, old = the current log-probs detached, i.e. w = 1 with gradient); ref_logps per token
    (needed when beta > 0); importance_weights per token or [B] (TRL's vLLM importance-sampling
    ratio, multiplies the policy term before the KL is added).
    Scored logits z = c * tanh(s * x / c) / T, x = hidden @ weight.T + bias (c =
    final_logit_softcapping, s = logit_scale, T = temperature: TRL's logits / temperature).
    Loss types and normalisers: mio_kernels/grpo_losses.py. max_completion_length (dr_grpo's
    normaliser B * max_completion_length): None = T (padded) or the longest completion (packed).
    num_items_in_batch (dapo, cispo): the scored tokens the loss is divided by (None: this batch's);
    TRL's gradient-accumulation and process scaling are the caller's.
    epsilon_high None = epsilon_low (for cispo it is the cap, TRL recommends 5); delta: two-sided
    clipping bound; use_bias_correction_kl (TRL's default True): the KL term times w.
    entropy_coef: loss -= entropy_coef * mean entropy over scored tokens (differentiable).
    Metrics (TRL names, detached): clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}
    (clipped types) or cispo_clip_ratio, kl (beta > 0), entropy (when computed: entropy_coef != 0 or
    log_entropy=True, which costs one more sweep over each logits chunk), policy_loss (entropy_coef != 0).
    backward_mode: auto | single_pass | recompute (module docstring). check_values: labels, cu_seqlens, NaN/inf.
    """
    cfg = GRPOConfig(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                     beta=beta, importance_sampling_level=importance_sampling_level, entropy_coef=entropy_coef,
                     use_bias_correction_kl=use_bias_correction_kl, sapo_temperature_pos=sapo_temperature_pos,
                     sapo_temperature_neg=sapo_temperature_neg)
    check_transform(temperature, logit_scale, final_logit_softcapping)
    num_sequences = _check_grpo_inputs(cfg, hidden, weight, labels, bias, cu_seqlens, advantages, old_logps,
                                       ref_logps, importance_weights, max_completion_length, num_items_in_batch,
                                       ignore_index, check_values, backward_mode)
    transform = LogitTransform.of(temperature, logit_scale, final_logit_softcapping)
    backend = resolve_backend(backend, hidden.device)
    labels = labels.long()
    batch = token_batch(cfg, labels, cu_seqlens, num_sequences, advantages, old_logps, ref_logps, importance_weights,
                        max_completion_length, num_items_in_batch, ignore_index)
    with_entropy = cfg.entropy_coef != 0.0 or bool(log_entropy)
    args = (hidden, weight, labels, bias, batch, cfg, transform, ignore_index)
    mode = resolve_grpo_backward_mode(backward_mode, backend, cfg, hidden, weight, labels, bias)
    if backend == "reference":
        loss, token_logps, entropy, metrics = _reference(*args, with_entropy)
        if check_values:
            check_finite_result(token_logps, hidden=hidden, weight=weight, bias=bias)
    elif mode == "single_pass":
        loss, token_logps, entropy, metrics = GRPOSinglePassFunction.apply(*args, cu_seqlens, with_entropy, check_values)
    else:
        loss, token_logps, entropy, metrics = GRPOLossFunction.apply(*args, backend, with_entropy, check_values)
    out_dtype = result_dtype(hidden)
    return GRPOLossOutput(loss, token_logps, {k: v.to(out_dtype) for k, v in metrics.items()}, entropy)


class FusedGRPOLoss(nn.Module):
    """nn.Module form of `fused_grpo_loss`: configure once, call with (hidden, weight, labels, advantages=...)."""

    def __init__(self, loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                 delta: Optional[float] = None, beta: float = 0.0, importance_sampling_level: str = "token",
                 entropy_coef: float = 0.0, max_completion_length: Optional[int] = None, temperature: float = 1.0,
                 logit_scale: float = 1.0, final_logit_softcapping: Optional[float] = None, ignore_index: int = -100,
                 backend: str = "auto", backward_mode: str = "auto", check_values: bool = True,
                 use_bias_correction_kl: bool = True, sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, log_entropy: bool = False):
        super().__init__()
        check_backward_mode(backward_mode)
        check_transform(temperature, logit_scale, final_logit_softcapping)
        cfg = GRPOConfig(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                         beta=beta, importance_sampling_level=importance_sampling_level, entropy_coef=entropy_coef,
                         use_bias_correction_kl=use_bias_correction_kl, sapo_temperature_pos=sapo_temperature_pos,
                         sapo_temperature_neg=sapo_temperature_neg)
        check_grpo_config(cfg)
        self.options = dict(dataclasses.asdict(cfg), max_completion_length=max_completion_length,
                            temperature=temperature, logit_scale=logit_scale,
                            final_logit_softcapping=final_logit_softcapping, ignore_index=ignore_index,
                            backend=backend, backward_mode=backward_mode, check_values=check_values,
                            log_entropy=log_entropy)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, advantages: Tensor,
                old_logps: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, importance_weights: Optional[Tensor] = None,
                num_items_in_batch=None) -> GRPOLossOutput:
        return fused_grpo_loss(hidden, weight, labels, advantages=advantages, old_logps=old_logps,
                               ref_logps=ref_logps, bias=bias, cu_seqlens=cu_seqlens,
                               importance_weights=importance_weights, num_items_in_batch=num_items_in_batch,
                               **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
