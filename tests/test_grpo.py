"""fused_grpo_loss against TRL 1.16's GRPO loss.

Two independent checks:
- a float64 oracle written here (full logits, log_softmax, and TRL's `_compute_loss` rewritten
  plainly on padded [B, T] tensors; nothing from the package), forward, metrics and gradients
  (hidden, weight, bias) for every loss type x importance-sampling level x option set x padded /
  packed x logit transform, every backend and backward mode, fp32 <= 1e-5 and bf16 <= 2e-2 relative;
- parity with TRL's own code: `GRPOTrainer._compute_loss` is called unbound on a
  types.SimpleNamespace carrying the attributes it reads, with the model call replaced by our op's
  per-token log-probs and entropies (leaf tensors); its loss, logged metrics and its gradient chained
  through the float64 log-probs to hidden/weight/bias must equal ours.
Ratios are drawn away from the clip boundaries (log-ratios from a fixed set), so that fp32 rounding
cannot move a token across a kink.
"""
import math
import types
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mio_kernels import FusedGRPOLoss, fused_grpo_loss
from mio_kernels.backends import available_kernel_backends
from mio_kernels.backends.native_backend import set_chunk_budget_bytes

import grpo_oracle
from conftest import WORST_ERRORS

IGNORE = -100
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
LOG_RATIOS = torch.tensor([-0.5, -0.1, 0.05, 0.1, 0.5], dtype=torch.float64)  # w: 0.61 .. 1.65, away from kinks
CPU = torch.device("cpu")
needs_native = pytest.mark.skipif("native" not in available_kernel_backends(CPU), reason="native extension not built")
needs_triton = pytest.mark.skipif("triton" not in available_kernel_backends(CPU), reason="triton unavailable")

# option sets: (name, options, per-token advantages, old log-probs, importance weights, packed, transform)
VARIANTS = {
    "plain": dict(opts=dict(), adv_tokens=False, old=False, iw=False, packed=False, transform={}),
    "kl_entropy": dict(opts=dict(beta=0.1, entropy_coef=0.05, epsilon_high=0.28), adv_tokens=False, old=True,
                       iw=False, packed=True, transform=dict(temperature=0.7)),
    "delta_iw": dict(opts=dict(delta=1.4, beta=0.05, use_bias_correction_kl=False), adv_tokens=True, old=True,
                     iw=True, packed=False, transform=dict(final_logit_softcapping=4.0, logit_scale=1.3)),
    "packed_iw_entropy": dict(opts=dict(entropy_coef=-0.03, max_completion_length=12), adv_tokens=False, old=True,
                              iw=True, packed=True, transform=dict(final_logit_softcapping=6.0, temperature=1.2)),
    # GSPO without KL or entropy: the per-sequence single pass's options
    "gspo": dict(opts=dict(delta=1.4, epsilon_high=0.28), adv_tokens=True, old=True, iw=True, packed=True,
                 transform=dict(final_logit_softcapping=5.0, temperature=0.8)),
}


@pytest.fixture(autouse=True)
def _restore_budget():
    yield
    set_chunk_budget_bytes(None)


# --------------------------------------------------------------------------------- the oracle

def oracle_logits(hidden, weight, bias, temperature=1.0, logit_scale=1.0, final_logit_softcapping=None):
    x = hidden @ weight.T + (0 if bias is None else bias)
    if final_logit_softcapping is not None:
        c = final_logit_softcapping
        return c * torch.tanh(logit_scale * x / c) / temperature
    return logit_scale * x / temperature


def oracle_token_logps(hidden, weight, bias, labels, transform):
    logp_all = torch.log_softmax(oracle_logits(hidden, weight, bias, **transform), -1)
    mask = labels != IGNORE
    logps = logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logps, entropy


def oracle_trl_loss(lp, ent, mask, adv, old, ref, iw, loss_type="dapo", epsilon_low=0.2, epsilon_high=None,
                    delta=None, beta=0.0, importance_sampling_level="token", entropy_coef=0.0,
                    use_bias_correction_kl=True, max_completion_length=None, num_items_in_batch=None,
                    log_entropy=True):
    """TRL's loss (grpo_oracle) with TRL's default SAPO temperatures and shape-based per-completion
    metrics; -> (loss, detached metrics, the scale rounding errors are relative to: the terms'
    magnitudes before they cancel)."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    iw = iw[:, None] if iw is not None and iw.dim() == 1 else iw
    per_completion = (importance_sampling_level == "sequence" or lp.shape[1] == 1) and adv.shape[1] == 1
    options = dict(loss_type=loss_type, max_completion_length=max_completion_length,
                   num_items_in_batch=num_items_in_batch)
    loss, metrics, per_token = grpo_oracle.trl_grpo_loss(
        lp, ent, mask, adv, old, ref, iw, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        beta=beta, importance_sampling_level=importance_sampling_level, entropy_coef=entropy_coef,
        use_bias_correction_kl=use_bias_correction_kl, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        per_completion=per_completion, log_entropy=log_entropy, **options)
    mask = mask.to(lp.dtype)
    scale = (float(grpo_oracle.reduce_per_token(x=per_token.detach().abs(), mask=mask, **options))
             + abs(entropy_coef) * float((ent.detach() * mask).sum() / mask.sum()))
    return loss, {k: v.detach() for k, v in metrics.items()}, scale


# ----------------------------------------------------------------------------------- the cases

def make_case(variant, loss_type, level, dtype=torch.float32, B=3, T=9, H=16, V=40, seed=None):
    """Padded float64 master inputs and the op's arguments (packed when the variant says so)."""
    spec = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).double()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)).to(dtype).double()
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(dtype).double()
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = [T, T - 3, T - 1][:B]
    labels[0, :2] = IGNORE                     # a prompt-like prefix
    for i, n in enumerate(lengths):
        labels[i, n:] = IGNORE                 # padding
    labels[1, 4] = IGNORE                      # a tool-output token
    mask = labels != IGNORE
    with torch.no_grad():
        lp_true, _ = oracle_token_logps(hidden, weight, bias, labels, spec["transform"])
    sign = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0).double()
    adv = sign * (0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    if spec["adv_tokens"]:
        adv = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(B, T, generator=g,
                                                                                              dtype=torch.float64))
    shape = (B, T) if level == "token" else (B, 1)
    d = LOG_RATIOS[torch.randint(0, len(LOG_RATIOS), shape, generator=g)].expand(B, T)
    old = (lp_true - d) if spec["old"] else None
    ref = lp_true + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    iw = (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)) if spec["iw"] else None
    opts = dict(spec["opts"], loss_type=loss_type, importance_sampling_level=level)
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.3
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, adv=adv, old=old, ref=ref, iw=iw,
                opts=opts, transform=spec["transform"], packed=spec["packed"], lengths=lengths, dtype=dtype)


def oracle(case, log_entropy=True):
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    lp, ent = oracle_token_logps(h, w, b, case["labels"], case["transform"])
    opts = dict(case["opts"])
    opts.setdefault("max_completion_length", case["labels"].shape[1])
    ref = case["ref"] if opts.get("beta", 0.0) else None
    loss, metrics, scale = oracle_trl_loss(lp, ent, case["mask"], case["adv"], case["old"], ref, case["iw"],
                                           log_entropy=log_entropy, **opts)
    grads = torch.autograd.grad(loss, (h, w, b))
    return loss.detach(), grads, metrics, max(scale, 1e-3)


def pack(x, lengths):
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)])


def unpack(x, lengths, like):
    out = torch.zeros_like(like)
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n] = x[start:start + n]
        start += n
    return out


def run_op(case, backend, backward_mode, requires=("hidden", "weight", "bias"), log_entropy=True):
    dtype, lengths = case["dtype"], case["lengths"]
    h, w, b = (case[k].to(dtype).requires_grad_(k in requires) for k in ("hidden", "weight", "bias"))
    labels, adv, old, ref, iw = case["labels"], case["adv"], case["old"], case["ref"], case["iw"]
    kwargs = dict(case["opts"], **case["transform"])
    cu = None
    if case["packed"]:
        cu = torch.tensor([0] + lengths).cumsum(0)
        h_in, labels = pack(h, lengths), pack(labels, lengths)
        adv = adv if adv.dim() == 1 else pack(adv, lengths)
        old, ref, iw = (None if t is None else pack(t, lengths) for t in (old, ref, iw))
    else:
        h_in = h
    kwargs.setdefault("max_completion_length", case["labels"].shape[1])
    if kwargs.get("beta", 0.0) == 0.0:
        ref = None
    f32 = (lambda t: None if t is None else t.float()) if dtype != torch.float64 else (lambda t: t)
    out = fused_grpo_loss(h_in, w, labels, bias=b, cu_seqlens=cu, advantages=f32(adv), old_logps=f32(old),
                          ref_logps=f32(ref), importance_weights=f32(iw), backend=backend,
                          backward_mode=backward_mode, log_entropy=log_entropy, **kwargs)
    wanted = [t for t in (h, w, b) if t.requires_grad]
    grads = torch.autograd.grad(out.loss, wanted)
    grads = iter(grads)
    grads = tuple(next(grads) if t.requires_grad else None for t in (h, w, b))
    return out, grads


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def check_against_oracle(case, backend, backward_mode, requires=("hidden", "weight", "bias"), log_entropy=True):
    loss_ref, grads_ref, metrics_ref, scale = oracle(case, log_entropy)
    out, grads = run_op(case, backend, backward_mode, requires, log_entropy)
    tol = TOL[case["dtype"]]
    where = f"{backend}/{backward_mode} {case['opts']} packed={case['packed']} {case['transform']}"
    assert abs(float(out.loss.detach()) - float(loss_ref)) <= tol * scale, where
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_ref):
        if g is not None:
            assert rel(g, r) <= tol, f"d_{name}: {rel(g, r):.2e} {where}"
    assert set(out.metrics) == set(metrics_ref), (sorted(out.metrics), sorted(metrics_ref), where)
    for k, v in metrics_ref.items():
        assert abs(float(out.metrics[k]) - float(v)) <= 10 * tol * max(1.0, abs(float(v))), (k, where)
    return out


# ---------------------------------------------------------------------- exactness, every backend

@needs_native
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_native_and_reference_match_trl_formulas(loss_type, level, variant):
    case = make_case(variant, loss_type, level)
    check_against_oracle(case, "reference", "auto")
    set_chunk_budget_bytes(4 * 40 * 4)         # 4 logits rows: completions span chunks
    check_against_oracle(case, "native", "recompute")
    check_against_oracle(case, "native", "auto")   # the single pass where the options allow it
    if level == "token":
        check_against_oracle(case, "native", "single_pass")


@needs_native
@pytest.mark.parametrize("requires", [("hidden", "weight", "bias"), ("hidden",), ("weight", "bias")],
                         ids=["all", "frozen_head", "head_only"])
@pytest.mark.parametrize("variant", ["plain", "gspo"])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "cispo"])
def test_sequence_level_single_pass(loss_type, variant, requires):
    """GSPO / luspo: each completion's coefficient is known once it is scored. 3-row chunks, so
    completions span chunks: the open completion's accumulator and earlier dH rows are scaled when
    it completes; fp32 and fp64; the entropies' values (log_entropy) computed in the same pass or not."""
    for dtype, log_entropy in ((torch.float32, True), (torch.float64, False)):
        case = make_case(variant, loss_type, "sequence", dtype=dtype)
        set_chunk_budget_bytes(3 * 40 * dtype.itemsize * (1 + 6 * log_entropy))   # the pass's entropy temporaries
        out = check_against_oracle(case, "native", "single_pass", requires, log_entropy=log_entropy)
        assert type(out.loss.grad_fn).__name__ == "GRPOSinglePassFunctionBackward"


@needs_native
@pytest.mark.parametrize("variant", ["kl_entropy", "delta_iw"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_frozen_weight_single_pass(loss_type, variant):
    """LoRA: only hidden requires grad; tiny chunks."""
    case = make_case(variant, loss_type, "token")
    set_chunk_budget_bytes(3 * 40 * 4)
    check_against_oracle(case, "native", "single_pass", requires=("hidden",))
    check_against_oracle(case, "native", "recompute", requires=("hidden",))


@needs_native
@pytest.mark.parametrize("backward_mode", ["single_pass", "recompute"])
@pytest.mark.parametrize("variant", ["kl_entropy", "delta_iw"])
def test_bf16(variant, backward_mode):
    case = make_case(variant, "dapo", "token", dtype=torch.bfloat16)
    set_chunk_budget_bytes(5 * 40 * 4)
    check_against_oracle(case, "native", backward_mode)


@needs_native
@pytest.mark.parametrize("loss_type", ["dapo", "sapo"])
def test_float64_single_pass(loss_type):
    case = make_case("kl_entropy", loss_type, "token", dtype=torch.float64)
    set_chunk_budget_bytes(2 * 40 * 8)
    check_against_oracle(case, "native", "single_pass")


@needs_triton
@pytest.mark.parametrize("loss_type,level,variant", [("dapo", "token", "kl_entropy"), ("grpo", "sequence", "delta_iw"),
                                                     ("cispo", "token", "packed_iw_entropy"),
                                                     ("luspo", "sequence", "kl_entropy")])
def test_triton_matches_trl_formulas(loss_type, level, variant):
    case = make_case(variant, loss_type, level, B=2, T=6, V=64)
    check_against_oracle(case, "triton", "auto")


# ------------------------------------------------------------------------- parity with TRL itself

def trl_compute_loss(lp, ent, mask, adv, old, ref, iw, opts, num_items):
    """Run GRPOTrainer._compute_loss on (lp, ent) [B, T]: returns (loss, metrics)."""
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    eps_low = opts.get("epsilon_low", 0.2)
    eps_high = opts.get("epsilon_high")
    beta = opts.get("beta", 0.0)
    ns = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=opts["importance_sampling_level"], beta=beta, loss_type=opts["loss_type"],
        epsilon_low=eps_low, epsilon_high=eps_low if eps_high is None else eps_high,
        args=types.SimpleNamespace(use_bias_correction_kl=opts.get("use_bias_correction_kl", True),
                                   delta=opts.get("delta"), sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                   steps_per_generation=1),
        use_vllm=iw is not None, vllm_importance_sampling_correction=True, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=opts["max_completion_length"],
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                          reduce=lambda x, reduction="sum": x, sync_gradients=True),
        _entropy_bonus_enabled=opts.get("entropy_coef", 0.0) != 0.0, use_adaptive_entropy=False,
        entropy_coef=opts.get("entropy_coef", 0.0), aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    B = lp.shape[0]
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros_like(mask, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, num_items_in_batch=torch.tensor(float(num_items)))
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    if iw is not None:
        inputs["importance_sampling_ratio"] = iw
    loss = trainer.GRPOTrainer._compute_loss(ns, None, inputs)
    return loss, {k: v[-1] for k, v in ns._metrics["train"].items() if k != "entropy_coef"}


@needs_native
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_parity_with_trl_compute_loss(loss_type, level, variant):
    """Our op (native, default backward mode, fp32, padded) vs TRL's own _compute_loss on our per-token
    log-probs and entropies; gradients: TRL's dL/dlogp, dL/dentropy chained through the float64
    log-probs and entropies to hidden, weight, bias."""
    case = make_case(variant, loss_type, level)
    case["packed"] = False
    set_chunk_budget_bytes(4 * 40 * 4)
    out, grads = run_op(case, "native", "auto")
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    lp64, ent64 = oracle_token_logps(h, w, b, case["labels"], case["transform"])
    lp = out.token_logps.double().clone().requires_grad_()
    ent = out.token_entropy.double().clone().requires_grad_()
    opts = dict(case["opts"])
    opts.setdefault("max_completion_length", case["labels"].shape[1])
    loss, metrics = trl_compute_loss(lp, ent, case["mask"], case["adv"], case["old"], case["ref"], case["iw"], opts,
                                     int(case["mask"].sum()))
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
    grads_trl = torch.autograd.grad((lp64 * g_lp).sum() + (ent64 * g_ent).sum(), (h, w, b))
    scale = oracle(case)[3]
    assert abs(float(out.loss.detach()) - float(loss.detach())) <= 1e-5 * scale
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_trl):
        assert rel(g, r) <= 1e-5, (name, rel(g, r))
    assert set(out.metrics) == set(metrics), (sorted(out.metrics), sorted(metrics))
    for k, v in metrics.items():
        assert abs(float(out.metrics[k]) - float(v)) <= 1e-5 * max(1.0, abs(float(v))), (k, float(out.metrics[k]), v)
    key = "grpo op vs TRL _compute_loss (loss, grads)"
    WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), abs(float(out.loss.detach()) - float(loss.detach())) / scale,
                            *(rel(g, r) for g, r in zip(grads, grads_trl)))


# ------------------------------------------------------------------------------------ memory

class LargeTensors(TorchDispatchMode):
    """Records every distinct storage at least `numel` elements large that an ATen op allocates."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs:      # views and in-place results are not allocations
                    self.storages.add(ptr)
        return out


@needs_native
@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
def test_single_pass_allocates_no_vocab_by_hidden_accumulator(entropy_coef):
    """The token-level single pass allocates one [V, H] tensor in its forward (dW) and none other;
    the backward returns dW scaled by the incoming gradient (one more, the returned .grad)."""
    B, T, H, V = 2, 40, 64, 512
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    set_chunk_budget_bytes(16 * V * 4)         # 16 rows x V < V x H: a chunk is smaller than [V, H]
    with LargeTensors(V * H) as fwd:
        out = fused_grpo_loss(hidden, weight, labels, bias=bias, advantages=torch.randn(B), beta=0.1,
                              ref_logps=-torch.rand(B, T), entropy_coef=entropy_coef, backward_mode="single_pass")
    assert len(fwd.storages) == 1, len(fwd.storages)
    with LargeTensors(V * H) as bwd:
        out.loss.backward()
    assert len(bwd.storages) <= 1


@needs_native
@pytest.mark.parametrize("frozen_head", [False, True])
def test_sequence_level_single_pass_allocates_one_accumulator(frozen_head):
    """GSPO's single pass: dW and one [V, H] accumulator (the completion open across chunks) in its
    forward; none of either when the head is frozen (LoRA); entropies logged in the same pass."""
    B, T, H, V = 2, 40, 64, 512
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=not frozen_head)
    labels = torch.randint(0, V, (B, T))
    set_chunk_budget_bytes(2 * V * 4 * 7)      # 2 rows per chunk with the entropy's temporaries
    with LargeTensors(V * H) as fwd:
        out = fused_grpo_loss(hidden, weight, labels, advantages=torch.randn(B), old_logps=-torch.rand(B, T) - 6,
                              importance_sampling_level="sequence", log_entropy=True, backward_mode="single_pass")
    assert len(fwd.storages) == (0 if frozen_head else 2), len(fwd.storages)
    assert out.token_entropy is not None and type(out.loss.grad_fn).__name__ == "GRPOSinglePassFunctionBackward"


@needs_native
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_zero_advantage_tokens_skip_the_gradient_gemms(loss_type, monkeypatch):
    """Without KL or entropy bonus a token with advantage 0 has dL/dlogp = 0 whatever its log-prob
    (TRL's groups whose rewards all agree): the token pass gives it its log-prob only, and the
    gradient GEMMs see the other rows. Same values and gradients as recompute."""
    import mio_kernels.backends.token_pass as tp
    seen = []
    real = tp._TokenWalk.gradients
    monkeypatch.setattr(tp._TokenWalk, "gradients",
                        lambda self, rows, *a: seen.append(rows.clone()) or real(self, rows, *a))
    B, T, H, V = 4, 9, 16, 40
    hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[1, :2] = IGNORE
    adv = torch.randn(B, T)
    adv[1] = 0.0                              # a completion whose group's rewards agree
    adv[3, ::2] = 0.0                         # scattered zero-advantage tokens
    old = -torch.rand(B, T) - 3
    set_chunk_budget_bytes(4 * V * 4)
    outs = {}
    for mode in ("single_pass", "recompute"):
        out = fused_grpo_loss(hidden, weight, labels, advantages=adv, old_logps=old,
                              loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else None,
                              backend="native", backward_mode=mode, log_entropy=True)
        outs[mode] = (out, torch.autograd.grad(out.loss, (hidden, weight)))
    walked = torch.cat(seen)
    expected = torch.nonzero(((labels != IGNORE) & (adv != 0)).reshape(-1)).flatten()
    assert torch.equal(walked.sort().values, expected)
    (a, ga), (b, gb) = outs["single_pass"], outs["recompute"]
    assert torch.allclose(a.token_logps, b.token_logps) and torch.allclose(a.token_entropy, b.token_entropy)
    assert torch.allclose(a.loss, b.loss, rtol=1e-6) and all(rel(x, y) < 1e-5 for x, y in zip(ga, gb))


@needs_native
@pytest.mark.parametrize("loss_type", ["grpo", "sapo"])
def test_zero_advantage_completions_skip_the_sequence_pass(loss_type, monkeypatch):
    """GSPO: a completion whose advantages are all 0 has c_s = 0 whatever its log-probs; the
    per-sequence pass walks the others, and the skipped one gets its log-probs and entropies from the
    token pass without gradient work. Same values and gradients as recompute, padded and packed."""
    import mio_kernels.backends.single_pass as sp
    walked = []
    real = sp.single_pass
    monkeypatch.setattr(sp, "single_pass",
                        lambda *a, **k: walked.append(a[6].flatten().tolist()) or real(*a, **k))
    B, T, H, V = 4, 9, 16, 40
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[2, :3] = IGNORE
    adv, old = torch.tensor([0.7, 0.0, -1.2, 0.0], dtype=torch.float64), -torch.rand(B, T, dtype=torch.float64) - 3
    set_chunk_budget_bytes(4 * V * 8 * 7)
    for packed in (False, True):
        extra = dict(cu_seqlens=torch.arange(0, B * T + 1, T)) if packed else {}
        h, y, o = (hidden.reshape(B * T, H), labels.reshape(-1), old.reshape(-1)) if packed else (hidden, labels, old)
        outs = {}
        for mode in ("single_pass", "recompute"):
            out = fused_grpo_loss(h, weight, y, advantages=adv, old_logps=o, loss_type=loss_type, backend="native",
                                  importance_sampling_level="sequence", backward_mode=mode, log_entropy=True, **extra)
            outs[mode] = (out, torch.autograd.grad(out.loss, (hidden, weight)))
        assert walked[-1] == [0, 2]
        (a, ga), (b, gb) = outs["single_pass"], outs["recompute"]
        assert torch.allclose(a.token_logps, b.token_logps, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.token_entropy, b.token_entropy, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.loss, b.loss, rtol=1e-12) and all(rel(x, z) < 1e-10 for x, z in zip(ga, gb))


@needs_native
def test_the_probe_sees_an_accumulator():
    """The probe works: the per-sequence single pass of fused_mio_loss allocates dW and its accumulator."""
    from mio_kernels import fused_mio_loss
    S, T, H, V = 2, 40, 64, 512
    hidden, weight = torch.randn(S, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    set_chunk_budget_bytes(V * H * 4 + 64 * V * 4)
    with LargeTensors(V * H) as probe:
        fused_mio_loss(hidden, weight, torch.randint(0, V, (S, T)), ref_logps=torch.zeros(S), loss_type="dpo",
                       backward_mode="single_pass")
    assert len(probe.storages) >= 2


# ------------------------------------------------------------------------- modes, module, inputs

def _small(B=2, T=5, H=8, V=30):
    return (torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True),
            torch.randint(0, V, (B, T)), torch.randn(B))


SEQUENCE_PASS_BLOCKERS = [(dict(beta=0.1), "KL term"), (dict(loss_type="cispo"), "cispo"),
                          (dict(entropy_coef=0.01), "entropy bonus")]


@needs_native
@pytest.mark.parametrize("changes,why", SEQUENCE_PASS_BLOCKERS, ids=[w for _, w in SEQUENCE_PASS_BLOCKERS])
def test_sequence_level_single_pass_refused_when_a_token_has_its_own_coefficient(changes, why, monkeypatch):
    """KL, cispo and the entropy bonus give tokens coefficients of their own: an explicit single_pass says
    which, auto recomputes; a forward-only call does no gradient work."""
    hidden, weight, labels, adv = _small()
    kwargs = dict(advantages=adv, importance_sampling_level="sequence", backend="native", **changes)
    if "beta" in changes:
        kwargs["ref_logps"] = torch.randn(labels.shape)
    with pytest.raises(ValueError, match=f"importance_sampling_level='sequence': .*{why}"):
        fused_grpo_loss(hidden, weight, labels, backward_mode="single_pass", **kwargs)
    import mio_kernels.backends.single_pass as sp
    monkeypatch.setattr(sp, "single_pass", lambda *a, **k: pytest.fail("single pass taken"))
    out = fused_grpo_loss(hidden, weight, labels, **kwargs)
    assert type(out.loss.grad_fn).__name__ == "GRPOLossFunctionBackward"
    out.loss.backward()
    with torch.no_grad():
        fused_grpo_loss(hidden, weight, labels, backward_mode="single_pass", **kwargs)


@needs_native
def test_sequence_level_single_pass_by_default(monkeypatch):
    """GSPO without KL or entropy takes the per-sequence single pass under auto."""
    import mio_kernels.backends.single_pass as sp
    calls, real = [], sp.single_pass
    monkeypatch.setattr(sp, "single_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, labels, adv = _small()
    fused_grpo_loss(hidden, weight, labels, advantages=adv, importance_sampling_level="sequence",
                    backend="native").loss.backward()
    assert calls == [1]


@needs_native
def test_single_pass_is_taken_by_default_at_token_level(monkeypatch):
    import mio_kernels.backends.token_pass as tp
    calls = []
    real = tp.token_pass
    monkeypatch.setattr(tp, "token_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, labels, adv = _small()
    fused_grpo_loss(hidden, weight, labels, advantages=adv, backend="native").loss.backward()
    assert calls == [1]


@needs_triton
def test_single_pass_needs_the_native_backend():
    hidden, weight, labels, adv = _small()
    with pytest.raises(ValueError, match="no single-pass"):
        fused_grpo_loss(hidden, weight, labels, advantages=adv, backend="triton", backward_mode="single_pass")


def test_module_form_matches_the_function():
    hidden, weight, labels, adv = _small()
    module = FusedGRPOLoss(loss_type="grpo", beta=0.0, backend="reference")
    assert "loss_type='grpo'" in repr(module)
    a = module(hidden, weight, labels, advantages=adv).loss
    b = fused_grpo_loss(hidden, weight, labels, advantages=adv, loss_type="grpo", backend="reference").loss
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="loss_type"):
        FusedGRPOLoss(loss_type="ppo")


BAD = [
    (dict(advantages=torch.randn(3)), "advantages"),
    (dict(advantages=torch.randn(2, 4)), "advantages"),
    (dict(old_logps=torch.randn(2)), "old_logps"),
    (dict(old_logps=torch.full((2, 5), float("nan"))), "old_logps"),
    (dict(beta=0.1, ref_logps=torch.randn(2, 4)), "ref_logps"),
    (dict(beta=0.1, ref_logps=torch.full((2, 5), float("inf"))), "ref_logps"),
    (dict(beta=0.1), "ref_logps"),
    (dict(importance_weights=torch.randn(5)), "importance_weights"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(importance_sampling_level="word"), "importance_sampling_level"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(epsilon_low=1.5), "epsilon_low"),
    (dict(epsilon_high=float("nan")), "epsilon_high"),
    (dict(beta=-1.0), "beta"),
    (dict(delta=0.5), "delta"),
    (dict(entropy_coef=float("inf")), "entropy_coef"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(num_items_in_batch=0), "num_items_in_batch"),
    (dict(backward_mode="twice"), "backward_mode"),
]


@pytest.mark.parametrize("changes,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(changes, name):
    hidden, weight, labels, adv = _small()
    kwargs = dict(advantages=adv, backend="reference")
    kwargs.update(changes)
    with pytest.raises(ValueError, match=name):
        fused_grpo_loss(hidden, weight, labels, **kwargs)


def test_non_finite_at_unscored_tokens_is_allowed():
    hidden, weight, labels, adv = _small()
    old = torch.zeros(2, 5)
    old[0, 0] = float("nan")
    labels[0, 0] = IGNORE       # only unscored tokens may hold nan when checked
    fused_grpo_loss(hidden, weight, labels, advantages=adv, old_logps=old, backend="reference")


# ------------------------------------------------------------- found by the randomized suite

@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_token_pass_non_contiguous_bias(dtype):
    """Random suite seed 1201 (and 7 more in 300 cases): the token-level single pass handed a strided
    fp32/fp64 bias to the extension's epilogue as is ('grad_epilogue: bias must be a contiguous [V]
    tensor'). Now it equals the recompute path."""
    torch.manual_seed(0)
    h, w, y = torch.randn(3, 5, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype), torch.randint(0, 50, (3, 5))
    adv, strided = torch.randn(3, dtype=dtype), torch.randn(100, dtype=dtype)[::2]
    grads = []
    for mode, bias in (("single_pass", strided), ("recompute", strided.contiguous())):
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_(), bias.detach().requires_grad_()]
        fused_grpo_loss(leaves[0], leaves[1], y, bias=leaves[2], advantages=adv, entropy_coef=0.01, backend="native",
                        backward_mode=mode).loss.backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert rel(a, b) <= (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_reference_backend_refuses_single_pass(level):
    """Random suite: backend='reference' with an explicit backward_mode='single_pass' ran (plain autograd)
    instead of raising the ValueError that every other backend without a single pass raises (and
    fused_mio_loss raises there)."""
    hidden, weight, labels, adv = _small()
    with pytest.raises(ValueError, match="has no single-pass backward"):
        fused_grpo_loss(hidden, weight, labels, advantages=adv, backend="reference", backward_mode="single_pass",
                        importance_sampling_level=level)


@pytest.mark.parametrize("backend", ["reference"] + (["native"] if "native" in available_kernel_backends(CPU) else []))
def test_cispo_clip_ratio_counts_an_empty_packed_completion(backend):
    """Random suite seed 200050: sequence level, one advantage per completion, cispo with eps_high < 1
    (its default, epsilon_low): TRL's (B, 1) ratio of a completion without tokens is exp(0 / 1) = 1 >
    eps_high, clipped when its advantage is positive; the op counted a zero-length packed completion
    as 0 (1/3 here instead of TRL's 2/3, which the padded form with a fully ignored row gave)."""
    torch.manual_seed(0)
    H, V = 8, 30
    hidden, weight = torch.randn(7, H), torch.randn(V, H)
    labels = torch.randint(0, V, (7,))
    adv = torch.tensor([1.0, 1.0, -1.0])
    opts = dict(advantages=adv, loss_type="cispo", importance_sampling_level="sequence", backend=backend)
    packed = fused_grpo_loss(hidden, weight, labels, cu_seqlens=torch.tensor([0, 4, 4, 7]), **opts)
    hp, yp = torch.zeros(3, 4, H), torch.full((3, 4), IGNORE)
    hp[0], yp[0], hp[2, :3], yp[2, :3] = hidden[:4], labels[:4], hidden[4:], labels[4:]
    padded = fused_grpo_loss(hp, weight, yp, **opts)
    assert float(padded.metrics["cispo_clip_ratio"]) == pytest.approx(2 / 3)
    assert float(packed.metrics["cispo_clip_ratio"]) == pytest.approx(2 / 3)
