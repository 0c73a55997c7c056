"""Triton backward: recompute a logit tile, turn it into dZ, and scatter dH, dW, db.

One program per (token block, vocab block) tile:
    x  = h @ w.T (+ b)                      recomputed from the saved inputs, fp32 accumulate
    z  = transform(x)                       (tile.transform_tile; identity costs nothing)
    dZ = g * (onehot(y) - p) - gH * p * ((z - m) - mu),   p = exp((z - m) - log_sumexp)
                                            g = dL/dlogp, gH = dL/dentropy per token (0 where ignored);
                                            m, log_sumexp saved by the forward, mu = E_p[z - m]
    dX = dZ * dz/dx
    dH[tokens] += dZ @ w,  dW[vocab] += dZ.T @ h,  db[vocab] += sum_tokens dZ
The adds are fp32 atomics into dH [N, D] and dW [V, D] (cast to the parameter dtype by the
launcher), so no N x V tensor ever exists and nothing beyond dH + dW + O(N) is allocated. They are
sem="relaxed": only their sum matters and no program reads them back, so the default acq_rel
barrier around each add buys nothing.
Tiles whose tokens all have g = 0 (prompt tokens, masked rows) skip all work; in other tiles
such rows get dZ = 0 whatever the saved softmax stats (the forward saves (0, 0) for ignored rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mio_kernels.kernels.config import backward_config, dot_precision, upcast_on_load
from mio_kernels.kernels.tile import logit_tile, transform_code, transform_tile
from mio_kernels.transform import IDENTITY


@triton.jit
def logprob_backward_kernel(
    H, W, Y, B, ROW_MAX, LOG_SUMEXP, G, GE, MU, DH, DW, DB,
    N, V, D, stride_hn, stride_wv, stride_dhn, stride_dwv, scale, cap,
    HAS_BIAS: tl.constexpr, TRANSFORM: tl.constexpr, ENTROPY: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped tile order: GROUP_N token blocks sweep the vocabulary together, so their h rows
    # and the w tiles they share stay in L2.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V, BLOCK_V)
    tiles_per_group = GROUP_N * blocks_v
    first_n = (pid // tiles_per_group) * GROUP_N
    group_size = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % tiles_per_group) % group_size
    pid_v = (pid % tiles_per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    g = tl.load(G + offs_n, mask=mask_n, other=0.0)
    g_any = tl.abs(g)
    if ENTROPY:
        ge = tl.load(GE + offs_n, mask=mask_n, other=0.0)
        g_any += tl.abs(ge)
    # 64-bit row offsets: N * H and V * H may exceed 2^31.
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
    dh_rows = DH + offs_n.to(tl.int64)[:, None] * stride_dhn
    dw_rows = DW + offs_v.to(tl.int64)[:, None] * stride_dwv
    if tl.max(g_any, axis=0) > 0.0:
        logits = logit_tile(h_rows, w_rows, B, offs_v, mask_n, mask_v, D, HAS_BIAS, UPCAST, DOT_PRECISION,
                            BLOCK_N, BLOCK_V, BLOCK_D)
        logits, slope = transform_tile(logits, scale, cap, TRANSFORM)

        labels = tl.load(Y + offs_n, mask=mask_n, other=-1)
        live = mask_n & (g_any > 0.0)  # else max = inf, probs = 0 (ignored rows' stats (0, 0): exp(z) may overflow)
        row_max = tl.load(ROW_MAX + offs_n, mask=live, other=float("inf"))
        log_sumexp = tl.load(LOG_SUMEXP + offs_n, mask=live, other=0.0)
        probs = tl.exp((logits - row_max[:, None]) - log_sumexp[:, None])
        onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
        dz = g[:, None] * (onehot - probs)
        if ENTROPY:
            mu = tl.load(MU + offs_n, mask=mask_n, other=0.0)
            centered = tl.where(live[:, None], logits - row_max[:, None], 0.0)  # dead rows: probs = 0
            dz -= ge[:, None] * probs * (centered - mu[:, None])
        if TRANSFORM != 0:
            dz = dz * slope
        dz = tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)
        if HAS_BIAS and COMPUTE_DW:
            tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
        # Low-precision inputs: dZ joins them in the tensor-core dots (fp32 accumulation).
        if UPCAST:
            dz_op = dz
        else:
            dz_op = dz.to(H.dtype.element_ty)

        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if COMPUTE_DH:
                w = tl.load(w_rows + offs_d[None, :],
                            mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_rows + offs_d[None, :], dh,
                              mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
            if COMPUTE_DW:
                h = tl.load(h_rows + offs_d[None, :],
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_rows + offs_d[None, :], dw,
                              mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")


def logprob_backward(hidden, weight, labels, bias, softmax_stats, grad_logp, ignore_index,
                     needs_hidden_grad: bool, needs_weight_grad: bool, transform=IDENTITY, grad_entropy=None):
    """Gradients of sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * entropy[t]); see the module
    docstring. softmax_stats [N, 2] ([N, 3] with the entropy) is what logprob_forward returned.

    Allocates fp32 dH [N, D] and dW [V, D] (+ db [V]) accumulators and nothing of size N x V.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = backward_config(n, v, d, hidden.device, hidden.dtype)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    d_hidden = torch.zeros((n, d), **f32) if needs_hidden_grad else None
    d_weight = torch.zeros((v, d), **f32) if needs_weight_grad else None
    d_bias = torch.zeros((v,), **f32) if (needs_weight_grad and bias is not None) else None
    if d_hidden is None and d_weight is None:
        return None, None, None
    # Ignored tokens carry grad 0 by contract; force it so a stray value cannot leak in.
    grad_logp = torch.where(labels != ignore_index, grad_logp.float(), 0.0).contiguous()
    stats = softmax_stats.float()
    row_max, log_sumexp = stats[:, 0].contiguous(), stats[:, 1].contiguous()  # O(N) copies
    entropy = grad_entropy is not None
    if entropy:
        grad_entropy = torch.where(labels != ignore_index, grad_entropy.float(), 0.0).contiguous()
        mean = (stats[:, 1] - stats[:, 2]).contiguous()  # E_p[z - m] = log sum exp(z - m) - entropy
    any_out = d_hidden if d_hidden is not None else d_weight
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
    logprob_backward_kernel[grid](
        hidden, weight, labels, bias if bias is not None else hidden, row_max, log_sumexp, grad_logp,
        grad_entropy if entropy else grad_logp, mean if entropy else grad_logp,
        d_hidden if d_hidden is not None else any_out,
        d_weight if d_weight is not None else any_out,
        d_bias if d_bias is not None else any_out,
        n, v, d, hidden.stride(0), weight.stride(0), d, d, transform.scale, transform.cap,
        HAS_BIAS=bias is not None, TRANSFORM=transform_code(transform), ENTROPY=entropy, COMPUTE_DH=d_hidden is not None, COMPUTE_DW=d_weight is not None,
        UPCAST=upcast_on_load(hidden), DOT_PRECISION=dot_precision(hidden),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return cast(d_hidden, hidden), cast(d_weight, weight), cast(d_bias, bias)
