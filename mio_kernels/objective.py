"""The preference objective over the [S] sequence log-probs of one batch.

Splits rows into chosen/rejected, forms log-ratios against the reference, applies the registered
loss (losses.py), adds the optional SFT term, and returns metrics and dL/dlogp_t per sequence.
This is the only place the row layout is interpreted:
    rows [0, P) chosen, then K blocks of P rejected rows  (S = P * (1 + K)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

from mio_kernels.losses import DEFAULT_LOSS, get_loss
from mio_kernels.sequence import SequenceLogps, reduce_sequences
from mio_kernels.transform import LogitTransform


@dataclass(frozen=True)
class PreferenceConfig:
    """The non-tensor options of the fused op (they travel into the autograd Function as one object)."""

    loss_type: str = DEFAULT_LOSS
    beta: float = 0.1
    num_negatives: int = 1
    label_smoothing: float = 0.0
    average_log_prob: bool = False
    reference_free: bool = False
    sft_weight: float = 0.0
    ignore_index: int = -100
    temperature: float = 1.0            # the scored logits (mio_kernels.transform):
    logit_scale: float = 1.0            #   z = c * tanh(s * x / c) / T, or s * x / T without c
    final_logit_softcapping: Optional[float] = None

    @property
    def transform(self) -> LogitTransform:
        return LogitTransform.of(self.temperature, self.logit_scale, self.final_logit_softcapping)

    @property
    def length_normalized(self) -> bool:
        return self.average_log_prob or get_loss(self.loss_type).length_normalized


METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "nll")


@dataclass
class MIOLossOutput:
    """What fused_mio_loss (and the reference oracle) return; defined here so both import it."""

    loss: Tensor                   # scalar, differentiable w.r.t. hidden, weight, bias
    policy_logps: Tensor           # [S] detached sequence log-probs l(y)
    ref_logps: Optional[Tensor]    # [S] detached reference sequence SUMS (None when reference_free)
    metrics: Dict[str, Tensor]     # detached 0-dim tensors, TRL names (call .item() at log time)
    policy_sums: Optional[Tensor] = None  # [S] detached sequence sums (= policy_logps unless length-normalised)


class Objective(NamedTuple):
    loss: Tensor            # scalar; differentiable w.r.t. the policy log-probs it was given
    seq_token_grad: Tensor  # [S] dL/dlogp_t for every scored token t of each sequence (detached)
    metrics: Tensor         # [len(METRIC_NAMES)] detached


def preference_objective(policy: SequenceLogps, ref_logps: Optional[Tensor], cfg: PreferenceConfig) -> Objective:
    """L = mean over prompts of the registered loss (+ sft_weight * mean NLL over chosen tokens).

    `ref_logps` [S] are reference sequence SUMS, whatever the loss (TRL's convention): the
    reference gets the policy's own reduction here, `policy.scale` (1, or 1/count when
    length-normalised; both sequences score the same tokens). `policy.logps` may carry autograd
    history (reference backend); the closed-form gradient is returned as well, for the fused backward.
    """
    spec = get_loss(cfg.loss_type)
    k = cfg.num_negatives
    logps = policy.logps
    u = logps if cfg.reference_free else logps - ref_logps.to(logps.dtype) * policy.scale.to(logps.dtype)
    if not cfg.reference_free and ref_logps.dtype != policy.token_sums.dtype:
        # The reference sums are known to their own dtype's precision (fp32 when cached): a policy
        # sum that rounds to the reference's value is the reference, so its log-ratio is exactly 0
        # (a policy equal to its reference gets rewards of 0, not rounding noise that flips accuracy).
        # u - u.detach(): the value 0 with u's gradient (the reference backend differentiates u).
        same = policy.token_sums.to(ref_logps.dtype) == ref_logps.to(policy.token_sums.device)
        u = torch.where(same, u - u.detach(), u)
    u = u.view(1 + k, -1)                              # [1+K, P]
    num_prompts = u.shape[1]
    per_prompt = spec.fn(u[0], u[1:], cfg.beta, cfg.label_smoothing)
    loss = per_prompt.loss.mean()
    grad_u = torch.cat([per_prompt.grad_chosen[None], per_prompt.grad_rejected]).reshape(-1) / num_prompts

    chosen_sums = policy.token_sums.view(1 + k, -1)[0]
    chosen_tokens = policy.counts.view(1 + k, -1)[0].sum().clamp(min=1.0)
    nll = -chosen_sums.sum() / chosen_tokens
    seq_token_grad = grad_u.detach() * policy.scale
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * nll
        is_chosen = torch.arange(logps.shape[0], device=logps.device) < num_prompts
        seq_token_grad = seq_token_grad - is_chosen * (cfg.sft_weight / chosen_tokens.detach())

    with torch.no_grad():
        rewards = cfg.beta * u
        rejected = rewards[1:]
        lp = logps.detach().view(1 + k, -1)
        metrics = torch.stack([
            rewards[0].mean(), rejected.mean(), (rewards[0] - rejected.mean(0)).mean(),
            (rewards[0] > rejected.max(0).values).to(rewards.dtype).mean(),
            lp[0].mean(), lp[1:].mean(), nll,
        ])
    return Objective(loss, seq_token_grad, metrics.detach())


def metrics_dict(metrics: Tensor) -> Dict[str, Tensor]:
    return dict(zip(METRIC_NAMES, metrics.unbind()))


def function_outputs(objective: Objective, policy: SequenceLogps, out_dtype: torch.dtype):
    """What the op's autograd.Functions return: (loss, policy_logps, metrics, policy_sums) in the
    public dtype; all but the loss are non-differentiable."""
    return (objective.loss.to(out_dtype), policy.logps.to(out_dtype), objective.metrics.to(out_dtype),
            policy.token_sums.to(out_dtype))


class CoefficientGroups(NamedTuple):
    """Which sequences' dL/dlogp_t (`Objective.seq_token_grad`) are known together: the schedule
    of the single-pass backward (mio_kernels/backends/single_pass.py)."""

    members: Tensor                # [num_groups, G] int64 rows; a row's coefficient depends on its group's logps only
    shared_factor: Optional[Tensor]  # [S] p_s when one accumulator serves a whole group, else None
    accumulator_slots: int         # fp32 [V, H] accumulators the single pass holds at once


def _shares_one_accumulator(cfg: PreferenceConfig) -> bool:
    spec = get_loss(cfg.loss_type)
    return spec.coupling == "separable" or (spec.coupling == "difference" and cfg.num_negatives == 1
                                            and cfg.sft_weight == 0)


def accumulator_slots(cfg: PreferenceConfig) -> int:
    """fp32 [V, H] accumulators the single pass holds at once (from the options alone: no labels)."""
    return 1 if _shares_one_accumulator(cfg) else 1 + cfg.num_negatives


def coefficient_groups(cfg: PreferenceConfig, labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> CoefficientGroups:
    """Group the S = P * (1 + K) rows by how their coefficients c_s couple (LossSpec.coupling).

    separable loss:                   each row alone, one accumulator;
    difference loss, K = 1, no SFT:   (chosen p, rejected p): c_s = p_s * g_p with the known
                                      p_s = +-scale_s, so one accumulator of sum_s p_s A_s suffices;
    otherwise:                        a prompt's 1 + K rows, one accumulator each.
    The SFT coefficient and the length normalisation depend on the labels only (known up front).
    """
    spec = get_loss(cfg.loss_type)
    k = cfg.num_negatives
    num_rows = labels.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    prompts = num_rows // (1 + k)
    rows = torch.arange(num_rows)
    if spec.coupling == "separable":
        return CoefficientGroups(rows[:, None], None, 1)
    members = rows.view(1 + k, prompts).T.contiguous()   # [P, 1 + K]: chosen, then its rejected
    if _shares_one_accumulator(cfg):  # difference loss, K = 1, no SFT term
        labels = labels.cpu()
        scale = reduce_sequences(torch.zeros(labels.shape), labels, cfg.ignore_index, cfg.length_normalized,
                                 None if cu_seqlens is None else cu_seqlens.cpu()).scale
        sign = torch.where(rows < prompts, 1.0, -1.0).to(scale.dtype)
        return CoefficientGroups(members, sign * scale, 1)
    return CoefficientGroups(members, None, accumulator_slots(cfg))
