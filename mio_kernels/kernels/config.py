"""The one shipped launch configuration per kernel (no autotuning), and the interpreter switches.

GPU tiles, bf16/fp16: 128-token x 128-vocab logit tiles, 64-wide reduction steps, 8 warps; the
operands feed the tensor cores (mma on sm_80, wgmma on sm_90) with fp32 accumulation.
GPU tiles, fp32: IEEE fp32 dots (so fp32 results match a float64 reference to ~1e-6), which run on
the FMA units with every operand of a reduction step in registers: at the bf16 tiles they spilled
(ptxas: forward 255 registers + 34-56 spill words, backward 664-684 spill words, sm_80/sm_90). So
128-token x 64-vocab tiles, 32-wide reduction steps, 16 warps: 0 spills for both kernels on sm_80
and sm_90, in the entropy and logit-transform variants too (110-128 registers; see
`python -m mio_kernels.kernels.aot`).
Under TRITON_INTERPRET=1 (CI without a GPU) each program instance is slow, so tiles are large
and the vocabulary is not split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Forward vocabulary splitting: aim for this many programs per SM, and give each split at least
# this many vocabulary columns (a split re-reads its token block's hidden rows).
PROGRAMS_PER_SM = 2
MIN_VOCAB_PER_SPLIT = 4096


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    v_splits: int = 1   # forward only: vocabulary slices per token block
    group_n: int = 8    # backward only: token blocks per L2-friendly group


def _block_d(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


def gpu_forward_config(d: int, v_splits: int = 1, dtype: torch.dtype = torch.bfloat16) -> LaunchConfig:
    if dtype == torch.float32:
        return LaunchConfig(block_n=128, block_v=64, block_d=_block_d(d, 32), num_warps=16, num_stages=3,
                            v_splits=v_splits)
    return LaunchConfig(block_n=128, block_v=128, block_d=_block_d(d, 64), num_warps=8, num_stages=3,
                        v_splits=v_splits)


def gpu_backward_config(d: int, dtype: torch.dtype = torch.bfloat16) -> LaunchConfig:
    if dtype == torch.float32:
        return LaunchConfig(block_n=128, block_v=64, block_d=_block_d(d, 32), num_warps=16, num_stages=2)
    return LaunchConfig(block_n=128, block_v=128, block_d=_block_d(d, 64), num_warps=8, num_stages=2)


def _interpreter_config(d: int) -> LaunchConfig:
    return LaunchConfig(block_n=64, block_v=512, block_d=_block_d(d, 128), num_warps=4, num_stages=1)


def forward_config(n: int, v: int, d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> LaunchConfig:
    if interpreting():
        return _interpreter_config(d)
    token_blocks = triton.cdiv(n, gpu_forward_config(d, dtype=dtype).block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Split the vocabulary only when there are too few token blocks to fill the GPU twice over.
    v_splits = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, token_blocks), triton.cdiv(v, MIN_VOCAB_PER_SPLIT)))
    return gpu_forward_config(d, v_splits, dtype)


def backward_config(n: int, v: int, d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> LaunchConfig:
    return _interpreter_config(d) if interpreting() else gpu_backward_config(d, dtype)


def dot_precision(t: torch.Tensor) -> str:
    # tf32 would cost fp32 inputs ~1e-3 relative error; ieee keeps them exact to fp32 rounding.
    return "ieee" if t.dtype == torch.float32 else "tf32"


def new_output(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Uninitialised kernel output; NaN-filled when MIO_KERNELS_POISON=1 (tests) so unwritten elements show."""
    out = torch.empty(shape, device=device, dtype=dtype)
    if os.environ.get("MIO_KERNELS_POISON", "0") == "1":
        out.fill_(float("nan"))
    return out


def upcast_on_load(t: torch.Tensor) -> bool:
    # The interpreter computes bf16 arithmetic wrongly; on a GPU, low precision feeds tensor cores.
    return interpreting() and t.dtype != torch.float32
