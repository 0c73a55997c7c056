"""What a user sees of a run: no deprecation warnings caused by the trainer, greedy decoding with
the current cache API, progress output, and the generations files."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from mio_kernels.train.cli import main

SHORT = ["--sft-steps", "2", "--steps", "2", "--max-train-examples", "32", "--max-eval-examples", "6",
         "--max-new-tokens", "6", "--tiny-hidden-size", "32", "--tiny-layers", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(run directory, warnings caught) of one whole short job: SFT, reference, eval with greedy
    decoding, preference steps, save, plot."""
    out = tmp_path_factory.mktemp("short")
    n = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--output-dir", str(out), "--no-progress", *SHORT]) == 0
    torch.set_num_threads(n)
    return out / "default", caught


def test_short_run_emits_no_deprecation_warning(short_run):
    """No FutureWarning/DeprecationWarning: such a warning during a run comes from an API we call
    in a deprecated way (transformers reports it at torch's Module.__call__, not at our line, so
    every one is counted, whatever file it names)."""
    bad = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in short_run[1]
           if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, "\n".join(bad)


def test_generations_files(short_run):
    """generations_{before,after}.jsonl: per held-out prompt, its prompt, the reference (chosen)
    response and answer, the generation and its answer, correct; their mean is exact_match."""
    import json

    from mio_kernels.train.data import load_rows

    run = short_run[0]
    summary = json.loads((run / "summary.json").read_text())
    rows, _ = load_rows("builtin:arithmetic", "test")
    for when in ("before", "after"):
        records = [json.loads(line) for line in (run / f"generations_{when}.jsonl").read_text().splitlines()]
        assert len(records) == summary[f"eval_{when}"]["examples"] == 6
        for rec, row in zip(records, rows):
            assert set(rec) == {"prompt", "reference", "reference_answer", "generation", "answer", "correct"}
            assert rec["prompt"] == row["prompt"] and rec["reference"] == row["chosen"]
            assert isinstance(rec["correct"], bool) and isinstance(rec["generation"], str)
            assert rec["correct"] == (rec["answer"] == rec["reference_answer"])
        assert sum(r["correct"] for r in records) / len(records) == summary[f"eval_{when}"]["exact_match"]


def test_generation_record_correct(tmp_path):
    """A generation whose final answer is the reference's is correct, whatever precedes it."""
    import json

    from mio_kernels.train.data import Example, final_answer
    from mio_kernels.train.evaluate import write_generations

    chosen = "3 + 4 = 7. #### 7"
    ex = Example([1, 2], [[3]], final_answer(chosen), prompt_text="What is 3 + 4?", chosen_text=chosen)
    write_generations(tmp_path / "g.jsonl", [ex, ex], ["4 + 3 = 7 ####  7", "#### 8"])
    recs = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [(r["answer"], r["correct"]) for r in recs] == [("7", True), ("8", False)]
    assert recs[0]["prompt"] == "What is 3 + 4?" and recs[0]["reference_answer"] == "7"


def test_greedy_generate_matches_uncached_decoding():
    """Batched, left-padded greedy decoding with a KV cache = one prompt at a time, no cache."""
    from mio_kernels.train.data import load_rows, tokenize_rows
    from mio_kernels.train.evaluate import greedy_generate
    from mio_kernels.train.model import BUILTIN_MODEL, PreferenceModel, load_model_and_tokenizer
    from mio_kernels.train.parallelize import Dist

    torch.manual_seed(0)
    lm, tok = load_model_and_tokenizer(BUILTIN_MODEL, tiny=dict(hidden_size=32, num_layers=2, num_heads=2,
                                                                intermediate_size=64))
    lm.eval()
    rows, src = load_rows("builtin:arithmetic", "test")
    examples, _ = tokenize_rows(rows, src, tok, 128, 96, max_rows=5)
    assert len({len(ex.prompt) for ex in examples}) > 1  # left padding is exercised
    got = greedy_generate(PreferenceModel(lm), examples, tok.pad_token_id, tok.eos_token_id, 6, 4, Dist())
    for ex, gen in zip(examples, got):
        ids, want = torch.tensor([ex.prompt]), []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(lm(ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                want.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert gen == want


# ----------------------------------------------------------------------------- progress

PHASE_SUMMARIES = ("SFT warm-up: 3 steps in", "reference log-probs: ", "eval before: log-probs: 6 prompts in",
                   "eval before: greedy generation: ", "preference training: 2 steps in",
                   "eval after: log-probs: 6 prompts in", "eval after: greedy generation: ")


def test_run_ends_with_human_lines(tmp_path, capsys):
    """The end of a run: what was trained, the headline numbers, where the files are (no JSON dump);
    config.json records how the run was spread (one process here)."""
    assert main(["--output-dir", str(tmp_path), *SHORT, "--sft-steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tail = lines[-4:]
    assert tail[0].startswith("done: mio (β = 0.5, K = 3) on builtin:tiny-llama") and "preference steps in" in tail[0]
    assert "exact match" in tail[1] and " → " in tail[1]
    assert "reward accuracy" in tail[2] and "margin" in tail[2]
    assert tail[3].startswith("files in ")
    for name in ("summary.json", "metrics.jsonl", "generations_before.jsonl", "generations_after.jsonl",
                 "rewards.png", "final/", "config.json"):
        assert name in tail[3], name
    assert not any(line.startswith(("{", "}", ' "')) for line in lines)
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert json.loads((run / "config.json").read_text())["distributed"] == {
        "processes": 1, "backend": None, "fsdp2": False, "device": "cpu"}


@pytest.mark.parametrize("shown", [True, False], ids=["progress", "no-progress"])
def test_non_tty_output_is_plain_lines(tmp_path, capsys, monkeypatch, shown):
    """stdout not a terminal: no carriage return, one summary line per phase, and (unless
    --no-progress) periodic plain progress lines with an ETA (every update here: interval 0)."""
    from mio_kernels.train import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    flags = ["--sft-steps", "3"] + ([] if shown else ["--no-progress"])
    assert main(["--output-dir", str(tmp_path), *SHORT, *flags]) == 0
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err
    lines = out.out.splitlines()
    periodic = [line for line in lines if "ETA" in line]
    for summary in PHASE_SUMMARIES:
        assert sum(line.startswith(f"[mio-train] {summary}") for line in lines if line not in periodic) == 1, summary
    if shown:
        assert "[mio-train] SFT warm-up: 1/3 steps (33%)" in "\n".join(periodic)
    else:
        assert not periodic


def run_in_terminal(args, cwd) -> str:
    """Output of `args` run with a pseudo-terminal (120 columns) as stdin, stdout and stderr."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_no_progress_draws_no_bar_on_a_terminal(tmp_path):
    """On a terminal the phases (and transformers' save) draw bars, redrawn with '\\r';
    --no-progress draws none: only whole lines ('\\r\\n' is the terminal's line end)."""
    import re
    import sys

    cmd = [sys.executable, "-m", "mio_kernels.train", "--output-dir", str(tmp_path), *SHORT]
    bars = run_in_terminal(cmd + ["--name", "bars"], tmp_path)
    quiet = run_in_terminal(cmd + ["--name", "quiet", "--no-progress"], tmp_path)
    redraw = re.compile(r"\r(?!\n)")
    assert redraw.search(bars) and "preference training:" in bars
    assert not redraw.search(quiet), quiet
    assert "[mio-train] preference training: 2 steps in" in quiet


# ----------------------------------------------------------------------------- rewards.png

def test_plot_has_four_labelled_panels(tmp_path, monkeypatch):
    """rewards.png: titled, four panels (loss; rewards; accuracy; log-probs), each with a title,
    axis labels, integer step ticks and a legend; the held-out evaluation is drawn."""
    import json

    import matplotlib.pyplot as plt

    from mio_kernels.train import plot

    rows = [{"phase": "sft", "step": s, "global_step": s, "loss": 5.0 / s} for s in range(1, 6)]
    rows += [{"phase": "pref", "step": s, "global_step": 5 + s, "loss": 1.3, "rewards/chosen": 0.1 * s,
              "rewards/rejected": -0.1 * s, "rewards/margins": 0.2 * s, "rewards/accuracies": 0.5,
              "logps/chosen": -3.0, "logps/rejected": -9.0} for s in range(1, 4)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = {"before": {k: 0.0 for k in rows[-1] if "/" in k}, "after": {k: v for k, v in rows[-1].items() if "/" in k}}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    out = plot.plot_metrics(metrics, tmp_path / "rewards.png", "run 'x': mio, β = 0.5, K = 3", evals, 3, "mio")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[0]
    assert fig._suptitle.get_text().startswith("run 'x'")
    panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert len(panels) == 4 and len(fig.axes) == 5  # + the SFT loss's own y-axis (right)
    for ax in panels:
        assert ax.get_title(loc="left") and ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
        assert all(float(t).is_integer() for t in ax.get_xticks())
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "thin: per step" in texts and any(t.startswith("thick: smoothed") for t in texts)
    assert sum(len(ax.collections) for ax in fig.axes) >= 3  # held-out eval markers
    legend = lambda ax: " | ".join(t.get_text() for t in ax.get_legend().get_texts())  # noqa: E731
    loss_ax, rewards_ax, _, logps_ax = panels
    assert "SFT: NLL per response token (right axis)" in legend(loss_ax) and "held-out eval before" in legend(loss_ax)
    assert [ax.get_ylabel() for ax in fig.axes if ax not in panels] == ["SFT NLL per token"]
    # the three rewards are all 0 before: one marker that says so, not three on top of each other
    assert "held-out before: all 0" in legend(rewards_ax)
    assert "sum over response tokens" in logps_ax.get_title(loc="left")

    # without evaluation: nothing drawn or named "held-out"
    figures.clear()
    plot.plot_metrics(metrics, tmp_path / "noeval.png", "t", {"before": None, "after": None}, 3, "ipo", True)
    fig = figures[0]
    assert sum(len(ax.collections) for ax in fig.axes) == 0
    for ax in fig.axes:
        if ax.get_legend() is not None:
            assert "held-out" not in legend(ax), legend(ax)
    assert "mean over response tokens" in fig.axes[3].get_title(loc="left")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    assert plot.plot_metrics(metrics, tmp_path / "none.png") is None  # no preference step yet


def test_smoothing_does_not_hook_at_the_ends():
    """A centred mean only where its whole window fits: exact on a straight line, not drawn (NaN)
    within half a window of each end, never the raw end value."""
    import math

    from mio_kernels.train.plot import half_window, smooth

    ramp = [0.5 + 0.003 * i for i in range(120)]
    noisy = [v + (0.1 if i % 2 else -0.1) for i, v in enumerate(ramp)]
    out, half = smooth(noisy), half_window(120)
    assert half == 4
    assert all(math.isnan(v) for v in out[:half] + out[-half:])
    inner = out[half:-half]
    assert all(abs(v - r) < 0.1 / 9 + 1e-12 for v, r in zip(inner, ramp[half:-half]))
    assert smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # fewer than 30 points: no smoothing
