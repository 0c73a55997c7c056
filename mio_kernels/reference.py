"""Plain-PyTorch reference: full logits, log_softmax, gather, autograd for every gradient.

Written for clarity, not memory: it holds the N x V logits (and autograd holds them again). It is
the oracle of the tests and the naive baseline of the benchmarks, and what backend="reference"
runs. It shares only the loss formulas (losses.py via objective.py) and the sequence reduction
with the fused op; gradients come from autograd, not from the closed forms.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mio_kernels.objective import MIOLossOutput, PreferenceConfig, metrics_dict, preference_objective
from mio_kernels.sequence import reduce_sequences, result_dtype
from mio_kernels.transform import IDENTITY, LogitTransform, transform_logits


def reference_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                             ignore_index: int = -100, transform: LogitTransform = IDENTITY,
                             return_entropy: bool = False):
    """hidden [..., H], weight [V, H], labels [...] -> per-token log-probs [...] (fp32, or fp64 for fp64
    inputs) of the transformed logits; with return_entropy also the per-token entropy [...] (0 where
    ignored)."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute) @ weight.to(compute).T
    if bias is not None:
        logits = logits + bias.to(compute)
    log_probs = torch.log_softmax(transform_logits(logits, transform), dim=-1)
    scored = labels != ignore_index
    token_logps = log_probs.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(scored, token_logps, 0.0)
    if not return_entropy:
        return token_logps
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logps, torch.where(scored, entropy, 0.0)


def reference_sequence_logps(hidden, weight, labels, bias, cfg: PreferenceConfig, cu_seqlens=None):
    token_logps = reference_token_logprobs(hidden, weight, labels, bias, cfg.ignore_index, cfg.transform)
    return reduce_sequences(token_logps, labels, cfg.ignore_index, cfg.length_normalized, cu_seqlens)


def reference_preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                              cu_seqlens: Optional[Tensor] = None,
                              ref_logps: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                              ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                              **options):
    """Same arguments and result as `fused_mio_loss`, computed naively. Does not validate inputs."""
    cfg = PreferenceConfig(**options)
    policy = reference_sequence_logps(hidden, weight, labels, bias, cfg, cu_seqlens)
    if ref_logps is None and ref_hidden is not None:
        with torch.no_grad():
            ref_logps = reference_sequence_logps(ref_hidden, ref_weight, labels, ref_bias, cfg, cu_seqlens).token_sums
    objective = preference_objective(policy, ref_logps, cfg)
    out_dtype = result_dtype(hidden)
    return MIOLossOutput(
        loss=objective.loss.to(out_dtype),
        policy_logps=policy.logps.detach().to(out_dtype),
        ref_logps=None if ref_logps is None else ref_logps.detach().to(out_dtype),
        metrics=metrics_dict(objective.metrics.to(out_dtype)),
        policy_sums=policy.token_sums.detach().to(out_dtype),
    )
