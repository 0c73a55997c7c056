"""Seeded randomized differential suite over the public option space of `fused_mio_loss`,
`FusedMIOLoss` and `linear_logprobs`, against a float64 oracle written in this file.

One source of truth for what a case is: `draw_case(seed)` -> a dict of options (backend, API,
backward mode, padded/packed layout with empty and fully ignored sequences, T = 1, loss type, K,
reference form, bias, sft_weight, average_log_prob, label_smoothing, logit transform and logit
magnitude, entropy, dtype, which inputs require grad, non-contiguous inputs, upstream gradient,
forward-only calls, chunk budget). One runner: `run_case(case)`. Tensors are drawn from the seed
too, so a seed reproduces its case exactly:

    python -m pytest tests/test_random_differential.py --random-cases N --random-seed S

runs the N cases with seeds S, S+1, ... (also MIO_RANDOM_CASES / MIO_RANDOM_SEED); without them CI
runs DEFAULT_CASES cases from seed DEFAULT_FIRST_SEED. Every failure message starts with the one-line
reproduction of its case, followed by the drawn options. MIO_RANDOM_STATS=<file> appends one JSON
line per case (backend, dtype, path taken, worst error, whether a bound was used) for long runs.

The oracle (`oracle`) follows docs/losses.md only: full logits, the logit transform, log_softmax,
gather, per-sequence sums and means in plain loops over each sequence's slice, every loss formula
written out, the SFT term, the metrics, and torch.autograd for the gradients, with the inputs
upcast to float64 leaf tensors (the soft cap's derivative taken as 1 / cosh^2, see `_softcap`). It never calls the package's own helpers (objective, losses,
sequence, reference, transform); from `mio_kernels.losses` it reads the registry's names only.

Errors. For every output q (loss, policy_logps, policy_sums, ref_logps, each metric, per-token
log-probs and entropies, d_hidden, d_weight, d_bias): err = ||ours - oracle|| / max(||oracle||,
floor), floor 1e-2 for the loss and the metrics (a loss or metric that crosses zero has no
relative precision there, as in test_fused.py); none for the rest beyond the output dtype's
smallest normal number (a saturated loss gives gradients of 1e-19, still held to relative TOL).
A case passes when err <= TOL[dtype] (1e-5 fp32, 2e-2 bf16/fp16, 1e-10 fp64: the exactness
tests' bounds). The ONLY excuse for an ill-conditioned case (large logits, saturated
softcapping, a loss near a cancellation) is a computed bound. First, the intrinsic error of plain
autograd: the same oracle evaluated in the case's compute
precision (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64), with torch's own tanh autograd, on the
inputs as they are and on two copies with hidden, weight and bias perturbed by one ulp (random signs, one of them with the GEMM
in the other order), each compared with the float64 oracle on the unperturbed inputs; q passes
when err <= 2 * max of those errors (test_fused.py's rule for large logits). The loss and the
metrics are functions of the per-sequence sums x_s (policy and reference), which are held to TOL
themselves; a cancellation between them (a log-ratio l - l_ref of a few units from sums of ~40)
is excused when |ours - oracle| <= TOL * sum_s |dq/dx_s| |x_s| (float64 autograd at the oracle's
values: the sums' tolerance through q's condition). Tolerances are never widened otherwise.
rewards/accuracies is an indicator: it must equal the oracle's except on prompts whose oracle
margin r_w - max_k r_k is within twice our own log-ratio error on that prompt (computed from our
returned log-probs), and by at most the share of such prompts.

fused_grpo_loss / FusedGRPOLoss (issue 24; api "grpo" / "grpo_module", a share GRPO_SHARE of the
seeds, decided by a random stream of their own so that every other seed draws the case it drew
before; `-k grpo` runs only these). `draw_grpo_case` draws every option together: backend
(reference, native, auto, Triton on tiny shapes), backward mode (single_pass where it can run:
native with token-level importance sampling; elsewhere the documented ValueError), padded / packed
with empty and fully ignored completions, every loss type, importance sampling level, epsilon_low /
epsilon_high, delta, beta with and without use_bias_correction_kl, entropy_coef (0 or not),
log_entropy, importance_weights per token or per completion, advantages per completion or per
token (mixed signs, some exactly 0), old_logps None (on-policy) or near the current log-probs,
ref_logps, max_completion_length, num_items_in_batch (int, float, tensor), SAPO temperatures, the
logit transforms, bias, dtype, which inputs require grad, non-contiguous inputs (the per-token
ones too), NaN at unscored positions of the per-token inputs, upstream gradient, forward-only calls
and the chunk budget. The oracle (`oracle_grpo`, `trl_grpo_loss`) is TRL 1.16's
`GRPOTrainer._compute_loss` rewritten plainly on padded [B, T] float64 tensors (one process, one
micro-batch), fed by the same full-logits log_softmax; it reads nothing from the package. Where
TRL decides by a tensor's shape what the op decides by meaning, the oracle follows the op's
documented meaning: the (B, 1) clip metrics are those of sequence-level ratios with one advantage
per completion (TRL would also take T = 1 for that), [B] advantages / importance weights of a packed
batch with N = B tokens are per token (labels' shape wins), values at unscored positions are
ignored (TRL multiplies them by the mask: NaN would propagate). Compared: loss, token_logps,
token_entropy, every metric and every gradient, with the rules above; the loss, kl, entropy and
policy_loss are functions of the per-token log-probs and entropies l_t, H_t (held to TOL
themselves), so their cancellation bound is TOL * sum_t |dq/dl_t| |l_t| + |dq/dH_t| |H_t| (float64
autograd of the values: on-policy, old tracks l). Ratios are drawn at least 1e-3 + 1e-4 |l_t| (in
log w) from every clip boundary, so neither the gradients nor the clip metrics (both discontinuous
there) can change side by rounding; should a ratio still sit within twice our own log-ratio error
of a boundary, the clip metrics are not compared (recorded as clip_metrics_skipped in the stats).
The entropy's gradient in the oracle is the closed form dH/dz = -p (log p + H) (`_Entropy`):
autograd through log_softmax cancels near-certain rows' gradient to ~1e-16 of their largest term,
float64 included (what made linear_logprobs seeds 103182 and 103878 look like kernel defects; the
native entropy value of such rows was a real one, fixed: its fp32 exp floored at exp(-87)).

Besides the random cases: the reproductions of issue 22's defects 1 and 2, and a regression test
for each defect this suite found (section "found by this suite"; GRPO ones in tests/test_grpo.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex

import pytest
import torch

from mio_kernels import FusedGRPOLoss, FusedMIOLoss, fused_grpo_loss, fused_mio_loss, linear_logprobs
from mio_kernels.backends import available_kernel_backends
from mio_kernels.backends.native_backend import ENV_CHUNK_MB, set_chunk_budget_bytes
from mio_kernels.losses import LOSSES  # the registry's names only; the oracle has its own formulas

import grpo_oracle
from conftest import WORST_ERRORS

DEFAULT_CASES = 400   # ~30% GRPO cases (GRPO_SHARE)
DEFAULT_FIRST_SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "nll")
# README "Backward mode": accumulator slots of the single pass per loss type.
SEPARABLE = {"mio", "bco_pair", "sppo_hard", "apo_zero"}
DIFFERENCE = {"dpo", "ipo", "hinge", "robust"}
MIB = 2**20
NATIVE = "native" in available_kernel_backends(torch.device("cpu"))
TRITON = "triton" in available_kernel_backends(torch.device("cpu"))


def repro(seed: int) -> str:
    return f"python -m pytest tests/test_random_differential.py --random-cases 1 --random-seed {seed}"


# ============================================================================ drawing a case


def _pick(r: random.Random, weights: dict):
    return r.choices(list(weights), list(weights.values()))[0]


def _slots(case) -> int:
    """README 'Backward mode' table: fp32 [V, H] accumulators the single pass holds."""
    loss, k = case["loss_type"], case["K"]
    if loss in SEPARABLE:
        return 1
    if loss in DIFFERENCE and k == 1 and case["sft_weight"] == 0:
        return 1
    return 1 + k


def _num_sequences(c) -> int:
    return c["B"] if c["api"] in GRPO_APIS else c["P"] * (1 + c["K"])


def _draw_head_and_grads(r, c) -> None:
    """The options both APIs draw alike, in one order (a seed's case depends on it): logit
    magnitude and transform, which inputs require grad, no_grad, check_values."""
    c["logit_mag"] = _pick(r, {1.0: 0.75, round(r.uniform(5, 60), 3): 0.2, round(r.uniform(300, 3000), 1): 0.05})
    if c["dtype"] == "fp16":
        c["logit_mag"] = min(c["logit_mag"], 30.0)
    c["temperature"] = 1.0 if r.random() < 0.6 else round(math.exp(r.uniform(math.log(0.3), math.log(3))), 4)
    c["logit_scale"] = 1.0 if r.random() < 0.6 else round(r.choice([-1, 1, 1]) * math.exp(r.uniform(-1.2, 1.2)), 4)
    c["final_logit_softcapping"] = None
    if r.random() >= 0.6:
        c["final_logit_softcapping"] = round(math.exp(r.uniform(math.log(0.5), math.log(30))), 3)
    c["requires"] = _pick(r, {"all": 0.35, "frozen_weight": 0.12, "hidden_only": 0.18, "weight_only": 0.1,
                              "params_only": 0.08, "bias_only": 0.05, "none": 0.05})
    c["no_grad"] = r.random() < 0.07
    c["check_values"] = r.random() < 0.8


def draw_case(seed: int) -> dict:
    """All options of one case, from its seed alone (tensors are drawn from the same seed by make_data)."""
    if is_grpo_seed(seed):
        return draw_grpo_case(seed)
    r = random.Random(seed)
    c = dict(seed=seed)
    c["api"] = _pick(r, {"fused": 0.5, "module": 0.15, "linear": 0.35})
    c["backend"] = _pick(r, {"native": 0.5, "reference": 0.3, "triton": 0.15, "auto": 0.05})
    tiny = c["backend"] == "triton"   # the interpreter is slow per program instance: tiny shapes
    if tiny:
        c["dtype"] = _pick(r, {"fp32": 0.6, "bf16": 0.25, "fp16": 0.1, "fp64": 0.05})
    else:
        c["dtype"] = _pick(r, {"fp32": 0.45, "bf16": 0.2, "fp16": 0.05, "fp64": 0.3})
    native = c["backend"] in ("native", "auto")
    long = native and r.random() < 0.15   # long sequences: many chunks per sequence under a small budget
    c["H"] = r.choice([4, 8, 16]) if (tiny or long) else r.choice([1, 4, 8, 16, 24, 32, 48])
    c["V"] = r.randint(2, 600) if tiny else (r.randint(2, 400) if long else r.randint(2, 1200))
    c["T"] = r.randint(40, 100) if long else (1 if r.random() < 0.12 else r.randint(2, 10 if tiny else 24))
    c["ignore_index"] = _pick(r, {-100: 0.75, -1: 0.15, c["V"] + 7: 0.1})
    c["mask_prob"] = _pick(r, {0.0: 0.4, 0.15: 0.4, 0.5: 0.2})        # fully ignored sequences
    c["sprinkle"] = _pick(r, {0.0: 0.6, 0.1: 0.3, 0.5: 0.1})          # ignored tokens inside responses
    c["poison_ignored"] = r.random() < 0.15    # ignored tokens' hidden states x200 (overflow if used)
    c["bias"] = r.random() < 0.6
    _draw_head_and_grads(r, c)
    c["noncontig"] = sorted(n for n in ("hidden", "weight", "bias", "labels", "ref_logps", "ref_hidden",
                                        "ref_weight", "cu_seqlens", "upstream") if r.random() < 0.12)
    c["noncontig_how"] = r.choice(["transpose", "stride"])

    if c["api"] == "linear":
        n = r.randint(1, 8 if tiny else (12 if not long else 8)) * c["T"]
        lead = _pick(r, {"2d": 0.4, "3d": 0.45, "4d": 0.15})
        if lead == "2d" or n % c["T"]:
            c["lead"] = [n]
        elif lead == "3d":
            c["lead"] = [n // c["T"], c["T"]]
        else:
            rows = n // c["T"]
            a = r.choice([d for d in range(1, rows + 1) if rows % d == 0])
            c["lead"] = [a, rows // a, c["T"]]
        c["return_entropy"] = r.random() < 0.5
        c["used"] = _pick(r, {"both": 0.6, "logps": 0.2, "entropy": 0.2}) if c["return_entropy"] else "logps"
        c["num_tokens"] = n
    else:
        c["K"] = r.randint(1, 3)
        c["P"] = r.randint(1, 2 if tiny else 3)
        s = c["P"] * (1 + c["K"])
        c["layout"] = "packed" if r.random() < 0.4 else "padded"
        if c["layout"] == "packed":
            c["lengths"] = [0 if r.random() < 0.12 else r.randint(1, c["T"]) for _ in range(s)]
            if sum(c["lengths"]) == 0:
                c["lengths"][0] = 1
            c["cu_dtype"] = r.choice(["int32", "int64"])
            c["num_tokens"] = sum(c["lengths"])
        else:
            c["num_tokens"] = s * c["T"]
        c["loss_type"] = r.choice(sorted(LOSSES))
        c["beta"] = round(math.exp(r.uniform(math.log(0.02), math.log(3))), 4)
        c["sft_weight"] = 0.0 if r.random() < 0.6 else round(r.uniform(0.05, 1.0), 3)
        c["average_log_prob"] = r.random() < 0.3
        c["label_smoothing"] = 0.0
        if c["loss_type"] == "robust" and r.random() < 0.7:
            c["label_smoothing"] = round(r.uniform(0.0, 0.45), 3)
        elif r.random() < 0.02:
            c["label_smoothing"] = 0.1          # refused unless robust
        c["ref"] = _pick(r, {"logps": 0.45, "free": 0.3, "states": 0.25})
        c["ref_near"] = r.random() < 0.5        # ref_logps near the policy's: log-ratios of a few units
        c["ref_logps_dtype"] = r.choice(["fp32", "fp64"])
        c["ref_bias"] = r.random() < 0.5
        c["H_ref"] = r.choice([1, 4, 8, 16])
        c["backward_mode"] = _pick(r, {"auto": 0.45, "recompute": 0.3, "single_pass": 0.25})
        c["upstream"] = _pick(r, {1.0: 0.35, 0.0: 0.03, round(r.choice([-1, 1]) * r.uniform(0.1, 4), 4): 0.62})

    # chunk budget (native only): a few logits rows per chunk (README: R = clamp(budget // (V p), 1,
    # scored tokens)), so that sequences and groups span chunks; via the setter or the variable
    c["chunking"] = _pick(r, {"default": 0.2, "budget": 0.65, "env": 0.15}) if native else "default"
    c["budget"] = None
    if c["chunking"] != "default":
        vp = c["V"] * (8 if c["dtype"] == "fp64" else 4)
        rows = r.randint(1, 8) if r.random() < 0.8 else r.randint(1, max(1, c["num_tokens"]))
        c["budget"] = rows * vp + r.randint(0, vp - 1)
    return c


def _present(c) -> set:
    return {"hidden", "weight"} | ({"bias"} if c["bias"] else set())


def _requires(c) -> set:
    want = {"all": {"hidden", "weight", "bias"}, "frozen_weight": {"hidden", "bias"}, "hidden_only": {"hidden"},
            "weight_only": {"weight"}, "params_only": {"weight", "bias"}, "bias_only": {"bias"},
            "none": set()}[c["requires"]]
    return want & _present(c)


def _needs_grad(c) -> bool:
    return not c["no_grad"] and bool(_requires(c))


def _acc_bytes(c, p, slots=None) -> int:
    req = _requires(c)
    slots = _slots(c) if slots is None else slots
    return slots * ((c["V"] * c["H"] if "weight" in req else 0) + (c["V"] if "bias" in req else 0)) * p


def expected_outcome(c):
    """-> (exception type, message pattern) the op must raise, or ("path", "single_pass"/"recompute"/None)
    (README "Backward mode": on CPU, auto takes the single pass when a gradient is needed and its
    accumulators are at most one weight gradient; an explicit single_pass takes any number of slots)."""
    if c["api"] in GRPO_APIS:
        return grpo_expected_outcome(c)
    if c["api"] != "linear":
        if c["label_smoothing"] > 0 and c["loss_type"] != "robust":
            return ValueError, "label_smoothing"
        native = c["backend"] in ("native", "auto")
        if c["backward_mode"] == "single_pass" and not native:
            return ValueError, "has no single-pass backward"
        if native:
            if c["backward_mode"] == "recompute" or not _needs_grad(c):
                return "path", "recompute"
            if c["backward_mode"] == "single_pass":
                return "path", "single_pass"
            p = 8 if c["dtype"] == "fp64" else 4
            one_gradient = (c["V"] * c["H"] + (c["V"] if "bias" in _requires(c) else 0)) * p
            return "path", "single_pass" if _acc_bytes(c, p) <= one_gradient else "recompute"
    if c["backend"] == "triton" and c["dtype"] == "fp64":
        return TypeError, "backend='triton' supports"
    return "path", None


# ============================================================================ the tensors of a case


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """Same values, not contiguous: reversed strides, or every other element of a wider buffer
    whose gaps hold NaN (floats) or token 0 (integers)."""
    if how == "transpose" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    wide = torch.empty(tuple(t.shape[:-1]) + (2 * t.shape[-1],), dtype=t.dtype)
    wide.fill_(float("nan") if t.is_floating_point() else 0)
    wide[..., ::2] = t
    return wide[..., ::2]


def _spans(c):
    """(first flat token, length) of every sequence."""
    if c["api"] == "linear":
        return [(0, c["num_tokens"])]
    if c["layout"] == "packed":
        starts = [sum(c["lengths"][:i]) for i in range(len(c["lengths"]))]
        return list(zip(starts, c["lengths"]))
    return [(s * c["T"], c["T"]) for s in range(_num_sequences(c))]


def make_data(c) -> dict:
    """The op's tensor arguments for case c (in the case's dtype and layout; leaves requiring grad
    as drawn), plus 'upstream' gradients and the flat float64 values the oracle starts from."""
    g = torch.Generator().manual_seed(c["seed"])
    r = random.Random(c["seed"] * 7919 + 17)
    dtype, (H, V, N) = DTYPES[c["dtype"]], (c["H"], c["V"], c["num_tokens"])
    ign = c["ignore_index"]

    labels = torch.randint(0, V, (N,), generator=g)
    if c["api"] == "linear":
        scored = torch.rand(N, generator=g) >= max(c["sprinkle"], 0.2 * (c["mask_prob"] > 0))
        labels[~scored] = ign
    else:
        for start, length in _spans(c):
            real = length if (c["layout"] == "packed" or r.random() < 0.5) else r.randint(0, length)
            prompt = r.randint(0, max(real - 1, 0))
            seq = labels[start:start + length]
            seq[:prompt] = ign
            seq[real:] = ign                       # padding after a padded row's real tokens
            if real and r.random() < 0.5:
                seq[real - 1] = ign                # labels shifted within the sequence: last token unscored
            if c["sprinkle"]:
                seq[torch.rand(length, generator=g) < c["sprinkle"]] = ign
            if r.random() < c["mask_prob"]:
                seq[:] = ign
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    if c["poison_ignored"]:
        hidden[labels == ign] *= 200
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (c["logit_mag"] / math.sqrt(H))
    bias = torch.randn(V, generator=g, dtype=torch.float64) * c["logit_mag"] if c["bias"] else None

    if c["api"] == "linear":
        shape = tuple(c["lead"])
    elif c["layout"] == "packed":
        shape = (N,)
    else:
        shape = (_num_sequences(c), c["T"])
    d = dict(hidden=hidden.to(dtype).reshape(shape + (H,)), weight=weight.to(dtype), labels=labels.reshape(shape),
             bias=None if bias is None else bias.to(dtype))
    if c["api"] == "linear":
        d["upstream"] = [torch.randn(shape, generator=g, dtype=torch.float64).to(
            torch.float64 if dtype == torch.float64 else torch.float32) for _ in range(2)]
    else:
        if c["layout"] == "packed":
            d["cu_seqlens"] = torch.tensor([0] + c["lengths"]).cumsum(0).to(getattr(torch, c["cu_dtype"]))
        d["upstream"] = torch.tensor(c["upstream"], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if c["api"] in GRPO_APIS:
            grpo_data(c, d, g)
        elif c["ref"] == "states":
            d["ref_hidden"] = torch.randn(shape + (c["H_ref"],), generator=g, dtype=torch.float64).to(dtype)
            d["ref_weight"] = (torch.randn(V, c["H_ref"], generator=g, dtype=torch.float64)
                               / math.sqrt(c["H_ref"])).to(dtype)
            d["ref_bias"] = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if c["ref_bias"] else None
        elif c["ref"] == "logps":
            if c["ref_near"]:
                with torch.no_grad():
                    sums = oracle(dict(c, ref="free"), d, torch.float64, forward_only=True)["policy_sums"]
                ref = sums + torch.randn(sums.shape, generator=g, dtype=torch.float64) * 2
            else:
                ref = -torch.rand(len(_spans(c)), generator=g, dtype=torch.float64) * c["T"] * 5
            d["ref_logps"] = ref.to(DTYPES[c["ref_logps_dtype"]])
    for name in c["noncontig"]:
        if name == "upstream" and c["api"] == "linear":
            d["upstream"] = [_strided(u, c["noncontig_how"]) for u in d["upstream"]]
        elif name != "upstream" and d.get(name) is not None:
            d[name] = _strided(d[name], c["noncontig_how"])
    for name in _requires(c):
        d[name].requires_grad_()
    return d


# ============================================================================ the float64 oracle


def _softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))   # log(1 + e^x), exact for any x (no threshold)


def _pair_losses(loss_type, u_w, u_l, beta, eps):
    """docs/losses.md, pairwise family: one (w, l_k) pair, [K, P]."""
    delta = u_w - u_l
    if loss_type == "ipo":
        return (u_w - u_l - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "robust":
        return (-(1 - eps) * torch.nn.functional.logsigmoid(beta * delta)
                + eps * torch.nn.functional.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return _softplus(-beta * u_w) + _softplus(beta * u_l)
    if loss_type == "sppo_hard":
        return (u_w - 0.5 / beta) ** 2 + (u_l + 0.5 / beta) ** 2
    if loss_type == "apo_zero":    # 1 - sigma(x) written sigma(-x): no cancellation where it saturates
        return _sigmoid(-beta * u_w) + _sigmoid(beta * u_l)
    raise KeyError(loss_type)


ORACLE_LOSSES = ("dpo", "mio", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "apo_zero")
LENGTH_NORMALISED = ("ipo",)


def _per_prompt_loss(loss_type, u, beta, eps):
    """u [1 + K, P] log-ratios (chosen row first) -> loss per prompt [P]."""
    r = beta * u
    if loss_type == "dpo":      # DV / InfoNCE: logsumexp(r_w, r_1..r_K) - r_w = log(1 + sum_k e^(r_k - r_w)),
        return _softplus(torch.logsumexp(r[1:] - r[0], 0))   # without the cancellation of the first form
    if loss_type == "mio":      # JS: sp(-r_w) + [sp(r_w) + sum_k sp(r_k)] / (K + 1)
        return _softplus(-r[0]) + (_softplus(r[0]) + _softplus(r[1:]).sum(0)) / u.shape[0]
    return _pair_losses(loss_type, u[0].expand_as(u[1:]), u[1:], beta, eps).mean(0)


def _softcap(u, plain=False):
    """tanh(u); its derivative sech^2(u) = 1 / cosh^2(u), not autograd's 1 - tanh^2(u), which loses
    digits where tanh saturates (5.8e-10 relative in a float64 gradient at |u| ~ 10, seed 200555).
    plain: torch's own tanh and its autograd (the intrinsic-error variants)."""
    if plain:
        return torch.tanh(u)
    return torch.tanh(u).detach() + (u - u.detach()) / torch.cosh(u.detach()) ** 2


def _logits(h, w, b, c, alt_order=False, plain=False):
    x = (w @ h.T).T if alt_order else h @ w.T
    if b is not None:
        x = x + b
    cap, s, t = c["final_logit_softcapping"], c["logit_scale"], c["temperature"]
    return (cap * _softcap(s * x / cap, plain) if cap is not None else s * x) / t


class _Sigmoid(torch.autograd.Function):
    """sigmoid with the derivative sigmoid(z) * sigmoid(-z): autograd's s * (1 - s) is 0 once s rounds
    to 1 (|z| > 37 in fp64), where the true derivative is e^-|z| (apo_zero at saturated rewards)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return torch.sigmoid(z)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        return grad * torch.sigmoid(z) * torch.sigmoid(-z)


_sigmoid = _Sigmoid.apply


def _log_softmax(z):
    """log softmax over the last dim with log-sum-exp = m + log(n) + log1p(rest / n) (n maxima, rest
    the sum of the other exp(z - m)): torch's m + log(s) rounds a near-certain row's log s (1e-19
    at m ~ 1e3) away, and with it the max's log-prob and a few % of the row's entropy (fp64 too)."""
    m = z.max(-1, keepdim=True).values   # attached: the maxima's own gradient flows through m
    d = z - m
    at_max = (d == 0).to(z.dtype)
    # n as a sum of exp(0): each of several tied maxima gets its own gradient p_j (max() passes m's
    # to one of them only; a soft-capped row's saturated logits tie exactly, seed 11009015)
    maxima = (torch.exp(d) * at_max).sum(-1, keepdim=True)
    rest = (torch.exp(d) * (1 - at_max)).sum(-1, keepdim=True)
    return d - (torch.log(maxima) + torch.log1p(rest / maxima))


class _Entropy(torch.autograd.Function):
    """H = -sum p log p of softmax(z) with the closed-form gradient dH/dz = -p (log p + H). Autograd
    through log_softmax forms g - p sum(g), which for a near-certain row cancels to ~1e-16 of the
    row's largest term (float64 too) while the true gradient is ~p_2 * gap (1e-30 and smaller)."""

    @staticmethod
    def forward(ctx, z):
        logp = _log_softmax(z)
        entropy = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logp, entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad):
        logp, entropy = ctx.saved_tensors
        return -logp.exp() * (logp + entropy[:, None]) * grad[:, None]


def _token_logps(h, w, b, labels, c, alt_order=False, plain=False):
    """flat [N, H] inputs -> (token log-probs [N], entropies [N]), 0 where ignored. plain: the
    entropy by autograd through log_softmax, as a user's fp32 code would (the computed bound)."""
    z = _logits(h, w, b, c, alt_order, plain)
    logp = torch.log_softmax(z, dim=-1) if plain else _log_softmax(z)
    scored = labels != c["ignore_index"]
    tok = logp.gather(1, torch.where(scored, labels, 0)[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1) if plain else _Entropy.apply(z)
    zero = torch.zeros((), dtype=logp.dtype)
    return torch.where(scored, tok, zero), torch.where(scored, ent, zero)


def _leaf(t, compute, perturb=None):
    if t is None:
        return None
    x = t.detach().to(torch.float64).clone()
    if perturb is not None:   # one ulp of `compute`, random signs
        x = x * (1 + torch.finfo(compute).eps * perturb(x.shape))
    return x.to(compute).requires_grad_()


def _objective(c, sums, counts, ref_sums):
    """Sequence level of docs/losses.md: per-sequence token sums [S] (and counts, reference sums) ->
    (loss, l [S], metrics incl. the log-ratios 'u' and per-prompt 'margin'), differentiable."""
    normalised = c["average_log_prob"] or c["loss_type"] in LENGTH_NORMALISED
    per_token = 1 / counts.clamp(min=1) if normalised else torch.ones_like(counts)
    ell = sums * per_token
    u = ell if ref_sums is None else ell - ref_sums * per_token
    k, beta = c["K"], c["beta"]
    u = u.reshape(1 + k, -1)
    loss = _per_prompt_loss(c["loss_type"], u, beta, c["label_smoothing"]).mean()
    chosen_tokens = counts.reshape(1 + k, -1)[0].sum().clamp(min=1)
    nll = -sums.reshape(1 + k, -1)[0].sum() / chosen_tokens
    if c["sft_weight"] > 0:
        loss = loss + c["sft_weight"] * nll
    rewards, lp = beta * u, ell.reshape(1 + k, -1)
    metrics = {
        "rewards/chosen": rewards[0].mean(), "rewards/rejected": rewards[1:].mean(),
        "rewards/margins": (rewards[0] - rewards[1:].mean(0)).mean(),
        "rewards/accuracies": (rewards[0] > rewards[1:].max(0).values).to(sums.dtype).mean(),
        "logps/chosen": lp[0].mean(), "logps/rejected": lp[1:].mean(), "nll": nll,
        "u": u.reshape(-1), "margin": rewards[0] - rewards[1:].max(0).values}
    return loss, ell, metrics


def sequence_condition(c, ref) -> dict:
    """For the loss and each metric q, a function of the per-sequence sums x (policy and reference):
    sum_s |dq/dx_s| |x_s| from float64 autograd at the oracle's values. An error of relative size
    TOL in each x_s moves q by at most TOL times this (to first order)."""
    sums = ref["policy_sums"].clone().requires_grad_()
    ref_sums = None if ref["ref_sums"] is None else ref["ref_sums"].clone().requires_grad_()
    loss, _, metrics = _objective(c, sums, ref["counts"], ref_sums)
    leaves = [x for x in (sums, ref_sums) if x is not None]
    out = {}
    for name, q in dict(metrics, loss=loss).items():
        if name in ("u", "margin", "rewards/accuracies"):
            continue
        grads = torch.autograd.grad(q, leaves, retain_graph=True, allow_unused=True)
        out[name] = sum((g.abs() * x.detach().abs()).sum().item() for g, x in zip(grads, leaves) if g is not None)
    return out


def oracle(c, d, compute=torch.float64, perturb=None, alt_order=False, forward_only=False, plain=False,
           lp_values=None) -> dict:
    """docs/losses.md in `compute` precision with autograd; -> the outputs and gradients of case c.
    lp_values (GRPO): the loss reads these token log-probs' values, its gradient flows as the exact ones'."""
    if c["api"] in GRPO_APIS:
        return oracle_grpo(c, d, compute, perturb, alt_order, forward_only, plain, lp_values)
    H = c["H"]
    h, w, b = (_leaf(d[n], compute, perturb) for n in ("hidden", "weight", "bias"))
    labels = d["labels"].reshape(-1).long()
    tok, ent = _token_logps(h.reshape(-1, H), w, b, labels, c, alt_order, plain)
    out = {}
    if c["api"] == "linear":
        shape = tuple(c["lead"])
        out["token_logps"], out["entropy"] = tok.reshape(shape), ent.reshape(shape)
        if not forward_only and _needs_grad(c):
            outs, grads = [], []
            if c["used"] in ("both", "logps"):
                outs.append(out["token_logps"]); grads.append(d["upstream"][0].to(compute))
            if c["used"] in ("both", "entropy"):
                outs.append(out["entropy"]); grads.append(d["upstream"][1].to(compute))
            torch.autograd.backward(outs, grads)
    else:
        scored = (labels != c["ignore_index"]).to(compute)
        spans = _spans(c)
        sums = torch.stack([tok[a:a + n].sum() for a, n in spans])
        counts = torch.stack([scored[a:a + n].sum() for a, n in spans])
        if c["ref"] == "free":
            ref_sums = None
        elif c["ref"] == "states":
            with torch.no_grad():
                rh, rw, rb = (_leaf(d[n], compute) for n in ("ref_hidden", "ref_weight", "ref_bias"))
                rtok, _ = _token_logps(rh.reshape(-1, c["H_ref"]), rw, rb, labels, c, alt_order, plain)
                ref_sums = torch.stack([rtok[a:a + n].sum() for a, n in spans])
        else:
            ref_sums = d["ref_logps"].detach().to(compute)
        loss, ell, metrics = _objective(c, sums, counts, ref_sums)
        out.update(loss=loss, policy_logps=ell, policy_sums=sums, counts=counts.detach(), ref_sums=ref_sums,
                   u=metrics.pop("u").detach(), margin_per_prompt=metrics.pop("margin").detach(),
                   metrics={m: v.detach() for m, v in metrics.items()})
        if not forward_only and _needs_grad(c):
            (loss * d["upstream"].to(compute)).backward()
    for name, leaf in (("d_hidden", h), ("d_weight", w), ("d_bias", b)):
        if leaf is not None and leaf.grad is not None:
            out[name] = leaf.grad
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


# ============================================================================ fused_grpo_loss cases
#
# A share GRPO_SHARE of the seeds (decided by a stream of their own, so that every other seed keeps
# the case it drew before these were added) are `fused_grpo_loss` (api "grpo") or `FusedGRPOLoss`
# ("grpo_module") cases. Their oracle is TRL 1.16's `GRPOTrainer._compute_loss` rewritten plainly on
# padded [B, T] float64 tensors (`trl_grpo_loss`), fed by the same full-logits log_softmax as above.


GRPO_APIS = ("grpo", "grpo_module")
GRPO_SHARE = 0.3
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max", "cispo_clip_ratio")
ENTROPY_TEMPORARIES = 6   # the single passes divide their chunk rows by 1 + this with the entropy (README)


def is_grpo_seed(seed: int) -> bool:
    return random.Random(f"grpo case {seed}").random() < GRPO_SHARE


def draw_grpo_case(seed: int) -> dict:
    """The options of a fused_grpo_loss / FusedGRPOLoss case."""
    r = random.Random(seed)
    c = dict(seed=seed)
    c["api"] = _pick(r, {"grpo": 0.75, "grpo_module": 0.25})
    c["backend"] = _pick(r, {"native": 0.5, "reference": 0.27, "triton": 0.13, "auto": 0.1})
    tiny = c["backend"] == "triton"
    if tiny:
        c["dtype"] = _pick(r, {"fp32": 0.6, "bf16": 0.3, "fp16": 0.05, "fp64": 0.05})
    else:
        c["dtype"] = _pick(r, {"fp32": 0.45, "bf16": 0.2, "fp16": 0.05, "fp64": 0.3})
    native = c["backend"] in ("native", "auto")
    long = native and r.random() < 0.15
    c["H"] = r.choice([4, 8, 16]) if (tiny or long) else r.choice([1, 4, 8, 16, 24, 32, 48])
    c["V"] = r.randint(2, 300) if tiny else (r.randint(2, 400) if long else r.randint(2, 1200))
    c["T"] = r.randint(40, 100) if long else (1 if r.random() < 0.1 else r.randint(2, 8 if tiny else 24))
    c["B"] = r.randint(1, 3 if tiny else (3 if long else 6))
    c["ignore_index"] = _pick(r, {-100: 0.75, -1: 0.15, c["V"] + 7: 0.1})
    c["mask_prob"] = _pick(r, {0.0: 0.4, 0.15: 0.4, 0.5: 0.2})        # fully ignored completions
    c["sprinkle"] = _pick(r, {0.0: 0.6, 0.1: 0.3, 0.5: 0.1})          # tool-output tokens inside completions
    c["poison_ignored"] = r.random() < 0.15
    c["bias"] = r.random() < 0.6
    c["layout"] = "packed" if r.random() < 0.4 else "padded"
    if c["layout"] == "packed":
        c["lengths"] = [0 if r.random() < 0.12 else r.randint(1, c["T"]) for _ in range(c["B"])]
        if sum(c["lengths"]) == 0:
            c["lengths"][0] = 1
        c["cu_dtype"] = r.choice(["int32", "int64"])
        c["num_tokens"] = sum(c["lengths"])
    else:
        c["num_tokens"] = c["B"] * c["T"]

    c["loss_type"] = r.choice(GRPO_LOSSES)
    c["importance_sampling_level"] = _pick(r, {"token": 0.6, "sequence": 0.4})
    c["epsilon_low"] = 0.2 if r.random() < 0.4 else round(r.uniform(0.01, 0.6), 4)
    c["epsilon_high"] = None
    if r.random() < 0.6:
        c["epsilon_high"] = round(r.uniform(0.5, 6) if c["loss_type"] == "cispo" else r.uniform(0.01, 0.6), 4)
    c["delta"] = None if r.random() < 0.7 else round(r.uniform(1.05, 3.0), 4)
    c["beta"] = 0.0 if r.random() < 0.5 else round(math.exp(r.uniform(math.log(0.005), math.log(1.0))), 5)
    c["use_bias_correction_kl"] = r.random() < 0.7
    c["entropy_coef"] = 0.0 if r.random() < 0.5 else round(r.choice([-1, 1, 1]) * math.exp(
        r.uniform(math.log(0.005), math.log(0.5))), 5)
    c["log_entropy"] = r.random() < 0.3
    c["sapo_temperature_pos"], c["sapo_temperature_neg"] = (1.0, 1.05) if r.random() < 0.5 else (
        round(r.uniform(0.3, 3), 3), round(r.uniform(0.3, 3), 3))
    # per completion [B] or per token (labels' shape); a packed [N] batch with N = B reads [B] as per token
    ambiguous = c["layout"] == "packed" and c["num_tokens"] == c["B"]
    c["advantages"] = "token" if ambiguous else _pick(r, {"sequence": 0.6, "token": 0.4})
    c["adv_zero"] = _pick(r, {0.0: 0.8, 0.2: 0.2})                     # some advantages exactly 0
    c["old"] = _pick(r, {None: 0.35, "near": 0.65})
    c["old_spread"] = r.choice([0.03, 0.2, 0.6])                       # |log w| drawn ~ N(0, spread)
    c["importance_weights"] = _pick(r, {None: 0.5, "token": 0.3, "sequence": 0.2})
    if ambiguous and c["importance_weights"] == "sequence":
        c["importance_weights"] = "token"
    c["ref"] = c["beta"] > 0 or r.random() < 0.2                      # ref_logps with beta = 0: unused
    c["aux_dtype"] = "fp64" if c["dtype"] == "fp64" and r.random() < 0.8 else r.choice(["fp32", "fp64"])
    c["poison_unscored"] = r.random() < 0.15      # NaN in old/ref/advantages/weights at unscored tokens
    c["max_completion_length"] = None if r.random() < 0.5 else r.randint(max(1, c["T"] // 2), 2 * c["T"])
    c["num_items_in_batch"] = _pick(r, {None: 0.5, "int": 0.2, "float": 0.15, "tensor": 0.15})
    if c["num_items_in_batch"] == "int":
        c["num_items_in_batch"] = r.randint(1, 2 * c["num_tokens"] + 1)
    elif c["num_items_in_batch"] is not None:
        c["num_items_in_batch"] = [round(r.uniform(0.5, 3 * c["num_tokens"]), 3), c["num_items_in_batch"]]


    _draw_head_and_grads(r, c)
    c["noncontig"] = sorted(n for n in ("hidden", "weight", "bias", "labels", "advantages", "old_logps", "ref_logps",
                                        "importance_weights", "cu_seqlens", "upstream") if r.random() < 0.12)
    c["noncontig_how"] = r.choice(["transpose", "stride"])
    c["backward_mode"] = _pick(r, {"auto": 0.45, "recompute": 0.3, "single_pass": 0.25})
    c["upstream"] = _pick(r, {1.0: 0.35, 0.0: 0.03, round(r.choice([-1, 1]) * r.uniform(0.1, 4), 4): 0.62})
    c["chunking"] = _pick(r, {"default": 0.2, "budget": 0.65, "env": 0.15}) if native else "default"
    c["budget"] = None
    if c["chunking"] != "default":
        vp = c["V"] * (8 if c["dtype"] == "fp64" else 4)
        if (c["entropy_coef"] != 0 or c["log_entropy"]) and r.random() < 0.5:
            vp *= 1 + ENTROPY_TEMPORARIES        # the single passes' rows per chunk with the entropy
        rows = r.randint(1, 8) if r.random() < 0.8 else r.randint(1, max(1, c["num_tokens"]))
        c["budget"] = rows * vp + r.randint(0, vp - 1)
    return c


def _with_entropy(c) -> bool:
    return c["entropy_coef"] != 0.0 or c["log_entropy"]


def _sequence_pass_blocked(c) -> bool:
    """grpo.py: at sequence level the single pass needs one coefficient per completion."""
    return c["beta"] != 0.0 or c["loss_type"] == "cispo" or c["entropy_coef"] != 0.0


def grpo_expected_outcome(c):
    """README 'GRPO-family losses' / grpo.py: the single pass runs on the native backend, at token-level
    importance sampling, or at sequence level without KL, entropy bonus or cispo; an explicit single_pass
    elsewhere raises ValueError (at sequence level only when a gradient is needed: a forward-only
    call does no gradient work); auto takes it when a gradient is needed there."""
    native = c["backend"] in ("native", "auto")
    sequence_blocked = c["importance_sampling_level"] == "sequence" and _sequence_pass_blocked(c)
    if c["backward_mode"] == "single_pass":      # checked before the kernels see the dtype
        if not native:
            return ValueError, "has no single-pass backward"
        if sequence_blocked and _needs_grad(c):
            return ValueError, "importance_sampling_level='sequence'"
    if c["backend"] == "triton" and c["dtype"] == "fp64":
        return TypeError, "backend='triton' supports"
    if not native:
        return "path", None
    single = _needs_grad(c) and not sequence_blocked and c["backward_mode"] != "recompute"
    return "path", "single_pass" if single else "recompute"


def _kinks(c) -> list:
    """log w where the loss's gradient or a clip metric jumps."""
    eh = c["epsilon_low"] if c["epsilon_high"] is None else c["epsilon_high"]
    if c["loss_type"] == "cispo":
        return [math.log(eh)] if eh > 0 else []
    if c["loss_type"] == "sapo":
        return []
    out = [math.log(1 - c["epsilon_low"]), math.log(1 + eh)]
    return out + ([math.log(c["delta"])] if c["delta"] is not None else [])


def _away_from_kinks(x: float, kinks, margin: float) -> float:
    for _ in range(4):
        near = [k for k in kinks if abs(x - k) < margin]
        if not near:
            break
        k = near[0]
        x = k + (margin if x >= k else -margin) * 1.5
    return x


def grpo_data(c, d, g) -> None:
    """Into d: the per-token / per-completion inputs of a GRPO case (make_data adds the rest). old_logps = log-probs - d with d ~ N(0,
    spread) (ratios on both sides of the clip boundaries), each ratio (token level) or completion mean
    (sequence level) moved at least 1e-3 + 1e-4 |logp| from every kink so rounding cannot cross one;
    ref_logps = log-probs + N(0, 0.5). Unscored positions hold garbage (NaN with poison_unscored)."""
    aux = torch.float64 if c["aux_dtype"] == "fp64" else torch.float32
    labels = d["labels"].reshape(-1)
    scored = labels != c["ignore_index"]
    n, b = c["num_tokens"], c["B"]
    shape = tuple(d["labels"].shape)
    with torch.no_grad():
        lp, _ = _token_logps(d["hidden"].reshape(-1, c["H"]).double(), d["weight"].double(),
                             None if d["bias"] is None else d["bias"].double(), labels.long(), c)

    def garbage(x):
        fill = torch.full((n,), float("nan"), dtype=torch.float64) if c["poison_unscored"] else \
            torch.randn(n, generator=g, dtype=torch.float64) * 3
        return torch.where(scored, x, fill).reshape(shape)

    def signed(count):
        a = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).double() * (
            0.1 + 2 * torch.rand(count, generator=g, dtype=torch.float64))
        return torch.where(torch.rand(count, generator=g) < c["adv_zero"], 0.0, a)

    adv = signed(b) if c["advantages"] == "sequence" else garbage(signed(n))
    d["advantages"] = adv.to(aux)
    d["old_logps"] = None
    if c["old"] is not None:
        dl = torch.randn(n, generator=g, dtype=torch.float64) * c["old_spread"]
        kinks = _kinks(c)
        if c["importance_sampling_level"] == "token":
            for t in range(n):
                dl[t] = _away_from_kinks(dl[t].item(), kinks, 1e-3 + 1e-4 * abs(lp[t].item()))
        else:
            for a, length in _spans(c):
                sel = scored[a:a + length]
                if sel.any():
                    seg = dl[a:a + length]
                    mean = seg[sel].mean().item()
                    margin = 1e-3 + 1e-4 * lp[a:a + length].abs().max().item()
                    seg[sel] += _away_from_kinks(mean, kinks, margin) - mean
        d["old_logps"] = garbage(lp - dl).to(aux)
    d["ref_logps"] = garbage(lp + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(aux) if c["ref"] \
        else None
    iw = c["importance_weights"]
    d["importance_weights"] = None if iw is None else (
        0.2 + 1.8 * torch.rand(b, generator=g, dtype=torch.float64) if iw == "sequence"
        else garbage(0.2 + 1.8 * torch.rand(n, generator=g, dtype=torch.float64))).to(aux)


def _num_items(c):
    v = c["num_items_in_batch"]
    if isinstance(v, list):
        return torch.tensor(v[0]) if v[1] == "tensor" else v[0]
    return v


def trl_grpo_loss(c, lp, ent, mask, adv, old, ref, iw, per_completion: bool, value_only: bool = False):
    """TRL's loss (grpo_oracle.trl_grpo_loss) with case c's options. per_completion chosen by meaning,
    not by T == 1 as TRL's shape test would. -> (loss, metrics)."""
    mcl = c["max_completion_length"]
    if mcl is None:   # the op's default: T (padded) or the longest completion (packed)
        mcl = c["T"] if c["layout"] == "padded" else max(c["lengths"])
    loss, metrics, _ = grpo_oracle.trl_grpo_loss(
        lp, ent, mask, adv, old, ref, iw, per_completion=per_completion, value_only=value_only,
        max_completion_length=mcl, num_items_in_batch=_num_items(c), log_entropy=_with_entropy(c),
        **{k: c[k] for k in ("loss_type", "epsilon_low", "epsilon_high", "delta", "beta",
                             "importance_sampling_level", "use_bias_correction_kl", "sapo_temperature_pos",
                             "sapo_temperature_neg", "entropy_coef")})
    return loss, metrics


def _padded_index(c):
    """[B, Tm] flat token index of each padded position (-1: none), Tm = T or the longest completion."""
    spans = _spans(c)
    tm = max(1, max(length for _, length in spans))
    pos = torch.full((len(spans), tm), -1, dtype=torch.long)
    for i, (a, length) in enumerate(spans):
        pos[i, :length] = torch.arange(a, a + length)
    return pos


def _grpo_inputs(c, d, scored_pad, pos, compute):
    """advantages, old, ref, importance weights as padded [B, Tm] (0 where unscored) or [B, 1] tensors."""
    valid = pos >= 0

    def per_token(t):
        if t is None:
            return None
        flat = t.detach().reshape(-1).to(compute)
        x = torch.where(valid, flat[pos.clamp(min=0)], torch.zeros((), dtype=compute))
        return torch.where(scored_pad, x, torch.zeros((), dtype=compute))

    def either(t, form):
        if t is None:
            return None
        return t.detach().to(compute)[:, None] if form == "sequence" else per_token(t)

    return (either(d["advantages"], c["advantages"]), per_token(d["old_logps"]),
            per_token(d["ref_logps"]) if c["beta"] != 0.0 else None,
            either(d["importance_weights"], c["importance_weights"]))


def oracle_grpo(c, d, compute=torch.float64, perturb=None, alt_order=False, forward_only=False,
                plain=False, lp_values=None) -> dict:
    """The float64 (or `compute`) evaluation of a GRPO case: full logits -> token log-probs and
    entropies (as `oracle`) -> padded [B, Tm] -> `trl_grpo_loss`; gradients by autograd."""
    h, w, b = (_leaf(d[n], compute, perturb) for n in ("hidden", "weight", "bias"))
    labels = d["labels"].reshape(-1).long()
    tok, ent = _token_logps(h.reshape(-1, c["H"]), w, b, labels, c, alt_order, plain)
    if lp_values is not None:
        tok = tok + (lp_values.reshape(-1).to(compute) - tok).detach()
    pos = _padded_index(c)
    valid = pos >= 0
    scored = (labels != c["ignore_index"])
    scored_pad = valid & scored[pos.clamp(min=0)]
    zero = torch.zeros((), dtype=compute)
    lp_pad = torch.where(scored_pad, tok[pos.clamp(min=0)], zero)
    ent_pad = torch.where(scored_pad, ent[pos.clamp(min=0)], zero)
    adv, old, ref, iw = _grpo_inputs(c, d, scored_pad, pos, compute)
    per_completion = c["importance_sampling_level"] == "sequence" and c["advantages"] == "sequence"
    loss, metrics = trl_grpo_loss(c, lp_pad, ent_pad, scored_pad, adv, old, ref, iw, per_completion)
    shape = tuple(d["labels"].shape)
    out = dict(loss=loss, token_logps=tok.reshape(shape), metrics={k: v.detach() for k, v in metrics.items()},
               lp_pad=lp_pad.detach(), ent_pad=ent_pad.detach(), scored_pad=scored_pad)
    if _with_entropy(c):
        out["token_entropy"] = ent.reshape(shape)
    if not forward_only and _needs_grad(c):
        (loss * d["upstream"].to(compute)).backward()
    for name, leaf in (("d_hidden", h), ("d_weight", w), ("d_bias", b)):
        if leaf is not None and leaf.grad is not None:
            out[name] = leaf.grad
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def grpo_condition(c, d, ref) -> dict:
    """For the loss and the continuous metrics: sum_t |dq/dl_t| |l_t| + |dq/dH_t| |H_t| over the
    per-token log-probs l and entropies H (float64 autograd of the values at the oracle's): an error of
    relative size TOL in each l_t, H_t (held to TOL themselves) moves q by at most TOL times this."""
    lp = ref["lp_pad"].clone().requires_grad_()
    ent = ref["ent_pad"].clone().requires_grad_()
    adv, old, refl, iw = _grpo_inputs(c, d, ref["scored_pad"], _padded_index(c), torch.float64)
    per_completion = c["importance_sampling_level"] == "sequence" and c["advantages"] == "sequence"
    loss, metrics = trl_grpo_loss(c, lp, ent, ref["scored_pad"], adv, old, refl, iw, per_completion,
                                  value_only=True)
    out = {}
    for name, q in dict(metrics, loss=loss).items():
        if name in CLIP_METRICS or not q.requires_grad:
            continue
        grads = torch.autograd.grad(q, (lp, ent), retain_graph=True, allow_unused=True)
        out[name] = sum((g.abs() * x.detach().abs()).sum().item() for g, x in zip(grads, (lp, ent))
                        if g is not None)
    return out


def _grpo_clip_ambiguous(c, d, ours, ref) -> bool:
    """True when some ratio (token or completion mean) sits within twice our own log-ratio error of a
    clip boundary (then the clip metrics are not compared: they are discontinuous there)."""
    if c["old"] is None or not _kinks(c):
        return False
    pos = _padded_index(c)
    scored = ref["scored_pad"]
    ours_lp = ours["token_logps"].detach().double().reshape(-1)
    ours_pad = torch.where(scored, ours_lp[pos.clamp(min=0)], 0.0)
    diff = (ours_pad - ref["lp_pad"]).abs()
    _, old, _, _ = _grpo_inputs(c, d, scored, pos, torch.float64)
    log_w = torch.where(scored, ref["lp_pad"] - old, 0.0)
    if c["importance_sampling_level"] == "sequence":
        count = scored.sum(-1).clamp(min=1)
        log_w, diff = log_w.sum(-1) / count, diff.sum(-1) / count
        scored = scored.any(-1)
    dist = torch.stack([(log_w - k).abs() for k in _kinks(c)]).min(0).values
    return bool(((dist <= 2 * diff + 1e-12) & scored).any())


def _grpo_options(c) -> dict:
    keys = ("loss_type", "epsilon_low", "epsilon_high", "delta", "beta", "importance_sampling_level", "entropy_coef",
            "max_completion_length", "temperature", "logit_scale", "final_logit_softcapping", "ignore_index",
            "backend", "backward_mode", "check_values", "use_bias_correction_kl", "sapo_temperature_pos",
            "sapo_temperature_neg", "log_entropy")
    return {k: c[k] for k in keys}


def call_grpo(c, d) -> dict:
    tensors = dict(advantages=d["advantages"], old_logps=d["old_logps"], ref_logps=d["ref_logps"], bias=d["bias"],
                   cu_seqlens=d.get("cu_seqlens"), importance_weights=d["importance_weights"],
                   num_items_in_batch=_num_items(c))
    if c["api"] == "grpo_module":
        return FusedGRPOLoss(**_grpo_options(c))(d["hidden"], d["weight"], d["labels"], **tensors)
    return fused_grpo_loss(d["hidden"], d["weight"], d["labels"], **tensors, **_grpo_options(c))


def _check_grpo_structure(c, d, ours, expected_path):
    dtype = DTYPES[c["dtype"]]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shape = tuple(d["labels"].shape)
    assert ours["loss"].shape == () and ours["loss"].dtype == out_dtype, (ours["loss"].shape, ours["loss"].dtype)
    ignored = d["labels"] == c["ignore_index"]
    for name in ("token_logps", "token_entropy"):
        t = ours[name]
        if name == "token_entropy" and not _with_entropy(c):
            assert t is None, "token_entropy returned though not computed"
            continue
        assert t is not None, f"{name} missing"
        assert t.shape == shape and t.dtype == out_dtype and not t.requires_grad, (name, t.shape, t.dtype)
        assert (t[ignored] == 0).all(), f"{name} not 0 at ignored tokens"
    want = _grpo_metric_names(c)
    assert sorted(ours["metrics"]) == sorted(want), (sorted(ours["metrics"]), sorted(want))
    for name, value in ours["metrics"].items():
        assert value.shape == () and value.dtype == out_dtype and not value.requires_grad, name
    if expected_path is not None and ours["grad_fn"] is not None:
        single = "SinglePass" in ours["grad_fn"]
        assert single == (expected_path == "single_pass"), \
            f"expected the {expected_path} path, got grad_fn {ours['grad_fn']}"
    requires = _requires(c)
    for name in ("hidden", "weight", "bias"):
        grad = ours.get("d_" + name)
        if name in requires and _needs_grad(c):
            assert grad is not None, f"d_{name} missing"
            assert grad.shape == d[name].shape and grad.dtype == d[name].dtype, (name, grad.shape, grad.dtype)
        else:
            assert grad is None, f"d_{name} computed for an input that needs no gradient"


def _grpo_metric_names(c) -> list:
    """TRL's logged names that the op returns for this case (grpo.py's docstring)."""
    names = (["policy_loss"] if c["entropy_coef"] != 0 else []) + (["kl"] if c["beta"] != 0 else []) \
        + (["entropy"] if _with_entropy(c) else [])
    if c["loss_type"] == "cispo":
        return names + ["cispo_clip_ratio"]
    return names + (list(CLIP_METRICS[:5]) if c["loss_type"] in grpo_oracle.CLIPPED else [])


def _named_grpo(c, res) -> dict:
    named = {"loss": (res["loss"], 1e-2), "token_logps": (res["token_logps"], None)}
    if _with_entropy(c):
        named["token_entropy"] = (res["token_entropy"], None)
    for m, v in res["metrics"].items():
        named[m] = (v, 1e-2)
    for name in ("d_hidden", "d_weight", "d_bias"):
        if res.get(name) is not None:
            named[name] = (res[name], None)
    return named


# ============================================================================ running a case


@contextlib.contextmanager
def chunking(c):
    """The case's chunk budget / chunk rows, restored afterwards whatever happens."""
    previous = set_chunk_budget_bytes(None)
    env = os.environ.pop(ENV_CHUNK_MB, None)
    try:
        if c["chunking"] == "budget":
            set_chunk_budget_bytes(c["budget"])
        elif c["chunking"] == "env":
            os.environ[ENV_CHUNK_MB] = repr((c["budget"] + 0.5) / MIB)
        yield
    finally:
        set_chunk_budget_bytes(previous)
        os.environ.pop(ENV_CHUNK_MB, None)
        if env is not None:
            os.environ[ENV_CHUNK_MB] = env


def _options(c):
    keys = ("loss_type", "beta", "num_negatives", "label_smoothing", "average_log_prob", "reference_free",
            "sft_weight", "ignore_index", "temperature", "logit_scale", "final_logit_softcapping", "backend",
            "check_values", "backward_mode")
    values = dict(c, num_negatives=c["K"], reference_free=c["ref"] == "free")
    return {k: values[k] for k in keys}


def call_op(c, d) -> dict:
    """Our outputs (and gradients, after backward with the case's upstream gradients)."""
    grad_ctx = torch.no_grad() if c["no_grad"] else contextlib.nullcontext()
    out = {}
    with grad_ctx:
        if c["api"] in GRPO_APIS:
            res = call_grpo(c, d)
            out.update(loss=res.loss, token_logps=res.token_logps, token_entropy=res.token_entropy,
                       metrics=res.metrics,
                       grad_fn=type(res.loss.grad_fn).__name__ if res.loss.grad_fn is not None else None)
            differentiable = res.loss.requires_grad
        elif c["api"] == "linear":
            res = linear_logprobs(d["hidden"], d["weight"], d["labels"], bias=d["bias"],
                                  ignore_index=c["ignore_index"], backend=c["backend"],
                                  temperature=c["temperature"], logit_scale=c["logit_scale"],
                                  final_logit_softcapping=c["final_logit_softcapping"],
                                  return_entropy=c["return_entropy"], check_values=c["check_values"])
            logps, entropy = res if c["return_entropy"] else (res, None)
            out.update(token_logps=logps, entropy=entropy)
            differentiable = logps.requires_grad
        else:
            tensors = {k: d.get(k) for k in ("bias", "cu_seqlens", "ref_logps", "ref_hidden", "ref_weight",
                                             "ref_bias")}
            if c["api"] == "module":
                res = FusedMIOLoss(**_options(c))(d["hidden"], d["weight"], d["labels"], **tensors)
            else:
                res = fused_mio_loss(d["hidden"], d["weight"], d["labels"], **tensors, **_options(c))
            out.update(loss=res.loss, policy_logps=res.policy_logps, policy_sums=res.policy_sums,
                       ref_logps=res.ref_logps, metrics=res.metrics,
                       grad_fn=type(res.loss.grad_fn).__name__ if res.loss.grad_fn is not None else None)
            differentiable = res.loss.requires_grad
    out["differentiable"] = differentiable
    if differentiable:
        if c["api"] == "linear":
            outs, grads = [], []
            if c["used"] in ("both", "logps"):
                outs.append(out["token_logps"]); grads.append(d["upstream"][0])
            if c["used"] in ("both", "entropy"):
                outs.append(out["entropy"]); grads.append(d["upstream"][1])
            torch.autograd.backward(outs, grads)
        else:
            torch.autograd.backward(out["loss"], d["upstream"])
    for name in ("hidden", "weight", "bias"):
        if d.get(name) is not None:
            out["d_" + name] = d[name].grad
    return out


def _err(a, b, floor=None):
    """||a - b|| / max(||b||, floor); floor None: relative, floored only at the smallest normal
    number of a's dtype (x sqrt(numel)), below which a cannot hold relative precision."""
    if floor is None:
        floor = torch.finfo(a.dtype).tiny * math.sqrt(max(1, a.numel()))
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def _named(c, res, oracle_result: bool) -> dict:
    """name -> (tensor, floor) of every compared output, from call_op's or oracle's result."""
    if c["api"] in GRPO_APIS:
        return _named_grpo(c, res)
    named = {}
    if c["api"] == "linear":
        named["token_logps"] = (res["token_logps"], None)
        if c["return_entropy"]:
            named["entropy"] = (res["entropy"], None)
    else:
        named["loss"] = (res["loss"], 1e-2)
        named["policy_logps"] = (res["policy_logps"], None)
        named["policy_sums"] = (res["policy_sums"], None)
        if c["ref"] != "free":
            named["ref_logps"] = (res["ref_sums"] if oracle_result else res["ref_logps"], None)
        for m in METRICS:
            if m != "rewards/accuracies":
                named[m] = (res["metrics"][m], 1e-2)
    for name in ("d_hidden", "d_weight", "d_bias"):
        if res.get(name) is not None:
            named[name] = (res[name], None)
    return named


def _check_structure(c, d, ours, expected_path):
    if c["api"] in GRPO_APIS:
        return _check_grpo_structure(c, d, ours, expected_path)
    dtype = DTYPES[c["dtype"]]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    requires = _requires(c)
    assert ours["differentiable"] == _needs_grad(c), f"output requires_grad={ours['differentiable']}"
    if c["api"] == "linear":
        for name in ("token_logps",) + (("entropy",) if c["return_entropy"] else ()):
            t = ours[name]
            assert t.shape == tuple(c["lead"]) and t.dtype == out_dtype, (name, t.shape, t.dtype)
            labels = d["labels"]
            assert (t[labels == c["ignore_index"]] == 0).all(), f"{name} not 0 at ignored tokens"
    else:
        s = len(_spans(c))
        assert ours["loss"].shape == () and ours["loss"].dtype == out_dtype, ours["loss"].dtype
        for name in ("policy_logps", "policy_sums"):
            assert ours[name].shape == (s,) and ours[name].dtype == out_dtype, (name, ours[name].dtype)
            assert not ours[name].requires_grad, name
        assert (ours["ref_logps"] is None) == (c["ref"] == "free")
        assert sorted(ours["metrics"]) == sorted(METRICS), sorted(ours["metrics"])
        for name, value in ours["metrics"].items():
            assert value.shape == () and value.dtype == out_dtype and not value.requires_grad, name
        if expected_path is not None:
            single = ours["grad_fn"] is not None and "SinglePass" in ours["grad_fn"]
            assert single == (expected_path == "single_pass"), \
                f"expected the {expected_path} path, got grad_fn {ours['grad_fn']}"
    for name in ("hidden", "weight", "bias"):
        grad = ours.get("d_" + name)
        if name in requires and _needs_grad(c):
            assert grad is not None, f"d_{name} missing"
            assert grad.shape == d[name].shape and grad.dtype == d[name].dtype, (name, grad.shape, grad.dtype)
        else:
            assert grad is None, f"d_{name} computed for an input that needs no gradient"


def _check_accuracies(c, ours, ref):
    """The indicator may differ only on prompts within twice our own log-ratio error of a tie."""
    k, p = c["K"], c["P"]
    counts = ref["counts"]
    normalised = c["average_log_prob"] or c["loss_type"] in LENGTH_NORMALISED
    scale = 1 / counts.clamp(min=1) if normalised else torch.ones_like(counts)
    ours_u = ours["policy_logps"].double()
    if c["ref"] != "free":
        ours_u = ours_u - ours["ref_logps"].double() * scale
    du = (ours_u - ref["u"]).abs().reshape(1 + k, p).max(0).values
    near = ref["margin_per_prompt"].abs() <= 2 * c["beta"] * du
    got, want = ours["metrics"]["rewards/accuracies"].item(), ref["metrics"]["rewards/accuracies"].item()
    rounding = torch.finfo(ours["metrics"]["rewards/accuracies"].dtype).eps   # e.g. 1/3 stored in fp32
    assert abs(got - want) <= near.sum().item() / p + rounding, \
        f"rewards/accuracies {got} vs oracle {want} ({int(near.sum())} of {p} prompts near a tie)"


def _without_overflow(name, a, b, tol):
    """Elements whose exact value lies beyond a's dtype (an fp16 gradient over 65504) may be inf of the
    exact value's sign, as any fp16 computation rounds them (and GradScaler expects); -> the rest."""
    beyond = b.abs() > torch.finfo(a.dtype).max * (1 - tol)
    if not beyond.any():
        return a, b
    got, want = a[beyond].double(), b[beyond]
    assert (torch.sign(got) == torch.sign(want)).all() and (got.abs() >= want.abs().clamp(
        max=torch.finfo(a.dtype).max) * (1 - tol)).all(), f"{name}: {got} where the oracle has {want}"
    return a[~beyond], b[~beyond]


PERTURBED_RUNS = 8   # at most, per case with an error over tolerance


def _bounds(c, d, ref, exact, over, tol, ours) -> dict:
    """An error over `tol` is the problem's, not ours, when it is within 2x the error of plain autograd
    in the compute precision: unperturbed, then with inputs moved by one ulp (random signs, alternating
    summation order), sampled until the error is explained or PERTURBED_RUNS are spent (one such run's
    error varies ~10x between draws). A function of the per-sequence sums may instead carry their
    tolerance through its condition number. A GRPO gradient may carry our own per-token log-probs'
    error (checked against tol themselves) through its coefficients dL/dl_t, which can be ill-
    conditioned (the k3 KL's 1 - exp(ref - l) near ref = l): within 2x the float64 oracle's gradient
    at our fp32/fp64 log-probs. -> name -> bound."""
    compute = torch.float64 if DTYPES[c["dtype"]] == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(c["seed"] + 1)

    def sign(shape):
        return torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1

    grpo = c["api"] in GRPO_APIS
    cond = grpo_condition(c, d, ref) if grpo else (sequence_condition(c, ref) if c["api"] != "linear" else {})
    intrinsic = dict.fromkeys(over, 0.0)

    def bound(name):
        b = 2 * intrinsic[name]
        if name in cond:
            b = max(b, tol * cond[name] / max(exact[name][0].abs().item(), exact[name][1]))
        return b

    runs = ([(compute, dict(plain=True))] if compute != torch.float64 else []) + [
        (compute, dict(perturb=sign, alt_order=bool(i % 2), plain=True)) for i in range(PERTURBED_RUNS)]
    if grpo and ours["token_logps"].dtype in (torch.float32, torch.float64):
        runs.insert(0, (torch.float64, dict(lp_values=ours["token_logps"])))
    for precision, run in runs:
        if all(e <= bound(name) for name, e in over.items()):
            break
        naive = _named(c, oracle(c, d, precision, **run), True)
        for name in over:
            if "lp_values" in run and not name.startswith("d_"):   # explains gradients only
                continue
            intrinsic[name] = max(intrinsic[name], _err(naive[name][0], exact[name][0], exact[name][1]))
    return {name: bound(name) for name in over}


def run_case(c) -> dict:
    """Run one case; assert; -> a summary (errors, bounds used) for the stats log."""
    if c["backend"] in ("native", "auto") and not NATIVE:
        pytest.skip("native extension not built")
    if c["backend"] == "triton" and not TRITON:
        pytest.skip("triton not available")
    d = make_data(c)
    expected = expected_outcome(c)
    summary = dict(seed=c["seed"], backend=c["backend"], api=c["api"], dtype=c["dtype"])
    with chunking(c):
        if expected[0] != "path":
            with pytest.raises(expected[0], match=expected[1]):
                call_op(c, d)
            summary["refused"] = expected[0].__name__
            return summary
        ours = call_op(c, d)
    summary["path"] = expected[1] or ("two_pass" if c["api"] == "linear" or c["backend"] != "reference"
                                      else "autograd")
    _check_structure(c, d, ours, expected[1])
    ref = oracle(c, d, torch.float64)
    exact = _named(c, ref, True)
    dtype = DTYPES[c["dtype"]]
    tol = TOL[dtype]
    errors = {}
    for name, (a, floor) in _named(c, ours, False).items():
        b = exact[name][0]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs oracle {tuple(b.shape)}"
        nan = torch.isnan(b)   # TRL's clip_ratio/low_min, high_max over no completion with tokens
        if nan.any():
            assert torch.equal(torch.isnan(a), nan), f"{name}: {a} where the oracle has {b}"
            a, b = a[~nan], b[~nan]
        a, b = _without_overflow(name, a, b, tol)
        assert torch.isfinite(a).all(), f"{name} not finite"
        errors[name] = _err(a, b, floor)
    grpo = c["api"] in GRPO_APIS
    if grpo and _grpo_clip_ambiguous(c, d, ours, ref):   # discontinuous there: not compared
        summary["clip_metrics_skipped"] = True
        for name in CLIP_METRICS:
            errors.pop(name, None)
    over = {n: e for n, e in errors.items() if e > tol}
    bounds = _bounds(c, d, ref, exact, over, tol, ours) if over else {}
    for name, e in over.items():
        assert e <= bounds[name], (f"{name}: relative error {e:.3g} > {tol} and > its bound {bounds[name]:.3g} "
                                   "(2x plain autograd's error, or the sequence-level bound); all errors: "
                                   + ", ".join(f"{n}={v:.2g}" for n, v in errors.items()))
    if c["api"] not in ("linear",) + GRPO_APIS:
        _check_accuracies(c, ours, ref)
    key = f"random {'grpo ' if grpo else ''}{c['backend']} {c['dtype']}"
    worst = max(errors.values(), default=0.0)
    WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), worst)
    summary.update(worst=worst, worst_name=max(errors, key=errors.get) if errors else None,
                   bounded={n: [errors[n], b] for n, b in bounds.items()})
    return summary


# ============================================================================ the tests


def _case_range(config):
    n = config.getoption("--random-cases", default=None)
    first = config.getoption("--random-seed", default=None)
    if n is None:
        n = int(os.environ.get("MIO_RANDOM_CASES", DEFAULT_CASES))
    if first is None:
        first = int(os.environ.get("MIO_RANDOM_SEED", DEFAULT_FIRST_SEED))
    return range(first, first + n)


def pytest_generate_tests(metafunc):
    if "random_case_seed" in metafunc.fixturenames:
        metafunc.parametrize("random_case_seed", _case_range(metafunc.config),
                             ids=lambda s: f"seed{s}-{draw_case(s)['api']}")   # -k grpo: the GRPO cases


def test_random_case(random_case_seed):
    case = draw_case(random_case_seed)
    try:
        summary = run_case(case)
    except pytest.skip.Exception:
        raise
    except BaseException as err:  # noqa: BLE001 - every failure carries its reproduction
        if isinstance(err, KeyboardInterrupt):
            raise
        shown = {k: v for k, v in case.items() if k != "seed"}
        raise AssertionError(f"{repro(random_case_seed)}\n  case: {json.dumps(shown)}\n"
                             f"  {type(err).__name__}: {err}") from err
    path = os.environ.get("MIO_RANDOM_STATS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(summary) + "\n")


def test_oracle_log_softmax_gradient_with_tied_maxima():
    """Exactly tied maxima (a soft-capped row's saturated logits) each get the gradient -p_j."""
    z = torch.tensor([3.0, 3.0, 1.0, 3.0, -2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_log_softmax(z)[2], z)
    want = -torch.softmax(z.detach(), -1)
    want[2] += 1
    assert torch.allclose(grad, want, rtol=1e-15, atol=1e-17)


def test_oracle_knows_every_registered_loss():
    """A loss registered without an oracle formula here would go untested."""
    assert set(LOSSES) <= set(ORACLE_LOSSES), sorted(set(LOSSES) - set(ORACLE_LOSSES))


def test_draw_is_a_function_of_the_seed():
    for seed in range(50):
        assert draw_case(seed) == draw_case(seed)
    case = draw_case(3)
    a, b = make_data(case), make_data(case)
    for name in ("hidden", "weight", "labels"):
        assert torch.equal(a[name], b[name])


def test_cli_reproduction_line():
    assert shlex.split(repro(12345))[-4:] == ["--random-cases", "1", "--random-seed", "12345"]


# ============================================================================ issue 22: regressions


def _oracle_loss_grads(hidden, weight, labels, *, cu_seqlens=None, ref_logps=None, **case):
    """float64 oracle for a plain fused_mio_loss call (identity transform, no bias)."""
    c = dict(api="fused", H=hidden.shape[-1], V=weight.shape[0], ignore_index=-100, final_logit_softcapping=None,
             logit_scale=1.0, temperature=1.0, sft_weight=0.0, average_log_prob=False, label_smoothing=0.0,
             requires="all", no_grad=False, bias=False, **case)
    if cu_seqlens is None:
        c.update(layout="padded", T=labels.shape[1])
    else:
        c.update(layout="packed", lengths=(cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
    c["ref"] = "free" if ref_logps is None else "logps"
    d = dict(hidden=hidden, weight=weight, bias=None, labels=labels, ref_logps=ref_logps,
             upstream=torch.tensor(1.0, dtype=torch.float64))
    return oracle(c, d)


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_issue22_defect1_frozen_head_single_pass_sequence_spanning_chunks():
    """Native single pass, hidden trainable, weight frozen, default 64 MiB budget: the second
    sequence spans two chunks (524 rows each at V = 32000); its dH rows of the earlier chunk must
    be scaled by its coefficient too."""
    previous = set_chunk_budget_bytes(None)
    env = os.environ.pop(ENV_CHUNK_MB, None)
    try:
        torch.manual_seed(0)
        h = torch.randn(2, 300, 8); w = torch.randn(32000, 8) / 8 ** .5; y = torch.randint(0, 32000, (2, 300))
        ref = fused_mio_loss(h, w, y, reference_free=True).policy_sums + 1
        x = h.clone().requires_grad_()
        out = fused_mio_loss(x, w, y, ref_logps=ref, backend="native")
        assert "SinglePass" in type(out.loss.grad_fn).__name__
        out.loss.backward()
        xr = h.clone().requires_grad_()
        fused_mio_loss(xr, w, y, ref_logps=ref, backend="native", backward_mode="recompute").loss.backward()
    finally:
        set_chunk_budget_bytes(previous)
        if env is not None:
            os.environ[ENV_CHUNK_MB] = env
    exact = _oracle_loss_grads(h.double(), w.double(), y, ref_logps=ref.double(), loss_type="mio", K=1, P=1,
                               beta=0.1)["d_hidden"]
    assert _err(xr.grad, exact) <= 1e-5
    assert _err(x.grad, exact) <= 1e-5, (x.grad[1, 0, :3], exact[1, 0, :3])


def test_issue22_defect2_reference_backend_packed_gradients():
    """Reference backend, packed, an empty middle sequence: the gradients equal the padded batch's
    (and the float64 oracle's) in fp64."""
    torch.manual_seed(0); T, H, V = 40, 16, 1000
    h = torch.randn(2 * T, H, dtype=torch.float64); w = torch.randn(V, H, dtype=torch.float64) / 4
    y = torch.randint(0, V, (2 * T,)); y[T - 1] = y[-1] = -100
    w1 = w.clone().requires_grad_()
    cu = torch.tensor([0, T, T, 2 * T])
    options = dict(loss_type="apo_zero", beta=0.15, num_negatives=2, reference_free=True)
    fused_mio_loss(h, w1, y, cu_seqlens=cu, **options, backend="reference").loss.backward()
    hp = torch.zeros(3, T, H, dtype=torch.float64); hp[0], hp[2] = h[:T], h[T:]
    yp = torch.full((3, T), -100); yp[0], yp[2] = y[:T], y[T:]
    w2 = w.clone().requires_grad_()
    fused_mio_loss(hp, w2, yp, **options, backend="reference").loss.backward()
    exact = _oracle_loss_grads(h, w, y, cu_seqlens=cu, loss_type="apo_zero", beta=0.15, K=2, P=1)["d_weight"]
    assert _err(w2.grad, exact) <= 1e-10
    assert _err(w1.grad, exact) <= 1e-10, _err(w1.grad, exact)


# ============================================================================ found by this suite


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_single_pass_non_contiguous_bias(dtype):
    """Seed 405: the native single pass (the CPU default) handed a strided bias to the extension's
    epilogue as is, which raised 'grad_epilogue: bias must be a contiguous [V] tensor' for fp32 and
    fp64 (bf16 was upcast into a fresh contiguous copy). Now it equals the recompute path."""
    torch.manual_seed(0)
    h, w, y = torch.randn(4, 5, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype), torch.randint(0, 50, (4, 5))
    strided = torch.randn(100, dtype=dtype)[::2]
    grads = []
    for mode, bias in (("single_pass", strided), ("recompute", strided.contiguous())):
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_(), bias.detach().requires_grad_()]
        fused_mio_loss(leaves[0], leaves[1], y, bias=leaves[2], reference_free=True, backend="native",
                       backward_mode=mode).loss.backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert _err(a, b) <= (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", ["reference"] + (["native"] if NATIVE else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_apo_zero_saturated_rewards(backend, dtype):
    """apo_zero's dL/du took 1 - sigmoid(z) by subtraction: at beta*u_w = 25 that keeps ~5 digits
    (relative error 3e-6 in every gradient, fp64 included). Now sigmoid(-z)."""
    torch.manual_seed(0)
    h, w, y = torch.randn(2, 6, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype), torch.randint(0, 50, (2, 6))
    sums = fused_mio_loss(h.double(), w.double(), y, reference_free=True, backend="reference").policy_sums
    ref = torch.stack([sums[0] - 50, sums[1] + 50])        # beta * u = +25 (chosen), -25 (rejected)
    leaf = w.clone().requires_grad_()
    fused_mio_loss(h, leaf, y, ref_logps=ref, loss_type="apo_zero", beta=0.5, backend=backend).loss.backward()
    exact = _oracle_loss_grads(h.double(), w.double(), y, ref_logps=ref, loss_type="apo_zero", beta=0.5, K=1,
                               P=1)["d_weight"]
    assert _err(leaf.grad, exact) <= TOL[dtype]


@pytest.mark.parametrize("loss_type", ["mio", "bco_pair", "dpo"])
def test_softplus_beyond_its_default_threshold_fp64(loss_type):
    """Seed 101808: F.softplus returns x for x > 20 (off by e^-20 ~ 2e-9), in the loss and in the
    reference backend's autograd gradient: 1.5e-10 relative in fp64 d_weight at |beta*u| ~ 25."""
    torch.manual_seed(0)
    h, w, y = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64), \
        torch.randint(0, 50, (2, 6))
    sums = fused_mio_loss(h, w, y, reference_free=True, backend="reference").policy_sums
    ref = torch.stack([sums[0] + 50, sums[1] - 50])        # beta * u = -25 (chosen), +25 (rejected)
    leaf = w.clone().requires_grad_()
    out = fused_mio_loss(h, leaf, y, ref_logps=ref, loss_type=loss_type, beta=0.5, backend="reference")
    out.loss.backward()
    exact = _oracle_loss_grads(h, w, y, ref_logps=ref, loss_type=loss_type, beta=0.5, K=1, P=1)
    assert _err(out.loss, exact["loss"]) <= 1e-10 and _err(leaf.grad, exact["d_weight"]) <= 1e-10
