"""Runs never lose or mix data: run-directory ownership, non-finite values, resume checks,
metrics.jsonl integrity, options validated before any work, corrupted checkpoints skipped."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from mio_kernels.train import checkpoint as ckpt
from mio_kernels.train.cli import main
from mio_kernels.train.metrics import MetricsLog

TINY = ["--tiny-hidden-size", "16", "--tiny-layers", "2", "--tiny-heads", "2", "--tiny-intermediate-size", "32",
        "--max-train-examples", "32", "--no-eval", "--no-progress", "--no-plot", "--no-save-final", "--threads", "1",
        "--batch-size", "4", "--micro-batch-size", "4", "--sft-batch-size", "4", "--sft-micro-batch-size", "4"]


def train(tmp_path, *extra, name="S"):
    return main(["--output-dir", str(tmp_path), "--name", name, *TINY, *extra])


def steps_of(run):
    return [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")]


def one_line_error(capsys, *words):
    # warnings are lines of their own (an earlier successful run's, e.g. --warmup-steps > --steps)
    err = "\n".join(l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("mio-train: warning:"))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# 1. ------------------------------------------------------------------- one run per directory
def test_second_run_is_refused_then_overwrite_replaces_it(tmp_path, capsys):
    assert train(tmp_path, "--checkpoint-every", "2", "--sft-steps", "4", "--steps", "4") == 0
    run = tmp_path / "S"
    first = steps_of(run)
    assert train(tmp_path, "--checkpoint-every", "2", "--sft-steps", "2", "--steps", "2", "--seed", "1") == 2
    one_line_error(capsys, str(run), "--resume", "--overwrite")
    assert steps_of(run) == first  # untouched
    assert train(tmp_path, "--checkpoint-every", "2", "--sft-steps", "2", "--steps", "2", "--seed", "1",
                 "--overwrite") == 0
    assert steps_of(run) == ["step_00000004", "step_00000002"]
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    capsys.readouterr()
    # --resume of the new run without its --seed is refused, naming both values
    assert train(tmp_path, "--checkpoint-every", "2", "--sft-steps", "2", "--steps", "2", "--resume") == 2
    one_line_error(capsys, "--seed 1 (checkpoint) vs 0 (now)")


def test_failed_start_leaves_nothing_and_resume_overwrite_exclude(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": 3, "rejected": " 4"}) + "\n")
    assert train(tmp_path, "--dataset", str(bad), "--sft-steps", "1", "--steps", "1") == 2
    one_line_error(capsys, "row 0", "'chosen'")
    assert not (tmp_path / "S").exists()
    assert train(tmp_path, "--resume", "--overwrite") == 2
    one_line_error(capsys, "--resume and --overwrite")


def test_finished_run_without_checkpoints_offers_only_what_works(tmp_path, capsys):
    """Its refusal does not suggest --resume (which would have nothing to resume)."""
    assert train(tmp_path, "--sft-steps", "1", "--steps", "1") == 0
    assert train(tmp_path, "--sft-steps", "1", "--steps", "1") == 2
    err = one_line_error(capsys, "finished run without checkpoints", "--overwrite", "--name")
    assert "--resume" not in err
    assert train(tmp_path, "--sft-steps", "1", "--steps", "1", "--resume") == 2
    one_line_error(capsys, "nothing to resume", "--overwrite")


def test_trl_loss_names_are_aliases(tmp_path, capsys):
    from mio_kernels.train.config import build_parser, parse_args

    assert parse_args(["--loss-type", "sigmoid"]).loss_type == "dpo"
    assert parse_args(["--loss-type", "nca_pair"]).loss_type == "mio"
    assert "sigmoid (= dpo)" in " ".join(build_parser().format_help().split())
    assert train(tmp_path, "--loss-type", "exo_pair") == 2
    one_line_error(capsys, "--loss-type", "sigmoid = dpo")


def test_options_that_cannot_act(tmp_path, capsys):
    """An explicit --eval without held-out data is an error; other options that cannot act are one
    warning line each, and the run goes on."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Ann has 3 pens.", "chosen": " 3 pens", "rejected": " 4 pens"}) + "\n"
                            for _ in range(8)))
    assert train(tmp_path, "--dataset", str(data), "--eval", "--sft-steps", "1", "--steps", "1") == 2
    one_line_error(capsys, "--eval", "--eval-dataset")
    assert not (tmp_path / "S").exists()
    assert train(tmp_path, "--dataset", str(data), "--sft-steps", "0", "--steps", "2", "--warmup-steps", "5",
                 "--sft-lr", "0.1", "--eval-batch-size", "3", "--dataset-split", "x") == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if l.startswith("mio-train: warning:")]
    for words in (("--warmup-steps 5 > the 2 preference steps",), ("--micro-batch-size", "--sft-micro-batch-size",
                  "padding-free"), ("--sft-lr", "--sft-steps 0"), ("--eval-batch-size", "--no-eval"),
                  ("--dataset-split", "a file")):
        assert sum(all(w in l for w in words) for l in warned) == 1, (words, warned)
    assert len(warned) == 5, warned


def test_defaults_warn_nothing():
    from mio_kernels.train.config import TrainConfig, option_warnings, parse_args

    assert option_warnings(TrainConfig()) == [] and option_warnings(parse_args([])) == []


# 2. ------------------------------------------------------------------- non-finite values
def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    from mio_kernels.train.config import parse_args
    from mio_kernels.train.trainer import Trainer

    trainer = Trainer(parse_args(["--output-dir", str(tmp_path), "--name", "S", *TINY, "--sft-steps", "4",
                                  "--steps", "0", "--checkpoint-every", "1", "--log-every", "100"]))
    step = trainer.optimizer_step

    def poisoned(lr):
        out = step(lr)
        if trainer.state.progress["step"] == 2:  # the update of step 3
            with torch.no_grad():
                trainer.model.head.lm_head.weight[0, 0] = float("nan")
        return out
    monkeypatch.setattr(trainer, "optimizer_step", poisoned)
    with pytest.raises(FloatingPointError, match="head.lm_head.weight") as err:
        trainer.run()
    assert "sft step 3" in str(err.value) and "No checkpoint written" in str(err.value)
    assert steps_of(tmp_path / "S") == ["step_00000002", "step_00000001"]  # the good ones, kept


# 3. + 4. -------------------------------------------------------------- resume checks
def test_resume_checks_options_and_reference_coverage(tmp_path, capsys):
    base = ["--checkpoint-every", "2", "--sft-steps", "2", "--steps", "2"]
    assert train(tmp_path, *base) == 0
    for extra, words in ((["--tiny-layers", "1"], ["--tiny-layers 2 (checkpoint) vs 1 (now)"]),
                         (["--loss-type", "ipo"], ["--loss-type 'mio' (checkpoint) vs 'ipo' (now)"]),
                         (["--seed", "5"], ["--seed 0 (checkpoint) vs 5 (now)"])):
        assert train(tmp_path, *base, "--resume", *extra) == 2, extra
        one_line_error(capsys, *words)
    # more steps: the precomputed reference lacks the new prompts, and says so
    assert train(tmp_path, *base[:-1], "8", "--resume") == 2
    one_line_error(capsys, "--steps 8", "reference", "not precomputed")
    # options that may change: fine
    assert train(tmp_path, *base, "--resume", "--log-every", "3", "--checkpoint-every", "1") == 0
    from mio_kernels.train.config import build_parser
    assert "may change on resume" in " ".join(build_parser().format_help().split())


# 5. ------------------------------------------------------------------- metrics.jsonl
def test_torn_metrics_line_and_fresh_start(tmp_path, capsys):
    base = ["--checkpoint-every", "2", "--sft-steps", "2", "--steps", "2"]
    assert train(tmp_path, *base) == 0
    log = tmp_path / "S" / "metrics.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join(rows) + '\n{"phase": "pref", "ste')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train(tmp_path, *base, "--resume") == 0
    assert log.read_text().splitlines() == rows
    # a resume that finds no good checkpoint starts over, with a fresh log
    for p in (tmp_path / "S" / "checkpoints").iterdir():
        (p / ckpt.MARKER).unlink()
    (tmp_path / "S" / "summary.json").unlink()
    log.write_text(log.read_text() * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train(tmp_path, *base, "--resume") == 0
    assert [json.loads(r)["global_step"] for r in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_metrics_trim_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, True)
    for g in (1, 2, 3):
        log.append({"global_step": g})
    before = path.read_text()

    def crash(*args):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        log.trim(1)
    assert path.read_text() == before  # never half-rewritten
    monkeypatch.undo()
    log.trim(2)
    assert [r["global_step"] for r in log.rows()] == [1, 2]
    path.write_text(before.replace('{"global_step": 2}', "{oops"))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        log.trim(3)


# 6. ------------------------------------------------------------------- options checked first
BAD_OPTIONS = [
    (["--label-smoothing", "0.1"], "--label-smoothing"), (["--num-negatives", "0"], "--num-negatives"),
    (["--num-negatives", "-1"], "--num-negatives"), (["--sft-weight", "-1"], "--sft-weight"),
    (["--beta", "inf"], "--beta"), (["--beta", "-1"], "--beta"), (["--backend", "foo"], "--backend"),
    (["--log-every", "0"], "--log-every"), (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--batch-size", "0"], "--batch-size"), (["--model", "./no/such/dir"], "./no/such/dir"),
    (["--dataset", "myprefs.jsonl"], "myprefs.jsonl"), (["--lr", "nan"], "--lr"),
]


@pytest.mark.parametrize("extra,word", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_invalid_option_fails_before_any_work(tmp_path, capsys, monkeypatch, extra, word):
    import mio_kernels.train.trainer as trainer_mod

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr(trainer_mod, "load_model_and_tokenizer", no_work)
    assert train(tmp_path, *extra) == 2
    one_line_error(capsys, word)
    assert not (tmp_path / "S").exists()
    with pytest.raises((ValueError, TypeError)):  # --debug: the exception itself
        train(tmp_path, *extra, "--debug")


# 7. ------------------------------------------------------------------- corruption of the same size
def _save_two(tmp_path):
    from mio_kernels.train.parallelize import Dist

    for step in (2, 4):
        torch.manual_seed(step)
        model = torch.nn.Linear(64, 32)
        ckpt.save_checkpoint(tmp_path, step, {"model": model.state_dict()}, {"step": step}, Dist(), keep=5)
    return tmp_path / "step_00000004"


@pytest.mark.parametrize("target", ["weights", ckpt.STATE_FILE, "rng_rank0.pt", ".metadata"])
def test_same_size_corruption_is_skipped(tmp_path, target):
    newest = _save_two(tmp_path)
    f = (max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size) if target == "weights"
         else newest / target)
    data = bytearray(f.read_bytes())
    n = min(400, len(data) // 2)
    data[len(data) // 4:len(data) // 4 + n] = bytes(255 - b for b in data[len(data) // 4:len(data) // 4 + n])
    f.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    text = " ".join(str(w.message) for w in caught)
    assert f.name in text and "checksum" in text


def test_help_groups_options_and_shows_every_default():
    import argparse
    import re
    from dataclasses import fields

    from mio_kernels.train.config import HELP_GROUPS, TrainConfig, build_parser

    parser = build_parser()
    text = parser.format_help()
    titles = [g.title for g in parser._action_groups]
    assert [t for t in titles if t in HELP_GROUPS] == list(HELP_GROUPS)
    grouped = [n for names in HELP_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in fields(TrainConfig))  # every option in exactly one group
    for action in parser._actions:
        if isinstance(action, argparse.BooleanOptionalAction) or action.dest == "debug":
            assert re.search(r"\(default: (on|off)\)$", action.help), action.dest
    assert not re.search(r"\w\.py\b", text), "a help string points at a source file"
