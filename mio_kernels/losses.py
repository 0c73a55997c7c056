"""Preference losses as pure functions of per-sequence log-ratios, each with its closed-form gradient.

Every formula of the project's loss specification is written here once. A loss takes

    u_chosen   [P]     log-ratio u(w) = l(w) - l_ref(w) of each prompt's chosen response
    u_rejected [K, P]  log-ratios of its K rejected responses
    beta > 0, label_smoothing in [0, 1/2)

and returns a `PerPromptLoss`: the loss of each prompt [P] (built from differentiable torch ops, so
autograd can check the closed forms) and dloss/du for the chosen [P] and rejected [K, P] inputs.
The fused op only needs these gradients: it never differentiates through this module.

Adding a loss = one function + one `register_loss` line + one row in tests/test_losses.py (and its
`coupling` checked by tests/test_single_pass.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PerPromptLoss(NamedTuple):
    loss: Tensor           # [P]
    grad_chosen: Tensor    # [P]     dloss[p] / du_chosen[p]
    grad_rejected: Tensor  # [K, P]  dloss[p] / du_rejected[k, p]


LossFn = Callable[[Tensor, Tensor, float, float], PerPromptLoss]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    pairwise: bool             # defined on one (w, l) pair; K > 1 averages over the K pairs
    length_normalized: bool    # always uses per-token averaged log-probs (IPO)
    uses_label_smoothing: bool = False
    # How dloss/du couples the sequences (what the single-pass backward can exploit):
    #   "separable":  dloss/du_s depends on u_s alone, for any K;
    #   "difference": K = 1: dloss/du_w = -dloss/du_l, a function of (u_w, u_l);
    #                 K > 1: couples the 1 + K sequences of a prompt;
    #   "coupled":    dloss/du of a prompt's 1 + K sequences depends on all of them (the safe default).
    coupling: str = "coupled"


LOSSES: Dict[str, LossSpec] = {}


COUPLINGS = ("separable", "difference", "coupled")


def register_loss(name: str, fn: LossFn, *, pairwise: bool, coupling: str = "coupled", length_normalized: bool = False,
                  uses_label_smoothing: bool = False) -> None:
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    LOSSES[name] = LossSpec(fn, pairwise, length_normalized, uses_label_smoothing, coupling)


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x). F.softplus's default threshold (x for x > 20) is off by e^-20 ~ 2e-9, in value
    and in autograd's gradient (the reference backend's), which fp64 sees; e^-40 is below fp64's eps."""
    return F.softplus(x, threshold=40.0)


# ---------------------------------------------------------------------------------------------
# The two MI losses, defined for any K.


def dpo_loss(u_chosen: Tensor, u_rejected: Tensor, beta: float, label_smoothing: float = 0.0) -> PerPromptLoss:
    """DV / InfoNCE form: L = logsumexp(r_w, r_1..r_K) - r_w, r = beta*u. K=1: -log sigmoid(r_w - r_l)."""
    rewards = beta * torch.cat([u_chosen[None], u_rejected], dim=0)          # [K+1, P]
    # = log(1 + sum_k e^(r_k - r_w)), written as softplus(logsumexp_k(r_k - r_w)) so that a tiny
    # loss keeps its relative precision (log of 1 + tiny would not).
    loss = _softplus(torch.logsumexp(rewards[1:] - rewards[0], dim=0))
    weights = torch.softmax(rewards, dim=0)[1:]             # dL/dr_k = softmax_k for each negative,
    return PerPromptLoss(loss, -beta * weights.sum(0), beta * weights)  # dL/dr_w = softmax_w - 1 = -sum_k softmax_k


def mio_loss(u_chosen: Tensor, u_rejected: Tensor, beta: float, label_smoothing: float = 0.0) -> PerPromptLoss:
    """JS form: L = sp(-r_w) + (sp(r_w) + sum_k sp(r_k)) / (K+1). K=1 is nca_pair."""
    k_plus_1 = u_rejected.shape[0] + 1
    r_w, r_l = beta * u_chosen, beta * u_rejected
    loss = _softplus(-r_w) + (_softplus(r_w) + _softplus(r_l).sum(0)) / k_plus_1
    # Chosen gradient vanishes at r_w = ln(K+1): pulled up, then held, never pushed down.
    grad_w = -torch.sigmoid(-r_w) + torch.sigmoid(r_w) / k_plus_1
    grad_l = torch.sigmoid(r_l) / k_plus_1
    return PerPromptLoss(loss, beta * grad_w, beta * grad_l)


# ---------------------------------------------------------------------------------------------
# The pairwise family: each is a loss of one (u_w, u_l) pair, broadcast over the K negatives and
# averaged over them by `_average_over_pairs`.


class PairLoss(NamedTuple):
    loss: Tensor     # [K, P]
    grad_w: Tensor   # [K, P]  d pair_loss / du_w
    grad_l: Tensor   # [K, P]  d pair_loss / du_l


def _average_over_pairs(pair_fn: Callable[[Tensor, Tensor, float, float], PairLoss]) -> LossFn:
    def loss_fn(u_chosen: Tensor, u_rejected: Tensor, beta: float, label_smoothing: float = 0.0) -> PerPromptLoss:
        k = u_rejected.shape[0]
        pair = pair_fn(u_chosen.expand_as(u_rejected), u_rejected, beta, label_smoothing)
        return PerPromptLoss(pair.loss.mean(0), pair.grad_w.mean(0), pair.grad_l / k)

    loss_fn.__name__ = pair_fn.__name__
    loss_fn.__doc__ = pair_fn.__doc__
    return loss_fn


def ipo_pair(u_w: Tensor, u_l: Tensor, beta: float, label_smoothing: float) -> PairLoss:
    """(u_w - u_l - 1/(2 beta))^2 on per-token averaged log-ratios."""
    gap = u_w - u_l - 1.0 / (2.0 * beta)
    return PairLoss(gap.square(), 2.0 * gap, -2.0 * gap)


def hinge_pair(u_w: Tensor, u_l: Tensor, beta: float, label_smoothing: float) -> PairLoss:
    """relu(1 - beta * (u_w - u_l))."""
    slack = 1.0 - beta * (u_w - u_l)
    active = (slack > 0).to(slack.dtype)
    return PairLoss(torch.relu(slack), -beta * active, beta * active)


def robust_pair(u_w: Tensor, u_l: Tensor, beta: float, label_smoothing: float) -> PairLoss:
    """[-(1-eps) log sig(beta d) + eps log sig(-beta d)] / (1 - 2 eps), d = u_w - u_l."""
    eps = label_smoothing
    z = beta * (u_w - u_l)
    loss = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    grad = beta * (-(1.0 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)) / (1.0 - 2.0 * eps)
    return PairLoss(loss, grad, -grad)


def bco_pair(u_w: Tensor, u_l: Tensor, beta: float, label_smoothing: float) -> PairLoss:
    """-log sig(beta u_w) - log sig(-beta u_l)."""
    zw, zl = beta * u_w, beta * u_l
    loss = _softplus(-zw) + _softplus(zl)
    return PairLoss(loss, -beta * torch.sigmoid(-zw), beta * torch.sigmoid(zl))


def sppo_hard_pair(u_w: Tensor, u_l: Tensor, beta: float, label_smoothing: float) -> PairLoss:
    """(u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2."""
    gw, gl = u_w - 0.5 / beta, u_l + 0.5 / beta
    return PairLoss(gw.square() + gl.square(), 2.0 * gw, 2.0 * gl)


class _Sigmoid(torch.autograd.Function):
    """sigmoid whose autograd derivative is sigmoid(z) * sigmoid(-z): the plain s * (1 - s) is 0 once s
    rounds to 1 (|z| > 37 in fp64), where the true one is e^-|z| (the reference backend
    differentiates the loss values)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return torch.sigmoid(z)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        return grad * torch.sigmoid(z) * torch.sigmoid(-z)


def apo_zero_pair(u_w: Tensor, u_l: Tensor, beta: float, label_smoothing: float) -> PairLoss:
    """(1 - sig(beta u_w)) + sig(beta u_l); 1 - sig(z) taken as sig(-z), exact where sig(z) -> 1."""
    zw, zl = beta * u_w, beta * u_l
    sw, sl, not_w = _Sigmoid.apply(zw), _Sigmoid.apply(zl), _Sigmoid.apply(-zw)
    return PairLoss(not_w + sl, -beta * sw * not_w, beta * sl * torch.sigmoid(-zl))


register_loss("mio", mio_loss, pairwise=False, coupling="separable")
DEFAULT_LOSS = "mio"  # the JS bound of the MIO paper
register_loss("dpo", dpo_loss, pairwise=False, coupling="difference")
register_loss("ipo", _average_over_pairs(ipo_pair), pairwise=True, coupling="difference", length_normalized=True)
register_loss("hinge", _average_over_pairs(hinge_pair), pairwise=True, coupling="difference")
register_loss("robust", _average_over_pairs(robust_pair), pairwise=True, coupling="difference",
              uses_label_smoothing=True)
register_loss("bco_pair", _average_over_pairs(bco_pair), pairwise=True, coupling="separable")
register_loss("sppo_hard", _average_over_pairs(sppo_hard_pair), pairwise=True, coupling="separable")
register_loss("apo_zero", _average_over_pairs(apo_zero_pair), pairwise=True, coupling="separable")

# TRL's (and Liger's) names of two of them
TRL_LOSS_ALIASES = {"sigmoid": "dpo", "nca_pair": "mio"}

LN4 = 2.0 * math.log(2.0)  # mio at zero rewards, K = 1


# ---------------------------------------------------------------------------------------------
# MI estimators on critic scores (for the Gaussian MI reproduction). Same DV / JS forms as above.


def dv_mi_estimate(scores_pos: Tensor, scores_neg: Tensor) -> Tensor:
    """Donsker-Varadhan / MINE: mean T_pos - log mean exp(T_neg). Differentiable."""
    return scores_pos.mean() - (torch.logsumexp(scores_neg.flatten(), 0) - math.log(scores_neg.numel()))


def js_mi_estimate(scores_pos: Tensor, scores_neg: Tensor) -> Tensor:
    """Jensen-Shannon bound: mean(-sp(-T_pos)) - mean(sp(T_neg)). Differentiable."""
    return (-F.softplus(-scores_pos)).mean() - F.softplus(scores_neg).mean()
