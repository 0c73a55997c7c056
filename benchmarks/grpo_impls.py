"""The GRPO implementations bench_grpo.py compares, behind one small interface.

Each implementation turns the benchmark inputs (`GRPOInputs`) into a `step` callable that runs the
forward of the GRPO-family loss from LM-head inputs and returns (loss scalar, per-token log-probs
[B, T] or None); the harness calls `loss.backward()` itself and reads hidden.grad / weight.grad
(bench_loss.fwd_bwd). Every row gets the same tensors and the same loss options (`GRPOOptions`,
TRL 1.16 GRPOConfig names and defaults: use_bias_correction_kl; importance_sampling_level "token",
or "sequence" for GSPO: each completion's importance ratio is exp of its masked mean log-ratio).

  ours_single_pass  fused_grpo_loss(backend="native", backward_mode="single_pass"): the gradient is
                    formed in the forward, chunk by chunk, from per-token coefficients (sequence
                    level: one coefficient per completion; only without KL, entropy or cispo).
  ours_recompute    the same with backward_mode="recompute": the backward recomputes the logits.
  liger             Liger-Kernel LigerFusedLinearGRPOLoss (0.8.5): ref_per_token_logps and
                    old_per_token_logps given, attention_mask = the scored tokens, advantages [B],
                    use_bias_correction_kl=True (TRL 1.16's default; Liger's is False),
                    max_completion_length = T, chunk_size = 1 completion, compiled=True (its loss math);
                    it refuses cispo and sapo at sequence level (`LIGER_NO_SEQUENCE_LEVEL`): skipped.
  trl               TRL 1.16's own path, called without a trainer: the fused LM head TRL patches into
                    the model (trl.trainer.utils.add_fused_lm_head with outputs ("log_probs",
                    "entropy"), as GRPOTrainer does; on CPU it scores every position), run through
                    GRPOTrainer._get_per_token_logps_and_entropies and GRPOTrainer._compute_loss
                    themselves, bound to a stand-in trainer (one process, no gradient accumulation,
                    train mode). The "model" is a stub whose backbone returns the benchmark's hidden
                    states after a one-token prompt.
  naive             plain PyTorch: full fp32 logits [B, T, V] -> log_softmax -> gather -> the loss,
                    written as TRL's _compute_loss computes it (`trl_formula_loss`); autograd backward.
  compiled          torch.compile of that same function.

LM-head GEMM FLOPs of one fwd+bwd (`GEMM_FACTOR`, in units of N H V; 2 N H V per GEMM: logits, dH,
dW, and the logits again where the backward recomputes them):
  6  ours_single_pass (logits chunk -> gradient in the epilogue -> dH rows and dW, no recompute);
     naive and compiled (the logits are kept for the backward; Inductor does not recompute matmuls).
  8  ours_recompute; Liger 0.8.5 (each completion's forward runs _ChunkedSelectiveLogProbFunction,
     whose backward `_selective_logprob_backward` "Recomputes logits per chunk", called right away
     by torch.autograd.grad inside the forward: logits, recomputed logits, dH, dW); TRL 1.16
     (trl.kernels.ChunkedLogProbFunction: "The backward recomputes each tile").
N counts the token rows the GEMMs run over (`Impl.gemm_tokens`): ours on CPU skips padding rows;
Liger, naive, compiled and TRL without Triton compute every position of the padded [B, T].
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import math
import types
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from loss_impls import _import_error

Step = Callable[[], Tuple[Tensor, Optional[Tensor]]]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
PEER_PACKAGES = {"liger": "liger-kernel", "trl": "trl"}
# Liger 0.8.5's ppo_loss_fn raises ValueError for these loss types at sequence level.
LIGER_NO_SEQUENCE_LEVEL = ("cispo", "sapo")

# LM-head GEMM FLOPs per N H V of one forward+backward (module docstring; evidence in each builder).
GEMM_FACTOR = {"ours_single_pass": 6, "ours_recompute": 8, "liger": 8, "trl": 8, "naive": 6, "compiled": 6}


@dataclass(frozen=True)
class GRPOOptions:
    """The loss options every row gets (TRL GRPOConfig names; epsilon_low is TRL's `epsilon`)."""

    loss_type: str = "dapo"
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    use_bias_correction_kl: bool = True
    log_entropy: bool = False          # ours also computes per-token entropies (TRL's trainer always does)
    importance_sampling_level: str = "token"   # "sequence": GSPO


@dataclass
class GRPOInputs:
    """One shape's tensors. hidden [B, T, H] and weight [V, H] require grad."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor                 # [B, T] int64, ignore_index at padding
    advantages: Tensor             # [B] one per completion
    old_logps: Optional[Tensor]    # [B, T] fp32, 0 at padding (None: on-policy)
    ref_logps: Optional[Tensor]    # [B, T] fp32, 0 at padding
    options: GRPOOptions
    ignore_index: int = -100

    @property
    def mask(self) -> Tensor:
        return self.labels != self.ignore_index

    def tensors(self) -> Dict[str, Optional[Tensor]]:
        return {"hidden": self.hidden.detach(), "weight": self.weight.detach(), "labels": self.labels,
                "advantages": self.advantages, "old_logps": self.old_logps, "ref_logps": self.ref_logps}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, Optional[Tensor]], options: GRPOOptions) -> "GRPOInputs":
        return cls(hidden=tensors["hidden"].clone().requires_grad_(), weight=tensors["weight"].clone().requires_grad_(),
                   labels=tensors["labels"], advantages=tensors["advantages"], old_logps=tensors["old_logps"],
                   ref_logps=tensors["ref_logps"], options=options)


# --------------------------------------------------------------------------------------------------
# Inputs.


def clip_boundaries(options: GRPOOptions) -> Tuple[float, ...]:
    """Log-ratios where the loss's gradient jumps (clipping starts): rounding differences between
    implementations must not move a token across one."""
    if options.loss_type == "cispo":
        return (math.log(options.epsilon_high),) if options.epsilon_high > 0 else ()
    if options.loss_type == "sapo":
        return ()
    bounds = [math.log1p(options.epsilon_high)]
    if options.epsilon_low < 1.0:
        bounds.append(math.log1p(-options.epsilon_low))
    if options.delta is not None:
        bounds.append(math.log(options.delta))
    return tuple(bounds)


def current_logps(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                  rows: int = 1024) -> Tensor:
    """Per-token log-probs [B, T] (fp32, 0 at ignored tokens), in row chunks of plain PyTorch."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    out = torch.zeros(y.shape, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, h.shape[0], rows):
            logits = (h[start:start + rows].float() @ weight.detach().float().T).log_softmax(-1)
            out[start:start + rows] = logits.gather(-1, y[start:start + rows].clamp(min=0)[:, None])[:, 0]
    return torch.where(y != ignore_index, out, 0.0).view(labels.shape)


def make_grpo_inputs(B: int, T: int, H: int, V: int, options: GRPOOptions, seed: int = 0,
                     off_policy_std: float = 0.1, ref_std: float = 0.1, margin: float = 1e-3,
                     zero_advantages: float = 0.0, device: torch.device = torch.device("cpu")) -> GRPOInputs:
    """Seeded inputs drawn as bench_loss.make_inputs draws them (hidden ~ N(0, 1), logits ~ N(0, 1),
    up to T/8 padding tokens at the end of each completion), plus advantages [B] ~ N(0, 1), and
    old / reference per-token log-probs = the current ones minus N(0, std) perturbations (off-policy:
    ratios around 1, a few percent of the tokens clipped at eps = 0.2). The old log-ratios are kept
    `margin` away from the clip boundaries (`clip_boundaries`). The first round(zero_advantages * B)
    completions get advantage 0 (groups whose rewards all agree), after the same draws."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, device=device)
    weight = torch.randn(V, H, generator=gen, device=device) / math.sqrt(H)
    labels = torch.randint(0, V, (B, T), generator=gen, device=device)
    lengths = T - torch.randint(0, T // 8 + 1, (B,), generator=gen, device=device)
    labels[torch.arange(T, device=device)[None, :] >= lengths[:, None]] = -100
    advantages = torch.randn(B, generator=gen, device=device)
    advantages[:round(zero_advantages * B)] = 0.0
    d_old = torch.randn(B, T, generator=gen, device=device) * off_policy_std
    d_ref = torch.randn(B, T, generator=gen, device=device) * ref_std
    for b in clip_boundaries(options):
        near = (d_old - b).abs() < margin
        d_old = torch.where(near, b + margin * torch.where(d_old >= b, 1.0, -1.0), d_old)
    logps = current_logps(hidden, weight, labels)
    scored = labels != -100
    old = torch.where(scored, logps - d_old, 0.0)
    ref = torch.where(scored, logps - d_ref, 0.0) if options.beta != 0.0 else None
    return GRPOInputs(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), labels=labels,
                      advantages=advantages, old_logps=old, ref_logps=ref, options=options)


# --------------------------------------------------------------------------------------------------
# The loss as TRL 1.16's GRPOTrainer._compute_loss writes it (one process, no gradient accumulation):
# used by the naive and compiled rows.


def log_importance_weights(per_token_logps: Tensor, old: Tensor, mask: Tensor, level: str) -> Tensor:
    """TRL's log importance weights: token level, the per-token log-ratio [B, T]; sequence level
    (GSPO), each completion's masked mean log-ratio [B, 1], broadcast over its tokens by the loss."""
    log_ratio = per_token_logps - old
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"unknown importance sampling level {level!r}")


def trl_formula_loss(per_token_logps: Tensor, mask: Tensor, advantages: Tensor, old_per_token_logps: Optional[Tensor],
                     ref_per_token_logps: Optional[Tensor], options: GRPOOptions, max_completion_length: int) -> Tensor:
    mask = mask.to(per_token_logps.dtype)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    coef_1 = torch.exp(log_importance_weights(per_token_logps, old, mask, options.importance_sampling_level))
    if options.beta != 0.0:
        d = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(d) - d - 1
        if options.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if options.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=options.epsilon_high).detach() * advantages * per_token_logps
    elif options.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - options.epsilon_low, 1 + options.epsilon_high)
        if options.delta is not None:
            coef_1 = torch.clamp(coef_1, max=options.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif options.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, options.sapo_temperature_pos, options.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    else:
        raise ValueError(f"unknown loss type {options.loss_type!r}")
    if options.beta != 0.0:
        per_token_loss = per_token_loss + options.beta * per_token_kl
    if options.loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if options.loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if options.loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if options.loss_type in ("cispo", "dapo"):
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)     # num_items_in_batch = this batch's
    return (per_token_loss * mask).sum(-1).mean()                          # luspo


def naive_grpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, advantages: Tensor, old_logps: Optional[Tensor],
                    ref_logps: Optional[Tensor], options: GRPOOptions, ignore_index: int = -100):
    """Full logits -> log_softmax -> gather -> TRL's loss formula. -> (loss, per-token log-probs)."""
    logits = hidden.float() @ weight.float().T                                      # [B, T, V]
    mask = labels != ignore_index
    per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = torch.where(mask, per_token, 0.0)
    loss = trl_formula_loss(per_token, mask, advantages, old_logps, ref_logps, options, labels.shape[1])
    return loss, per_token.detach()


# --------------------------------------------------------------------------------------------------
# Builders.


def _build_ours(backward_mode: str):
    def build(inputs: GRPOInputs) -> Step:
        from mio_kernels import fused_grpo_loss

        o = inputs.options

        def step():
            out = fused_grpo_loss(inputs.hidden, inputs.weight, inputs.labels, advantages=inputs.advantages,
                                  old_logps=inputs.old_logps, ref_logps=inputs.ref_logps, loss_type=o.loss_type,
                                  epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high, delta=o.delta, beta=o.beta,
                                  use_bias_correction_kl=o.use_bias_correction_kl,
                                  sapo_temperature_pos=o.sapo_temperature_pos,
                                  sapo_temperature_neg=o.sapo_temperature_neg, log_entropy=o.log_entropy,
                                  importance_sampling_level=o.importance_sampling_level,
                                  ignore_index=inputs.ignore_index, backend="native", backward_mode=backward_mode)
            return out.loss, out.token_logps
        return step
    return build


def _build_naive(inputs: GRPOInputs) -> Step:
    def step():
        return naive_grpo_loss(inputs.hidden, inputs.weight, inputs.labels, inputs.advantages, inputs.old_logps,
                               inputs.ref_logps, inputs.options, inputs.ignore_index)
    return step


def _build_compiled(inputs: GRPOInputs) -> Step:
    compiled = torch.compile(naive_grpo_loss)

    def step():
        return compiled(inputs.hidden, inputs.weight, inputs.labels, inputs.advantages, inputs.old_logps,
                        inputs.ref_logps, inputs.options, inputs.ignore_index)
    return step


def _build_liger(inputs: GRPOInputs) -> Step:
    # liger_kernel/chunked_loss/grpo_loss.py, fused_linear_ppo.py (0.8.5): per chunk of `chunk_size`
    # completions, chunk_forward -> _ChunkedSelectiveLogProbFunction (logits streamed in 4096-column
    # chunks), the loss math (torch.compile'd), then torch.autograd.grad inside the forward, whose
    # backward recomputes the logits: 8 N H V. The gradients are stashed for the backward.
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    o = inputs.options
    module = LigerFusedLinearGRPOLoss(beta=o.beta, compiled=True, use_ref_model=o.beta != 0.0, chunk_size=1,
                                      epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high, loss_type=o.loss_type,
                                      max_completion_length=inputs.labels.shape[1],
                                      importance_sampling_level=o.importance_sampling_level,
                                      sapo_temperature_pos=o.sapo_temperature_pos,
                                      sapo_temperature_neg=o.sapo_temperature_neg, temperature=1.0, delta=o.delta,
                                      use_bias_correction_kl=o.use_bias_correction_kl)
    mask = inputs.mask.to(torch.int64)
    targets = inputs.labels.clamp(min=0)

    def step():
        loss, _metrics = module(inputs.hidden, inputs.weight, targets, mask, inputs.advantages,
                                ref_per_token_logps=inputs.ref_logps, old_per_token_logps=inputs.old_logps)
        return loss, None
    return step


class _StubConfig:
    """What add_fused_lm_head reads from a model config (no softcapping, no logit scale)."""

    model_type = "bench_stub"
    final_logit_softcapping = None
    logit_scale = None
    output_multiplier = None
    lm_head_multiplier = None
    logits_scaling = None
    output_router_logits = False

    def get_text_config(self):
        return self


class _StubCausalLM:
    """A causal LM whose backbone returns the benchmark's hidden states: input_ids = [1-token prompt,
    T completion tokens], and position p's hidden state predicts token p + 1, so the completion's T
    scored positions get hidden[:, 0..T-1]."""

    def __init__(self, hidden: Tensor, weight: Tensor):
        self.config = _StubConfig()
        self.training = True
        self._hidden = hidden
        self._head = types.SimpleNamespace(weight=weight, bias=None)
        self.base_model = self._backbone

    def _backbone(self, input_ids=None, attention_mask=None, **kwargs):
        tail = self._hidden.new_zeros(self._hidden.shape[0], 1, self._hidden.shape[2])
        return types.SimpleNamespace(last_hidden_state=torch.cat([self._hidden, tail], dim=1))

    def get_output_embeddings(self):
        return self._head

    def forward(self, *args, **kwargs):      # replaced by add_fused_lm_head
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class _StubAccelerator:
    num_processes = 1
    sync_gradients = True

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_trainer_stand_in(options: GRPOOptions, model: _StubCausalLM, max_completion_length: int):
    """The attributes GRPOTrainer._compute_loss and _get_per_token_logps_and_entropies read, with
    TRL's GRPOTrainer methods bound to it (one process, gradient accumulation 1, train mode)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    args = types.SimpleNamespace(delta=options.delta, use_bias_correction_kl=options.use_bias_correction_kl,
                                 sapo_temperature_pos=options.sapo_temperature_pos,
                                 sapo_temperature_neg=options.sapo_temperature_neg, steps_per_generation=1)
    trainer = types.SimpleNamespace(
        args=args, model=model, accelerator=_StubAccelerator(), loss_type=options.loss_type, beta=options.beta,
        epsilon_low=options.epsilon_low, epsilon_high=options.epsilon_high,
        importance_sampling_level=options.importance_sampling_level,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        use_adaptive_entropy=False, entropy_coef=0.0, current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    for name in ("_get_per_token_logps_and_entropies", "_compute_loss"):
        method = getattr(GRPOTrainer, name)
        # without TRL's profiling_decorator (a timer that logs to the trainer's state)
        setattr(trainer, name, types.MethodType(getattr(method, "__wrapped__", method), trainer))
    return trainer


def _build_trl(inputs: GRPOInputs) -> Step:
    # trl/trainer/utils.py add_fused_lm_head -> trl/kernels/chunked_logprob.py ChunkedLogProbFunction:
    # [4096-token x 32768-column] tiles of the logits folded into online-logsumexp statistics (and the
    # entropy); "The backward recomputes each tile, turns it into the logits gradient in place, and
    # accumulates the gradient GEMMs in fp32": 8 N H V.
    from trl.trainer.utils import add_fused_lm_head

    B, T = inputs.labels.shape
    model = _StubCausalLM(inputs.hidden, inputs.weight)
    add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs", "entropy"))
    trainer = _trl_trainer_stand_in(inputs.options, model, T)
    mask = inputs.mask
    batch = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long, device=mask.device),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long, device=mask.device),
        "completion_ids": inputs.labels.clamp(min=0),
        "completion_mask": mask.to(torch.long),
        "advantages": inputs.advantages,
        "num_items_in_batch": mask.sum().float(),
    }
    if inputs.old_logps is not None:
        batch["old_per_token_logps"] = inputs.old_logps
    if inputs.ref_logps is not None:
        batch["ref_per_token_logps"] = inputs.ref_logps

    def step():
        for metrics in trainer._metrics.values():     # GRPOTrainer.log clears them
            metrics.clear()
        return trainer._compute_loss(model, batch), None
    return step


_BUILDERS = {"ours_single_pass": _build_ours("single_pass"), "ours_recompute": _build_ours("recompute"),
             "liger": _build_liger, "trl": _build_trl, "naive": _build_naive, "compiled": _build_compiled}


# --------------------------------------------------------------------------------------------------
# Availability: a missing or unsuitable implementation is reported as skipped with the reason.


def peer_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(PEER_PACKAGES[name])
    except importlib.metadata.PackageNotFoundError:
        return None


def _ours_unavailable(inputs: GRPOInputs) -> Optional[str]:
    reason = _import_error("mio_kernels")
    if reason:
        return reason
    import mio_kernels
    if not hasattr(mio_kernels, "fused_grpo_loss"):
        return "this mio_kernels has no fused_grpo_loss"
    from mio_kernels.backends import unavailable_reason
    return unavailable_reason("native", inputs.hidden.device)


def _liger_unavailable(inputs: GRPOInputs) -> Optional[str]:
    if peer_version("liger") is None:
        return "liger-kernel not installed (pip install .[bench])"
    o = inputs.options
    if o.importance_sampling_level == "sequence" and o.loss_type in LIGER_NO_SEQUENCE_LEVEL:
        return f"Liger refuses loss_type={o.loss_type!r} at importance_sampling_level='sequence'"
    return _import_error("liger_kernel.chunked_loss")


def _trl_unavailable(inputs: GRPOInputs) -> Optional[str]:
    if peer_version("trl") is None:
        return "trl not installed (pip install .[trl])"
    return _import_error("trl.trainer.grpo_trainer")


_UNAVAILABLE = {"ours_single_pass": _ours_unavailable, "ours_recompute": _ours_unavailable,
                "liger": _liger_unavailable, "trl": _trl_unavailable}


@dataclass(frozen=True)
class Impl:
    name: str      # row key
    label: str     # human-readable, for tables

    def unavailable(self, inputs: GRPOInputs) -> Optional[str]:
        check = _UNAVAILABLE.get(self.name)
        return check(inputs) if check else None

    def build(self, inputs: GRPOInputs) -> Step:
        return _BUILDERS[self.name](inputs)

    def gemm_tokens(self, inputs: GRPOInputs) -> int:
        """The token rows this row's LM-head GEMMs run over: ours (native, CPU) skips the ignored
        (padding) rows; Liger, naive and compiled compute every position of [B, T]; TRL too on a
        device without Triton (its `compact` path, scored rows only, is for CUDA/XPU)."""
        if self.name in ("ours_single_pass", "ours_recompute") and inputs.hidden.device.type == "cpu":
            return int(inputs.mask.sum())
        if self.name == "trl" and inputs.hidden.device.type in ("cuda", "xpu"):
            return int(inputs.mask.sum())
        return inputs.labels.numel()

    def gemm_flop(self, inputs: GRPOInputs) -> float:
        """LM-head GEMM FLOPs of one fwd+bwd: GEMM_FACTOR * tokens * H * V (ours in recompute: the
        backward recomputes only rows with a non-zero gradient, i.e. every scored row once beta > 0)."""
        return float(GEMM_FACTOR[self.name]) * self.gemm_tokens(inputs) * inputs.weight.shape[1] * inputs.weight.shape[0]


IMPLS = (
    Impl("ours_single_pass", "ours, fused_grpo_loss native, backward_mode='single_pass'"),
    Impl("ours_recompute", "ours, fused_grpo_loss native, backward_mode='recompute'"),
    Impl("liger", "Liger LigerFusedLinearGRPOLoss"),
    Impl("trl", "TRL GRPOTrainer fused LM head + _compute_loss"),
    Impl("naive", "naive PyTorch (full logits)"),
    Impl("compiled", "torch.compile(naive)"),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)
OURS = IMPLS[0]
PEER_NAMES = ("liger", "trl", "naive", "compiled")


def impls_by_name() -> Dict[str, Impl]:
    return {impl.name: impl for impl in IMPLS}


def options_dict(options: GRPOOptions) -> dict:
    return asdict(options)
