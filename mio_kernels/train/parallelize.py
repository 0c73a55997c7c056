"""Process group, device, and FSDP2 (`fully_shard`) for a PreferenceModel.

Sharding (torchtitan's recipe, adapted to a loss that reads the LM-head weight directly):
  * each decoder block is its own FSDP unit (gathered for its forward, resharded after);
  * the LM head (`PreferenceModel.head`, an LMHeadLoss) is one unit with
    reshard_after_forward=False. The fused loss runs inside its forward, so FSDP's own hooks
    gather the weight before the loss and reduce-scatter its gradient after backward: the
    kernel sees the whole [V, H] weight and is never given a shard or re-gathered per chunk.
    Across the micro-batches of one step the trainer also keeps it gathered
    (`set_reshard_after_backward(False)` until the last one): one all-gather per step;
  * the root unit holds the rest (embeddings, final norm); FSDP never reshards the root
    after forward. With tied embeddings the head is left in the root unit (one weight, one unit).
Gradients: every process's loss is already normalised by the global count of prompts/tokens in
the step, so the cross-process reduction must sum (FSDP averages by default: the trainer
multiplies the loss by the world size, keeping gradients backend-agnostic).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from mio_kernels.train.model import PreferenceModel, decoder_layers


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Reads torchrun's environment; one process (no process group) when it is absent.
    Backend: NCCL on CUDA, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=int(os.environ.get("MIO_DIST_TIMEOUT_MIN", "30"))))
    return Dist(rank, world, local_rank, dev)


def fsdp_modules(model: nn.Module) -> List[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def parallelize(pm: PreferenceModel, d: Dist, bf16: bool, activation_checkpointing: bool) -> PreferenceModel:
    """Apply activation checkpointing and, with more than one process, FSDP2 (see module doc).

    bf16: single process -> autocast for the backbone; FSDP -> parameters gathered in bf16,
    gradients reduced in fp32 (MixedPrecisionPolicy), no autocast.
    """
    if activation_checkpointing:  # HF's per-block checkpointing (renamed in transformers 5)
        kwargs = {"use_reentrant": False}
        if hasattr(pm.lm, "activation_checkpointing_enable"):
            pm.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            pm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not d.enabled:
        pm.autocast_dtype = torch.bfloat16 if bf16 else None
        return pm
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    pm.autocast_dtype = None
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    dtype = torch.bfloat16 if bf16 else None
    blocks_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if bf16 else None)
    # Root and head inputs include fp32 reference log-probs: never cast them to bf16.
    outer_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if bf16 else None,
                                    cast_forward_inputs=False)
    for block in decoder_layers(pm.backbone, pm.lm):
        fully_shard(block, mesh=mesh, mp_policy=blocks_mp)
    if not pm.tied:
        fully_shard(pm.head, mesh=mesh, mp_policy=outer_mp, reshard_after_forward=False)
    fully_shard(pm, mesh=mesh, mp_policy=outer_mp)
    return pm


def set_head_kept_gathered(pm: nn.Module, keep: bool) -> None:
    """Keep the sharded LM head gathered after backward (between micro-batches of one step)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(pm.head, FSDPModule):
        pm.head.set_reshard_after_backward(not keep)


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter (after evaluation, before a checkpoint)."""
    for m in fsdp_modules(model):
        m.reshard()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_state_dict(model: nn.Module, d: Dist, rank0_only: bool = False) -> dict:
    """The model's full (unsharded) state dict on CPU: on every process, or (rank0_only) on rank 0
    with an empty dict elsewhere. Every process must call it."""
    if not d.enabled:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))
    return {k: v.detach().cpu() for k, v in sd.items()}
