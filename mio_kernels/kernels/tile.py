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


@triton.jit
def transform_tile(x, scale, cap, TRANSFORM: tl.constexpr):
    """Logit transform of a tile -> (z, dz/dx). TRANSFORM (constexpr): 0 identity (slope 1, nothing
    computed), 1 z = scale * x, 2 z = cap * tanh(scale * x). With e = exp(-2|u|), u = scale * x:
    tanh(u) = sign(u) (1 - e) / (1 + e) and 1 - tanh(u)^2 = 4e / (1 + e)^2, exact where tanh saturates."""
    z = x
    slope = 1.0
    if TRANSFORM == 1:
        z = x * scale
        slope = scale
    if TRANSFORM == 2:
        u = x * scale
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        z = cap * tl.where(u < 0, -t, t)
        slope = (4.0 * scale * cap) * e / ((1.0 + e) * (1.0 + e))
    return z, slope


def transform_code(transform) -> int:
    """The TRANSFORM constexpr of a LogitTransform: 0 identity, 1 scale only, 2 softcap."""
    return 2 if transform.cap > 0 else (0 if transform.scale == 1.0 else 1)
