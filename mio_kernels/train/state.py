"""The training state: what a checkpoint saves and a resume restores.

`TrainState` is a torch.distributed.checkpoint `Stateful`: DCP calls `state_dict()` to save (and,
on load, to get the tensors it loads into, in place) and `load_state_dict()` after loading.
Tensors: model and optimizer (sharded under FSDP), reference log-probs, the online reference
model. `progress` (phase, step, evaluation results) is plain JSON, written next to them
(checkpoint.py: trainer_state.json). The learning-rate schedule and the data order are pure
functions of (seed, phase, step), so the progress is their whole state.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.distributed.checkpoint.stateful import Stateful

PHASES = ("sft", "pref", "done")


def fresh_progress() -> Dict[str, Any]:
    return {"phase": "sft", "step": 0, "eval_before": None, "eval_after": None}


class TrainState(Stateful):
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ref_train: Optional[torch.Tensor] = None    # [N, 1+K] reference log-prob sums (precompute)
        self.ref_eval: Optional[torch.Tensor] = None     # [N_eval, 1+K]
        self.ref_model: Optional[torch.nn.Module] = None  # online: a frozen copy of the policy
        self.progress: Dict[str, Any] = fresh_progress()

    def global_step(self, sft_steps: int) -> int:
        """Optimizer steps since the start of the job (SFT steps, then preference steps)."""
        return (sft_steps if self.progress["phase"] != "sft" else 0) + self.progress["step"]

    def state_dict(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state: Dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if self.ref_train is not None:
            state["ref"] = {"train": self.ref_train, "eval": self.ref_eval}
        if self.ref_model is not None:
            state["ref_model"] = get_model_state_dict(self.ref_model)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if "ref" in state:  # loaded in place into these very tensors; kept explicit
            self.ref_train, self.ref_eval = state["ref"]["train"], state["ref"]["eval"]
        if self.ref_model is not None:
            set_model_state_dict(self.ref_model, state["ref_model"])
