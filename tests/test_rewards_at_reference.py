"""A policy equal to its reference has rewards of exactly 0 (and reward accuracy 0) on every path:
the op (every backend and backward mode, padded and packed, sums and length-normalised, reference
sums cached in fp32 or fp64) and the trainer's first preference step (each --reference mode).
The TRL trainer's first step: tests/test_trl.py."""
import json

import pytest
import torch

from mio_kernels import fused_mio_loss, linear_logprobs
from mio_kernels.train.cli import main

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def batch(seed=0, s=8, t=20, h=16, v=300):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(s, t, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(v, (s, t), generator=g)
    labels[:, :5] = -100
    return hidden, weight, labels


def own_sums(hidden, weight, labels, backend):
    """The policy's own sequence log-prob sums, as a caller caches them for ref_logps."""
    return linear_logprobs(hidden, weight, labels, backend=backend).double().sum(-1)


@pytest.mark.parametrize("backend, mode", [("reference", "auto"), ("native", "single_pass"), ("native", "recompute")])
@pytest.mark.parametrize("loss_type", ["mio", "dpo", "ipo"])
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.float64])
def test_op_rewards_exactly_zero_at_the_reference(backend, mode, loss_type, ref_dtype):
    hidden, weight, labels = batch()
    ref = own_sums(hidden, weight, labels, backend).to(ref_dtype)
    out = fused_mio_loss(hidden, weight, labels, ref_logps=ref, loss_type=loss_type, num_negatives=3,
                         beta=0.5, backend=backend, backward_mode=mode)
    for name in REWARDS:
        assert out.metrics[name].item() == 0.0, (name, out.metrics[name].item())
    # the exact 0 is the value only: the gradient at the reference is the float64 reference's
    leaf = weight.clone().requires_grad_()
    fused_mio_loss(hidden, leaf, labels, ref_logps=ref, loss_type=loss_type, num_negatives=3, beta=0.5,
                   backend=backend, backward_mode=mode).loss.backward()
    exact = weight.double().requires_grad_()
    fused_mio_loss(hidden.double(), exact, labels, ref_logps=ref.double(), loss_type=loss_type, num_negatives=3,
                   beta=0.5, backend="reference").loss.backward()
    assert exact.grad.norm() > 0
    assert ((leaf.grad.double() - exact.grad).norm() / exact.grad.norm()).item() <= 1e-5
    # the op's own returned sums passed back as the reference: the same
    again = fused_mio_loss(hidden, weight, labels, ref_logps=out.policy_sums, loss_type=loss_type,
                           num_negatives=3, beta=0.5, backend=backend, backward_mode=mode)
    assert [again.metrics[n].item() for n in REWARDS] == [0.0] * 4


def test_op_packed_rewards_exactly_zero_at_the_reference():
    hidden, weight, labels = batch(1)
    lengths = torch.tensor([20, 7, 13, 20, 3, 20, 9, 11])
    keep = torch.arange(20)[None] < lengths[:, None]
    packed_h, packed_y = hidden[keep], labels[keep]
    cu = torch.zeros(9, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ref = torch.stack([linear_logprobs(packed_h, weight, packed_y)[a:b].double().sum()
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]).float()
    out = fused_mio_loss(packed_h, weight, packed_y, cu_seqlens=cu, ref_logps=ref, num_negatives=3, beta=0.5)
    assert [out.metrics[n].item() for n in REWARDS] == [0.0] * 4


def test_a_real_difference_is_kept():
    """Only a sum that rounds to the reference's own value counts as equal: a change of the policy
    above the reference's precision still gives a nonzero reward."""
    hidden, weight, labels = batch(2)
    ref = own_sums(hidden, weight, labels, "reference").float()
    ref[0] -= 1e-3
    out = fused_mio_loss(hidden, weight, labels, ref_logps=ref, num_negatives=3, beta=0.5, backend="reference")
    assert out.metrics["rewards/chosen"].item() > 0


TINY = ["--tiny-hidden-size", "16", "--tiny-layers", "2", "--tiny-heads", "2", "--tiny-intermediate-size", "32",
        "--max-train-examples", "32", "--no-eval", "--no-progress", "--no-plot", "--no-save-final", "--threads", "1",
        "--batch-size", "8", "--micro-batch-size", "4", "--sft-batch-size", "4", "--sft-micro-batch-size", "4"]


@pytest.mark.parametrize("extra", [[], ["--no-padding-free"], ["--reference", "online"]],
                         ids=["precompute-packed", "precompute-padded", "online"])
def test_trainer_first_step_rewards_exactly_zero(tmp_path, capsys, extra):
    assert main(["--output-dir", str(tmp_path), "--name", "r", *TINY, "--sft-steps", "3", "--steps", "1",
                 *extra]) == 0
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert first["phase"] == "pref" and first["step"] == 1
    assert [first[n] for n in REWARDS] == [0.0] * 4
