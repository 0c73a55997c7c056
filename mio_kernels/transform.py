"""The logit transform of the LM head: temperature, logit scale and final-logit softcapping.

With x = h @ W.T + b (the raw logits), the scored logits are

    z = c * tanh(s * x / c) / T       with softcapping c = final_logit_softcapping
    z = s * x / T                     without (c = None)

(s = logit_scale, T = temperature). Every backend computes it inside its logit tile / chunk, in
the two-float form `LogitTransform(scale, cap)`:  z = cap * tanh(scale * x) if cap > 0 else
scale * x, with the exact gradient dz/dx = scale * cap * (1 - tanh^2) (resp. scale).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class LogitTransform(NamedTuple):
    """What the kernels receive: z = cap * tanh(scale * x) when cap > 0, else scale * x."""

    scale: float = 1.0
    cap: float = 0.0

    @classmethod
    def of(cls, temperature: float = 1.0, logit_scale: float = 1.0,
           final_logit_softcapping: Optional[float] = None) -> "LogitTransform":
        if final_logit_softcapping is None:
            return cls(float(logit_scale) / float(temperature), 0.0)
        c = float(final_logit_softcapping)
        return cls(float(logit_scale) / c, c / float(temperature))

    @property
    def identity(self) -> bool:
        return self.cap == 0.0 and self.scale == 1.0


IDENTITY = LogitTransform()


def transform_logits(logits: Tensor, transform: LogitTransform) -> Tensor:
    """The transform in plain PyTorch (the reference backend and greedy decoding), any shape."""
    if transform.cap > 0:
        return transform.cap * torch.tanh(transform.scale * logits)
    return logits if transform.scale == 1.0 else transform.scale * logits
