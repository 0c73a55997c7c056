"""Exactness of fused_mio_loss and linear_logprobs on every kernel backend available here, against
the plain-PyTorch reference evaluated in float64 on the same inputs (forward and backward).

Relative error = ||ours - oracle|| / ||oracle|| per output; bounds: 1e-5 in fp32, 2e-2 in bf16/fp16.
"""
import math

import pytest
import torch

from mio_kernels import FusedMIOLoss, fused_mio_loss, linear_logprobs
from mio_kernels.backends import available_kernel_backends
from mio_kernels.function import _kernel_token_logprobs
from mio_kernels.losses import LN4, LOSSES
from mio_kernels.reference import reference_preference_loss, reference_token_logprobs
from mio_kernels.transform import LogitTransform

from conftest import DEVICE, WORST_ERRORS

BACKENDS = available_kernel_backends(DEVICE)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
IGNORE = -100


def make_inputs(s=4, t=9, h=32, v=1009, dtype=torch.float32, bias=True, logit_scale=1.0, mask_rows=(),
                ref="logps", h_ref=24):
    """Random policy inputs (ragged prompt masks), plus a reference of the requested kind."""
    dev = DEVICE
    hidden = torch.randn(s, t, h, device=dev, dtype=torch.float64)
    weight = torch.randn(v, h, device=dev, dtype=torch.float64) * (logit_scale / math.sqrt(h))
    labels = torch.randint(0, v, (s, t), device=dev)
    prompt_len = torch.randint(0, max(t - 1, 1), (s,), device=dev)
    labels[torch.arange(t, device=dev)[None, :] < prompt_len[:, None]] = IGNORE
    for row in mask_rows:
        labels[row] = IGNORE
    inputs = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), labels=labels,
                  bias=(torch.randn(v, device=dev, dtype=torch.float64) * logit_scale).to(dtype) if bias else None)
    if ref == "logps":
        inputs["ref_logps"] = -torch.rand(s, device=dev, dtype=torch.float32) * t * 5
    elif ref == "states":
        inputs["ref_hidden"] = torch.randn(s, t, h_ref, device=dev).to(dtype)
        inputs["ref_weight"] = (torch.randn(v, h_ref, device=dev) / math.sqrt(h_ref)).to(dtype)
        inputs["ref_bias"] = torch.randn(v, device=dev).to(dtype) if bias else None
    return inputs


DIFFERENTIABLE = ("hidden", "weight", "bias")


def compare_to_oracle(backend, inputs, tol=None, **options):
    dtype = inputs["hidden"].dtype
    ours_inputs = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE and v is not None else v)
                   for k, v in inputs.items()}
    ours = fused_mio_loss(**ours_inputs, backend=backend, **options)
    ours.loss.backward()
    ref_inputs = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in inputs.items()}
    for k in DIFFERENTIABLE:
        if ref_inputs.get(k) is not None:
            ref_inputs[k].requires_grad_()
    oracle = reference_preference_loss(**ref_inputs, **options)
    oracle.loss.backward()

    tol = tol or TOL[dtype]
    pairs = {"loss": (ours.loss, oracle.loss), "policy_logps": (ours.policy_logps, oracle.policy_logps)}
    for k in DIFFERENTIABLE:
        if inputs.get(k) is not None:
            pairs[f"d_{k}"] = (ours_inputs[k].grad, ref_inputs[k].grad)
    if oracle.ref_logps is not None:
        pairs["ref_logps"] = (ours.ref_logps, oracle.ref_logps)
    worst = 0.0
    for name, (a, b) in pairs.items():
        assert a is not None and torch.isfinite(a).all(), f"{name} missing or non-finite"
        assert a.shape == b.shape, name
        # A loss that crosses zero (robust, hinge, ipo) has no relative precision there: its error is
        # measured against max(|L|, 0.01).
        floor = 1e-2 if name == "loss" else 1e-6
        err = ((a.double() - b).norm() / b.norm().clamp_min(floor)).item()
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol} ({dtype}, backend={backend})"
        worst = max(worst, err)
        key = f"{backend} {str(dtype).replace('torch.', '')}"
        WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), err)
    for name, value in ours.metrics.items():
        assert math.isclose(value.item(), oracle.metrics[name].item(), rel_tol=50 * tol, abs_tol=50 * tol), name
    return worst, pairs


pytestmark = pytest.mark.skipif(not BACKENDS, reason="no kernel backend available on this machine")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_every_k(backend, loss_type, k):
    smoothing = 0.15 if loss_type == "robust" else 0.0
    inputs = make_inputs(s=2 * (1 + k), t=7, v=521)
    compare_to_oracle(backend, inputs, loss_type=loss_type, num_negatives=k, beta=0.2, label_smoothing=smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [
    dict(s=4, t=9, h=32, v=1009),    # V not a multiple of any block
    dict(s=2, t=1, h=16, v=300),     # T = 1
    dict(s=6, t=5, h=48, v=2100),    # ragged H, V > one interpreter block
    dict(s=2, t=130, h=8, v=70),     # N not a block multiple, tiny V and H
], ids=["v1009", "t1", "ragged", "long-t"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_awkward_shapes(backend, shape, bias):
    compare_to_oracle(backend, make_inputs(**shape, bias=bias), loss_type="mio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_sequence(backend):
    # One chosen and one rejected row score no token at all; both reductions must give l = 0.
    inputs = make_inputs(s=4, mask_rows=(1, 2))
    compare_to_oracle(backend, inputs, loss_type="dpo")
    compare_to_oracle(backend, inputs, loss_type="mio", average_log_prob=True)


def whole_ignored_tile_inputs(**kwargs):
    """Long prompts (the first 100 of T = 160 tokens) and two fully masked rows: with 64-token tiles
    (the interpreter's; 128 on a GPU) whole tiles score nothing, and others mix prompt and scored
    tokens. Ignored tokens' hidden states are scaled 200x, so exp of their logits overflows fp32
    should anything use their softmax statistics."""
    inputs = make_inputs(s=4, t=160, h=16, v=300, mask_rows=(1, 2), **kwargs)
    inputs["labels"][:, :100] = IGNORE
    ignored = (inputs["labels"] == IGNORE)[..., None]
    inputs["hidden"] = torch.where(ignored, inputs["hidden"] * 200, inputs["hidden"])
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_ignored_tiles(backend):
    inputs = whole_ignored_tile_inputs()
    labels = inputs["labels"]
    assert (labels.reshape(-1, 64)[:, :] == IGNORE).all(1).sum() >= 3  # whole tiles with nothing scored
    for entropy in (False, True):
        logp, stats = _kernel_token_logprobs(backend, inputs["hidden"], inputs["weight"], labels, inputs["bias"],
                                             IGNORE, LogitTransform.of(final_logit_softcapping=30.0), entropy)
        assert torch.isfinite(logp).all() and torch.isfinite(stats).all()
        assert (logp[labels == IGNORE] == 0).all()
        if backend == "triton":  # its documented contract: ignored rows' stats are (0, 0), entropy 0
            assert (stats[labels.reshape(-1) == IGNORE] == 0).all()
    compare_to_oracle(backend, inputs, loss_type="mio")
    compare_to_oracle(backend, inputs, loss_type="dpo", sft_weight=0.5, average_log_prob=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["mio", "dpo"])
def test_large_logits(backend, loss_type):
    """Logits ~1e4 carry an fp32 rounding of ~1e-3 that no fp32 implementation avoids: where two
    top logits are within a few units, softmax (and so the gradient) inherits it. The bound is
    therefore 1e-5 or twice the intrinsic fp32 error, whichever is larger; the intrinsic error is
    plain PyTorch's fp32 error on these inputs and on three copies perturbed by one fp32 ulp."""
    inputs = make_inputs(s=4, t=6, h=16, v=777, logit_scale=2500.0)
    logits = inputs["hidden"].double() @ inputs["weight"].double().T
    assert logits.abs().max() > 5e3
    options = dict(loss_type=loss_type, beta=1e-4)
    intrinsic = 0.0
    for trial in range(4):
        probe = dict(inputs)
        if trial:
            ulp = torch.randn_like(probe["hidden"]).sign() * torch.finfo(torch.float32).eps
            probe["hidden"] = probe["hidden"] * (1 + ulp)
            _, truth = compare_to_oracle("reference", probe, tol=float("inf"), **options)
            # Compare the perturbed fp32 run with the unperturbed float64 oracle.
            _, exact = compare_to_oracle("reference", inputs, tol=float("inf"), **options)
            pairs = {k: (truth[k][0], exact[k][1]) for k in truth}
        else:
            _, pairs = compare_to_oracle("reference", inputs, tol=float("inf"), **options)
        intrinsic = max(intrinsic, *(((a.double() - b).norm() / b.norm().clamp_min(1e-6)).item()
                                     for a, b in pairs.values()))
    compare_to_oracle(backend, inputs, tol=max(TOL[torch.float32], 2 * intrinsic), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(loss_type="mio", average_log_prob=True),
    dict(loss_type="dpo", reference_free=True),
    dict(loss_type="mio", sft_weight=0.7),
    dict(loss_type="dpo", sft_weight=0.3, num_negatives=2, average_log_prob=True),
    dict(loss_type="ipo", num_negatives=3),
], ids=["avg", "ref-free", "sft", "sft-avg-k2", "ipo-k3"])
def test_options(backend, options):
    k = options.get("num_negatives", 1)
    ref = "none" if options.get("reference_free") else "logps"
    compare_to_oracle(backend, make_inputs(s=2 * (1 + k), ref=ref), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("loss_type", ["mio", "ipo"])
def test_reference_model_states(backend, bias, loss_type):
    inputs = make_inputs(s=6, ref="states", bias=bias)
    compare_to_oracle(backend, inputs, loss_type=loss_type, num_negatives=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["mio", "dpo"])
def test_low_precision(backend, dtype, loss_type):
    compare_to_oracle(backend, make_inputs(s=4, t=8, h=64, v=1009, dtype=dtype), loss_type=loss_type)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_reference_states(backend):
    compare_to_oracle(backend, make_inputs(s=4, dtype=torch.bfloat16, ref="states"), loss_type="mio")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mio_at_zero_rewards_is_ln4_end_to_end(backend):
    inputs = make_inputs(s=4, ref="none")
    policy = fused_mio_loss(**inputs, reference_free=True, backend=backend).policy_logps
    out = fused_mio_loss(**inputs, ref_logps=policy, backend=backend)  # u = 0 for every row
    assert abs(out.loss.item() - LN4) < 1e-6
    assert abs(out.metrics["rewards/margins"].item()) < 1e-6  # policy_logps are the fp32 rounding of l


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_any_upstream_gradient(backend, dtype):
    inputs = make_inputs(s=3, t=11, h=40, v=1009, dtype=dtype)
    hidden = inputs["hidden"].detach().requires_grad_()
    weight = inputs["weight"].detach().requires_grad_()
    bias = inputs["bias"].detach().requires_grad_()
    labels = inputs["labels"]
    upstream = torch.randn(labels.shape, device=DEVICE)
    ours = linear_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    assert (ours[labels == IGNORE] == 0).all()
    (ours * upstream).sum().backward()

    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    oracle = reference_token_logprobs(h64, w64, labels, b64)
    (oracle * upstream.double()).sum().backward()
    tol = TOL[dtype]
    for a, b in [(ours, oracle), (hidden.grad, h64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)]:
        assert ((a.double() - b).norm() / b.norm()).item() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    inputs = make_inputs(s=2, bias=True)
    hidden = inputs["hidden"].detach().requires_grad_()
    weight = inputs["weight"].detach()  # frozen head
    out = fused_mio_loss(hidden, weight, inputs["labels"], bias=inputs["bias"], ref_logps=inputs["ref_logps"],
                         backend=backend)
    out.loss.backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_form_matches_function(backend):
    inputs = make_inputs(s=6, ref="logps")
    module = FusedMIOLoss(loss_type="dpo", beta=0.3, num_negatives=2, backend=backend)
    a = module(inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"],
               ref_logps=inputs["ref_logps"])
    b = fused_mio_loss(**inputs, loss_type="dpo", beta=0.3, num_negatives=2, backend=backend)
    assert torch.equal(a.loss, b.loss)
    assert "dpo" in repr(module)


def test_auto_backend_on_this_device():
    inputs = make_inputs(s=2)
    out = fused_mio_loss(**inputs)  # auto: native where built (CPU or CUDA), else triton on CUDA or reference
    ref = fused_mio_loss(**inputs, backend="reference")
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_enclosing_autocast_does_not_lower_precision(backend):
    """fp32 inputs under torch.autocast(bf16), forward and backward: the op keeps its own fp32 path."""
    inputs = make_inputs(dtype=torch.float32, bias=False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        compare_to_oracle(backend, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(loss_type=name) for name in sorted(LOSSES)]
                         + [dict(loss_type="mio", average_log_prob=True),
                            dict(loss_type="dpo", average_log_prob=True, num_negatives=2)],
                         ids=lambda o: "-".join(str(v) for v in o.values()))
def test_ref_logps_are_sums_for_every_loss(backend, options):
    """ref_logps are sequence sums whatever the loss (TRL's convention): the op reduces them like the
    policy itself. Passing the reference model's sums equals passing its states to the oracle, and
    the log-ratios are the length-normalised ones where the loss is (ipo, average_log_prob)."""
    k = options.get("num_negatives", 1)
    smoothing = 0.15 if options["loss_type"] == "robust" else 0.0
    inputs = make_inputs(s=2 * (1 + k), t=9, v=521, ref="states", mask_rows=(1,))
    labels = inputs["labels"]
    ref_sums = reference_token_logprobs(inputs["ref_hidden"], inputs["ref_weight"], labels,
                                        inputs["ref_bias"]).double().sum(-1)
    policy = {key: inputs[key] for key in ("hidden", "weight", "labels", "bias")}
    options = dict(options, beta=0.2, label_smoothing=smoothing)
    ours = fused_mio_loss(**policy, ref_logps=ref_sums.float(), backend=backend, **options)
    oracle = reference_preference_loss(**{k: (v.double() if v.is_floating_point() else v)
                                          for k, v in inputs.items()}, **options)
    assert oracle.ref_logps is not None and torch.allclose(oracle.ref_logps, ref_sums, rtol=1e-6)
    floor = max(abs(oracle.loss.item()), 1e-2)
    assert abs(ours.loss.item() - oracle.loss.item()) <= 1e-5 * floor
    # the log-ratio the metrics report: beta * (l - l_ref) in the loss's reduction
    counts = (labels != IGNORE).sum(-1).clamp(min=1).double()
    normalised = options.get("average_log_prob") or LOSSES[options["loss_type"]].length_normalized
    u = ours.policy_logps.double() - (ref_sums / counts if normalised else ref_sums)
    p = labels.shape[0] // (1 + k)
    assert ours.metrics["rewards/chosen"].item() == pytest.approx(0.2 * u[:p].mean().item(), rel=1e-4, abs=1e-5)
    via_states = fused_mio_loss(**inputs, backend=backend, **options)
    assert via_states.ref_logps.double() == pytest.approx(ref_sums, rel=1e-5, abs=1e-4)
    assert ours.policy_sums.double() == pytest.approx(oracle.policy_sums, rel=1e-5, abs=1e-4)
    # The sums the op computed from the states, passed back as ref_logps, give the same loss. (Not
    # compared with `ours`: the two fp32 evaluations of ref differ by ~1e-5, and the robust loss keeps
    # a slope of eps / (1 - 2 eps) where it is near 0, so 1e-5 of the loss is not a fair bound there.)
    via_sums = fused_mio_loss(**policy, ref_logps=via_states.ref_logps, backend=backend, **options)
    assert abs(via_states.loss.item() - via_sums.loss.item()) <= 1e-6 * floor
