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
    """token_logps [S, T] (0 at ignored positions), labels [S, T] -> per-sequence log-probs.

    A fully masked sequence has l = 0 (and count 0), in both reductions.
    """
    counts = (labels != ignore_index).sum(-1).to(token_logps.dtype)
    sums = token_logps.sum(-1)
    scale = 1.0 / counts.clamp(min=1.0) if length_normalized else torch.ones_like(counts)
    return SequenceLogps(sums * scale, sums, counts, scale)
