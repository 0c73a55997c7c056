"""The GPU exactness sweep: every backend (native, triton, reference) and backward mode, in bf16, fp16 and
fp32, on CUDA tensors, against the plain-PyTorch reference evaluated in float64 on the same (rounded)
inputs, forward and backward. Relative error bounds as in test_fused.py / test_single_pass.py: 1e-5 in
fp32, 2e-2 in bf16/fp16. Skips without a CUDA device; run on a GPU by benchmarks/gpu_check.sh.

Shapes are not block multiples (V = 1009, N = 192 tokens, H = 96) so masked tile edges are hit; the
single pass runs in chunks of 23 rows (sequences span chunks) and the native recompute path in chunks of
37 rows. Each case records its worst relative error as a junit property (`worst_rel_err`)."""
import math

import pytest
import torch

import mio_kernels.backends.single_pass as walk
from mio_kernels import fused_mio_loss, linear_logprobs
from mio_kernels.backends import unavailable_reason
from mio_kernels.backends.native_backend import set_chunk_budget_bytes
from mio_kernels.reference import reference_preference_loss, reference_token_logprobs
from mio_kernels.transform import LogitTransform

from conftest import WORST_ERRORS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: this GPU sweep runs where CUDA is (benchmarks/gpu_check.sh)")

IGNORE = -100
V, T, H = 1009, 48, 96
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (backend, backward_mode): every mode each backend accepts
MODES = [("native", "single_pass"), ("native", "recompute"), ("native", "auto"),
         ("triton", "recompute"), ("triton", "auto"), ("reference", "recompute"), ("reference", "auto")]
# (loss options, K): a separable loss, a coupled one (1 + K accumulator slots), a length-normalised
# difference loss, and a soft-capped head
LOSS_CASES = {
    "mio-k1": (dict(loss_type="mio"), 1),
    "dpo-k2-sft": (dict(loss_type="dpo", sft_weight=0.3), 2),
    "ipo-avg": (dict(loss_type="ipo", average_log_prob=True), 1),
    "mio-softcap": (dict(loss_type="mio", final_logit_softcapping=3.0, temperature=0.9), 1),
}


def _needs(backend: str) -> None:
    if backend != "reference":
        reason = unavailable_reason(backend, torch.device("cuda"))
        if reason:
            pytest.skip(f"backend {backend!r} cannot run on CUDA here: {reason}")


def make_inputs(k: int, dtype: torch.dtype, prompts: int = 2, scale: float = 1.0) -> dict:
    """Random inputs drawn in float64 on the GPU and rounded to `dtype`; ragged prompt masks, one fully
    masked rejected row."""
    dev = torch.device("cuda")
    s = prompts * (1 + k)
    hidden = torch.randn(s, T, H, device=dev, dtype=torch.float64)
    weight = torch.randn(V, H, device=dev, dtype=torch.float64) * (scale / math.sqrt(H))
    labels = torch.randint(0, V, (s, T), device=dev)
    prompt_len = torch.randint(0, T - 1, (s,), device=dev)
    labels[torch.arange(T, device=dev)[None, :] < prompt_len[:, None]] = IGNORE
    labels[s - 1] = IGNORE
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), labels=labels,
                bias=(torch.randn(V, device=dev, dtype=torch.float64) * scale).to(dtype),
                ref_logps=-torch.rand(s, device=dev) * T * 5)


def relative_errors(pairs: dict) -> dict:
    errs = {}
    for name, (got, want) in pairs.items():
        assert got is not None and torch.isfinite(got).all(), f"{name} missing or non-finite"
        assert got.shape == want.shape and got.is_cuda, name
        floor = 1e-2 if name == "loss" else 1e-6   # a loss that crosses zero: error against max(|L|, 0.01)
        errs[name] = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(floor)).item()
    return errs


def check(errs: dict, dtype: torch.dtype, what: str, record_property) -> None:
    worst = max(errs.values())
    record_property("worst_rel_err", f"{worst:.3e}")
    key = f"cuda {what.split()[0]} {str(dtype).replace('torch.', '')}"
    WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), worst)
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"{what}: relative error vs float64 reference over {TOL[dtype]}: " + ", ".join(
        f"{n} {e:.3g}" for n, e in bad.items())


@pytest.fixture
def chunking(monkeypatch):
    """Small chunks: single-pass chunks of 23 rows, native recompute chunks of 37 rows."""
    def setup(backend: str, mode: str) -> None:
        if backend == "native" and mode == "single_pass":
            monkeypatch.setattr(walk, "chunk_rows", lambda *args: 23)
        elif backend == "native" and mode == "recompute":
            set_chunk_budget_bytes(37 * V * 4)
    yield setup
    set_chunk_budget_bytes(None)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend,mode", MODES, ids=[f"{b}-{m}" for b, m in MODES])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_matches_float64_reference(dtype_name, backend, mode, case, chunking, record_property):
    _needs(backend)
    dtype = DTYPES[dtype_name]
    options, k = LOSS_CASES[case]
    options = dict(options, num_negatives=k, beta=0.3)
    inputs = make_inputs(k, dtype)
    chunking(backend, mode)
    leaves = {n: (t.detach().clone().requires_grad_() if n in ("hidden", "weight", "bias") else t)
              for n, t in inputs.items()}
    ours = fused_mio_loss(**leaves, backend=backend, backward_mode=mode, **options)
    (2.5 * ours.loss).backward()
    exact = {n: (t.detach().double().requires_grad_() if n in ("hidden", "weight", "bias") else t)
             for n, t in inputs.items()}
    oracle = reference_preference_loss(**exact, **options)
    (2.5 * oracle.loss).backward()
    pairs = {"loss": (ours.loss, oracle.loss), "policy_logps": (ours.policy_logps, oracle.policy_logps)}
    pairs.update({f"d_{n}": (leaves[n].grad, exact[n].grad) for n in ("hidden", "weight", "bias")})
    for n in ("hidden", "weight", "bias"):
        assert leaves[n].grad.dtype == dtype, f"d_{n} is {leaves[n].grad.dtype}, not {dtype}"
    check(relative_errors(pairs), dtype, f"{backend} {mode} {case} {dtype_name}", record_property)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("transform", [{}, dict(logit_scale=1.7, final_logit_softcapping=4.0)],
                         ids=["identity", "softcap"])
def test_token_logprobs_and_entropy(dtype_name, backend, transform, record_property):
    """linear_logprobs with the entropy (the kernels' ENTROPY variants) under an arbitrary upstream gradient."""
    _needs(backend)
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(1, dtype, scale=3.0)
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in ("hidden", "weight", "bias")}
    logps, entropy = linear_logprobs(leaves["hidden"], leaves["weight"], inputs["labels"], leaves["bias"],
                                     backend=backend, return_entropy=True, **transform)
    g_logp, g_ent = torch.randn_like(logps), torch.randn_like(entropy)
    ((logps * g_logp).sum() + (entropy * g_ent).sum()).backward()
    exact = {n: inputs[n].detach().double().requires_grad_() for n in ("hidden", "weight", "bias")}
    want_logps, want_entropy = reference_token_logprobs(exact["hidden"], exact["weight"], inputs["labels"],
                                                        exact["bias"], IGNORE, LogitTransform.of(**transform),
                                                        return_entropy=True)
    ((want_logps * g_logp.double()).sum() + (want_entropy * g_ent.double()).sum()).backward()
    pairs = {"logps": (logps, want_logps), "entropy": (entropy, want_entropy)}
    pairs.update({f"d_{n}": (leaves[n].grad, exact[n].grad) for n in ("hidden", "weight", "bias")})
    check(relative_errors(pairs), dtype, f"{backend} token-logprobs {dtype_name}", record_property)
