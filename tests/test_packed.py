"""Padding-free batches: hidden [N, H] + cu_seqlens [S+1] give the padded computation's results."""
import pytest
import torch

from mio_kernels import fused_mio_loss
from mio_kernels.backends import available_kernel_backends
from mio_kernels.losses import LOSSES

from conftest import DEVICE

IGNORE = -100
BACKENDS = ["reference", *available_kernel_backends(DEVICE)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def make_batch(num_prompts=2, k=1, h=16, v=101, max_len=9, dtype=torch.float32, bias=True, empty=(1,),
               ref="logps", zero_length=()):
    """The same S = P(1+K) sequences, padded [S, T, H] and packed [N, H] + cu_seqlens.

    Lengths vary from 1 to max_len; each sequence's last token is ignore_index (shifted labels),
    a ragged prompt is ignored too, the sequences in `empty` have no scored token at all and those
    in `zero_length` no token (a fully masked padded row)."""
    s = num_prompts * (1 + k)
    lengths = torch.randint(1, max_len + 1, (s,))
    lengths[0] = 1
    lengths[list(zero_length)] = 0
    padded_hidden = torch.randn(s, max_len, h, dtype=torch.float64, device=DEVICE).to(dtype)
    padded_labels = torch.full((s, max_len), IGNORE, device=DEVICE)
    for i, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        labels = torch.randint(0, v, (n,), device=DEVICE)
        labels[: int(torch.randint(0, n, ()))] = IGNORE   # prompt
        labels[-1] = IGNORE                               # nothing follows the last token
        padded_labels[i, :n] = labels
    for i in empty:
        padded_labels[i] = IGNORE
    valid = torch.arange(max_len, device=DEVICE)[None, :] < lengths.to(DEVICE)[:, None]
    cu = torch.zeros(s + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0).to(DEVICE)
    weight = (torch.randn(v, h, dtype=torch.float64, device=DEVICE) / h ** 0.5).to(dtype)
    common = dict(weight=weight, bias=torch.randn(v, device=DEVICE).to(dtype) if bias else None)
    padded = dict(hidden=padded_hidden, labels=padded_labels, **common)
    packed = dict(hidden=padded_hidden[valid], labels=padded_labels[valid], cu_seqlens=cu, **common)
    if ref == "logps":
        padded["ref_logps"] = packed["ref_logps"] = -torch.rand(s, device=DEVICE) * 20
    elif ref == "states":
        ref_hidden = torch.randn(s, max_len, 8, device=DEVICE).to(dtype)
        ref_weight = torch.randn(v, 8, device=DEVICE).to(dtype) / 8 ** 0.5
        padded.update(ref_hidden=ref_hidden, ref_weight=ref_weight)
        packed.update(ref_hidden=ref_hidden[valid], ref_weight=ref_weight)
    return padded, packed, valid


def run(inputs, backend, **options):
    inputs = {k: v.detach().clone().requires_grad_() if k in ("hidden", "weight", "bias") and v is not None else v
              for k, v in inputs.items()}
    out = fused_mio_loss(**inputs, backend=backend, **options)
    out.loss.backward()
    return out, inputs


def assert_same(padded, packed, valid, backend, tol, **options):
    a, pa = run(padded, backend, **options)
    b, pb = run(packed, backend, **options)

    def close(x, y, name):
        err = ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-6)).item()
        assert err <= tol, f"{name}: packed vs padded relative difference {err:.3g} > {tol} ({backend})"

    close(b.loss, a.loss, "loss")
    close(b.policy_logps, a.policy_logps, "policy_logps")
    if a.ref_logps is not None:
        close(b.ref_logps, a.ref_logps, "ref_logps")
    for name in a.metrics:
        close(b.metrics[name], a.metrics[name], name)
    close(pb["hidden"].grad, pa["hidden"].grad[valid], "d_hidden")
    assert (pa["hidden"].grad[~valid] == 0).all()
    close(pb["weight"].grad, pa["weight"].grad, "d_weight")
    if pa.get("bias") is not None:
        close(pb["bias"].grad, pa["bias"].grad, "d_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_packed_equals_padded_every_loss(backend, loss_type, k):
    padded, packed, valid = make_batch(k=k)
    assert_same(padded, packed, valid, backend, TOL[torch.float32], loss_type=loss_type, num_negatives=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(average_log_prob=True), dict(sft_weight=0.5), dict(reference_free=True),
                                     dict(ref="states"), dict(bias=False, loss_type="ipo")],
                         ids=["average_log_prob", "sft", "reference_free", "ref_states", "nobias_ipo"])
def test_packed_equals_padded_every_option(backend, options):
    options = dict(options)
    batch_options = {key: options.pop(key) for key in ("ref", "bias") if key in options}
    if options.get("reference_free"):
        batch_options["ref"] = None
    padded, packed, valid = make_batch(**batch_options)
    assert_same(padded, packed, valid, backend, TOL[torch.float32], **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_sequence_is_a_masked_row(backend):
    padded, packed, valid = make_batch(k=2, zero_length=(2, 5), empty=())
    assert_same(padded, packed, valid, backend, TOL[torch.float32], num_negatives=2, sft_weight=0.1)


def test_packed_float64_matches_to_rounding():
    padded, packed, valid = make_batch(dtype=torch.float64, k=2, num_prompts=3)
    assert_same(padded, packed, valid, "reference", TOL[torch.float64], num_negatives=2, loss_type="dpo")


def test_packed_single_token_sequences():
    padded, packed, valid = make_batch(max_len=1, empty=())
    out = fused_mio_loss(**packed, backend=BACKENDS[-1])
    assert torch.isfinite(out.loss) and (out.policy_logps == 0).all()  # nothing scored, nothing summed


@pytest.mark.parametrize("make_change, pattern", [
    (lambda p: dict(cu_seqlens=p["cu_seqlens"][None]), r"cu_seqlens must be 1-D"),
    (lambda p: dict(cu_seqlens=p["cu_seqlens"] + 1), r"cu_seqlens must start at 0, got 1"),
    (lambda p: dict(cu_seqlens=p["cu_seqlens"].flip(0).clone().index_fill_(0, torch.tensor([0]), 0)),
     "non-decreasing"),
    (lambda p: dict(cu_seqlens=torch.cat([p["cu_seqlens"][:-1], p["cu_seqlens"][-1:] - 1])), "must end at N"),
    (lambda p: dict(cu_seqlens=p["cu_seqlens"].float()), "cu_seqlens must be int32 or int64"),
    (lambda p: dict(hidden=p["hidden"][None], labels=p["labels"][None]), r"hidden must be packed \[N, H\]"),
    (lambda p: dict(cu_seqlens=torch.cat([p["cu_seqlens"][:1], p["cu_seqlens"][2:]]), ref_logps=p["ref_logps"][:-1]),
     "not divisible by 1 \\+ num_negatives = 2"),
    (lambda p: dict(ref_logps=p["ref_logps"][:-1]), r"ref_logps must be \[S\] = \[4\]"),
], ids=["2d", "start", "decreasing", "end", "dtype", "3d_hidden", "layout", "ref_logps"])
def test_bad_cu_seqlens_names_the_argument(make_change, pattern):
    _, packed, _ = make_batch()
    with pytest.raises((ValueError, TypeError), match=pattern):
        fused_mio_loss(**{**packed, **make_change(packed)}, backend=BACKENDS[-1])


def test_reference_gradient_of_a_sequence_beside_a_large_coefficient():
    """Regression: the reference backend reduced packed sequences as differences of one prefix sum,
    so every token's gradient carried ~1e-16 x the batch's largest coefficient: O(1) wrong for the
    sequence of an empty neighbour (fp64 too). Packed must equal the padded batch."""
    torch.manual_seed(0)
    T, H, V = 40, 16, 1000
    h = torch.randn(2 * T, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / 4
    y = torch.randint(0, V, (2 * T,))
    y[T - 1] = y[-1] = -100
    options = dict(loss_type="apo_zero", beta=0.15, num_negatives=2, reference_free=True, backend="reference")
    packed_w = w.clone().requires_grad_()
    fused_mio_loss(h, packed_w, y, cu_seqlens=torch.tensor([0, T, T, 2 * T]), **options).loss.backward()
    padded_h = torch.zeros(3, T, H, dtype=torch.float64)
    padded_y = torch.full((3, T), -100)
    padded_h[0], padded_h[2], padded_y[0], padded_y[2] = h[:T], h[T:], y[:T], y[T:]
    padded_w = w.clone().requires_grad_()
    fused_mio_loss(padded_h, padded_w, padded_y, **options).loss.backward()
    assert ((packed_w.grad - padded_w.grad).norm() / padded_w.grad.norm()).item() <= 1e-12
