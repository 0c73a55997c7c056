"""Logit transforms (temperature, logit_scale, final_logit_softcapping) and per-token entropy, on
every backend available here (the reference, native, Triton under the interpreter), against the
plain-PyTorch formula evaluated in float64 on the same inputs: forward and backward (hidden,
weight, bias). Relative error = ||ours - oracle|| / ||oracle||; bounds as in test_fused.py."""
import math

import pytest
import torch

from mio_kernels import FusedMIOLoss, fused_mio_loss, linear_logprobs
from mio_kernels.backends import available_kernel_backends
from mio_kernels.reference import reference_token_logprobs
from mio_kernels.transform import LogitTransform

from conftest import DEVICE, WORST_ERRORS
from test_fused import TOL, compare_to_oracle, make_inputs, whole_ignored_tile_inputs

BACKENDS = ("reference",) + available_kernel_backends(DEVICE)
IGNORE = -100
TRANSFORMS = {
    "identity": {},
    "temperature": dict(temperature=0.7),
    "scale": dict(logit_scale=0.35),
    "negative-scale": dict(logit_scale=-1.5),
    "softcap": dict(final_logit_softcapping=3.0),
    "all": dict(temperature=1.3, logit_scale=0.8, final_logit_softcapping=4.0),
}


def _inputs(s=3, t=5, h=32, v=1009, dtype=torch.float32, scale=1.0, mask_rows=()):
    hidden = torch.randn(s, t, h, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(v, h, device=DEVICE, dtype=torch.float64) * (scale / math.sqrt(h))
    bias = torch.randn(v, device=DEVICE, dtype=torch.float64) * scale
    labels = torch.randint(0, v, (s, t), device=DEVICE)
    labels[:, 0] = IGNORE  # a prompt token per row
    for row in mask_rows:
        labels[row] = IGNORE
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-6)).item()


def check_linear(backend, inputs, options, *, entropy, upstream=("logps", "entropy"), tol=None):
    """linear_logprobs (+ entropy) and the gradients of sum(u * logps) + sum(v * entropy), u / v random
    for each upstream named, against float64 autograd through the same formula."""
    hidden, weight, bias, labels = inputs
    dtype = hidden.dtype
    ours_in = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    exact_in = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    u = torch.randn(labels.shape, device=DEVICE, dtype=torch.float64)
    v = torch.randn(labels.shape, device=DEVICE, dtype=torch.float64)
    ours = linear_logprobs(ours_in[0], ours_in[1], labels, ours_in[2], backend=backend, return_entropy=entropy,
                           **options)
    exact = reference_token_logprobs(exact_in[0], exact_in[1], labels, exact_in[2], IGNORE,
                                     LogitTransform.of(**options), return_entropy=entropy)
    ours, exact = (ours, exact) if entropy else ((ours,), (exact,))
    assert all(o.dtype == torch.float32 and o.shape == labels.shape for o in ours)
    assert all((o[labels == IGNORE] == 0).all() for o in ours)
    weights = [u if "logps" in upstream else None, v if "entropy" in upstream else None][:len(ours)]
    loss_ours = sum((o.double() * w).sum() for o, w in zip(ours, weights) if w is not None)
    loss_exact = sum((e * w).sum() for e, w in zip(exact, weights) if w is not None)
    loss_ours.backward()
    loss_exact.backward()
    pairs = dict(zip(("logps", "entropy"), zip(ours, exact)))
    pairs.update({f"d_{n}": (a.grad, b.grad) for n, a, b in zip(("hidden", "weight", "bias"), ours_in, exact_in)})
    tol = tol or TOL[dtype]
    key = f"{backend} {str(dtype).replace('torch.', '')} (transforms)"
    for name, (a, b) in pairs.items():
        assert a is not None and torch.isfinite(a).all(), f"{name} missing or non-finite"
        err = _rel(a, b)
        WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), err)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol} ({dtype}, {backend}, {options})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_transform(backend, name, dtype):
    check_linear(backend, _inputs(dtype=dtype, h=48 if dtype == torch.bfloat16 else 32), TRANSFORMS[name],
                 entropy=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["identity", "softcap", "all"])
@pytest.mark.parametrize("upstream", [("logps",), ("entropy",), ("logps", "entropy")], ids=["lp", "ent", "both"])
def test_entropy(backend, name, upstream):
    check_linear(backend, _inputs(), TRANSFORMS[name], entropy=True, upstream=upstream)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_bf16(backend):
    check_linear(backend, _inputs(dtype=torch.bfloat16, h=48), TRANSFORMS["all"], entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True], ids=["logps", "entropy"])
def test_saturated_softcap(backend, entropy):
    """Raw logits in the hundreds: tanh saturates for most of the vocabulary (slope ~e^-20). The kernels
    take the slope 1 - tanh^2 from exp(-2|u|); plain PyTorch's fp32 autograd takes it from the
    rounded tanh and loses digits there (up to ~2e-5 measured), hence its looser bound."""
    inputs = _inputs(h=16, v=777, scale=60.0)
    x = inputs[0].double() @ inputs[1].double().T
    assert x.abs().max() > 100
    check_linear(backend, inputs, dict(final_logit_softcapping=10.0, temperature=0.9), entropy=entropy,
                 tol=1e-4 if backend == "reference" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [dict(s=2, t=1, h=16, v=300), dict(s=2, t=40, h=8, v=70)], ids=["t1", "long-t"])
def test_awkward_shapes(backend, shape):
    check_linear(backend, _inputs(**shape), TRANSFORMS["all"], entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend):
    check_linear(backend, _inputs(s=4, mask_rows=(1, 2)), TRANSFORMS["all"], entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["identity", "all"])
def test_whole_ignored_tiles(backend, name):
    inputs = whole_ignored_tile_inputs()
    check_linear(backend, tuple(inputs[k] for k in ("hidden", "weight", "bias", "labels")), TRANSFORMS[name],
                 entropy=True)


def test_entropy_of_uniform_logits_is_log_v():
    hidden = torch.zeros(2, 3, 8)
    weight = torch.randn(50, 8)
    labels = torch.zeros(2, 3, dtype=torch.long)
    for backend in BACKENDS:
        _, entropy = linear_logprobs(hidden, weight, labels, backend=backend, return_entropy=True,
                                     final_logit_softcapping=2.0, temperature=0.5)
        assert torch.allclose(entropy, torch.full_like(entropy, math.log(50)), atol=1e-5), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [TRANSFORMS["softcap"], TRANSFORMS["all"]], ids=["softcap", "all"])
def test_fused_loss_with_transform(backend, options):
    compare_to_oracle(backend, make_inputs(s=4, t=6, v=1009), loss_type="mio", **options)
    compare_to_oracle(backend, make_inputs(s=4, t=6, v=1009, ref="states"), loss_type="dpo", **options)


def test_module_carries_transform():
    inputs = make_inputs(s=2, t=4, v=300)
    module = FusedMIOLoss(temperature=0.5, final_logit_softcapping=3.0, backend="reference")
    a = module(inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"],
               ref_logps=inputs["ref_logps"])
    b = fused_mio_loss(**inputs, temperature=0.5, final_logit_softcapping=3.0, backend="reference")
    c = fused_mio_loss(**inputs, backend="reference")
    assert torch.equal(a.loss, b.loss) and not torch.equal(b.policy_logps, c.policy_logps)
    assert "final_logit_softcapping=3.0" in repr(module)


BAD = [
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("logit_scale", 0.0), ("logit_scale", float("nan")), ("logit_scale", float("-inf")),
    ("final_logit_softcapping", 0.0), ("final_logit_softcapping", -30.0), ("final_logit_softcapping", float("nan")),
]


@pytest.mark.parametrize("arg,value", BAD, ids=[f"{a}={v}" for a, v in BAD])
def test_bad_transform_is_a_clear_error(arg, value):
    inputs = make_inputs(s=2, t=3, v=50)
    with pytest.raises(ValueError, match=arg):
        linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"], **{arg: value})
    with pytest.raises(ValueError, match=arg):
        fused_mio_loss(**inputs, **{arg: value})
    with pytest.raises(ValueError, match=arg):
        FusedMIOLoss(**{arg: value})


# ------------------------------------------------------------------ trainer: the head's transform from the config

def _tiny_lm(kind):
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                                           query_pre_attn_scalar=8, sliding_window=16)
        config._attn_implementation = "eager"
        return transformers.Gemma2ForCausalLM(config)
    config = transformers.GraniteConfig(**{k: v for k, v in common.items() if k != "head_dim"},
                                        logits_scaling=0.125, embedding_multiplier=2.0, residual_multiplier=0.5)
    return transformers.GraniteForCausalLM(config)


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_trainer_scores_transformed_heads_like_the_model(kind):
    """The trainer's sequence log-probs equal log_softmax of the model's own forward().logits."""
    import dataclasses

    from mio_kernels.objective import PreferenceConfig
    from mio_kernels.train.model import HeadTasks, PreferenceModel, check_supported
    from mio_kernels.transform import head_transform

    lm = _tiny_lm(kind).eval()
    with torch.no_grad():  # large logits, so that the softcap (or the scaling) matters
        lm.get_output_embeddings().weight.mul_(20.0)
    check_supported(lm)
    options = head_transform(lm)
    assert options == (dict(logit_scale=1.0, final_logit_softcapping=3.0) if kind == "gemma2"
                       else dict(logit_scale=8.0, final_logit_softcapping=None))
    tasks = HeadTasks(dataclasses.replace(PreferenceConfig(), **options), backend=BACKENDS[-1])
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE)], dim=1)
    labels[:, :3] = IGNORE  # prompt
    with torch.no_grad():
        ours = PreferenceModel(lm)(ids, mask, task=tasks.sequence_logps, labels=labels)["policy_logps"]
        logits = lm(input_ids=ids, attention_mask=mask).logits.double()
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    theirs = torch.where(labels != IGNORE, token, 0.0).sum(-1)
    assert logits.abs().max() > 2.0
    assert torch.allclose(ours.double(), theirs, rtol=1e-5, atol=1e-4), (ours, theirs)


def test_trainer_refuses_what_the_op_cannot_express():
    from mio_kernels.train.model import check_supported

    lm = _tiny_lm("granite")
    lm.config.output_multiplier_scale = 0.5
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        check_supported(lm)
    lm = _tiny_lm("gemma2")
    lm.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_supported(lm)
