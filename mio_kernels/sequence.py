"""Sequence layer: per-token log-probs [S, T] -> per-sequence log-probs [S], and the factor its
backward hands each token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SequenceLogps(NamedTuple):
    logps: Tensor       # [S] l(y): sum of token log-probs, or their mean when length-normalised
    token_sums: Tensor  # [S] sum of token log-probs
    counts: Tensor      # [S] number of scored tokens (float)
    scale: Tensor       # [S] d l / d logp_t for each scored token t (1, or 1/count)


def reduce_sequences(token_logps: Tensor, labels: Tensor, ignore_index: int, length_normalized: bool) -> SequenceLogps:
    """token_logps [S, T] (0 at ignored positions), labels [S, T] -> per-sequence log-probs, float64.

    Sums run in float64: l of a long sequence is large (~T log V) while the losses need it to
    better than fp32's ~1e-7 of |l| (the pairwise losses take differences of nearby l's). Cheap:
    [S, T] in, [S] out. A fully masked sequence has l = 0 (and count 0), in both reductions.
    """
    counts = (labels != ignore_index).sum(-1).to(torch.float64)
    sums = token_logps.to(torch.float64).sum(-1)
    scale = 1.0 / counts.clamp(min=1.0) if length_normalized else torch.ones_like(counts)
    return SequenceLogps(sums * scale, sums, counts, scale)


def result_dtype(hidden: Tensor) -> torch.dtype:
    """Public outputs (loss, sequence log-probs) are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32
