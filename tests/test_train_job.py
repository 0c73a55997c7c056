"""The trainer in one process: the default job's first steps end to end, loss scaling under
gradient accumulation, reference modes, activation checkpointing, the config front end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mio_kernels.train.config import TrainConfig, parse_args
from mio_kernels.train.trainer import Trainer, lr_at

TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens/s")
TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-heads", "2", "--tiny-intermediate-size", "64",
        "--max-train-examples", "32", "--no-eval", "--no-progress", "--threads", "1"]


def test_default_job_first_steps(tmp_path):
    """The default job (model, data, SFT -> MIO -> eval) with small step counts."""
    from mio_kernels.train.cli import main

    main(["--output-dir", str(tmp_path), "--sft-steps", "3", "--steps", "3", "--max-train-examples", "64",
          "--max-eval-examples", "12", "--max-new-tokens", "12", "--no-progress"])
    run = tmp_path / "default"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("sft", 3),
                                                      ("pref", 1), ("pref", 2), ("pref", 3)]
    for r in rows[3:]:
        assert set(TRL_NAMES) <= r.keys() and all(math.isfinite(r[k]) for k in TRL_NAMES)
    assert rows[3]["loss"] == pytest.approx(math.log(4), abs=1e-5)  # MIO at the reference: ln 4
    assert rows[3]["rewards/chosen"] == pytest.approx(0, abs=1e-5)  # batching differs by rounding only
    summary = json.loads((run / "summary.json").read_text())
    for when in ("eval_before", "eval_after"):
        assert {"exact_match", "rewards/accuracies", "logps/accuracies"} <= summary[when].keys()
    assert (run / "rewards.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size


def grads(trainer, phase, step=0):
    trainer.model.zero_grad(set_to_none=True)
    stats = trainer.forward_backward(trainer.phases[phase], trainer.step_indices(trainer.phases[phase], step))
    return {k: v.item() for k, v in stats.items()}, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def make(tmp_path, *extra):
    # padded: the micro-batch sizes below are the padded path's (padding-free: tests/test_train_packed.py)
    t = Trainer(parse_args(TINY + ["--output-dir", str(tmp_path), "--batch-size", "8", "--micro-batch-size", "8",
                                   "--sft-batch-size", "8", "--sft-micro-batch-size", "8", "--no-padding-free",
                                   *extra]))
    t.compute_reference()
    return t


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make(tmp_path_factory.mktemp("acc"))


@pytest.mark.parametrize("phase", ["sft", "pref"])
def test_accumulation_equals_one_big_batch(trainer, phase):
    """Micro-batches of 3, 3, 2 prompts (unequal token counts) give the one-batch loss and grads
    (to fp32 rounding, amplified by different padding widths: atol = 1e-5 * max|g|; an unscaled
    accumulation would be off by ~1/3)."""
    spec = trainer.phases[phase]
    stats_big, g_big = grads(trainer, phase)
    spec.micro_batch_size = 3
    try:
        stats_acc, g_acc = grads(trainer, phase)
    finally:
        spec.micro_batch_size = 8
    assert stats_acc["loss"] == pytest.approx(stats_big["loss"], rel=1e-6)
    for name in g_big:
        atol = 1e-5 * g_big[name].abs().max().item()
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-5, atol=atol, msg=name)


def test_reference_modes_agree(trainer, tmp_path):
    """Online frozen copy == precomputed log-probs; at the reference MIO's loss is ln 4 (any K)."""
    stats_pre, g_pre = grads(trainer, "pref")
    online = make(tmp_path, "--reference", "online")
    stats_on, g_on = grads(online, "pref")
    assert stats_pre["loss"] == pytest.approx(math.log(4), abs=1e-6)
    assert stats_on["loss"] == pytest.approx(stats_pre["loss"], abs=1e-6)
    for name in g_pre:
        torch.testing.assert_close(g_on[name], g_pre[name], rtol=1e-4, atol=1e-6, msg=name)
    free = make(tmp_path, "--reference", "none", "--loss-type", "dpo")
    stats_free, _ = grads(free, "pref")
    assert math.isfinite(stats_free["loss"]) and stats_free["rewards/chosen"] != 0


def test_activation_checkpointing_same_grads(trainer, tmp_path):
    _, g = grads(trainer, "pref")
    ac = make(tmp_path, "--activation-checkpointing")
    on = lambda lm: (lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing")
                     else lm.is_gradient_checkpointing)
    assert on(ac.lm) and not on(trainer.lm)
    _, g_ac = grads(ac, "pref")
    for name in g:
        torch.testing.assert_close(g_ac[name], g[name], rtol=1e-5, atol=1e-5 * g[name].abs().max().item(), msg=name)


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_at(55, 1.0, 10, 100, 0.1) < 1.0


def test_config_file_and_flags(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("loss_type: dpo\nbeta: 0.5\nmax-length: 64\nmax_prompt_length: 48\n")
    cfg = parse_args(["--config", str(yml), "--beta", "0.2", "--no-eval", "--num-negatives", "2"])
    assert (cfg.loss_type, cfg.beta, cfg.max_length, cfg.eval, cfg.num_negatives) == ("dpo", 0.2, 64, False, 2)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"steps": 7, "tokenizer": None}))
    assert parse_args(["--config", str(js)]).steps == 7
    js.write_text(json.dumps({"stepz": 7}))
    with pytest.raises(ValueError, match="unknown option 'stepz'"):
        parse_args(["--config", str(js)])
    with pytest.raises(ValueError, match="--loss-type"):
        parse_args(["--loss-type", "nope"])
    assert TrainConfig().resolved_sft_steps() > 0 and TrainConfig(model="some/model").resolved_sft_steps() == 0


def test_registered_loss_reaches_the_cli():
    """The CLI reads the loss types from the registry: a loss added with register_loss is accepted."""
    from mio_kernels.losses import LOSSES, mio_loss, register_loss
    from mio_kernels.train.config import build_parser

    register_loss("test_only_loss", mio_loss, pairwise=False)
    try:
        cfg = parse_args(["--loss-type", "test_only_loss", "--beta", "0.3", "--sft-weight", "0.5"])
        assert "test_only_loss" in build_parser().format_help()
        pcfg = cfg.preference_config(3)
        assert (pcfg.loss_type, pcfg.beta, pcfg.num_negatives, pcfg.sft_weight) == ("test_only_loss", 0.3, 3, 0.5)
    finally:
        del LOSSES["test_only_loss"]
    with pytest.raises(ValueError, match="--loss-type"):
        parse_args(["--loss-type", "test_only_loss"])


def test_eval_metrics_are_the_objectives():
    """Held-out metrics come from the op's objective; checked here against the definitions."""
    from mio_kernels.objective import PreferenceConfig
    from mio_kernels.train.evaluate import preference_metrics

    logps, ref = -10 * torch.rand(7, 3, dtype=torch.float64), -10 * torch.rand(7, 3, dtype=torch.float64)
    got = preference_metrics(logps, ref, PreferenceConfig(beta=0.5, num_negatives=2))
    r = 0.5 * (logps - ref)
    want = {"rewards/chosen": r[:, 0].mean(), "rewards/rejected": r[:, 1:].mean(),
            "rewards/margins": (r[:, 0] - r[:, 1:].mean(1)).mean(),
            "rewards/accuracies": (r[:, 0] > r[:, 1:].max(1).values).double().mean(),
            "logps/chosen": logps[:, 0].mean(), "logps/rejected": logps[:, 1:].mean(),
            "logps/accuracies": (logps[:, 0] > logps[:, 1:].max(1).values).double().mean()}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k].item(), rel=1e-12, abs=1e-12), k
    free = preference_metrics(logps, None, PreferenceConfig(beta=0.5, num_negatives=2, reference_free=True))
    assert free["rewards/chosen"] == pytest.approx(0.5 * logps[:, 0].mean().item())


def test_eval_metrics_length_normalised_take_sums_and_counts():
    """ipo / average_log_prob: the table holds sums (policy and reference); metrics use per-token means."""
    from mio_kernels.objective import PreferenceConfig
    from mio_kernels.train.evaluate import preference_metrics

    sums, ref = -10 * torch.rand(5, 2, dtype=torch.float64), -10 * torch.rand(5, 2, dtype=torch.float64)
    counts = torch.randint(1, 9, (5, 2)).double()
    got = preference_metrics(sums, ref, PreferenceConfig(loss_type="ipo", beta=0.5), counts)
    r = 0.5 * (sums - ref) / counts
    assert got["rewards/chosen"] == pytest.approx(r[:, 0].mean().item(), rel=1e-12)
    assert got["logps/rejected"] == pytest.approx((sums / counts)[:, 1].mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="counts"):
        preference_metrics(sums, ref, PreferenceConfig(loss_type="ipo"))

