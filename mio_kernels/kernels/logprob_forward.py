"""Triton forward: logit tiles -> transform -> online logsumexp (fp32) -> target gather -> per-token
log-prob (and, with ENTROPY, the online moment sum exp(z - m) (z - m) that gives the entropy).

Grid (token blocks, vocab splits). Each program walks its slice of the vocabulary in BLOCK_V
tiles; a tile of logits z = h @ w.T (+ b) lives only in registers. Per split it writes the
partial logsumexp and the target logit (0 unless the label falls in that split); the launcher
merges the splits (O(N * splits)). Splitting V keeps the GPU busy when N is small.

The saved softmax statistics are the row max m and log(sum exp(z - m)) as two fp32 numbers, not
lse = m + log(...) as one: at logits ~1e4 a single fp32 lse is off by up to half an ulp (5e-4),
and every exp(z - lse) of the backward would inherit that relative error.

Ignored tokens (label == ignore_index: prompt tokens, masked rows) are not scored. A BLOCK_N tile
whose labels are all ignored skips the GEMM: split 0 writes (max 0, sum exp 1, target 0, moment 0)
and every other split (max 0, sum exp 0, ...), so the merge gives max 0, log sum exp 0, mean 0.
Contract: softmax_stats of ignored rows are (0, 0) (and entropy 0), in every tile, and logp is 0;
the numbers are finite but are not the row's softmax, so a consumer must give ignored rows zero
weight (the backward masks their dZ, since exp(z - 0) may overflow).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mio_kernels.kernels.config import dot_precision, forward_config, new_output, upcast_on_load
from mio_kernels.kernels.tile import logit_tile, transform_code, transform_tile
from mio_kernels.transform import IDENTITY


@triton.jit
def logprob_forward_kernel(
    H, W, Y, B, MAX_PART, SUMEXP_PART, TARGET_PART, MOMENT_PART,
    N, V, D, stride_hn, stride_wv, ignore_index, v_per_split, scale, cap,
    HAS_BIAS: tl.constexpr, TRANSFORM: tl.constexpr, ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(Y + offs_n, mask=mask_n, other=ignore_index)
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn  # 64-bit: N * H may exceed 2^31

    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sumexp = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    moment = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - row_max) * (z - row_max)

    v_begin = pid_split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    if tl.max((labels != ignore_index).to(tl.int32), axis=0) == 0:  # nothing scored: no GEMM
        row_max = tl.zeros((BLOCK_N,), tl.float32)
        row_sumexp += (pid_split == 0).to(tl.float32)  # merged log sum exp: log 1 = 0
        v_end = v_begin
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
        logits = logit_tile(h_rows, w_rows, B, offs_v, mask_n, mask_v, D, HAS_BIAS, UPCAST, DOT_PRECISION,
                            BLOCK_N, BLOCK_V, BLOCK_D)
        logits, _ = transform_tile(logits, scale, cap, TRANSFORM)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))

        # Online logsumexp: every split holds >= 1 valid column, so new_max is finite.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        shifted = logits - new_max[:, None]
        exps = tl.exp(shifted)
        if ENTROPY:  # moment relative to the new max: exp(m - m') (moment + (m - m') sum) + tile's
            delta = tl.where(row_sumexp > 0, row_max - new_max, 0.0)
            moment = tl.exp(delta) * (moment + delta * row_sumexp) + \
                tl.sum(exps * tl.where(mask_v[None, :], shifted, 0.0), axis=1)  # masked columns: exps = 0
        row_sumexp = row_sumexp * tl.exp(row_max - new_max) + tl.sum(exps, axis=1)
        row_max = new_max
        is_target = offs_v[None, :] == labels[:, None]
        target += tl.sum(tl.where(is_target, logits, 0.0), axis=1)

    out = pid_split * N + offs_n
    tl.store(MAX_PART + out, row_max, mask=mask_n)
    tl.store(SUMEXP_PART + out, row_sumexp, mask=mask_n)
    tl.store(TARGET_PART + out, target, mask=mask_n)
    if ENTROPY:
        tl.store(MOMENT_PART + out, moment, mask=mask_n)


def _merge_splits(max_part, sumexp_part, moment_part):
    """Per-split (max, sum exp(z - max), moment) -> row max, log sum exp(z - max), and the mean
    E_p[z - max] (None without moments)."""
    row_max = max_part.max(0).values
    shift = max_part - row_max  # <= 0
    weights = torch.exp(shift)
    sumexp = (sumexp_part * weights).sum(0)
    mean = None if moment_part is None else (weights * (moment_part + shift * sumexp_part)).sum(0) / sumexp
    return row_max, torch.log(sumexp), mean


def logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias, ignore_index: int,
                    transform=IDENTITY, with_entropy: bool = False):
    """hidden [N, D], weight [V, D], labels [N] int64, bias [V] | None, transform (LogitTransform)
    -> (logp [N] fp32, softmax_stats [N, 2] fp32: row max, log sum exp(z - max) [, entropy:
    with_entropy]; logp and every stat are 0 where ignored)."""
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = forward_config(n, v, d, hidden.device, hidden.dtype)
    v_per_split = triton.cdiv(triton.cdiv(v, cfg.v_splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(v, v_per_split)
    max_part = new_output((splits, n), hidden.device)
    sumexp_part = new_output((splits, n), hidden.device)
    target_part = new_output((splits, n), hidden.device)
    moment_part = new_output((splits, n), hidden.device) if with_entropy else None
    grid = (triton.cdiv(n, cfg.block_n), splits)
    logprob_forward_kernel[grid](
        hidden, weight, labels, bias if bias is not None else hidden, max_part, sumexp_part, target_part,
        moment_part if with_entropy else max_part,
        n, v, d, hidden.stride(0), weight.stride(0), ignore_index, v_per_split, transform.scale, transform.cap,
        HAS_BIAS=bias is not None, TRANSFORM=transform_code(transform), ENTROPY=with_entropy,
        UPCAST=upcast_on_load(hidden), DOT_PRECISION=dot_precision(hidden),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    row_max, log_sumexp, mean = _merge_splits(max_part, sumexp_part, moment_part)
    target = target_part.sum(0)  # only the split holding the label contributes
    scored = labels != ignore_index
    logp = torch.where(scored, (target - row_max) - log_sumexp, 0.0)
    stats = [torch.where(scored, row_max, 0.0), torch.where(scored, log_sumexp, 0.0)]  # ignored: (0, 0)
    stats += [torch.where(scored, log_sumexp - mean, 0.0)] if with_entropy else []
    return logp, torch.stack(stats, dim=1)
