"""Token-level single pass of the native backend: the LM-head gradient of a loss whose dL/dlogp_t
is known in token t's own chunk (GRPO family with token-level importance sampling).

Per chunk of R scored token rows (the same GEMMs and epilogue as the per-sequence single pass,
mio_kernels/backends/single_pass.py, whose helpers this module imports):

    X = H_c W^T                                     GEMM 1 (2 R H V FLOPs)
    [entropy: H_t and kappa_t dH_t/dX in torch, before the epilogue overwrites X]
    logp_t;  X <- (onehot(y) - softmax(z)) dz/dX    epilogue, in place; z = transform(X + b)
    g_t = coefficients(rows, logp)                  dL/dlogp_t from the chunk's own log-probs
    dH_c = g * (X W)                                GEMM 2
    dW += X^T (g * H_c),  db += X^T g               GEMM 3 (a GEMV)

With an entropy gradient (dL/dH_t = e_t, known before the forward), X <- g X + e dH/dX first and
the rows are not scaled again. 6 N H V FLOPs, no [V, H] accumulator: memory beyond the gradients
is one logits chunk of R * V * p bytes (p = 4, 8 for fp64), R = budget // (V * p) (at least 1),
divided by 1 + ENTROPY_TEMPORARIES when the entropy is computed (its torch sweep holds a few
chunk-sized temporaries): `chunk_rows` of the per-sequence pass.

Tokens known before the forward to have a zero coefficient (`value_only`: an advantage of 0 without
KL term or entropy bonus, TRL's groups whose rewards all agree) are walked last, in chunks of their
own, through GEMM 1 and the epilogue only: 2 H V FLOPs each instead of 6, as the recompute backward
skips rows with a zero gradient.

Host synchronisation: one, to find the scored (and value-only) rows.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from mio_kernels import _native
from mio_kernels.backends.single_pass import _addmm_into, _mm_into, chunk_entropy, chunk_rows
from mio_kernels.transform import IDENTITY, LogitTransform


class TokenPassResult(NamedTuple):
    token_logps: Tensor          # [N] fp32 (fp64 for fp64 inputs), 0 at ignored tokens
    entropy: Optional[Tensor]    # [N] same dtype, 0 at ignored tokens (with with_entropy)
    d_hidden: Optional[Tensor]   # [N, H] hidden's dtype
    d_weight: Optional[Tensor]   # [V, H] weight's dtype
    d_bias: Optional[Tensor]     # [V] bias's dtype


class _TokenWalk:
    """The chunk loop's state: the gradients and outputs being filled, one logits buffer."""

    def __init__(self, hidden, weight, labels, bias, coefficients, entropy_grad, with_entropy, needs_hidden,
                 needs_weight, needs_bias, rows_per_chunk, transform):
        n_tokens, width = hidden.shape
        vocab = weight.shape[0]
        self.acc = _native.accumulation_dtype(hidden.dtype)
        # CPU computes in fp32/fp64 throughout; cuBLAS takes 16-bit operands with fp32 accumulation.
        self.cd = hidden.dtype if hidden.is_cuda else self.acc
        opts = dict(device=hidden.device, dtype=self.acc)
        self.hidden, self.weight, self.labels = hidden, weight.to(self.cd), labels
        self.bias = None if bias is None else bias.to(self.acc).contiguous()   # the epilogue needs a dense [V]
        self.coefficients, self.entropy_grad, self.transform = coefficients, entropy_grad, transform
        self.token_logps = torch.zeros(n_tokens, **opts)
        self.entropy = torch.zeros(n_tokens, **opts) if with_entropy else None
        self.dH = torch.zeros(n_tokens, width, **opts) if needs_hidden else None
        self.dW = torch.zeros(vocab, width, **opts) if needs_weight else None
        self.db = torch.zeros(vocab, **opts) if needs_bias else None
        self.buf = torch.empty(rows_per_chunk, vocab, **opts)

    def logits(self, h: Tensor) -> Tensor:
        z = self.buf[:h.shape[0]]
        if z.is_cuda:
            _mm_into(z, h, self.weight.t())
        else:
            _native.logits_into(z, h, self.weight)
        return z

    def chunk(self, rows: Tensor, start: int, consecutive: bool, with_gradient: bool) -> None:
        """Token rows `rows` [r] (device), which are start, start + 1, ... when consecutive; without
        gradient: their log-probs (and entropies) only."""
        n = rows.shape[0]
        h = (self.hidden.narrow(0, start, n) if consecutive else self.hidden.index_select(0, rows)).to(self.cd)
        z = self.logits(h)
        dx_entropy = None
        if self.entropy is not None:
            e_grad = (None if self.entropy_grad is None or not with_gradient
                      else self.entropy_grad.index_select(0, rows).to(self.acc))
            ent, dx_entropy = chunk_entropy(z, self.bias, self.transform, e_grad)
            self.entropy[rows] = ent
        logp = _native.grad_epilogue(z, self.labels.index_select(0, rows), self.bias, self.cd, self.transform.scale,
                                     self.transform.cap)
        self.token_logps[rows] = logp
        if not with_gradient:
            return
        dz = z if self.cd == z.dtype else z.view(self.cd)[:, :z.shape[1]]
        g = self.coefficients(rows, logp).to(self.acc)
        f = g
        if dx_entropy is not None:
            dz.mul_(g[:, None].to(dz.dtype)).add_(dx_entropy.to(dz.dtype))
            f = None                           # the coefficients are inside dz
        self.gradients(rows, start, consecutive, h, dz, f)

    def gradients(self, rows, start, consecutive, h, dz, f: Optional[Tensor]) -> None:
        """dH rows = f * (dz W), dW += dz^T (f * h), db += dz^T f (f None: 1)."""
        n = rows.shape[0]
        if self.dH is not None:
            u = torch.empty(n, h.shape[1], device=h.device, dtype=self.acc)
            _mm_into(u, dz, self.weight)
            if f is not None:
                u.mul_(f[:, None])
            if consecutive:
                self.dH.narrow(0, start, n).copy_(u)
            else:
                self.dH.index_copy_(0, rows, u)
        if self.dW is not None:
            _addmm_into(self.dW, dz.t(), h if f is None else h * f[:, None].to(h.dtype))
        if self.db is not None:
            col = torch.ones(n, 1, device=h.device, dtype=dz.dtype) if f is None else f[:, None].to(dz.dtype)
            _addmm_into(self.db[:, None], dz.t(), col)


def token_pass(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int,
               coefficients: Callable[[Tensor, Tensor], Tensor], entropy_grad: Optional[Tensor], with_entropy: bool,
               needs_hidden: bool, needs_weight: bool, needs_bias: bool, budget_bytes: int,
               transform: LogitTransform = IDENTITY, value_only: Optional[Tensor] = None) -> TokenPassResult:
    """hidden [N, H], weight [V, H], labels [N] int64, bias [V] | None.
    coefficients(rows [r] int64 (device), logp [r]) -> dL/dlogp of those tokens [r] (never called for
    value_only rows);
    entropy_grad [N] | None: dL/dentropy_t (implies with_entropy).
    value_only [N] bool | None: tokens whose coefficient and entropy gradient are known to be 0; they
    are walked after the others, in chunks of their own, for their log-probs (and entropies) only.
    Returns the token log-probs (and entropies) and the gradients of
    sum_t coefficient_t logp_t + entropy_grad_t entropy_t w.r.t. hidden, weight and bias."""
    with_entropy = with_entropy or entropy_grad is not None
    scored_cpu = labels.cpu() != ignore_index
    if value_only is None:
        groups = [torch.nonzero(scored_cpu).flatten()]
    else:   # rows with a gradient first, then the value-only rows: each chunk is one or the other
        skip = value_only.cpu()
        groups = [torch.nonzero(scored_cpu & ~skip).flatten(), torch.nonzero(scored_cpu & skip).flatten()]
    rows_cpu = torch.cat(groups)
    rows_all = rows_cpu.to(hidden.device)
    scored = len(rows_cpu)
    rows_per_chunk = chunk_rows(budget_bytes, weight.shape[0], hidden.dtype, max(scored, 1), with_entropy)
    walk = _TokenWalk(hidden, weight, labels, bias, coefficients, entropy_grad, with_entropy, needs_hidden,
                      needs_weight, needs_bias and bias is not None, rows_per_chunk, transform)
    group_start = 0
    for group, group_rows in enumerate(groups):
        group_end = group_start + len(group_rows)
        for k0 in range(group_start, group_end, rows_per_chunk):
            k1 = min(k0 + rows_per_chunk, group_end)
            start = int(rows_cpu[k0])
            walk.chunk(rows_all[k0:k1], start, int(rows_cpu[k1 - 1]) - start == k1 - 1 - k0, group == 0)
        group_start = group_end
    return TokenPassResult(
        walk.token_logps, walk.entropy,
        None if walk.dH is None else walk.dH.to(hidden.dtype),
        None if walk.dW is None else walk.dW.to(weight.dtype),
        None if walk.db is None else walk.db.to(bias.dtype))
