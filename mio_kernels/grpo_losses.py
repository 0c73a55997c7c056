"""GRPO-family losses as pure functions of per-token log-probs (TRL 1.16 `GRPOTrainer._compute_loss`).

Every formula of the GRPO family is written here once, over flat per-token tensors [N] (a padded
[B, T] batch flattened, or a packed one), with `seq` [N] the completion of each token:

    d_t = l_t - o_t                  log-ratio to the old policy (o = l detached when on-policy)
    w   = e^{d_t}                    importance weight, token level;  sequence level (GSPO):
          exp(sum_t m d / sum_t m)   one per completion
    clipped types  L_t = -min(min(w, delta) A, clip(w, 1 - eps_low, 1 + eps_high) A)   (min(w, delta): two-sided)
    cispo          L_t = -sg(min(w, eps_high)) A l_t
    sapo           L_t = -sigmoid(tau (w - 1)) 4 / tau A,  tau = tau_pos if A > 0 else tau_neg
    L_t *= importance_weights;  L_t += beta k3_t,  k3 = e^{q - l} - (q - l) - 1  (times w when
    use_bias_correction_kl, TRL's default)
    loss = sum_t n_t L_t - entropy_coef * sum_t m_t H_t / sum m

n_t is the loss type's aggregation weight (`aggregation_weights`): grpo, sapo 1/(B |o_i|);
bnpo 1/sum m; dr_grpo 1/(B max_completion_length); dapo, cispo 1/num_items_in_batch; luspo 1/B.
(TRL also divides by the gradient-accumulation steps and rescales num_items_in_batch by processes
and steps_per_generation; the op takes the normaliser as given, i.e. one micro-batch, one process.)

The fused op needs dL/dl_t and dL/dH_t per token: `grpo_objective` takes them by autograd over
these [N] tensors (O(N)). With token-level weights, dL/dl_t depends only on l_t and on inputs
known before the forward, so `token_coefficients` gives it for any subset of tokens (the single
pass, chunk by chunk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class GRPOConfig:
    """The loss options (TRL GRPOConfig names; epsilon_low is TRL's `epsilon`)."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None     # None: epsilon_low (TRL); the cap of cispo
    delta: Optional[float] = None            # two-sided clipping bound (INTELLECT-2)
    beta: float = 0.0                        # k3 KL coefficient
    importance_sampling_level: str = "token"
    entropy_coef: float = 0.0
    use_bias_correction_kl: bool = True      # TRL 1.16 default: the KL term times w
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def token_level(self) -> bool:
        return self.importance_sampling_level == "token"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_grpo_config(cfg: GRPOConfig) -> None:
    """ValueError naming the option that is unknown or out of range."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {cfg.importance_sampling_level!r}")
    if not (_finite(cfg.epsilon_low) and 0.0 <= cfg.epsilon_low < 1.0):
        raise ValueError(f"epsilon_low must be a finite number in [0, 1), got {cfg.epsilon_low!r}")
    if cfg.epsilon_high is not None and not (_finite(cfg.epsilon_high) and cfg.epsilon_high >= 0.0):
        raise ValueError(f"epsilon_high must be None or a finite number >= 0, got {cfg.epsilon_high!r}")
    if cfg.delta is not None and not (_finite(cfg.delta) and cfg.delta > 1.0):
        raise ValueError(f"delta must be None or a finite number > 1 (the two-sided bound on the ratio; TRL "
                         f"recommends > 1 + epsilon_high), got {cfg.delta!r}")
    if not (_finite(cfg.beta) and cfg.beta >= 0.0):
        raise ValueError(f"beta must be a finite number >= 0, got {cfg.beta!r}")
    if not _finite(cfg.entropy_coef):
        raise ValueError(f"entropy_coef must be a finite number, got {cfg.entropy_coef!r}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        value = getattr(cfg, name)
        if not (_finite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class TokenBatch(NamedTuple):
    """Per-token inputs of one batch, flat [N] float64 (0 at unscored tokens), on the tokens' device."""

    seq: Tensor                           # [N] int64 completion of each token
    mask: Tensor                          # [N] 1 where scored
    advantages: Tensor                    # [N]
    old_logps: Optional[Tensor]           # [N] | None (on-policy)
    ref_logps: Optional[Tensor]           # [N] | None (needed when beta > 0)
    importance_weights: Optional[Tensor]  # [N] | None
    weight: Tensor                        # [N] n_t, the loss type's aggregation weight
    entropy_weight: Tensor                # [N] m_t / max(sum m, 1)
    num_sequences: int
    advantages_per_sequence: bool         # TRL's (B, 1) advantages: the clip metrics' shape
    sequence_advantages: Optional[Tensor] = None   # [B] float64 when given per completion


def aggregation_weights(loss_type: str, mask: Tensor, seq: Tensor, num_sequences: int,
                        max_completion_length, num_items_in_batch) -> Tensor:
    """n_t with policy loss = sum_t n_t L_t, each loss type's normaliser (TRL's `_compute_loss`):
    grpo, sapo: mean over completions of the per-completion token mean; bnpo: token mean over the
    batch; dr_grpo: sum / (B * max_completion_length); dapo, cispo: sum / num_items_in_batch (None:
    the batch's scored tokens); luspo: mean over completions of the per-completion token sum.
    max_completion_length / num_items_in_batch: numbers or 0-dim tensors."""
    total = mask.sum().clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        counts = torch.zeros(num_sequences, dtype=mask.dtype, device=mask.device).index_add_(0, seq, mask)
        return mask / (num_sequences * counts.clamp(min=1.0)[seq])
    if loss_type == "bnpo":
        return mask / total
    if loss_type == "dr_grpo":
        return mask / (num_sequences * torch.as_tensor(max_completion_length, dtype=mask.dtype, device=mask.device))
    if loss_type in ("dapo", "cispo"):
        if num_items_in_batch is None:
            return mask / total
        return mask / torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
    if loss_type == "luspo":
        return mask / num_sequences
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


class TokenTerms(NamedTuple):
    loss: Tensor              # [n] L_t (policy term times importance_weights, plus beta * KL)
    ratio: Tensor             # [n] w as TRL's clip metrics see it (after the delta clamp)
    kl: Optional[Tensor]      # [n] the KL term as logged (times w with the bias correction)


def token_terms(cfg: GRPOConfig, logps: Tensor, log_weights: Tensor, advantages: Tensor, ref_logps: Optional[Tensor],
                importance_weights: Optional[Tensor]) -> TokenTerms:
    """TRL's per-token loss, term for term; log_weights = log w per token (token level: l - o; sequence
    level: the completion's mean log-ratio, broadcast)."""
    coef_1 = torch.exp(log_weights)
    kl = None
    if cfg.beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        if cfg.use_bias_correction_kl:
            kl = kl * coef_1
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=cfg.eps_high).detach() * advantages * logps
    elif cfg.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.eps_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)
        loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif cfg.loss_type == "sapo":
        tau = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * advantages
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if importance_weights is not None:
        loss = loss * importance_weights
    if kl is not None:
        loss = loss + cfg.beta * kl
    return TokenTerms(loss, coef_1, kl)


def _log_weights(cfg: GRPOConfig, logps: Tensor, batch: TokenBatch) -> Tensor:
    old = logps.detach() if batch.old_logps is None else batch.old_logps
    log_ratio = logps - old
    if cfg.token_level:
        return log_ratio
    zeros = torch.zeros(batch.num_sequences, dtype=logps.dtype, device=logps.device)
    counts = zeros.index_add(0, batch.seq, batch.mask).clamp(min=1.0)
    return (zeros.index_add(0, batch.seq, log_ratio * batch.mask) / counts)[batch.seq]


def grpo_loss(cfg: GRPOConfig, logps: Tensor, entropies: Optional[Tensor], batch: TokenBatch):
    """-> (loss, policy_loss, TokenTerms, log_weights), differentiable w.r.t. logps [N] and entropies [N]."""
    log_weights = _log_weights(cfg, logps, batch)
    terms = token_terms(cfg, logps, log_weights, batch.advantages, batch.ref_logps, batch.importance_weights)
    policy = (batch.weight * terms.loss).sum()
    loss = policy
    if cfg.entropy_coef != 0.0:
        loss = loss - cfg.entropy_coef * (batch.entropy_weight * entropies).sum()
    return loss, policy, terms, log_weights


class GRPOObjective(NamedTuple):
    loss: Tensor                     # scalar float64, detached
    metrics: Dict[str, Tensor]       # TRL names, detached 0-dim float64
    grad_logps: Optional[Tensor]     # [N] dL/dl_t (None without needs_grad)
    grad_entropy: Optional[Tensor]   # [N] dL/dH_t (None when entropy_coef = 0 or without needs_grad)


def grpo_objective(cfg: GRPOConfig, logps: Tensor, entropies: Optional[Tensor], batch: TokenBatch,
                   needs_grad: bool = True) -> GRPOObjective:
    """Loss, metrics and the per-token gradients (autograd over the [N] tensors: O(N))."""
    with torch.enable_grad():
        lp = logps.detach().to(torch.float64).requires_grad_(needs_grad)
        ent = None if entropies is None else entropies.detach().to(torch.float64)
        wants_ent_grad = needs_grad and ent is not None and cfg.entropy_coef != 0.0
        if wants_ent_grad:
            ent.requires_grad_(True)
        loss, policy, terms, log_weights = grpo_loss(cfg, lp, ent, batch)
        grad_lp = grad_ent = None
        if needs_grad:
            inputs = (lp, ent) if wants_ent_grad else (lp,)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            grad_lp = torch.zeros_like(lp) if grads[0] is None else grads[0]
            grad_ent = grads[1] if wants_ent_grad else None
    metrics = grpo_metrics(cfg, terms, log_weights.detach(), ent, batch, policy.detach())
    return GRPOObjective(loss.detach(), metrics, grad_lp, grad_ent)


def token_coefficients(cfg: GRPOConfig, logps: Tensor, rows: Tensor, batch: TokenBatch) -> Tensor:
    """dL/dl_t for the tokens `rows` [n] from their log-probs [n] alone: token-level importance
    sampling only (the single pass asks chunk by chunk). The entropy bonus's dL/dH_t is
    -entropy_coef * batch.entropy_weight, known before the forward."""
    assert cfg.token_level, "token_coefficients needs importance_sampling_level='token'"

    def pick(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.index_select(0, rows)

    with torch.enable_grad():
        lp = logps.detach().to(torch.float64).requires_grad_(True)
        old = lp.detach() if batch.old_logps is None else pick(batch.old_logps)
        terms = token_terms(cfg, lp, lp - old, pick(batch.advantages), pick(batch.ref_logps),
                            pick(batch.importance_weights))
        (grad,) = torch.autograd.grad((pick(batch.weight) * terms.loss).sum(), lp, allow_unused=True)
    return torch.zeros_like(lp) if grad is None else grad


def zero_coefficient_tokens(cfg: GRPOConfig, batch: TokenBatch) -> Optional[Tensor]:
    """[N] bool: tokens whose dL/dl_t is 0 whatever their log-prob, known before the forward: an
    advantage of 0 (every loss type's policy term is a multiple of A_t) without KL term or entropy
    bonus. None when there is a KL term or entropy bonus."""
    if cfg.beta != 0.0 or cfg.entropy_coef != 0.0:
        return None
    return batch.advantages == 0


def sequence_pass_blocker(cfg: GRPOConfig) -> Optional[str]:
    """None when, at sequence-level importance sampling, dL/dl_t is one number per completion: the
    policy term reaches l_t only through the completion's mean log-ratio (every clipped type, sapo),
    so the per-sequence single pass applies. Else why not."""
    if cfg.beta != 0.0:
        return f"the KL term (beta={cfg.beta}) gives each token a coefficient of its own"
    if cfg.loss_type == "cispo":
        return "cispo's term is linear in each token's log-prob (a coefficient per token)"
    if cfg.entropy_coef != 0.0:
        return f"the entropy bonus (entropy_coef={cfg.entropy_coef}) gives each token a gradient of its own"
    return None


def sequence_coefficients(cfg: GRPOConfig, logps: Tensor, batch: TokenBatch) -> Tensor:
    """c_s = dL/dl_t, one number per completion s (`sequence_pass_blocker` None), from the token
    log-probs [N]; exact for every completion whose tokens are all scored already (the per-sequence
    single pass asks chunk by chunk and ignores the others)."""
    with torch.enable_grad():
        lp = logps.detach().to(torch.float64).requires_grad_(True)
        (grad,) = torch.autograd.grad(grpo_loss(cfg, lp, None, batch)[0], lp, allow_unused=True)
    c = torch.zeros(batch.num_sequences, dtype=torch.float64, device=logps.device)
    if grad is not None:
        scored = batch.mask > 0
        c[batch.seq[scored]] = grad[scored]   # equal within a completion: any of its tokens gives c_s
    return c


def _nanmin(x: Tensor) -> Tensor:
    x = x[~torch.isnan(x)]
    return x.new_tensor(float("nan")) if x.numel() == 0 else x.min()


def _nanmax(x: Tensor) -> Tensor:
    x = x[~torch.isnan(x)]
    return x.new_tensor(float("nan")) if x.numel() == 0 else x.max()


def grpo_metrics(cfg: GRPOConfig, terms: TokenTerms, log_weights: Tensor, entropies: Optional[Tensor],
                 batch: TokenBatch, policy_loss: Tensor) -> Dict[str, Tensor]:
    """TRL's logged metrics for one process and one micro-batch (detached 0-dim tensors)."""
    m, seq, num_seq = batch.mask, batch.seq, batch.num_sequences
    total = m.sum().clamp(min=1.0)
    zeros = torch.zeros(num_seq, dtype=m.dtype, device=m.device)
    counts = zeros.index_add(0, seq, m)

    def token_mean(x: Tensor) -> Tensor:
        return (x.detach().to(m.dtype) * m).sum() / total

    out: Dict[str, Tensor] = {}
    if cfg.entropy_coef != 0.0:
        out["policy_loss"] = policy_loss
    if terms.kl is not None:
        out["kl"] = token_mean(terms.kl)
    if entropies is not None:
        out["entropy"] = token_mean(entropies)
    ratio = terms.ratio.detach()
    adv = batch.advantages
    # TRL's (B, 1) ratios and advantages (sequence level, advantages per completion): one value per
    # completion, metrics are means over completions; else (B, T) and token means.
    per_completion = not cfg.token_level and batch.advantages_per_sequence
    if per_completion:
        # any token of a completion carries its ratio and advantage; one without tokens has TRL's
        # w = exp(0 / 1) = 1 and its own advantage (cispo with eps_high < 1 counts it as clipped)
        last = torch.full((num_seq,), -1, dtype=torch.long, device=m.device).scatter_reduce(
            0, seq, torch.arange(len(seq), device=m.device), "amax", include_self=True)
        empty_ratio = torch.ones(num_seq, dtype=m.dtype, device=m.device)
        empty_adv = torch.zeros_like(empty_ratio) if batch.sequence_advantages is None else batch.sequence_advantages

        def seq_values(indicator) -> Tensor:
            return torch.where(last >= 0, indicator(ratio, adv)[last.clamp(min=0)], indicator(empty_ratio, empty_adv))

        def mean(indicator) -> Tensor:
            return seq_values(indicator).sum() / max(num_seq, 1)
    else:
        def seq_values(indicator) -> Tensor:
            return zeros.index_add(0, seq, indicator(ratio, adv) * m) / counts   # NaN for a completion without tokens

        def mean(indicator) -> Tensor:
            return token_mean(indicator(ratio, adv))
    if cfg.loss_type in CLIPPED_LOSS_TYPES:
        def low(r: Tensor, a: Tensor) -> Tensor:
            return ((r < 1 - cfg.epsilon_low) & (a < 0)).to(m.dtype)

        def high(r: Tensor, a: Tensor) -> Tensor:
            return ((r > 1 + cfg.eps_high) & (a > 0)).to(m.dtype)

        out["clip_ratio/low_mean"] = mean(low)
        out["clip_ratio/high_mean"] = mean(high)
        out["clip_ratio/region_mean"] = mean(lambda r, a: torch.maximum(low(r, a), high(r, a)))
        out["clip_ratio/low_min"] = _nanmin(seq_values(low))
        out["clip_ratio/high_max"] = _nanmax(seq_values(high))
    elif cfg.loss_type == "cispo":
        out["cispo_clip_ratio"] = mean(lambda r, a: ((r > cfg.eps_high) & (a > 0)).to(m.dtype))
    return out
