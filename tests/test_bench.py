"""Smoke test of the benchmark harness (benchmarks/bench_loss.py) on a tiny configuration."""
import json
import math
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)
bench_loss = pytest.importorskip("bench_loss")


def _rows(out_dir, tag):
    with open(os.path.join(out_dir, f"{tag}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("in_process", [False, True], ids=["fresh-process", "in-process"])
def test_tiny_reference_run(tmp_path, in_process):
    # One fresh worker process (a few seconds), or two shapes and both losses in this process.
    shapes, losses = ("2x16x8x64,2x32x8x64", "mio,dpo") if in_process else ("2x16x8x64", "mio")
    argv = ["--device", "cpu", "--shapes", shapes, "--impls", "naive", "--ours", "reference", "--losses", losses,
            "--repeats", "1", "--warmup", "1", "--min-time", "0", "--out", str(tmp_path), "--tag", "smoke"]
    bench_loss.main(argv + (["--in-process"] if in_process else []))
    result = _rows(tmp_path, "smoke")
    rows = result["rows"]
    assert len(rows) == (4 if in_process else 1)
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0
        assert row["check"]["status"] in ("target", "ok")
        assert row["peak_extra_bytes"] is None or row["peak_extra_bytes"] >= 0
    assert result["environment"]["torch"] and result["settings"]["ours_primary"] == "naive"
    for shape in result["shapes"]:
        assert shape["floors"]["compute_floor_s"] > 0 and shape["floors"]["memory_floor_s"] > 0
    md = (tmp_path / "smoke.md").read_text()
    assert "| mio |" in md and ("| dpo |" in md) == in_process
    assert (tmp_path / "smoke.png").exists() == in_process    # a plot needs two lengths


def test_disagreeing_case_is_flagged():
    import torch
    shape = bench_loss.Shape(1, 8, 4, 16)
    inputs = bench_loss.make_inputs(shape, torch.device("cpu"), torch.float32, seed=0, beta=0.1)
    loss = inputs.hidden.square().sum() + inputs.weight.square().sum()
    loss.backward()
    target = bench_loss.snapshot(loss, None, inputs)
    assert bench_loss.compare(loss, None, inputs, target, torch.float32)["status"] == "ok"
    target["d_weight"] = target["d_weight"] + 1.0
    assert bench_loss.compare(loss, None, inputs, target, torch.float32)["status"] == "FLAGGED"


def test_missing_peer_is_reported_skipped(tmp_path, monkeypatch):
    import loss_impls
    monkeypatch.setitem(loss_impls.PEER_PACKAGES, "liger", "no-such-distribution-for-the-test")
    argv = ["--device", "cpu", "--shapes", "2x16x8x64", "--impls", "naive,liger", "--ours", "reference",
            "--losses", "mio", "--repeats", "1", "--min-time", "0", "--in-process", "--out", str(tmp_path),
            "--tag", "smoke", "--no-plot"]
    rows = bench_loss.main(argv)["rows"]
    liger = [r for r in rows if r["impl"] == "liger"]
    assert len(liger) == 1 and liger[0]["status"] == "skipped" and "not installed" in liger[0]["reason"]
    assert "skipped: liger-kernel not installed" in (tmp_path / "smoke.md").read_text()


def test_trl_fused_head_row_matches_the_target(tmp_path):
    """TRL's fused LM head is a real peer row: it runs and its loss and gradients match ours."""
    argv = ["--device", "cpu", "--shapes", "2x16x8x64", "--impls", "naive,trl", "--ours", "native",
            "--losses", "mio", "--repeats", "1", "--warmup", "1", "--min-time", "0", "--out", str(tmp_path),
            "--tag", "trl", "--in-process"]
    bench_loss.main(argv)
    rows = {row["impl"]: row for row in _rows(tmp_path, "trl")["rows"]}
    assert rows["trl"]["status"] == "ok", rows["trl"]
    assert rows["trl"]["check"]["status"] in ("target", "ok"), rows["trl"]["check"]


def test_interleaved_rows_are_checked_and_count_their_gemms(tmp_path):
    """bench_interleaved.py: ours first, every row checked against it, each row's GEMM FLOPs as it does
    them (auto on the native backend takes the single pass here: 6 N H V; recompute and TRL's head 8)."""
    import bench_interleaved

    out = tmp_path / "interleaved.json"
    result = bench_interleaved.main(["--shape", "2x16x8x64", "--impls", "native_recompute,naive,trl",
                                     "--losses", "mio,dpo", "--rounds", "2", "--out", str(out)])
    assert json.loads(out.read_text())["losses"].keys() == {"mio", "dpo"}
    nhv = 2 * 2 * 16 * 8 * 64
    for rows in result["losses"].values():
        assert list(rows) == ["native", "native_recompute", "naive", "trl"]
        assert rows["native"]["best_vs_ours"] == 1.0
        assert {name: row["gemm_flop"] / nhv for name, row in rows.items()} == {
            "native": 6, "native_recompute": 8, "naive": 6, "trl": 8}
        for row in rows.values():
            assert row["check"]["status"] == "ok" and len(row["all_s"]) == 2 and row["gemm_floor_s"] > 0
