"""The logit transform of the LM head: temperature, logit scale and final-logit softcapping.

With x = h @ W.T + b (the raw logits), the scored logits are

    z = c * tanh(s * x / c) / T       with softcapping c = final_logit_softcapping
    z = s * x / T                     without (c = None)

(s = logit_scale, T = temperature). Every backend computes it inside its logit tile / chunk, in
the two-float form `LogitTransform(scale, cap)`:  z = cap * tanh(scale * x) if cap > 0 else
scale * x, with the exact gradient dz/dx = scale * cap * (1 - tanh^2) (resp. scale).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

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


# HF config attributes that change the logits in ways z = c * tanh(s * x / c) / T cannot express.
UNSUPPORTED_HEAD_ATTRS = ("output_multiplier_scale",)


def head_transform(lm) -> Dict[str, Optional[float]]:
    """The op's logit-transform options for `lm`'s head, read from its config: Gemma-2/3
    `final_logit_softcapping` (z = c * tanh(x / c)), Cohere `logit_scale` (z = s * x), Granite
    `logits_scaling` (z = x / s). Raises ValueError naming an attribute the op cannot express."""
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for attr in UNSUPPORTED_HEAD_ATTRS:
        value = getattr(cfg, attr, None)
        if value not in (None, 0, 1, 1.0, False):
            raise ValueError(f"{type(lm).__name__} transforms its logits with {attr}={value}, which the fused "
                             "loss cannot express (it scores c * tanh(s * (hidden @ lm_head.weight.T + bias) / c))")
    scale = 1.0
    for attr, invert in (("logit_scale", False), ("logits_scaling", True)):
        value = getattr(cfg, attr, None)
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value != 0):
            raise ValueError(f"{type(lm).__name__}'s {attr}={value!r} must be a finite nonzero number")
        scale *= 1.0 / value if invert else float(value)
    softcap = getattr(cfg, "final_logit_softcapping", None) or None  # 0 / False: none
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{type(lm).__name__}'s final_logit_softcapping={softcap!r} must be None or a number > 0")
    return dict(logit_scale=scale, final_logit_softcapping=None if softcap is None else float(softcap))
