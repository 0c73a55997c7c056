"""python/experiments/online_contrastive.py: the --quick run (as a user runs it) and its pieces.

The quick run's SFT model is too small to answer anything right, so its online steps find no
usable prompt and make no update; the update paths (GRPO through fused_grpo_loss, online DPO / MIO
through fused_mio_loss) are checked on that same model with the dataset's own solutions as the
"samples" (one right, three wrong per prompt). No test asserts the scientific outcome.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "python" / "experiments"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mio_kernels.train") is None,
                                reason="the trainer is not installed")


def load_module():
    sys.path.insert(0, str(EXPERIMENTS))  # its own imports (_common, main_job_seeds)
    spec = importlib.util.spec_from_file_location("online_contrastive", EXPERIMENTS / "online_contrastive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("online_contrastive")
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "online_contrastive.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_outputs(quick_run):
    out = quick_run
    assert (out / "online_contrastive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "online_contrastive.json").read_text())
    cfg = record["config"]
    assert record["experiment"] == "online_contrastive" and cfg["quick"]
    assert sorted((r["method"], r["seed"]) for r in record["runs"]) == sorted(
        (m, s) for m in ("grpo", "dpo", "mio") for s in cfg["seeds"])
    assert len(cfg["seeds"]) == 3
    eval_steps = sorted({*range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"]), 0, cfg["steps"]})
    for run in record["runs"]:
        series, evals = run["series"], run["evals"]
        for key in ("mean_reward", "usable_fraction", "logp_chosen", "logp_rejected", "entropy", "step_time_s"):
            assert len(series[key]) == cfg["steps"], key
        assert evals["step"] == eval_steps
        for r, u, h in zip(series["mean_reward"], series["usable_fraction"], series["entropy"]):
            assert 0.0 <= r <= 1.0 and 0.0 <= u <= 1.0
            assert finite(h) and 0.0 < h <= math.log(5000)  # nats per token, below log(vocab)
        for u, c, rej in zip(series["usable_fraction"], series["logp_chosen"], series["logp_rejected"]):
            # a pair's log-probs exist exactly when a prompt was usable; sums of log-probs are < 0
            assert (c is None) == (rej is None) == (u == 0.0)
            assert c is None or (c < 0 and rej < 0)
        assert run["updates"] == sum(u > 0 for u in series["usable_fraction"])
        assert all(0.0 <= e <= 1.0 for e in evals["exact_match"])
        assert all(finite(v) and v < 0 for v in evals["logp_heldout_chosen"])
    # step 0's held-out evaluation is the SFT model's: the same for every method and seed
    starts = {(r["evals"]["exact_match"][0], r["evals"]["logp_heldout_chosen"][0]) for r in record["runs"]}
    assert len(starts) == 1
    # a seed's first samples are drawn from the same policy with the same generator: equal for every method
    for seed in cfg["seeds"]:
        firsts = {(r["series"]["mean_reward"][0], r["series"]["entropy"][0]) for r in record["runs"] if r["seed"] == seed}
        assert len(firsts) == 1
    for method in ("grpo", "dpo", "mio"):
        summary = record["summary"][method]
        assert finite(summary["exact_match_end"]["mean"]) and summary["exact_match_end"]["std"] >= 0
    table = (out / "online_contrastive.md").read_text()
    assert all(f"| {m} |" in table for m in ("grpo", "dpo", "mio")) and "mean ± std over seeds 0, 1, 2" in table


def test_group_advantages_and_pairs():
    oc = load_module()
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    adv = oc.group_advantages(rewards)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))                       # no contrast, no signal
    assert torch.allclose(adv[0], (rewards[0] - 0.25) / (rewards[0].std() + 1e-4))
    completions = [[[5], [6], [6], [7]], [[1], [1], [1], [1]], [[2], [3], [2], [4]]]
    pairs = oc.select_pairs(rewards.tolist(), completions, k=3)
    # prompt 0: chosen sample 0, distinct wrong ones 1 and 3 (2 repeats 1), cycled to K = 3
    # prompt 1: all right, unusable; prompt 2: chosen 1, wrong 0 and 2 are the same text: one distinct
    assert pairs == [(0, 0, [1, 3, 1]), (2, 1, [0, 0, 0])]


def test_update_paths_on_gold_samples(quick_run):
    """Each method's step on the dataset's solutions: finite loss, the parameters move, and the
    reported chosen / rejected log-probs are the policy's before the update (the same for every method)."""
    from mio_kernels.train.data import Example
    from mio_kernels.train.evaluate import is_correct, sequence_logps

    oc = load_module()
    cfg = json.loads((quick_run / "online_contrastive.json").read_text())["config"]
    args = oc.parse_args(["--quick"])
    sft = quick_run / "runs" / "online_contrastive_sft_quick" / "final"
    logps = {}
    for method in ("grpo", "dpo", "mio"):
        run = oc.OnlineRun(sft, method, 0, args)
        prompts = run.train[:4]
        completions = [list(ex.responses) for ex in prompts]   # [chosen, 3 rejected]
        texts = [run.tok.batch_decode(c, skip_special_tokens=True) for c in completions]
        rewards = torch.tensor([[float(is_correct(t, p)) for t in ts] for ts, p in zip(texts, prompts)])
        assert rewards.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 4                # the verifier: only the chosen is right
        pairs = oc.select_pairs(rewards.tolist(), completions, run.k)
        assert [p[:2] for p in pairs] == [(i, 0) for i in range(4)]
        pair_examples = [Example(p.prompt, [c[0], c[1]], p.answer) for p, c in zip(prompts, completions)]
        before = sequence_logps(run.model, pair_examples, run.eval_tasks, 4, run.pad, run.d).sums
        params = [p.detach().clone() for p in run.lm.parameters()]
        if method == "grpo":
            res = run.grpo_step(prompts, completions, rewards, pairs)
        else:
            res = run.contrastive_step(prompts, completions, pairs)
        assert finite(res["loss"])
        assert any(not torch.equal(a, b) for a, b in zip(params, run.lm.parameters()))
        assert res["logp_chosen"] == pytest.approx(before[:, 0].mean().item(), rel=1e-4)
        assert res["logp_rejected"] == pytest.approx(before[:, 1].mean().item(), rel=1e-4)
        logps[method] = (res["logp_chosen"], res["logp_rejected"])
    assert logps["grpo"] == pytest.approx(logps["dpo"], rel=1e-4) and logps["dpo"] == pytest.approx(logps["mio"], rel=1e-4)
    assert cfg["k"] == 3
