"""TRL 1.16 GRPOTrainer._compute_loss, rewritten plainly, term for term, on padded [B, T] tensors of
any dtype (the oracle of tests/test_grpo.py and of the randomized differential suite). One process,
one micro-batch, no gradient accumulation; `iw` is TRL's vLLM importance_sampling_ratio."""
import torch

CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")   # the losses with TRL's clip-ratio metrics


def reduce_per_token(loss_type, x, mask, max_completion_length, num_items_in_batch):
    """TRL's reduction of the per-token terms x [B, T] to the loss, for each loss type."""
    if loss_type in ("grpo", "sapo"):
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (x * mask).sum() / (x.shape[0] * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        items = (mask.sum() if num_items_in_batch is None
                 else torch.as_tensor(float(num_items_in_batch), dtype=x.dtype))
        return (x * mask).sum() / items.clamp(min=1.0)
    return (x * mask).sum(-1).mean()   # luspo


def trl_grpo_loss(lp, ent, mask, adv, old, ref, iw, *, loss_type, epsilon_low, epsilon_high, delta, beta,
                  importance_sampling_level, use_bias_correction_kl, sapo_temperature_pos,
                  sapo_temperature_neg, max_completion_length, num_items_in_batch, entropy_coef,
                  per_completion, log_entropy=True, value_only=False):
    """lp, ent, mask [B, T]; adv, iw [B, 1] or [B, T]; old None = on-policy; ref used when beta != 0.
    per_completion: TRL's (B, 1) clip metrics (sequence level with one advantage per completion).
    value_only: the loss as a function of the log-probs' values (on-policy old tracks lp; cispo's
    clamped ratio not detached), for condition bounds. Metrics are not detached (the kl's condition
    uses them). -> (loss, metrics, per-token terms [B, T] before the reduction)."""
    eh = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(lp.dtype)
    old = (lp if value_only else lp.detach()) if old is None else old
    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_w)
    if beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if use_bias_correction_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=eh)
        per_token = -(clamped if value_only else clamped.detach()) * adv * lp
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eh)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if iw is not None:
        per_token = per_token * iw
    if beta != 0.0:
        per_token = per_token + beta * kl
    loss = reduce_per_token(loss_type, per_token, mask, max_completion_length, num_items_in_batch)
    metrics = {}
    if entropy_coef != 0.0:
        metrics["policy_loss"] = loss
        loss = loss - entropy_coef * (ent * mask).sum() / mask.sum().clamp(min=1.0)

    def global_mean(x, one_per_completion=False):
        if one_per_completion:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def seq_mean(x, one_per_completion=False):
        return x[:, 0] if one_per_completion else (x * mask).sum(-1) / mask.sum(-1)

    def nan_reduce(x, fn):
        x = x[~torch.isnan(x)]
        return torch.tensor(float("nan"), dtype=lp.dtype) if x.numel() == 0 else fn(x)

    if beta != 0.0:
        metrics["kl"] = global_mean(kl)
    if log_entropy:
        metrics["entropy"] = global_mean(ent)
    c1 = coef_1.detach()
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_mean(((c1 > eh) & (adv > 0)).to(lp.dtype), per_completion)
    elif loss_type in CLIPPED:
        low = ((c1 < 1 - epsilon_low) & (adv < 0)).to(lp.dtype)
        high = ((c1 > 1 + eh) & (adv > 0)).to(lp.dtype)
        metrics["clip_ratio/low_mean"] = global_mean(low, per_completion)
        metrics["clip_ratio/high_mean"] = global_mean(high, per_completion)
        metrics["clip_ratio/region_mean"] = global_mean(torch.maximum(low, high), per_completion)
        metrics["clip_ratio/low_min"] = nan_reduce(seq_mean(low, per_completion), torch.min)
        metrics["clip_ratio/high_max"] = nan_reduce(seq_mean(high, per_completion), torch.max)
    return loss, metrics, per_token
