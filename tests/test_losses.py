"""The loss layer: every registered loss's closed-form gradient against autograd, and the
identities the loss specification states (ln 4, nca_pair, TRL's sigmoid DPO)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mio_kernels.losses import LN4, LOSSES, dv_mi_estimate, get_loss, js_mi_estimate

ALL_LOSSES = sorted(LOSSES)


@pytest.mark.parametrize("loss_type", ALL_LOSSES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_closed_form_gradient_matches_autograd(loss_type, k):
    p = 5
    u_w = (3 * torch.randn(p, dtype=torch.float64)).requires_grad_()
    u_l = (3 * torch.randn(k, p, dtype=torch.float64)).requires_grad_()
    eps = 0.2 if get_loss(loss_type).uses_label_smoothing else 0.0
    out = get_loss(loss_type).fn(u_w, u_l, 0.7, eps)
    assert out.loss.shape == (p,) and out.grad_chosen.shape == (p,) and out.grad_rejected.shape == (k, p)
    g_w, g_l = torch.autograd.grad(out.loss.sum(), (u_w, u_l))
    torch.testing.assert_close(out.grad_chosen, g_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.grad_rejected, g_l, rtol=1e-12, atol=1e-12)


def test_mio_at_zero_rewards_is_ln4():
    zero = torch.zeros(3, dtype=torch.float64)
    out = get_loss("mio").fn(zero, zero[None], 0.1, 0.0)
    torch.testing.assert_close(out.loss, torch.full_like(zero, LN4))
    assert math.isclose(LN4, math.log(4.0))


def _nca_pair_as_trl_writes_it(chosen_rewards, rejected_rewards):
    return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards))


def test_mio_k1_equals_nca_pair():
    beta = 0.3
    u_w, u_l = 5 * torch.randn(8, dtype=torch.float64), 5 * torch.randn(8, dtype=torch.float64)
    ours = get_loss("mio").fn(u_w, u_l[None], beta, 0.0).loss
    torch.testing.assert_close(ours, _nca_pair_as_trl_writes_it(beta * u_w, beta * u_l))


def test_dpo_k1_equals_trl_sigmoid():
    beta = 0.1
    u_w, u_l = 20 * torch.randn(8, dtype=torch.float64), 20 * torch.randn(8, dtype=torch.float64)
    trl = -F.logsigmoid(beta * (u_w - u_l))  # TRL sigmoid loss, label_smoothing = 0
    torch.testing.assert_close(get_loss("dpo").fn(u_w, u_l[None], beta, 0.0).loss, trl)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_mio_chosen_gradient_vanishes_at_ln_k_plus_1(k):
    beta = 0.5
    u_w = torch.full((1,), math.log(k + 1) / beta, dtype=torch.float64)
    out = get_loss("mio").fn(u_w, torch.randn(k, 1, dtype=torch.float64), beta, 0.0)
    assert abs(out.grad_chosen.item()) < 1e-12
    assert (out.grad_rejected > 0).all()


def test_robust_without_smoothing_is_dpo():
    u_w, u_l = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(get_loss("robust").fn(u_w, u_l[None], 0.4, 0.0).loss,
                               get_loss("dpo").fn(u_w, u_l[None], 0.4, 0.0).loss)


def test_pairwise_losses_average_over_negatives():
    u_w = torch.randn(4, dtype=torch.float64)
    u_l = torch.randn(3, 4, dtype=torch.float64)
    fn = get_loss("hinge").fn
    per_pair = torch.stack([fn(u_w, u_l[i:i + 1], 2.0, 0.0).loss for i in range(3)])
    torch.testing.assert_close(fn(u_w, u_l, 2.0, 0.0).loss, per_pair.mean(0))


def test_unknown_loss_type_names_the_choices():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        get_loss("kto")


def test_mi_estimators_on_a_perfect_critic():
    # Scores = log density ratio of a discrete pair: DV recovers the MI; JS is bounded by it.
    pos = torch.full((1000,), math.log(2.0), dtype=torch.float64)
    neg = torch.cat([pos[:500], torch.full((500,), -60.0, dtype=torch.float64)])
    assert abs(dv_mi_estimate(pos, neg).item() - math.log(2.0)) < 1e-9
    assert js_mi_estimate(pos, neg).item() < math.log(2.0)
