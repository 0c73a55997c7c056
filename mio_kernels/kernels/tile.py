"""Triton helpers shared by the forward and backward kernels."""
import triton
import triton.language as tl


@triton.jit
def logit_tile(h_rows, w_rows, B, offs_v, mask_n, mask_v, D,
               HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = h @ w.T (+ b) for one [BLOCK_N, BLOCK_V] tile, accumulated in fp32 over D.

    h_rows / w_rows: pointers to the tile's rows of hidden [N, D] and weight [V, D]."""
    logits = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong: upcast right after load
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        logits = tl.dot(h, tl.trans(w), logits, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        logits += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return logits
