"""Reference scoring: the reference log-probs the preference loss compares the policy with.

The reference is the policy as it is after the SFT warm-up. `--reference`:
  precompute  one forward-only pass scores every training prompt the preference schedule visits
              (and the held-out set) before preference training: no second model in memory;
  online      a frozen copy of the policy, sharded like it, scores each batch;
  none        reference-free (the loss sees log-probs, not log-ratios).
Log-probs are sequence SUMS for every loss type (the op applies a length-normalised loss's
reduction itself) and, per batch, in the loss's row layout (chosen block, then K rejected blocks).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from mio_kernels.train.data import Example
from mio_kernels.train.evaluate import sequence_logps
from mio_kernels.train.model import HeadTasks, PreferenceModel
from mio_kernels.train.parallelize import Dist, full_state_dict, parallelize


def frozen_copy(lm: torch.nn.Module, d: Dist, bf16: bool) -> PreferenceModel:
    """A frozen copy of the policy as it is now (online reference), sharded like the policy."""
    sd = full_state_dict(lm, d)
    ref_lm = type(lm)(lm.config).to(d.device)
    ref_lm.load_state_dict(sd)
    ref_lm.requires_grad_(False).eval()
    return parallelize(PreferenceModel(ref_lm), d, bf16, activation_checkpointing=False)


def score_table(model, examples: Sequence[Example], needed: Sequence[int], tasks: HeadTasks, batch_size: int,
                pad_id: int, d: Dist, packing: Optional[int] = None, tick=None) -> Tensor:
    """[N, 1 + K] fp32 reference log-prob sums of `examples`; rows not in `needed` stay NaN, so using
    one by mistake shows as a NaN loss. Batched as evaluate.sequence_logps (packed under `packing`
    tokens); tick: its progress callback."""
    width = len(examples[0].responses) if examples else 1
    table = torch.full((len(examples), width), float("nan"))
    needed = sorted(set(needed))
    if needed:
        table[needed] = sequence_logps(model, [examples[i] for i in needed], tasks, batch_size, pad_id, d,
                                       packing=packing, tick=tick).sums
    return table


def batch_reference(mode: str, ref_train: Optional[Tensor], ref_model, tasks: HeadTasks, indices: Sequence[int],
                    batch: Dict[str, Tensor], device: torch.device) -> Optional[Tensor]:
    """[S] reference log-prob sums of the batch of prompts `indices`, in the loss's row layout
    (`batch`: padded or packed, as the policy's)."""
    if mode == "none":
        return None
    if mode == "online":
        with torch.no_grad():
            return ref_model(**batch, task=tasks.sequence_logps)["policy_logps"]
    return ref_train[list(indices)].T.reshape(-1).to(device)
