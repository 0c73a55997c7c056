"""Single-pass gradient of the native backend: the LM-head gradient is formed in the forward.

For every loss of fused_mio_loss, dL/dlogp_t is one number c_s for all scored tokens t of a
sequence s (`Objective.seq_token_grad`); so it is for fused_grpo_loss at sequence-level importance
sampling without per-token terms (`grpo_losses.sequence_coefficients`, each completion its own
group). So the gradient is built while the chunk's logits are in memory.
Per chunk of R scored token rows (GEMMs through ATen: CPU BLAS / cuBLAS; the row epilogue is the
extension's mio_native::grad_epilogue):

    Z = H_c W^T                                  GEMM 1 (2 R H V FLOPs; CPU: in vocabulary blocks)
    logp_t;  Z <- (onehot(y) - softmax(z)) dz/dZ   epilogue, in place; z = transform(Z + b)
    dH_c = f * (Z W)                             GEMM 2
    dW += Z^T (f * H_c)   or   A_j += ...        GEMM 3 (db likewise, a GEMV)

(z: the scored logits of mio_kernels/transform.py, recomputed from Z inside the epilogue; dz/dZ is
1 for the identity.)

f is c_s for rows whose coefficient is known, else a known pre-factor p_s (1, or +-scale_s for a
difference loss) and the rows' share of dW goes into an fp32 [V, H] accumulator A_j (slot j).
A row's coefficient is known once its group is scored (`coefficient_groups` in objective.py:
a sequence for separable losses, a (chosen, rejected) pair for difference losses at K = 1, a
prompt's 1 + K sequences otherwise); rows are walked group by group. When the group left open
across chunks completes: dW += (c_s / p_s) A_j per slot, A_j reset, and its earlier dH rows are
multiplied by c_s / p_s. So 6 N H V FLOPs in all (recompute: 8), hidden and weight read once.

Memory (p = 4 bytes, 8 for fp64):
    logits chunk   R * V * p,   R = clamp(budget // (V * p), 1, scored rows)   (the chunk budget)
    accumulators   slots * (V * H [if dW] + V [if db]) * p                     (gradient memory)
plus the gradients themselves, held from forward to backward: dH [N, H] (built in p-byte
precision, cast to hidden's dtype at the end), dW [V, H] and db [V] (fp32 for 16-bit parameters,
cast at the end). Which calls may allocate the accumulators: mio_kernels/single_pass.py.

Host synchronisation: one, to read the labels (and cu_seqlens): the schedule depends on which
tokens are scored. Packed sequences (cu_seqlens) are walked the same way, by their segments.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from mio_kernels import _native
from mio_kernels.transform import IDENTITY, LogitTransform, transform_logits

def accumulator_bytes(slots: int, vocab: int, hidden_size: int, dtype: torch.dtype, needs_weight: bool,
                      needs_bias: bool) -> int:
    """Bytes of the [slots, V, H] (+ [slots, V]) accumulators of a single pass in `dtype`'s precision."""
    elem = _native.accumulation_dtype(dtype).itemsize
    return slots * ((vocab * hidden_size if needs_weight else 0) + (vocab if needs_bias else 0)) * elem


# Chunk-sized tensors alive at once in `chunk_entropy` (transform, log-softmax, exp, product,
# and their gradients), counted against the budget beside the logits chunk.
ENTROPY_TEMPORARIES = 6


def chunk_rows(budget_bytes: int, vocab: int, dtype: torch.dtype, scored_rows: int, with_entropy: bool = False) -> int:
    """Logits rows per chunk: the chunk budget's worth of rows of V elements in `dtype`'s
    accumulation precision (4 bytes, 8 for fp64), divided by 1 + ENTROPY_TEMPORARIES when the
    entropy is computed, at least 1, at most the scored rows. The same rule as the native
    recompute passes; the accumulators are not counted against it."""
    per_row = vocab * _native.accumulation_dtype(dtype).itemsize * (1 + (ENTROPY_TEMPORARIES if with_entropy else 0))
    return int(max(1, min(budget_bytes // per_row, scored_rows)))


def chunk_entropy(x: Tensor, bias: Optional[Tensor], transform: LogitTransform, grad: Optional[Tensor]):
    """x [r, V] raw logits (left unchanged) -> (entropy [r] of softmax(transform(x + b)),
    grad[:, None] * d entropy / dx [r, V] or None). Plain torch autograd, as the reference backend."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(grad is not None)
        logq = torch.log_softmax(transform_logits(xr if bias is None else xr + bias, transform), dim=-1)
        entropy = -(logq.exp() * logq).sum(-1)
        dx = None if grad is None else torch.autograd.grad(entropy, xr, grad)[0]
    return entropy.detach(), dx


class SinglePassResult(NamedTuple):
    token_logps: Tensor          # [N] fp32 (fp64 for fp64 inputs), 0 at ignored tokens
    d_hidden: Optional[Tensor]   # [N, H] hidden's dtype: dL/dhidden for the coefficients given
    d_weight: Optional[Tensor]   # [V, H] weight's dtype
    d_bias: Optional[Tensor]     # [V] bias's dtype
    entropy: Optional[Tensor] = None   # [N] like token_logps (with_entropy): values only, no gradient


class _Schedule(NamedTuple):
    """Scored token rows, group by group and within a group member by member."""
    rows: Tensor         # [M] flat token rows (hidden's device)
    rows_cpu: Tensor     # [M]
    seq: Tensor          # [M] sequence of each row (device)
    slot: Tensor         # [M] accumulator slot of each row (cpu)
    group_of: Tensor     # [M] group of each row (cpu)
    group_start: Tensor  # [num_groups] first position of each group (cpu)
    group_end: Tensor    # [num_groups] one past its last position (cpu)
    breaks: Tensor       # [M] number of positions p <= i with rows[p] != rows[p - 1] + 1 (cpu)


def sequence_spans(labels: Tensor, cu_seqlens: Optional[Tensor]):
    """(first flat token row [S], length [S]) of every sequence: rows of [S, T] labels, or the
    segments of packed labels [N] given by cu_seqlens [S + 1]."""
    if cu_seqlens is None:
        num_seq, seq_len = labels.shape
        return torch.arange(num_seq) * seq_len, torch.full((num_seq,), seq_len)
    cu = cu_seqlens.long()
    return cu[:-1], cu[1:] - cu[:-1]


def _schedule(labels_flat: Tensor, spans, ignore_index: int, members: Tensor, shared: bool, device) -> _Schedule:
    """labels_flat [N] (cpu), spans from `sequence_spans` (cpu), members [groups, G] (cpu)."""
    starts, lengths = spans
    width = members.shape[1]
    order = members.reshape(-1)                                    # sequences in walk order
    walk_lengths = lengths[order]
    member = torch.repeat_interleave(torch.arange(len(order)), walk_lengths)   # walk position of each token
    first = walk_lengths.cumsum(0) - walk_lengths
    rows = starts[order][member] + torch.arange(len(member)) - first[member]
    scored = labels_flat[rows] != ignore_index
    member, rows = member[scored], rows[scored]
    seq = order[member]
    group = member // width
    end = torch.bincount(group, minlength=members.shape[0]).cumsum(0)
    start = torch.cat([end.new_zeros(1), end[:-1]])
    slot = torch.zeros_like(member) if shared else member % width
    breaks = torch.cat([rows.new_zeros(min(1, len(rows))), (rows[1:] != rows[:-1] + 1).cumsum(0)])
    return _Schedule(rows.to(device), rows, seq.to(device), slot, group, start, end, breaks)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b with out's (fp32) accumulation for 16-bit operands (cuBLAS)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, accumulated in acc's dtype (fp32 for 16-bit operands on CUDA)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


class _Walk:
    """The chunk loop's state: gradients, accumulators and the group left open across chunks."""

    def __init__(self, hidden, weight, labels, bias, sched, members, shared_factor, coefficients, needs_hidden,
                 needs_weight, needs_bias, slots, rows_per_chunk, transform: LogitTransform, with_entropy: bool):
        n_tokens, width = hidden.shape
        vocab = weight.shape[0]
        self.acc = _native.accumulation_dtype(hidden.dtype)
        # CPU computes in fp32/fp64 throughout; cuBLAS takes 16-bit operands with fp32 accumulation.
        self.cd = hidden.dtype if hidden.is_cuda else self.acc
        self.hidden, self.weight = hidden, weight.to(self.cd)
        self.labels, self.sched, self.coefficients = labels, sched, coefficients
        self.transform = transform
        self.bias = None if bias is None else bias.to(self.acc).contiguous()   # the epilogue needs a dense [V]
        self.prefactor = None if shared_factor is None else shared_factor.to(hidden.device, self.acc)
        opts = dict(device=hidden.device, dtype=self.acc)
        self.token_logps = torch.zeros(n_tokens, **opts)
        self.entropy = torch.zeros(n_tokens, **opts) if with_entropy else None
        self.dH = torch.zeros(n_tokens, width, **opts) if needs_hidden else None
        self.dW = torch.zeros(vocab, width, **opts) if needs_weight else None
        self.db = torch.zeros(vocab, **opts) if needs_bias else None
        self.A = torch.zeros(slots, vocab, width, **opts) if needs_weight else None
        self.Ab = torch.zeros(slots, vocab, **opts) if needs_bias else None
        self.buf = torch.empty(rows_per_chunk, vocab, **opts)
        self.members = members.to(hidden.device)
        self.open_group, self.open_start, self.used_slots = -1, 0, set()

    def hidden_rows(self, k0: int, k1: int) -> Tensor:
        if int(self.sched.breaks[k1 - 1]) == int(self.sched.breaks[k0]):   # consecutive token rows
            return self.hidden.narrow(0, int(self.sched.rows_cpu[k0]), k1 - k0).to(self.cd)
        return self.hidden.index_select(0, self.sched.rows[k0:k1]).to(self.cd)

    def factors(self, c: Optional[Tensor], k0: int, known_end: int, k1: int) -> Tensor:
        """Per row: c_s where known (rows [k0, known_end)), else the pre-factor p_s (or 1)."""
        f = torch.ones(k1 - k0, device=self.hidden.device, dtype=self.acc)
        if known_end > k0:
            f[:known_end - k0] = c[self.sched.seq[k0:known_end]]
        if known_end < k1 and self.prefactor is not None:
            f[known_end - k0:] = self.prefactor[self.sched.seq[known_end:k1]]
        return f

    def chunk(self, k0: int, k1: int) -> None:
        s = self.sched
        last_group = int(s.group_of[k1 - 1])
        complete = int(s.group_end[last_group]) == k1
        known_end = k1 if complete else max(k0, int(s.group_start[last_group]))
        rows = s.rows[k0:k1]
        h = self.hidden_rows(k0, k1)
        z = self.buf[:k1 - k0]
        if z.is_cuda:
            _mm_into(z, h, self.weight.t())
        else:
            _native.logits_into(z, h, self.weight)
        if self.entropy is not None:   # before the epilogue overwrites the logits
            self.entropy[rows] = chunk_entropy(z, self.bias, self.transform, None)[0]
        self.token_logps[rows] = _native.grad_epilogue(z, self.labels[rows], self.bias, self.cd,
                                                       self.transform.scale, self.transform.cap)
        dz = z if self.cd == z.dtype else z.view(self.cd)[:, :z.shape[1]]
        c = self.coefficients(self.token_logps) if known_end > k0 else None
        f = self.factors(c, k0, known_end, k1)
        if self.dH is not None:
            u = torch.empty(k1 - k0, h.shape[1], device=h.device, dtype=self.acc)
            _mm_into(u, dz, self.weight)
            self.dH.index_copy_(0, rows, u.mul_(f[:, None]))
        needs_params = self.dW is not None or self.db is not None
        h_scaled = h * f[:, None].to(h.dtype) if self.dW is not None else None
        f_col = f[:, None].to(dz.dtype)
        known = known_end - k0
        if known > 0 and needs_params:
            self.accumulate(self.dW, self.db, dz[:known], h_scaled, f_col[:known])
        if self.open_group >= 0 and int(s.group_end[self.open_group]) <= k1:
            self.fold(c, k0)
        if known_end < k1:
            # opened even when no parameter needs a gradient: the group's dH rows written here
            # are rescaled by c_s / p_s when it completes (fold)
            if self.open_group != last_group:
                self.open_group, self.open_start = last_group, known_end
            if needs_params:
                self.open_pending(known_end, k0, dz, h_scaled, f_col)

    def accumulate(self, dW, db, dz, h_scaled, f_col) -> None:
        if dW is not None:
            _addmm_into(dW, dz.t(), h_scaled[:dz.shape[0]])
        if db is not None:
            _addmm_into(db[:, None], dz.t(), f_col)

    def open_pending(self, start: int, k0: int, dz, h_scaled, f_col) -> None:
        """Rows [start, k1) of the open group, whose coefficient is not known yet: into their slots."""
        slots = self.sched.slot[start:k0 + dz.shape[0]]
        bounds = [0] + (torch.nonzero(slots[1:] != slots[:-1]).flatten() + 1).tolist() + [len(slots)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            j = int(slots[a])
            self.used_slots.add(j)
            rows = slice(start - k0 + a, start - k0 + b)
            self.accumulate(None if self.A is None else self.A[j], None if self.Ab is None else self.Ab[j],
                            dz[rows], None if h_scaled is None else h_scaled[rows], f_col[rows])

    def fold(self, c: Tensor, k0: int) -> None:
        """The open group's coefficients are known: fold its accumulators and earlier dH rows."""
        s, g = self.sched, self.open_group
        scale = (c if self.prefactor is None else c.to(self.acc) / self.prefactor).to(self.acc)   # c_s / p_s
        for j in sorted(self.used_slots):
            # slot j holds member j of the group; a shared slot holds p_s-weighted rows of all
            # members, whose c_s / p_s agree (the chosen row's is taken)
            factor = scale[self.members[g, 0 if self.prefactor is not None else j]]
            for acc, out in ((self.A, self.dW), (self.Ab, self.db)):
                if acc is not None:
                    out.add_(acc[j].mul_(factor))
                    acc[j].zero_()
        if self.dH is not None and self.open_start < k0:
            rows = s.rows[self.open_start:k0]
            f = scale[s.seq[self.open_start:k0]][:, None]
            self.dH.index_copy_(0, rows, self.dH.index_select(0, rows).mul_(f))
        self.open_group, self.used_slots = -1, set()


def single_pass(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], cu_seqlens: Optional[Tensor],
                ignore_index: int, members: Tensor, shared_factor: Optional[Tensor], slots: int,
                coefficients: Callable[[Tensor], Tensor], needs_hidden: bool, needs_weight: bool,
                needs_bias: bool, budget_bytes: int, transform: LogitTransform = IDENTITY,
                with_entropy: bool = False) -> SinglePassResult:
    """hidden [S, T, H], weight [V, H], labels [S, T] int64 (or packed: hidden [N, H], labels [N] and
    cu_seqlens [S + 1]), bias [V] | None; members [groups, G] and
    shared_factor [S] | None from `coefficient_groups`; coefficients(token_logps [S*T]) -> c [S],
    exact for every sequence whose group is completely scored (the others' entries are ignored).
    Token log-probs are of the transformed logits z = transform(h W^T + b) (mio_kernels/transform.py).
    Returns the token log-probs (and, with_entropy, the entropies' values) and the gradients of
    sum_t c_s(t) logp_t. budget_bytes bounds the
    logits chunk (`chunk_rows`); whether the accumulators may be allocated is the caller's
    choice (mio_kernels/single_pass.py)."""
    width, vocab = hidden.shape[-1], weight.shape[0]
    labels_cpu = labels.cpu()
    spans = sequence_spans(labels_cpu, None if cu_seqlens is None else cu_seqlens.cpu())
    sched = _schedule(labels_cpu.reshape(-1), spans, ignore_index, members.cpu(), shared_factor is not None,
                      hidden.device)
    needs_bias = needs_bias and bias is not None
    rows = chunk_rows(budget_bytes, vocab, hidden.dtype, len(sched.rows_cpu), with_entropy)
    walk = _Walk(hidden.reshape(-1, width), weight, labels.reshape(-1), bias, sched, members, shared_factor,
                 coefficients, needs_hidden, needs_weight, needs_bias, slots, rows, transform, with_entropy)
    for k0 in range(0, len(sched.rows_cpu), rows):
        walk.chunk(k0, min(k0 + rows, len(sched.rows_cpu)))
    return SinglePassResult(
        walk.token_logps,
        None if walk.dH is None else walk.dH.to(hidden.dtype).view(hidden.shape),
        None if walk.dW is None else walk.dW.to(weight.dtype),
        None if walk.db is None else walk.db.to(bias.dtype), walk.entropy)
