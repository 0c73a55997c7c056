"""Smoke test of the GRPO benchmark (benchmarks/bench_grpo.py): --quick with every available row, at
token- and sequence-level importance sampling, each checked against ours and agreeing; the per-row
memory process; a disagreeing row is FAILED and not timed. No wall-time assertions."""
import json
import math
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)
bench_grpo = pytest.importorskip("bench_grpo")
grpo_impls = pytest.importorskip("grpo_impls")

OURS_ROWS = ("ours_single_pass", "ours_recompute")


def _native_missing():
    from mio_kernels.backends import unavailable_reason
    return unavailable_reason("native", torch.device("cpu"))


pytestmark = pytest.mark.skipif(bool(_native_missing()), reason=f"native backend: {_native_missing()}")


def test_quick_every_row_checked_and_agrees(tmp_path):
    out = tmp_path / "quick.json"
    result = bench_grpo.main(["--quick", "--no-memory", "--out", str(out)])
    rows = result["rows"]
    assert list(rows) == list(grpo_impls.IMPL_NAMES)        # every row reported, ours first
    ran = []
    for name, row in rows.items():
        if row["status"] == "skipped":                      # an optional peer that is not installed
            assert name not in OURS_ROWS and row["reason"], row
            continue
        assert row["status"] == "ok", (name, row)
        check = row["check"]
        assert check["status"] == ("target" if name == "ours_single_pass" else "ok"), (name, check)
        for key, value in check.items():
            if key.endswith("_rel_err"):
                limit = bench_grpo.LOGPS_TOLERANCE if key == "logps_rel_err" else bench_grpo.TOLERANCE
                assert math.isfinite(value) and value <= limit, (name, key, value)
        if name != "ours_single_pass":
            assert {"loss_rel_err", "d_hidden_rel_err", "d_weight_rel_err"} <= set(check), (name, check)
        assert len(row["all_s"]) == 1 and all(math.isfinite(t) for t in row["all_s"])
        assert row["gemm_factor"] == grpo_impls.GEMM_FACTOR[name] and row["gemm_flop"] > 0
        ran.append(name)
    assert set(OURS_ROWS) <= set(ran) and {"naive", "compiled"} <= set(ran)
    env = result["environment"]
    assert env["torch"] and env["date_utc"] and "load_avg_1m_at_end" in env
    assert json.loads(out.read_text())["rows"].keys() == rows.keys()
    md = out.with_suffix(".md").read_text()
    assert "| row | GEMM FLOPs |" in md and md.count("| ok (") == len(ran) - 1


def test_quick_sequence_level_every_row_agrees(tmp_path):
    """GSPO (importance_sampling_level="sequence") in every row: each one that runs passes the check."""
    out = tmp_path / "gspo.json"
    result = bench_grpo.main(["--quick", "--no-memory", "--importance-sampling-level", "sequence", "--beta", "0",
                              "--loss-type", "grpo", "--out", str(out)])
    assert result["options"]["importance_sampling_level"] == "sequence"
    assert json.loads(out.read_text())["options"]["importance_sampling_level"] == "sequence"
    ran = []
    for name, row in result["rows"].items():
        if row["status"] == "skipped":
            assert name not in OURS_ROWS and row["reason"], row
            continue
        assert row["status"] == "ok", (name, row)
        assert row["check"]["status"] == ("target" if name == "ours_single_pass" else "ok"), (name, row["check"])
        ran.append(name)
    assert set(OURS_ROWS) <= set(ran) and {"naive", "compiled"} <= set(ran)
    assert "sequence-level IS (GSPO)" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("extra, named", [(["--beta", "0.04"], "--beta 0.04"),
                                          (["--beta", "0", "--entropy"], "--entropy"),
                                          (["--beta", "0", "--loss-type", "cispo"], "--loss-type cispo")])
def test_sequence_level_refuses_what_the_single_pass_cannot_run(extra, named, capsys):
    with pytest.raises(SystemExit):
        bench_grpo.parse_args(["--importance-sampling-level", "sequence"] + extra)
    assert named in capsys.readouterr().err


def test_zero_advantages_every_row_agrees(tmp_path):
    """--zero-advantages: that share of the completions at A = 0 (the single passes give them log-probs
    only); the other draws unchanged; every row still passes the check."""
    options = grpo_impls.GRPOOptions(beta=0.0, loss_type="grpo")
    plain = grpo_impls.make_grpo_inputs(4, 16, 8, 64, options, seed=3)
    zeroed = grpo_impls.make_grpo_inputs(4, 16, 8, 64, options, seed=3, zero_advantages=0.5)
    assert torch.equal(zeroed.advantages[:2], torch.zeros(2)) and torch.equal(zeroed.advantages[2:], plain.advantages[2:])
    assert torch.equal(zeroed.old_logps, plain.old_logps) and torch.equal(zeroed.hidden, plain.hidden)
    result = bench_grpo.main(["--quick", "--no-memory", "--beta", "0", "--loss-type", "grpo", "--zero-advantages",
                              "0.5", "--impls", "ours_recompute,naive", "--out", str(tmp_path / "zero.json")])
    assert result["inputs"]["zero_advantages"] == 0.5
    for name in ("ours_single_pass", "ours_recompute", "naive"):
        assert result["rows"][name]["check"]["status"] in ("target", "ok"), result["rows"][name]
    assert "50% of the completions at 0" in (tmp_path / "zero.md").read_text()


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_zero_advantages_out_of_range_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        bench_grpo.parse_args(["--zero-advantages", value])
    assert "--zero-advantages must be a fraction in [0, 1]" in capsys.readouterr().err


def test_sequence_level_formula_is_trl_masked_mean_log_ratio():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    old = torch.tensor([[-1.5, -1.5, 0.0], [-0.2, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    got = grpo_impls.log_importance_weights(logps, old, mask, "sequence")
    assert torch.allclose(got, torch.tensor([[0.0], [-0.1]]))
    assert torch.equal(grpo_impls.log_importance_weights(logps, old, mask, "token"), logps - old)


def test_memory_in_a_fresh_process_per_row(tmp_path):
    result = bench_grpo.main(["--quick", "--impls", "ours_recompute", "--out", str(tmp_path / "mem.json")])
    for name in OURS_ROWS:
        row = result["rows"][name]
        assert row["status"] == "ok" and "memory_error" not in row, row
        assert row["peak_extra_bytes"] is None or row["peak_extra_bytes"] >= 0
        assert row["memory_method"]


def test_disagreeing_row_is_failed_and_not_timed():
    options = grpo_impls.GRPOOptions()
    inputs = grpo_impls.make_grpo_inputs(2, 32, 8, 64, options, seed=1)

    class Scaled(grpo_impls.Impl):
        def unavailable(self, inputs):
            return None

        def build(self, inputs):
            ours = grpo_impls.OURS.build(inputs)

            def step():
                loss, logps = ours()
                return loss * 1.01, logps
            return step

    rows = {}
    steps = bench_grpo.checked_steps([grpo_impls.OURS, Scaled("scaled", "ours x 1.01")], inputs, rows)
    assert list(steps) == ["ours_single_pass"]
    assert rows["scaled"]["status"] == "FAILED" and rows["scaled"]["check"]["status"] == "FAILED"
    assert rows["scaled"]["check"]["loss_rel_err"] > bench_grpo.TOLERANCE
    assert "median_s" not in rows["scaled"]


def test_inputs_keep_clear_of_the_clip_bounds():
    options = grpo_impls.GRPOOptions(epsilon_low=0.2, epsilon_high=0.28)
    inputs = grpo_impls.make_grpo_inputs(2, 512, 8, 64, options, seed=0, off_policy_std=0.2)
    logps = grpo_impls.current_logps(inputs.hidden, inputs.weight, inputs.labels)
    log_ratio = (logps - inputs.old_logps)[inputs.mask]
    for bound in grpo_impls.clip_boundaries(options):
        assert (log_ratio - bound).abs().min() > 5e-4
    assert ((log_ratio.exp() - 1).abs() > 0.2).any()         # some tokens are clipped
    assert inputs.ref_logps.shape == inputs.labels.shape and inputs.advantages.shape == (2,)
