"""Checkpoints: atomic, never loaded when incomplete or truncated, and SIGKILL + --resume is exact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from mio_kernels.train import checkpoint as ckpt
from mio_kernels.train.parallelize import Dist


def small_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def app(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "ref": {"train": torch.arange(6.0).view(3, 2)}}


def test_save_load_roundtrip_and_pruning(tmp_path):
    d = Dist()
    for step in (2, 4, 6):
        model, opt = small_state(step)
        ckpt.save_checkpoint(tmp_path, step, app(model, opt), {"phase": "pref", "step": step}, d, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000004"]
    assert not list(tmp_path.glob("*.tmp"))
    model, opt = small_state(0)
    state = app(model, opt)
    state["ref"]["train"] = torch.zeros(3, 2)
    trainer_state = ckpt.load_checkpoint(tmp_path / "step_00000006", state, d)
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ref_model, _ = small_state(6)
    assert trainer_state == {"phase": "pref", "step": 6}
    assert torch.equal(model.weight, ref_model.weight) and torch.equal(state["ref"]["train"], torch.arange(6.0).view(3, 2))


def test_incomplete_or_truncated_checkpoint_is_never_loaded(tmp_path):
    d = Dist()
    for step in (2, 4):
        model, opt = small_state(step)
        ckpt.save_checkpoint(tmp_path, step, app(model, opt), {"step": step}, d, keep=5)
    # A crash mid-write leaves a .tmp directory (never a candidate) ...
    (tmp_path / "step_00000008.tmp").mkdir()
    (tmp_path / "step_00000008.tmp" / "__0_0.distcp").write_bytes(b"partial")
    # ... a directory copied without its marker, or a checkpoint whose data file got truncated.
    (tmp_path / "step_00000007").mkdir()
    newest = tmp_path / "step_00000004"
    data = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    text = " ".join(str(w.message) for w in caught)
    assert "step_00000004" in text and "truncated" in text and "step_00000007" in text and "COMPLETE" in text
    model, opt = small_state(0)
    with pytest.raises(RuntimeError, match="refusing to load"):
        ckpt.load_checkpoint(newest, app(model, opt), d)
    with pytest.raises(RuntimeError, match="refusing to load"):
        ckpt.load_checkpoint(tmp_path / "step_00000007", app(model, opt), d)


# ----------------------------------------------------------------------------- SIGKILL + resume

ARGS = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-heads", "2", "--tiny-intermediate-size", "64",
        "--max-train-examples", "64", "--sft-steps", "6", "--steps", "40", "--batch-size", "4",
        "--micro-batch-size", "2", "--sft-batch-size", "4", "--sft-micro-batch-size", "3", "--checkpoint-every", "3",
        "--no-eval", "--no-plot", "--no-progress", "--threads", "1", "--seed", "3"]


def train_cmd(out: Path, name: str, *extra: str):
    return [sys.executable, "-m", "mio_kernels.train", "--output-dir", str(out), "--name", name, *ARGS, *extra]


def final_weights(run: Path):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def metric_rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def kill_and_resume(tmp_path, *extra: str):
    """An uninterrupted run, and a run SIGKILLed after its checkpoint at preference step 6 then
    resumed: the same final weights, bit for bit, and the same metrics log."""
    from mio_kernels.train.cli import main

    env = dict(os.environ, OMP_NUM_THREADS="1")
    threads = torch.get_num_threads()
    try:  # the uninterrupted run in this process (saves an interpreter start), the others killable
        main(train_cmd(tmp_path, "straight", *extra)[3:])
    finally:
        torch.set_num_threads(threads)

    proc = subprocess.Popen(train_cmd(tmp_path, "killed", *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = tmp_path / "killed" / "checkpoints" / "step_00000012" / ckpt.MARKER  # preference step 6
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "summary.json").exists()

    subprocess.run(train_cmd(tmp_path, "killed", *extra, "--resume"), check=True, env=env, capture_output=True,
                   timeout=300)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The log of the resumed run is the uninterrupted run's, line for line (timings aside).
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens/s"} for r in rows]
    assert strip(metric_rows(tmp_path / "killed")) == strip(metric_rows(tmp_path / "straight"))


def test_sigkill_then_resume_is_exact(tmp_path):
    """Padded batches (padding-free, the default, is tests/test_train_packed.py's)."""
    kill_and_resume(tmp_path, "--no-padding-free")
