"""Input checks shared by every backend: bad input gets a ValueError/TypeError naming the argument
and what was expected, before any kernel runs.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from mio_kernels.losses import LOSSES, get_loss
from mio_kernels.objective import PreferenceConfig

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _require_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


_warned_all_ignored = False


def warn_all_ignored(ignore_index: int) -> None:
    """Once per process: a batch in which no label is scored."""
    global _warned_all_ignored
    if not _warned_all_ignored:
        _warned_all_ignored = True
        warnings.warn(f"every label of the batch is ignore_index={ignore_index}: no token is scored, so every "
                      "sequence log-prob is 0 and the loss is a constant without gradient (check the labels; "
                      "warned once)", stacklevel=4)


def check_linear_inputs(hidden, weight, labels, bias=None, *, ignore_index: int = -100,
                        hidden_name: str = "hidden", weight_name: str = "weight", bias_name: str = "bias",
                        check_label_values: bool = True, warn_unscored: bool = False) -> None:
    """hidden [..., H] float, weight [V, H] same dtype/device, labels hidden.shape[:-1] integer in [0, V).
    check_label_values: the label values too (one host sync), and with warn_unscored a warning (once
    per process) when no label is scored."""
    _require_tensor(hidden_name, hidden)
    _require_tensor(weight_name, weight)
    _require_tensor("labels", labels)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{hidden_name} must be a floating tensor ({FLOAT_DTYPES}), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} dtype {weight.dtype} must match {hidden_name} dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but {hidden_name} is on {hidden.device}")
    if hidden.dim() < 2:
        raise ValueError(f"{hidden_name} must be [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name} is [V, H] = {tuple(weight.shape)} but {hidden_name}'s last dim "
                         f"H = {hidden.shape[-1]}: the hidden sizes must match")
    if bias is not None:
        _require_tensor(bias_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{bias_name} must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"{bias_name} must have {hidden_name}'s dtype and device "
                            f"({hidden.dtype}, {hidden.device}), got ({bias.dtype}, {bias.device})")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64, int32 or any other integer dtype; used as "
                        f"int64), got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {hidden_name}'s leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but {hidden_name} is on {hidden.device}")
    if hidden.numel() == 0 or labels.numel() == 0:
        raise ValueError(f"empty batch: {hidden_name} has shape {tuple(hidden.shape)}")
    if check_label_values:
        vocab = weight.shape[0]
        scored = labels != ignore_index
        bad = scored & ((labels < 0) | (labels >= vocab))
        any_bad, any_scored = torch.stack([bad.any(), scored.any()]).tolist()  # one host sync, before any kernel
        if any_bad:                                                            # could index out of bounds
            value = int(labels[bad].flatten()[0])
            raise ValueError(f"labels must be in [0, V={vocab}) or equal ignore_index={ignore_index}; "
                             f"found {value}")
        if warn_unscored and not any_scored:
            warn_all_ignored(ignore_index)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_transform(temperature=1.0, logit_scale=1.0, final_logit_softcapping=None) -> None:
    """The logit-transform options (mio_kernels.transform)."""
    if not (_is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (_is_number(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite nonzero number, got {logit_scale!r}")
    if final_logit_softcapping is not None and not (_is_number(final_logit_softcapping)
                                                    and final_logit_softcapping > 0):
        raise ValueError(f"final_logit_softcapping must be None or a finite number > 0, "
                         f"got {final_logit_softcapping!r}")


def check_config(cfg: PreferenceConfig) -> None:
    spec = get_loss(cfg.loss_type)  # raises on an unknown loss_type
    check_transform(cfg.temperature, cfg.logit_scale, cfg.final_logit_softcapping)
    if not isinstance(cfg.num_negatives, int) or isinstance(cfg.num_negatives, bool) or cfg.num_negatives < 1:
        raise ValueError(f"num_negatives must be an integer >= 1, got {cfg.num_negatives!r}")
    if not (isinstance(cfg.beta, (int, float)) and math.isfinite(cfg.beta) and cfg.beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {cfg.beta!r}")
    if not (0.0 <= cfg.label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing!r}")
    if cfg.label_smoothing > 0 and not spec.uses_label_smoothing:
        smoothed = " or ".join(f"loss_type={name!r}" for name, other in LOSSES.items() if other.uses_label_smoothing)
        raise ValueError(f"label_smoothing={cfg.label_smoothing} is only defined for {smoothed}, "
                         f"not {cfg.loss_type!r}")
    if not (math.isfinite(cfg.sft_weight) and cfg.sft_weight >= 0):
        raise ValueError(f"sft_weight must be a finite number >= 0, got {cfg.sft_weight!r}")


def check_packing(hidden: Tensor, cu_seqlens: Optional[Tensor], check_values: bool) -> int:
    """Padded hidden [S, T, H], or packed hidden [N, H] with cu_seqlens [S+1]; returns S.

    The values of cu_seqlens (0 first, non-decreasing, N last) cost one host sync: checked with
    check_values."""
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [S, T, H] (or [N, H] with cu_seqlens), got shape {tuple(hidden.shape)}")
        return hidden.shape[0]
    _require_tensor("cu_seqlens", cu_seqlens)
    if hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens, hidden must be packed [N, H], got shape {tuple(hidden.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [S+1] with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    if check_values:
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {first}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing (sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1])")
        if last != hidden.shape[0]:
            raise ValueError(f"cu_seqlens must end at N = {hidden.shape[0]} (hidden's tokens), got {last}")
    return cu_seqlens.numel() - 1


def check_batch_layout(num_rows: int, cfg: PreferenceConfig) -> None:
    if num_rows % (1 + cfg.num_negatives) != 0:
        raise ValueError(f"the batch has S={num_rows} sequences, not divisible by 1 + num_negatives = "
                         f"{1 + cfg.num_negatives}: rows must be [chosen (P); rejected_1 (P); ...; rejected_K (P)]")


def check_reference(cfg: PreferenceConfig, hidden: Tensor, weight: Tensor, ref_logps: Optional[Tensor],
                    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], num_sequences: int) -> None:
    has_logps = ref_logps is not None
    has_states = ref_hidden is not None or ref_weight is not None
    if cfg.reference_free:
        if has_logps or has_states:
            raise ValueError("reference_free=True uses no reference: pass neither ref_logps nor ref_hidden/ref_weight")
        return
    if has_logps == has_states:
        raise ValueError("a reference is needed (reference_free=False): pass exactly one of ref_logps [S] or "
                         "ref_hidden [S, T, H_ref] with ref_weight [V, H_ref]"
                         + (" (got both)" if has_logps else " (got neither)"))
    if has_logps:
        _require_tensor("ref_logps", ref_logps)
        if ref_logps.shape != (num_sequences,):
            raise ValueError(f"ref_logps must be [S] = [{num_sequences}], got {tuple(ref_logps.shape)}")
        if not ref_logps.dtype.is_floating_point:
            raise TypeError(f"ref_logps must be a floating tensor, got {ref_logps.dtype}")
        if ref_logps.device != hidden.device:
            raise ValueError(f"ref_logps is on {ref_logps.device} but hidden is on {hidden.device}")
    else:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("the reference model's states need both ref_hidden and ref_weight")
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden must be hidden's shape but H_ref: {tuple(hidden.shape[:-1])} + (H_ref,), "
                             f"got {tuple(ref_hidden.shape)}")
        if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight must be [V, H_ref] with V = {weight.shape[0]} (the policy's vocabulary), "
                             f"got {tuple(ref_weight.shape)}")


def check_first_order_only() -> None:
    """Called in the kernels' autograd backwards: autograd enables grad mode there only for
    create_graph=True, which these closed-form gradients cannot honour."""
    if torch.is_grad_enabled():
        raise RuntimeError("second derivatives of the fused kernels are not supported (backward with "
                           "create_graph=True); use backend='reference' if you need them")


def check_finite_result(seq_logps: Tensor, **inputs: Optional[Tensor]) -> None:
    """Non-finite log-probs are traced back to the input that caused them (one host sync)."""
    if bool(torch.isfinite(seq_logps).all()):
        return
    for name, t in inputs.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
    raise ValueError("sequence log-probs are non-finite although the inputs are finite "
                     "(logits overflowed the input dtype?)")
