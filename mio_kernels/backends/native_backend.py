"""`native` kernel backend: the C++/CUDA extension `mio_kernels._C` (csrc/).

Tokens are processed in chunks of R rows. Per chunk:
  forward:  Z = H_chunk @ W^T (+ b), one ATen GEMM (CPU BLAS / cuBLAS) with fp32 accumulation
            (fp64 for fp64 inputs); then a fused row epilogue: row max m, log sum exp(z - m),
            target gather -> per-token logp. m and the log-sum are saved apart as the softmax
            statistics [N, 2] (m + log-sum in one fp32 number loses ~5e-4 at logits of ~1e4).
  backward: Z recomputed; dZ = g * (onehot - softmax(Z)) written over it in place (the CPU
            path recomputes each row's m and log-sum from these logits, the CUDA path reads
            the saved ones); then dH_chunk = dZ @ W, dW += dZ^T @ H_chunk, db += sum_rows dZ
            as GEMMs into fp32 accumulators, cast to the parameters' dtype at the end.

Memory bound (extra bytes beyond inputs and outputs; p = 4 for fp32/bf16/fp16, 8 for fp64):
    R = clamp(budget // (V * p), 1, N)                              rows per chunk
    logits buffer                    R * V * p                      (the budgeted temporary)
    bf16/fp16 on CPU, once           V * H * 4 (+ V * 4 bias)       fp32 copy of W (and b)
    bf16/fp16 backward               V * H * 4 (+ V * 4)            fp32 dW (db) accumulator
    per chunk                        <= 3 * R * H * 4 + V * 4       gathered / upcast rows, dH rows, db row
    CUDA bf16/fp16 backward          + min(V, budget // (H * 4)) * H * 4   fp32 slab of dZ^T @ H_chunk
i.e. O(R * V + V * H), never O(N * V). When one logits row exceeds the budget, R = 1.
`last_workspace()` reports the buffer and the summed temporaries of the last call.

Chunk budget: 64 MiB of logits on CPU (R = 524 rows at V = 32000 in fp32; smaller chunks
cost GEMM efficiency: 32 MiB was ~20% slower end to end at H = 256), 1 GiB on CUDA.
Override with the environment variable MIO_KERNELS_NATIVE_CHUNK_MB (read at every call; may
be fractional) or `set_chunk_budget_bytes(n)` (wins over the variable; None restores it).

Threads (CPU): torch's intra-op thread count (torch.set_num_threads) drives both the GEMMs
and the epilogue, which splits rows over at::parallel_for.

Determinism (CPU): every row of the epilogue is computed by one thread in a fixed order, so
for a fixed thread count results are bitwise reproducible; they depend on the chunk size
only through rounding (GEMM blocking, the order dW and db are summed). CUDA results are
reproducible as far as the cuBLAS kernels chosen are.

Skipped rows (CPU): forward computes no logits for tokens at ignore_index (prompts, padding;
their logp is 0 and their softmax statistics are left 0), and backward recomputes only rows
with grad_logp != 0 (whole all-zero chunks therefore cost nothing). On CUDA every row is
computed (choosing rows would need a host synchronisation); zero-gradient rows get dZ = 0.

Dtypes: fp32, bf16, fp16 and fp64 (the last for float64 comparisons in tests). logp and the
softmax statistics are fp32, or fp64 for fp64 inputs; gradients come back in the parameters'
dtypes.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from mio_kernels import _native
from mio_kernels.transform import IDENTITY, LogitTransform

ENV_CHUNK_MB = "MIO_KERNELS_NATIVE_CHUNK_MB"
DEFAULT_CHUNK_MB = {"cpu": 64, "cuda": 1024}
MIB = 2**20

_budget_override: Optional[int] = None


def set_chunk_budget_bytes(nbytes: Optional[int]) -> Optional[int]:
    """Set the logits-chunk budget in bytes for every device (None: back to the environment
    variable / defaults). Returns the previous override."""
    global _budget_override
    if nbytes is not None and int(nbytes) < 1:
        raise ValueError(f"chunk budget must be a positive number of bytes, got {nbytes}")
    previous, _budget_override = _budget_override, (None if nbytes is None else int(nbytes))
    return previous


def chunk_budget_bytes(device: torch.device) -> int:
    """The logits-chunk budget in bytes that a call on `device` uses."""
    if _budget_override is not None:
        return _budget_override
    env = os.environ.get(ENV_CHUNK_MB, "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{ENV_CHUNK_MB} must be a number of MiB, got {env!r}") from None
        if mb <= 0:
            raise ValueError(f"{ENV_CHUNK_MB} must be positive, got {env!r}")
        return max(1, int(mb * MIB))
    return DEFAULT_CHUNK_MB.get(torch.device(device).type, DEFAULT_CHUNK_MB["cpu"]) * MIB


def last_workspace() -> Dict[str, int]:
    """What the last native call allocated (see the module docstring)."""
    return _native.last_workspace()


class NativeBackend:
    name = "native"

    def supports(self, device) -> Optional[str]:
        reason = _native.unavailable_reason()
        if reason is not None:
            return reason
        device = torch.device(device)
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if _native.with_cuda():
                return None
            return ("mio_kernels._C was built without its CUDA sources (CPU-only torch, no CUDA toolkit, "
                    "or MIO_KERNELS_NO_CUDA=1 at build time); rebuild with "
                    "`pip install --no-build-isolation -e .` where torch is a CUDA build and nvcc is found")
        return f"the native backend runs on cpu and cuda tensors, not {device.type}"

    def forward(self, hidden, weight, labels, bias, ignore_index, transform: LogitTransform = IDENTITY,
                with_entropy: bool = False):
        """hidden [N, H], weight [V, H], labels [N] int64, bias [V] | None -> (logp [N],
        softmax_stats [N, 2]: row max, log sum exp(z - max) [, entropy]), fp32 (fp64 for fp64
        inputs); logp is 0 at ignore_index."""
        return _native.logprob_forward(hidden, weight, labels, bias, ignore_index, chunk_budget_bytes(hidden.device),
                                       transform.scale, transform.cap, with_entropy)

    def backward(self, hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index,
                 needs_hidden_grad, needs_weight_grad, transform: LogitTransform = IDENTITY, grad_entropy=None):
        """-> (d_hidden [N, H] | None, d_weight [V, H] | None, d_bias [V] | None), gradients of
        sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * entropy[t]) in the parameters' dtypes."""
        return _native.logprob_backward(hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index,
                                        needs_hidden_grad, needs_weight_grad, chunk_budget_bytes(hidden.device),
                                        transform.scale, transform.cap, grad_entropy)
