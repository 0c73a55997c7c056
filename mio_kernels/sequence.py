"""Sequence layer: per-token log-probs -> per-sequence log-probs [S], and the factor its backward
hands each token.

Two layouts of the same S sequences: padded, token log-probs [S, T] (a row per sequence), or
packed, [N] with cu_seqlens [S+1] (flash-attention's convention: sequence i is tokens
cu_seqlens[i]:cu_seqlens[i+1]). Both reduce to the same [S] results.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class SequenceLogps(NamedTuple):
    logps: Tensor       # [S] l(y): sum of token log-probs, or their mean when length-normalised
    token_sums: Tensor  # [S] sum of token log-probs
    counts: Tensor      # [S] number of scored tokens (float)
    scale: Tensor       # [S] d l / d logp_t for each scored token t (1, or 1/count)


def reduce_sequences(token_logps: Tensor, labels: Tensor, ignore_index: int, length_normalized: bool,
                     cu_seqlens: Optional[Tensor] = None) -> SequenceLogps:
    """token_logps (0 at ignored positions) and labels, [S, T] or packed [N] with cu_seqlens ->
    per-sequence log-probs, float64.

    Sums run in float64: l of a long sequence is large (~T log V) while the losses need it to
    better than fp32's ~1e-7 of |l| (the pairwise losses take differences of nearby l's). Cheap:
    tokens in, [S] out. A sequence with no scored token has l = 0 (and count 0), in both reductions.
    """
    scored = (labels != ignore_index).to(torch.float64)
    if cu_seqlens is None:
        counts, sums = scored.sum(-1), token_logps.to(torch.float64).sum(-1)
    else:
        counts, sums = segment_sums(scored, cu_seqlens), segment_sums(token_logps.to(torch.float64), cu_seqlens)
    scale = 1.0 / counts.clamp(min=1.0) if length_normalized else torch.ones_like(counts)
    return SequenceLogps(sums * scale, sums, counts, scale)


def segment_sums(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """values [N] float64 -> [S] sums over cu_seqlens' segments, each reduced on its own.

    Not as differences of one prefix sum: autograd through those gives every token's gradient an
    absolute error of ~1e-16 x the largest coefficient in the batch, O(1) wrong for a sequence
    whose own coefficient is tiny next to another's. segment_reduce is deterministic, has an
    exact backward (each token gets its segment's gradient) and needs no host sync.
    """
    # cu_seqlens is validated with check_values; clamped here so no segment reads past N anyway
    bounds = cu_seqlens.long().clamp(0, values.shape[0]).cummax(0).values
    return torch.segment_reduce(values, "sum", lengths=bounds[1:] - bounds[:-1], unsafe=True)


def per_token(seq_values: Tensor, labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """[S] per-sequence values -> one per token, shaped like labels (the backward's dL/dlogp_t)."""
    if cu_seqlens is None:
        return seq_values[:, None].expand(labels.shape)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return seq_values.repeat_interleave(lengths, output_size=labels.shape[0])  # no host sync


def result_dtype(hidden: Tensor) -> torch.dtype:
    """Public outputs (loss, sequence log-probs) are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32
