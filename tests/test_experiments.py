"""The paper-reproduction experiments (python/experiments/) run in quick mode and write their outputs.

Each script runs as its own process, as a user would run it, into a temporary --out directory.
These tests check that the outputs exist and hold finite numbers under the expected keys; they do
not assert the scientific outcome (the quick configurations are far too small for that).
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "python" / "experiments"


def run_quick(script: str, out: Path, timeout: float = 300.0) -> dict:
    name = Path(script).stem
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for ext in ("png", "json", "md"):
        path = out / f"{name}.{ext}"
        assert path.is_file() and path.stat().st_size > 0, f"missing {path}"
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{name}.json").read_text())


def assert_finite(value, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{where} = {value!r}"


def test_gaussian_mi_quick(tmp_path):
    record = run_quick("gaussian_mi.py", tmp_path)
    assert record["experiment"] == "gaussian_mi" and record["config"]["quick"]
    cfg = record["config"]
    assert len(record["cells"]) == len(cfg["rhos"]) * len(cfg["ks"])
    for cell in record["cells"]:
        assert_finite(cell["true_mi"], "true_mi")
        for est in ("dv", "js"):
            for key in ("mi_heldout", "mi_train_tail_std", "own_var", "var_at_init", "var_at_js_final",
                        "var_at_dv_final"):
                assert_finite(cell[est][key], f"{est}.{key}")
            for key in ("nsr_at_init", "own_nsr_early"):  # None where the mean gradient is not resolved
                assert cell[est][key] is None or cell[est][key] > 0
            assert cell[est]["var_at_init"] > 0
    for k in cfg["ks"]:
        summary = record["summary"][f"K={k}"]
        for key in ("mean_abs_err_dv", "mean_abs_err_js", "geomean_ratio_var_at_init", "geomean_ratio_var_at_js_final"):
            assert_finite(summary[key], key)


def test_toy_dynamics_quick(tmp_path):
    record = run_quick("toy_dynamics.py", tmp_path)
    assert record["experiment"] == "toy_dynamics" and record["config"]["quick"]
    cfg = record["config"]
    assert len(record["runs"]) == 4 * 2 * len(cfg["worlds"]) * len(cfg["ks"])  # scenarios x losses x worlds x K
    for run in record["runs"]:
        assert run["loss"] in ("dpo", "mio")
        for key in ("p_chosen_start", "p_chosen_max", "p_chosen_end", "p_rejected_end", "p_unseen_end",
                    "u_chosen_worst_min", "u_chosen_worst_end", "chosen_late_drop"):
            assert_finite(run[key], key)
        assert 0.0 < run["p_chosen_end"] <= 1.0
        assert len(run["curve"]["step"]) == len(run["curve"]["p_chosen"]) > 1
        assert run["curve"]["step"][-1] == cfg["steps"]
    assert set(record["summary"]) >= {"dpo_lowers_chosen_in", "mio_lowers_chosen_in"}


@pytest.mark.skipif(importlib.util.find_spec("mio_kernels.train") is None, reason="the trainer is not installed")
def test_chosen_rewards_quick(tmp_path):
    record = run_quick("chosen_rewards.py", tmp_path / "out", timeout=600.0)
    assert record["experiment"] == "chosen_rewards" and record["config"]["quick"]
    cfg = record["config"]
    assert set(record["runs"]) == {f"{loss}_k{k}" for loss in ("dpo", "mio") for k in cfg["ks"]}
    for name, run in record["runs"].items():
        curves = run["curves"]
        assert curves["step"] == list(range(1, cfg["steps"] + 1))
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert len(curves[key]) == cfg["steps"]
            for v in curves[key]:
                assert_finite(v, f"{name} {key}")
        for when in ("eval_before", "eval_after"):
            assert_finite(run[when]["exact_match"], f"{name} {when} exact_match")
            assert_finite(run[when]["rewards/chosen"], f"{name} {when} rewards/chosen")
        for key in ("chosen_reward_final", "chosen_reward_late_decline", "rejected_reward_final", "margin_final"):
            assert_finite(record["summary"][name][key], f"{name} {key}")


@pytest.mark.skipif(importlib.util.find_spec("mio_kernels.train") is None, reason="the trainer is not installed")
def test_main_job_seeds_quick(tmp_path):
    """The README table's script: runs, then mean ± std per loss and the machine it ran on."""
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "main_job_seeds.py"), "--quick", "--seeds", "0", "1",
                           "--losses", "mio", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "main_job_seeds.json").read_text())
    assert record["seeds"] == [0, 1] and [r["seed"] for r in record["runs"]] == [0, 1]
    assert record["machine"]["cpu"] and record["machine"]["date"] and record["machine"]["threads_per_run"] == 1
    for when in ("before", "after"):
        for key in ("exact_match", "rewards/accuracies", "logps/chosen"):
            stats = record["summary"]["mio"][when][key]
            assert_finite(stats["mean"], key) and stats["std"] >= 0
    table = (tmp_path / "main_job_seeds.md").read_text()
    assert "mean ± std over 2 seeds" in table and "| mio |" in table
