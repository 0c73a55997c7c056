"""The implementations bench_loss.py compares, behind one small interface.

Each implementation turns the benchmark inputs into a `step` callable that runs the forward of the
preference loss and returns (loss scalar, policy sequence log-probs [S] or None); the harness calls
`loss.backward()` itself and reads hidden.grad / weight.grad.

What each one computes (all: sum of token log-probs per sequence, beta, mean over prompts):
  naive     mio_kernels.reference.reference_preference_loss (== fused_mio_loss(backend="reference")):
            full logits -> log_softmax -> gather -> sum -> loss, autograd for the backward.
  naive_dtype  the same written as TRL does it: the GEMM in the input dtype (our reference upcasts
            to fp32 first), log_softmax in fp32. Identical to naive for fp32 inputs; the default
            implementation list includes it only for bf16/fp16.
  compiled  torch.compile of that same function.
  liger     Liger-Kernel LigerFusedLinearDPOLoss, loss_type "sigmoid" (= dpo K=1) or "nca_pair"
            (= mio K=1), average_log_prob=False, compute_nll_loss=False, chunk_size=1 pair.
            Liger 0.8.5 takes no precomputed reference log-probs (only a reference model it re-runs
            per chunk), so it runs reference-free (use_ref_model=False): the same FLOPs and memory
            as a precomputed reference, which only shifts the log-ratios by a constant. Its check
            target is therefore ours with reference_free=True.
  trl       TRL's fused LM head (trl.kernels.ChunkedLogProbFunction, what DPOTrainer's fused head
            runs; its chunk width), per-token log-probs reduced and fed to the op's own objective;
            on CPU it folds tiles with torch ops, as TRL does without Triton.
  cce       Apple Cut Cross-Entropy linear_cross_entropy(..., reduction="none") per-token losses,
            reduced and fed to the op's own objective (mio_kernels.objective). impl="cce"
            (Triton) on CUDA, impl="torch_compile" elsewhere.
  <backend> ours: fused_mio_loss(backend=<backend>) for each available kernel backend.
  native_single_pass / native_recompute
            ours on the native backend with backward_mode forced: the gradient formed in the forward
            (6 N H V GEMM FLOPs) or recomputed in the backward (8 N H V).
LM-head GEMM FLOPs each row actually does: `gemm_flop`.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

Step = Callable[[], Tuple[Tensor, Optional[Tensor]]]

LIGER_LOSS_TYPE = {"dpo": "sigmoid", "mio": "nca_pair"}
PEER_PACKAGES = {"liger": "liger-kernel", "cce": "cut-cross-entropy", "trl": "trl"}


@dataclass
class Inputs:
    """One benchmark shape's tensors. hidden [S, T, H] and weight [V, H] require grad."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor        # [S, T] int64, ignore_index at padding
    ref_logps: Tensor     # [S] precomputed reference sequence log-probs (fp32)
    num_prompts: int      # P; S = P * (1 + K)
    num_negatives: int    # K
    beta: float
    ignore_index: int = -100


@dataclass(frozen=True)
class Impl:
    name: str               # row key: naive, compiled, liger, cce, or a kernel backend name
    label: str              # human-readable, for tables and plots
    target: str = "ref"     # which check target it must match: "ref" (precomputed) or "free"

    def unavailable(self, device: torch.device, loss_type: str, num_negatives: int) -> Optional[str]:
        if self.name in _UNAVAILABLE:
            return _UNAVAILABLE[self.name](device, loss_type, num_negatives)
        from mio_kernels.backends import unavailable_reason   # ours: a kernel backend
        return unavailable_reason(self.name, device)

    def build(self, inputs: Inputs, loss_type: str) -> Step:
        return _BUILDERS.get(self.name, _build_ours(self.name))(inputs, loss_type)


def peer_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(PEER_PACKAGES[name])
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# Builders.


def _loss_options(inputs: Inputs, loss_type: str) -> dict:
    return dict(loss_type=loss_type, beta=inputs.beta, num_negatives=inputs.num_negatives,
                ignore_index=inputs.ignore_index)


def _build_naive(inputs: Inputs, loss_type: str) -> Step:
    from mio_kernels.reference import reference_preference_loss

    opts = _loss_options(inputs, loss_type)

    def step():
        out = reference_preference_loss(inputs.hidden, inputs.weight, inputs.labels, ref_logps=inputs.ref_logps,
                                        **opts)
        return out.loss, out.policy_logps
    return step


def _build_compiled(inputs: Inputs, loss_type: str) -> Step:
    from mio_kernels.reference import reference_preference_loss

    compiled = torch.compile(reference_preference_loss)
    opts = _loss_options(inputs, loss_type)

    def step():
        out = compiled(inputs.hidden, inputs.weight, inputs.labels, ref_logps=inputs.ref_logps, **opts)
        return out.loss, out.policy_logps
    return step


def _build_ours(backend: str, backward_mode: str = "auto"):
    def build(inputs: Inputs, loss_type: str, reference_free: bool = False) -> Step:
        from mio_kernels import fused_mio_loss

        opts = _loss_options(inputs, loss_type)
        ref = dict(reference_free=True) if reference_free else dict(ref_logps=inputs.ref_logps)

        def step():
            out = fused_mio_loss(inputs.hidden, inputs.weight, inputs.labels, backend=backend,
                                 backward_mode=backward_mode, **ref, **opts)
            return out.loss, out.policy_logps
        return step
    return build


def build_reference_free(backend: str, inputs: Inputs, loss_type: str) -> Step:
    """Ours with reference_free=True: the check target of the reference-free peers (Liger)."""
    if backend == "naive":
        from mio_kernels.reference import reference_preference_loss

        opts = _loss_options(inputs, loss_type)

        def step():
            out = reference_preference_loss(inputs.hidden, inputs.weight, inputs.labels, reference_free=True, **opts)
            return out.loss, out.policy_logps
        return step
    return _build_ours(backend)(inputs, loss_type, reference_free=True)


def _loss_from_token_logps(inputs: Inputs, loss_type: str, token_logps: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-token log-probs [S, T] (0 at ignored tokens) -> (loss, sequence log-probs [S]), through the
    op's own sequence reduction and objective (row layout and loss formula written once, there)."""
    from mio_kernels.objective import PreferenceConfig, preference_objective
    from mio_kernels.sequence import reduce_sequences

    cfg = PreferenceConfig(**_loss_options(inputs, loss_type))
    policy = reduce_sequences(token_logps, inputs.labels, inputs.ignore_index, cfg.length_normalized)
    loss = preference_objective(policy, inputs.ref_logps, cfg).loss
    return loss.float(), policy.logps.detach().float()


def _build_naive_dtype(inputs: Inputs, loss_type: str) -> Step:
    """TRL's way: the lm_head GEMM in the input dtype, then log_softmax in fp32 over full logits."""
    scored = inputs.labels != inputs.ignore_index
    safe_labels = torch.where(scored, inputs.labels, 0)

    def step():
        log_probs = torch.log_softmax((inputs.hidden @ inputs.weight.T).float(), dim=-1)
        token_logps = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) * scored
        return _loss_from_token_logps(inputs, loss_type, token_logps)
    return step


def _build_liger(inputs: Inputs, loss_type: str) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(ignore_index=inputs.ignore_index, beta=inputs.beta, compute_nll_loss=False,
                                     compiled=True, use_ref_model=False, average_log_prob=False, chunk_size=1,
                                     loss_type=LIGER_LOSS_TYPE[loss_type])

    def step():
        loss, aux = module(inputs.weight, inputs.hidden, inputs.labels)
        return loss, torch.cat([aux[0], aux[1]]).detach()   # chosen logps [P], rejected logps [P]
    return step


def _build_cce(inputs: Inputs, loss_type: str) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if inputs.hidden.is_cuda else "torch_compile"

    def step():
        nll = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, ignore_index=inputs.ignore_index,
                                   reduction="none", impl=impl)           # [S, T], 0 at ignored tokens
        return _loss_from_token_logps(inputs, loss_type, -nll.float())
    return step


def _build_trl(inputs: Inputs, loss_type: str) -> Step:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    scored = inputs.labels != inputs.ignore_index
    flat_labels = torch.where(scored, inputs.labels, 0).reshape(-1)

    def step():
        hidden = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])
        logps = ChunkedLogProbFunction.apply(hidden, inputs.weight, None, flat_labels, 1.0,
                                             _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
        return _loss_from_token_logps(inputs, loss_type, logps.view(scored.shape) * scored)
    return step


# ours with the backward mode forced: name -> (backend, backward_mode, GEMM FLOPs per N H V)
BACKWARD_MODE_IMPLS = {"native_single_pass": ("native", "single_pass", 6), "native_recompute": ("native", "recompute", 8)}

_BUILDERS = {"naive": _build_naive, "naive_dtype": _build_naive_dtype, "compiled": _build_compiled,
             "liger": _build_liger, "cce": _build_cce, "trl": _build_trl,
             **{name: _build_ours(backend, mode) for name, (backend, mode, _) in BACKWARD_MODE_IMPLS.items()}}


# LM-head GEMM FLOPs of one fwd+bwd, in units of N H V (2 per GEMM: logits, dH, dW, and the logits
# again where the backward recomputes them). 6: the logits (or the gradient) formed once — naive and
# compiled keep the logits; Liger forms each pair's gradient in its forward (torch.func.grad_and_value
# per chunk, a pair's logits held); CCE's CPU fallback (impl="torch_compile") keeps them. 8: the
# backward recomputes them — TRL's head, CCE's CUDA kernel (less the blocks its gradient filter skips).
PEER_GEMM_FACTOR = {"naive": 6, "naive_dtype": 6, "compiled": 6, "liger": 6, "trl": 8}


def gemm_flop(name: str, inputs: Inputs, loss_type: str) -> float:
    """The LM-head GEMM FLOPs one fwd+bwd step of `name` does on these inputs (ours with
    backward_mode="auto": what it resolves to for them)."""
    n, h, v = inputs.labels.numel(), inputs.weight.shape[1], inputs.weight.shape[0]
    if name in BACKWARD_MODE_IMPLS:
        factor = BACKWARD_MODE_IMPLS[name][2]
    elif name == "cce":
        factor = 8 if inputs.hidden.is_cuda else 6
    elif name in PEER_GEMM_FACTOR:
        factor = PEER_GEMM_FACTOR[name]
    else:
        from mio_kernels.objective import PreferenceConfig
        from mio_kernels.single_pass import resolve_backward_mode
        cfg = PreferenceConfig(**_loss_options(inputs, loss_type))
        mode = resolve_backward_mode("auto", name, cfg, inputs.hidden, inputs.weight, inputs.labels, None)
        factor = 6 if mode == "single_pass" else 8
    return float(factor) * n * h * v


# --------------------------------------------------------------------------------------------------
# Availability: a missing or unsuitable peer is reported as skipped with the reason, never faked.


def _liger_unavailable(device, loss_type, num_negatives):
    if peer_version("liger") is None:
        return "liger-kernel not installed (pip install .[bench])"
    if loss_type not in LIGER_LOSS_TYPE:
        return f"Liger has no loss_type for {loss_type!r}"
    if num_negatives != 1:
        return "Liger's DPO loss takes one rejected response per prompt (K=1)"
    return _import_error("liger_kernel.chunked_loss")


def _cce_unavailable(device, loss_type, num_negatives):
    if peer_version("cce") is None:
        return "cut-cross-entropy not installed (pip install .[bench])"
    return _import_error("cut_cross_entropy")


def _trl_unavailable(device, loss_type, num_negatives):
    if peer_version("trl") is None:
        return "trl not installed (pip install .[trl])"
    return _import_error("trl.kernels")


def _always_available(device, loss_type, num_negatives):
    return None


def _native_unavailable(device, loss_type, num_negatives):
    from mio_kernels.backends import unavailable_reason
    return unavailable_reason("native", device)


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as err:  # a broken optional peer is skipped, whatever the reason
        return f"import {module} failed: {first_line(err)}"
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


_UNAVAILABLE = {"liger": _liger_unavailable, "cce": _cce_unavailable, "trl": _trl_unavailable,
                "naive": _always_available,
                "naive_dtype": _always_available, "compiled": _always_available,
                **{name: _native_unavailable for name in BACKWARD_MODE_IMPLS}}

PEERS = (
    Impl("naive", "naive PyTorch (ours, reference backend)"),
    Impl("naive_dtype", "naive, GEMM in the input dtype (TRL-style)"),
    Impl("compiled", "torch.compile(naive)"),
    Impl("liger", "Liger LigerFusedLinearDPOLoss (ref-free)", target="free"),
    Impl("trl", "TRL fused LM head (ChunkedLogProbFunction) + loss"),
    Impl("cce", "Cut Cross-Entropy + loss"),
    Impl("native_single_pass", "ours, native, backward_mode='single_pass' (6NHV)"),
    Impl("native_recompute", "ours, native, backward_mode='recompute' (8NHV)"),
)


def ours_impl(backend: str) -> Impl:
    return Impl(backend, f"ours, fused_mio_loss(backend={backend!r})")
