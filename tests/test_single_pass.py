"""backward_mode: the single-pass gradient (native backend) against recompute and the float64 reference,
with and without a logit transform, the loss coupling flags it relies on, how `auto` chooses, and the
CUDA epilogue compiling with plain nvcc.

Relative error bounds against the float64 reference as in test_fused.py: 1e-5 in fp32, 2e-2 in bf16.
"""
import math

import pytest
import torch

import mio_kernels.backends.single_pass as walk
from mio_kernels import FusedMIOLoss, _native, fused_mio_loss
from mio_kernels.backends import available_kernel_backends
from mio_kernels.backends.native_backend import set_chunk_budget_bytes
from mio_kernels.losses import LOSSES
from mio_kernels.objective import PreferenceConfig, coefficient_groups, preference_objective
from mio_kernels.reference import reference_preference_loss
from mio_kernels.sequence import reduce_sequences
from mio_kernels.single_pass import resolve_backward_mode
from mio_kernels.transform import LogitTransform, transform_logits

from conftest import NVCC, nvcc_ptxas_report
IGNORE = -100
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
needs_native = pytest.mark.skipif("native" not in available_kernel_backends(torch.device("cpu")),
                                  reason="native extension not built")


@pytest.fixture(autouse=True)
def _default_budget():
    yield
    set_chunk_budget_bytes(None)


# ---------------------------------------------------------------- the coupling flags, numerically


def _coefficients(loss_type, k, logps):
    cfg = PreferenceConfig(loss_type=loss_type, num_negatives=k, reference_free=True, beta=0.7)
    labels = torch.zeros(logps.shape[0], 1, dtype=torch.long)
    policy = reduce_sequences(logps[:, None], labels, IGNORE, False)
    return preference_objective(policy, None, cfg).seq_token_grad


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("k", [1, 2])
def test_coupling_flag_matches_the_gradient(loss_type, k):
    """Perturbing one sequence's logp moves exactly the coefficients the flag says it may move."""
    prompts = 3
    logps = -torch.rand((1 + k) * prompts, dtype=torch.float64) * 4
    base = _coefficients(loss_type, k, logps)
    coupling = LOSSES[loss_type].coupling
    moved_others = False
    for s, bump in ((s, bump) for s in range(logps.shape[0]) for bump in (0.37, 25.0, -25.0)):  # big: hinge flips
        bumped = logps.clone()
        bumped[s] += bump
        changed = (_coefficients(loss_type, k, bumped) - base).abs() > 1e-12
        same_prompt = torch.arange(logps.shape[0]) % prompts == s % prompts
        if coupling == "separable":
            allowed = torch.arange(logps.shape[0]) == s
        else:
            allowed = same_prompt
        assert not (changed & ~allowed).any(), f"{loss_type}: bumping row {s} moved rows {changed.nonzero().flatten()}"
        moved_others |= bool((changed & (torch.arange(logps.shape[0]) != s)).any())
    if coupling != "separable":
        assert moved_others, f"{loss_type} is flagged {coupling!r} but behaves separably: flag it 'separable'"
    if coupling == "difference" and k == 1:
        chosen, rejected = base.view(2, prompts)
        assert torch.allclose(chosen, -rejected, rtol=0, atol=1e-15), f"{loss_type}: c_w != -c_l"


def test_coefficient_groups_slots():
    labels = torch.zeros(6, 3, dtype=torch.long)
    assert coefficient_groups(PreferenceConfig("mio", num_negatives=2), labels).accumulator_slots == 1
    assert coefficient_groups(PreferenceConfig("dpo", num_negatives=2), labels).accumulator_slots == 3
    labels2 = torch.zeros(4, 3, dtype=torch.long)
    assert coefficient_groups(PreferenceConfig("hinge"), labels2).accumulator_slots == 1
    assert coefficient_groups(PreferenceConfig("hinge", sft_weight=0.1), labels2).accumulator_slots == 2
    assert coefficient_groups(PreferenceConfig("bco_pair", sft_weight=0.1), labels2).accumulator_slots == 1


# ---------------------------------------------------------------- exactness


def make_inputs(k, dtype, *, prompts=2, t=9, h=32, v=1009, bias=True, mask_rows=(), prompt_len=None, scale=1.0):
    """scale: of the raw logits (weight and bias), e.g. large enough for softcapping to saturate."""
    s = prompts * (1 + k)
    hidden = torch.randn(s, t, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (scale / math.sqrt(h))
    labels = torch.randint(0, v, (s, t))
    prompt_len = torch.randint(0, max(t - 1, 1), (s,)) if prompt_len is None else torch.tensor(prompt_len)
    labels[torch.arange(t)[None, :] < prompt_len[:, None]] = IGNORE
    for row in mask_rows:
        labels[row] = IGNORE
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), labels=labels,
                bias=(torch.randn(v, dtype=torch.float64) * scale).to(dtype) if bias else None,
                ref_logps=-torch.rand(s) * t * 5)


def run(inputs, grad_scale=2.5, **options):
    """-> [loss, policy_logps, d_hidden, d_weight(, d_bias)] in float64, after (grad_scale * loss).backward()."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in ("hidden", "weight", "bias") and v is not None else v)
              for k, v in inputs.items()}
    if options.get("backend") == "reference":
        leaves = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in leaves.items()}
        leaves = {k: (v.detach().requires_grad_() if k in ("hidden", "weight", "bias") and v is not None else v)
                  for k, v in leaves.items()}
        options = {k: v for k, v in options.items() if k not in ("backend", "backward_mode")}
        out = reference_preference_loss(**leaves, **options)
    else:
        out = fused_mio_loss(**leaves, **options)
    (grad_scale * out.loss).backward()
    grads = [leaves[k].grad for k in ("hidden", "weight", "bias") if leaves[k] is not None]
    return [out.loss.detach(), out.policy_logps] + grads, out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-6)).item()


CASES = [  # (k, options, mask_rows, rows per chunk)
    (1, {}, (), None),
    (1, dict(average_log_prob=True, sft_weight=0.3), (1,), 4),
    (2, {}, (), 23),
    (2, dict(sft_weight=0.5), (0, 4), 4),
    (2, dict(average_log_prob=True, reference_free=True), (), 5),
]


@needs_native
# every case in fp32; two in bf16 (the walk is dtype-independent; keeps CI fast)
@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in range(len(CASES))]
                         + [(1, torch.bfloat16), (3, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_single_pass_matches_recompute_and_reference(loss_type, case, dtype, monkeypatch):
    k, options, mask_rows, rows = CASES[case]
    if rows is not None:  # chunks that split sequences and chunks that hold several
        monkeypatch.setattr(walk, "chunk_rows", lambda *args: rows)
    inputs = make_inputs(k, dtype, mask_rows=mask_rows)
    if options.get("reference_free"):
        inputs.pop("ref_logps")
    compare_modes(inputs, dtype, dict(options, loss_type=loss_type, num_negatives=k))


def compare_modes(inputs, dtype, options, agree=2e-6):
    """single_pass against recompute (fp32: `agree`) and the float64 reference (TOL), forward and backward."""
    options = dict(options, beta=0.3)
    if options["loss_type"] == "robust":
        options["label_smoothing"] = 0.1
    single, out = run(inputs, backend="native", backward_mode="single_pass", **options)
    assert "SinglePass" in type(out.loss.grad_fn).__name__
    recompute, _ = run(inputs, backend="native", backward_mode="recompute", **options)
    oracle, _ = run(inputs, backend="reference", **options)
    # A loss near 0 (hinge at its kink, robust where its two terms cancel) is ill-conditioned: it may
    # differ by up to 2x what plain fp32 autograd's loss differs from float64 on the same case.
    with torch.no_grad():
        plain = reference_preference_loss(**{k: v for k, v in inputs.items()}, **options).loss.double()
    loss_bound = 2 * (plain - oracle[0]).abs().item()
    names = ["loss", "policy_logps", "d_hidden", "d_weight", "d_bias"]
    for name, a, b, r in zip(names, single, recompute, oracle):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        floor = 1e-2 if name == "loss" else 1e-6
        err = ((a.double() - r).norm() / r.norm().clamp_min(floor)).item()
        excused = name == "loss" and (a.double() - r).abs().item() <= loss_bound
        assert err <= TOL[dtype] or excused, f"{name}: single pass vs float64 reference {err:.3g}"
        if dtype == torch.float32 and not (name == "loss" and (a.double() - b.double()).abs().item() <= loss_bound):
            assert rel(a, b) <= agree, f"{name}: single pass vs recompute {rel(a, b):.3g}"


# (options, k, bias, raw-logit scale, rows per chunk): softcapped rows with raw logits ~1e2 saturate
# tanh for much of the vocabulary (dz/dx < 5e-7 there, taken from exp(-2|u|)).
TRANSFORM_CASES = [
    (dict(temperature=0.7), 1, True, 1.0, None),
    (dict(logit_scale=1.7), 1, False, 1.0, 4),
    (dict(final_logit_softcapping=3.0), 1, True, 40.0, None),
    (dict(final_logit_softcapping=5.0, temperature=0.9), 1, False, 60.0, 5),
    (dict(logit_scale=-1.5, final_logit_softcapping=2.0), 2, False, 8.0, 4),
    (dict(temperature=1.3, logit_scale=0.8, final_logit_softcapping=4.0), 2, True, 1.0, 23),
]
TRANSFORM_IDS = ["temperature", "scale-nobias", "softcap-saturated", "softcap-saturated-nobias",
                 "negscale-softcap-k2-nobias", "all-k2"]


@needs_native
@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in range(len(TRANSFORM_CASES))]
                         + [(len(TRANSFORM_CASES) - 1, torch.bfloat16)],
                         ids=[f"{n}-fp32" for n in TRANSFORM_IDS] + ["all-k2-bf16"])
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_single_pass_with_logit_transform(loss_type, case, dtype, monkeypatch):
    """The epilogue applies the transform: logp of z = transform(x) and dX = (onehot - softmax(z)) dz/dx."""
    options, k, bias, scale, rows = TRANSFORM_CASES[case]
    if rows is not None:
        monkeypatch.setattr(walk, "chunk_rows", lambda *args: rows)
    inputs = make_inputs(k, dtype, bias=bias, scale=scale, h=48 if dtype == torch.bfloat16 else 32)
    if scale > 10:  # the saturated regime is really exercised
        x = inputs["hidden"].double() @ inputs["weight"].double().T
        assert (x.abs() / options["final_logit_softcapping"] > 8).double().mean() > 0.3   # 1 - tanh^2 < 5e-7
    # Where tanh saturates, dz/dx ~ 4 exp(-2|u|) turns a rounding difference e in the logits (the
    # two modes' GEMMs block differently) into a relative 2|u| e in the gradient: |u| ~ 10 here.
    compare_modes(inputs, dtype, dict(options, loss_type=loss_type, num_negatives=k),
                  agree=1e-5 if scale > 10 else 2e-6)


EPILOGUE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _native.with_cuda() else [])


@needs_native
@pytest.mark.parametrize("device", EPILOGUE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options,scale", [({}, 1.0), (dict(temperature=0.6, logit_scale=-1.3), 1.0),
                                           (dict(final_logit_softcapping=3.0, temperature=0.8), 30.0)],
                         ids=["identity", "scaled", "softcap-saturated"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_grad_epilogue_op(device, dtype, options, scale, with_bias):
    """The op alone: logp of z = transform(x + b) and dX = (onehot - softmax(z)) dz/dx, against float64
    autograd through the plain-PyTorch transform."""
    tf = LogitTransform.of(**options)
    x = torch.randn(7, 1009, dtype=torch.float64) * scale
    bias = torch.randn(1009, dtype=torch.float64) * scale if with_bias else None
    labels = torch.randint(0, 1009, (7,))
    exact_x = x.clone().requires_grad_()
    exact = torch.log_softmax(transform_logits(exact_x + (0 if bias is None else bias), tf), -1)
    exact = exact.gather(1, labels[:, None]).squeeze(1)
    exact.sum().backward()
    buf = x.to(device, dtype, copy=True)
    logp = _native.grad_epilogue(buf, labels.to(device), None if bias is None else bias.to(device, dtype), dtype,
                                 tf.scale, tf.cap)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(logp.cpu(), exact.detach()) <= tol and rel(buf.cpu(), exact_x.grad) <= tol


@needs_native
def test_chunk_whose_rows_span_first_to_last_without_being_consecutive(monkeypatch):
    # Walk order (prompt by prompt) visits rows 5..8, 19..26, 39..44, 14..17, 27: 23 rows from 5 to 27
    # that are not the run 5..27.
    monkeypatch.setattr(walk, "chunk_rows", lambda *args: 23)
    inputs = make_inputs(2, torch.float32, prompt_len=[5, 5, 1, 0, 3, 1])
    single, _ = run(inputs, backend="native", backward_mode="single_pass", loss_type="ipo", num_negatives=2)
    oracle, _ = run(inputs, backend="reference", loss_type="ipo", num_negatives=2)
    for a, r in zip(single, oracle):
        assert rel(a, r) <= 1e-5


@needs_native
@pytest.mark.parametrize("loss_type", ["mio", "dpo"])
def test_t1_no_bias_fully_masked_and_frozen_weight(loss_type):
    inputs = make_inputs(1, torch.float32, t=1, bias=False, mask_rows=(2,))
    single, _ = run(inputs, backend="native", backward_mode="single_pass", loss_type=loss_type)
    oracle, _ = run(inputs, backend="reference", loss_type=loss_type)
    for a, r in zip(single, oracle):
        assert rel(a, r) <= 1e-5
    # weight frozen: dH only, no accumulators, so even a budget of a few logits rows fits
    inputs = make_inputs(2, torch.float32, v=1000)
    hidden = inputs["hidden"].clone().requires_grad_()
    set_chunk_budget_bytes(70 * 1000 * 4)
    out = fused_mio_loss(hidden, inputs["weight"], inputs["labels"], bias=inputs["bias"], ref_logps=inputs["ref_logps"],
                         loss_type=loss_type, num_negatives=2, backend="native", backward_mode="single_pass")
    out.loss.backward()
    set_chunk_budget_bytes(None)
    ref_hidden = inputs["hidden"].double().requires_grad_()
    ref = reference_preference_loss(ref_hidden, inputs["weight"].double(), inputs["labels"],
                                    bias=inputs["bias"].double(), ref_logps=inputs["ref_logps"],
                                    loss_type=loss_type, num_negatives=2)
    ref.loss.backward()
    assert rel(hidden.grad, ref_hidden.grad) <= 1e-5


@needs_native
def test_reference_model_states_and_module():
    inputs = make_inputs(1, torch.float32)
    inputs.pop("ref_logps")
    inputs.update(ref_hidden=torch.randn(4, 9, 16), ref_weight=torch.randn(1009, 16) / 4)
    single, _ = run(inputs, backend="native", backward_mode="single_pass", loss_type="ipo")
    recompute, _ = run(inputs, backend="native", backward_mode="recompute", loss_type="ipo")
    for a, b in zip(single, recompute):
        assert rel(a, b) <= 2e-6
    module = FusedMIOLoss(loss_type="ipo", backend="native", backward_mode="single_pass")
    assert "backward_mode='single_pass'" in repr(module)


@needs_native
@pytest.mark.parametrize("loss_type,k", [("mio", 1), ("dpo", 2)])
def test_budget_bounds_every_temporary(loss_type, k):
    """The logits chunk stays within the chunk budget, the accumulators within slots * (V * H + V) * 4;
    nothing of N x V elements is allocated."""
    from test_memory import LargestTensor

    inputs = make_inputs(k, torch.float32, t=40, v=1009, bias=True)
    n, v, h = inputs["labels"].numel(), 1009, 32
    slots = coefficient_groups(PreferenceConfig(loss_type, num_negatives=k), inputs["labels"]).accumulator_slots
    budget = 64 * v * 4
    set_chunk_budget_bytes(budget)
    leaves = {key: (val.requires_grad_() if key in ("hidden", "weight", "bias") else val) for key, val in inputs.items()}
    with LargestTensor() as probe:
        out = fused_mio_loss(**leaves, loss_type=loss_type, num_negatives=k, backend="native",
                             backward_mode="single_pass")
        out.loss.backward()
    assert probe.nbytes <= max(budget, slots * (v * h + v) * 4, n * h * 4) < n * v * 4, probe.nbytes


# ---------------------------------------------------------------- choosing the mode


def _resolve(mode, backend="native", requires_grad=True, loss_type="mio", k=1, v=1009, h=32, bias=False):
    inputs = make_inputs(k, torch.float32, v=v, h=h, bias=bias)
    weight = inputs["weight"].requires_grad_(requires_grad)
    cfg = PreferenceConfig(loss_type=loss_type, num_negatives=k)
    return resolve_backward_mode(mode, backend, cfg, inputs["hidden"], weight, inputs["labels"], inputs["bias"])


@needs_native
def test_auto_picks_single_pass_when_its_accumulators_are_one_gradient():
    assert _resolve("auto") == "single_pass"
    assert _resolve("auto", requires_grad=False) == "recompute"       # forward only
    with torch.no_grad():
        assert _resolve("auto") == "recompute"
    assert _resolve("auto", backend="triton") == "recompute"
    assert _resolve("recompute") == "recompute"
    # the logits chunk has its own budget: even a one-row budget leaves the single pass on
    set_chunk_budget_bytes(1)
    assert _resolve("auto") == "single_pass"
    assert _resolve("auto", loss_type="dpo", k=1) == "single_pass"   # difference loss: 1 slot
    # 1 + K slots are more than one weight gradient: auto recomputes, an explicit single_pass runs
    assert _resolve("auto", loss_type="dpo", k=2) == "recompute"
    assert _resolve("single_pass", loss_type="dpo", k=2) == "single_pass"


def _meta_call(vocab, width, dtype=torch.float32, tokens=4 * 8192, requires_grad=True):
    """Shapes of a real head without its memory: meta tensors carry shape, dtype and requires_grad."""
    hidden = torch.empty(tokens, width, device="meta", dtype=dtype, requires_grad=requires_grad)
    weight = torch.empty(vocab, width, device="meta", dtype=dtype, requires_grad=requires_grad)
    labels = torch.empty(tokens, device="meta", dtype=torch.long)
    return hidden, weight, labels


@needs_native
@pytest.mark.parametrize("loss_type", ["mio", "dpo"])
def test_llama3_head_takes_the_single_pass_by_default_on_cpu(loss_type):
    """V = 128256, H = 4096: one accumulator slot (2.1 GB) is one weight gradient: auto takes it."""
    hidden, weight, labels = _meta_call(128256, 4096)
    cfg = PreferenceConfig(loss_type=loss_type)
    assert resolve_backward_mode("auto", "native", cfg, hidden, weight, labels, None) == "single_pass"
    assert resolve_backward_mode("auto", "native", PreferenceConfig(loss_type, num_negatives=3), hidden, weight,
                                 labels, None) == ("single_pass" if loss_type == "mio" else "recompute")


@pytest.mark.parametrize("free_gib,expected", [(80, None), (2.5, "free")])
def test_cuda_single_pass_needs_free_device_memory(monkeypatch, free_gib, expected):
    """On CUDA the accumulators (2.1 GB fp32 at V = 128256, H = 4096) and the 1 GiB logits chunk must
    fit in free device memory with a margin; the device query is faked here (no GPU needed)."""
    import types

    import mio_kernels.single_pass as mode

    monkeypatch.setattr(mode, "free_device_bytes", lambda device: int(free_gib * 2**30))
    cuda = torch.device("cuda")

    def fake(shape, dtype=torch.bfloat16, requires_grad=True):
        return types.SimpleNamespace(shape=torch.Size(shape), dtype=dtype, device=cuda, is_cuda=True,
                                     requires_grad=requires_grad, numel=lambda: math.prod(shape))

    hidden, weight, labels = fake((32768, 4096)), fake((128256, 4096)), fake((32768,), torch.long, False)
    reason = mode.single_pass_blocker(PreferenceConfig("mio"), hidden, weight, labels, None)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason and "margin" in reason
    frozen = fake((128256, 4096), requires_grad=False)   # no accumulators: nothing to check
    assert mode.single_pass_blocker(PreferenceConfig("mio"), hidden, frozen, labels, None) is None


@needs_native
@pytest.mark.parametrize("dtype,elem", [(torch.float32, 4), (torch.bfloat16, 4), (torch.float64, 8)])
def test_chunk_rows_follow_the_documented_formula(dtype, elem, monkeypatch):
    """R = clamp(budget // (V * p), 1, scored rows), p = 4 bytes (8 for fp64), whatever the
    accumulators (the README's "Backward mode" formula)."""
    v, rows = 1009, 7
    spans = []
    original = walk._Walk.chunk
    monkeypatch.setattr(walk._Walk, "chunk", lambda self, k0, k1: (spans.append(k1 - k0), original(self, k0, k1)))
    set_chunk_budget_bytes(rows * v * elem + elem - 1)
    inputs = make_inputs(1, dtype, v=v, bias=True)
    inputs["weight"].requires_grad_()
    out = fused_mio_loss(**inputs, loss_type="dpo", backend="native", backward_mode="single_pass")
    out.loss.backward()
    assert max(spans) == rows and walk.chunk_rows(rows * v * elem, v, dtype, 3) == 3


@needs_native
@pytest.mark.parametrize("loss_type,k", [("mio", 1), ("dpo", 1), ("dpo", 2), ("ipo", 1)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_frozen_head_sequence_spanning_chunks(loss_type, k, packed):
    """Regression: with the weight and bias frozen (LoRA), the dH rows of a sequence written in an
    earlier chunk were never multiplied by its coefficient. Chunks of 5 rows split every sequence."""
    inputs = make_inputs(k, torch.float32, t=23, v=1009, bias=True)
    if packed:
        s, t = inputs["labels"].shape
        inputs.update(hidden=inputs["hidden"].reshape(s * t, -1), labels=inputs["labels"].reshape(-1),
                      cu_seqlens=torch.arange(0, s * t + 1, t))
    options = dict(loss_type=loss_type, num_negatives=k, beta=0.3)
    hidden = inputs["hidden"].clone().requires_grad_()
    set_chunk_budget_bytes(5 * 1009 * 4)
    out = fused_mio_loss(**dict(inputs, hidden=hidden), **options, backend="native", backward_mode="auto")
    assert "SinglePass" in type(out.loss.grad_fn).__name__
    out.loss.backward()
    ref_hidden = inputs["hidden"].double().requires_grad_()
    ref = reference_preference_loss(ref_hidden, inputs["weight"].double(), inputs["labels"],
                                    bias=inputs["bias"].double(), ref_logps=inputs["ref_logps"],
                                    cu_seqlens=inputs.get("cu_seqlens"), **options)
    ref.loss.backward()
    assert rel(hidden.grad, ref_hidden.grad) <= 1e-5


@needs_native
def test_forward_only_does_no_gradient_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("gradient walk ran without a gradient to compute")

    monkeypatch.setattr(walk, "_Walk", fail)
    inputs = make_inputs(1, torch.float32)
    with torch.no_grad():
        out = fused_mio_loss(**inputs, backend="native", backward_mode="single_pass")
    assert out.loss.grad_fn is None and torch.isfinite(out.loss)
    fused_mio_loss(**inputs, backend="native", backward_mode="auto")  # no input requires grad


def test_bad_backward_mode_and_unsupported_backend():
    inputs = make_inputs(1, torch.float32)
    with pytest.raises(ValueError, match="backward_mode must be one of"):
        fused_mio_loss(**inputs, backend="reference", backward_mode="two_pass")
    with pytest.raises(ValueError, match="backward_mode must be one of"):
        FusedMIOLoss(backward_mode="fast")
    with pytest.raises(ValueError, match="backend='triton' has no single-pass backward"):
        _resolve("single_pass", backend="triton")
    with pytest.raises(ValueError, match="backend='reference' has no single-pass backward"):
        fused_mio_loss(**inputs, backend="reference", backward_mode="single_pass")


# ---------------------------------------------------------------- packed sequences (cu_seqlens)


def make_packed(k, dtype, lengths, *, h=32, v=1009, bias=True, masked=()):
    """Padding-free batch: sequences of `lengths` back to back, each with a random prompt (ignored)
    and its last token ignored (labels shifted within the sequence); `masked` rows fully ignored."""
    n = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    labels = torch.randint(0, v, (n,))
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        prompt = int(torch.randint(0, max(b - a, 1), ()))
        labels[a:a + prompt] = IGNORE
        labels[b - 1] = IGNORE
        if s in masked:
            labels[a:b] = IGNORE
    return dict(hidden=torch.randn(n, h, dtype=torch.float64).to(dtype),
                weight=(torch.randn(v, h, dtype=torch.float64) / math.sqrt(h)).to(dtype), labels=labels,
                bias=torch.randn(v, dtype=torch.float64).to(dtype) if bias else None, cu_seqlens=cu,
                ref_logps=-torch.rand(len(lengths)) * 20)


PACKED_CASES = [  # (k, lengths, options, fully masked sequences, rows per chunk)
    (1, [7, 1, 12, 5], {}, (), None),
    (1, [3, 9, 2, 11], dict(sft_weight=0.4, average_log_prob=True), (1,), 3),
    (2, [5, 8, 1, 6, 9, 2], {}, (4,), 7),
    (2, [4, 6, 10, 3, 2, 7], dict(sft_weight=0.2), (), 4),
]


@needs_native
@pytest.mark.parametrize("case", range(len(PACKED_CASES)))
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_packed_single_pass_matches_recompute_and_reference(loss_type, case, monkeypatch):
    k, lengths, options, masked, rows = PACKED_CASES[case]
    if rows is not None:  # chunks that split sequences and chunks that hold several
        monkeypatch.setattr(walk, "chunk_rows", lambda *args: rows)
    inputs = make_packed(k, torch.float32, lengths, masked=masked)
    options = dict(options, loss_type=loss_type, num_negatives=k, beta=0.3)
    if loss_type == "robust":
        options["label_smoothing"] = 0.1
    assert resolve_backward_mode("auto", "native", PreferenceConfig(**{o: v for o, v in options.items()}),
                                 inputs["hidden"].requires_grad_(), inputs["weight"], inputs["labels"],
                                 inputs["bias"]) == "single_pass"
    single, out = run(inputs, backend="native", backward_mode="single_pass", **options)
    assert "SinglePass" in type(out.loss.grad_fn).__name__
    recompute, _ = run(inputs, backend="native", backward_mode="recompute", **options)
    oracle, _ = run(inputs, backend="reference", **options)
    for name, a, b, r in zip(["loss", "policy_logps", "d_hidden", "d_weight", "d_bias"], single, recompute, oracle):
        floor = 1e-2 if name == "loss" else 1e-6
        err = ((a.double() - r).norm() / r.norm().clamp_min(floor)).item()
        assert err <= TOL[torch.float32], f"{name}: packed single pass vs float64 reference {err:.3g}"
        assert rel(a, b) <= 2e-6, f"{name}: packed single pass vs recompute {rel(a, b):.3g}"


@needs_native
def test_packed_equals_padded_single_pass():
    """The same sequences packed and padded give the same loss and gradients (rows of real tokens)."""
    padded = make_inputs(1, torch.float32, t=6)
    s, t = padded["labels"].shape
    packed = dict(padded, hidden=padded["hidden"].reshape(s * t, -1), labels=padded["labels"].reshape(-1),
                  cu_seqlens=torch.arange(0, s * t + 1, t))
    a, _ = run(padded, backend="native", backward_mode="single_pass", loss_type="dpo")
    b, _ = run(packed, backend="native", backward_mode="single_pass", loss_type="dpo")
    for x, y in zip(a, b):
        assert rel(x.reshape(y.shape), y) <= 1e-6


@needs_native
@pytest.mark.parametrize("options", [TRANSFORM_CASES[0][0], TRANSFORM_CASES[-1][0]], ids=["temperature", "all"])
def test_auto_takes_the_single_pass_for_a_transformed_head(options):
    inputs = {k: (v.detach().clone().requires_grad_() if k in ("hidden", "weight") else v)
              for k, v in make_inputs(1, torch.float32).items()}
    cfg = PreferenceConfig(loss_type="mio", **options)
    assert resolve_backward_mode("auto", "native", cfg, inputs["hidden"], inputs["weight"], inputs["labels"],
                                 inputs["bias"]) == "single_pass"
    auto = fused_mio_loss(**inputs, backend="native", backward_mode="auto", **options)
    assert "SinglePass" in type(auto.loss.grad_fn).__name__


@needs_native
def test_auto_under_torch_compile_takes_recompute():
    """The single pass reads its schedule from the labels on the host: a traced call takes recompute
    (fullgraph, no break) and gives eager's result."""
    inputs = make_inputs(2, torch.float32, v=301)

    def loss(hidden, weight):
        return fused_mio_loss(hidden, weight, inputs["labels"], bias=inputs["bias"], ref_logps=inputs["ref_logps"],
                              num_negatives=2, backend="native", backward_mode="auto", check_values=False).loss

    torch._dynamo.reset()
    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight")]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
    eager = loss(*leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert "SinglePass" in type(eager.grad_fn).__name__


@needs_native
def test_explicit_single_pass_while_traced_is_refused(monkeypatch):
    """While torch.compile traces, an explicit single_pass says why it cannot run (auto falls back)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match="backward_mode='single_pass' cannot run: torch.compile cannot trace it"):
        _resolve("single_pass")
    assert _resolve("auto") == "recompute"


# ---------------------------------------------------------------- CUDA epilogue: compile-only here

@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_grad_epilogue_compiles_with_plain_nvcc(arch, tmp_path):
    report = nvcc_ptxas_report("grad_epilogue.cu", arch, tmp_path)
    spills = [line for line in report.splitlines() if "spill stores" in line]
    assert spills and all(" 0 bytes spill stores" in line for line in spills), report
