"""FSDP2 on gloo (2 real processes, torchrun) gives the loss and gradients of 1 process.

The same script (this file, run as __main__) computes, for a few optimizer steps of the SFT and
the preference phase, the loss and the full gradient of every parameter, gathering FSDP's
sharded gradients (DTensor.full_tensor()), the LM head's included; rank 0 saves them. The two
runs split the global batch differently (1 process: micro-batches of 2 prompts; 2 processes:
3 prompts each, as micro-batches of 2 and 1), so this also checks the loss scaling across
unequal micro-batches and processes.

Tolerance: fp32 everywhere; the runs differ only in summation order (padding widths, the
reduce-scatter). The first step of each phase starts from the same weights: gradients agree to
rtol = 1e-4, atol = 1e-6, losses to 1e-5 relative. Later steps start from weights that differ by
those rounding errors amplified by Adam (whose first update is ~lr * sign(g), so a gradient
entry near 0 can flip): there gradients agree to rtol = 1e-3, atol = 1e-3 * max|g| and losses
to 1e-4 relative.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
RTOL, ATOL, LOSS_RTOL = 1e-4, 1e-6, 1e-5


def tiny_args(out: Path, *extra: str):
    return ["--output-dir", str(out), "--name", "fsdp", "--tiny-hidden-size", "32", "--tiny-layers", "2",
            "--tiny-heads", "2", "--tiny-intermediate-size", "64", "--max-train-examples", "48",
            "--no-eval", "--no-progress", "--threads", "1", *extra]


def worker(out_dir: str, result_file: str, steps: int) -> None:
    from mio_kernels.train.config import parse_args
    from mio_kernels.train.trainer import Trainer

    cfg = parse_args(tiny_args(Path(out_dir), "--batch-size", "6", "--micro-batch-size", "2",
                               "--sft-batch-size", "6", "--sft-micro-batch-size", "2"))
    trainer = Trainer(cfg)
    results = {}
    for phase in ("sft", "pref"):
        spec = trainer.phases[phase]
        if phase == "pref":
            trainer.compute_reference()
        trainer.state.optimizer = trainer.make_optimizer(spec)
        for step in range(steps):
            stats = trainer.forward_backward(spec, trainer.step_indices(spec, step))
            stats = {k: v.clone() for k, v in stats.items()}
            loss = stats["loss"]
            if trainer.d.enabled:
                torch.distributed.all_reduce(loss)
            grads = {}
            for name, p in trainer.model.named_parameters():
                g = p.grad
                grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone()
            results[f"{phase}{step}"] = {"loss": loss.item(), "grads": grads}
            trainer.optimizer_step(lr=1e-2)
    if trainer.d.is_main:
        torch.save(results, result_file)
    job(out_dir, trainer)
    trainer.close()


JOB = ["--name", "job", "--sft-steps", "2", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "1",
       "--sft-batch-size", "4", "--sft-micro-batch-size", "2", "--checkpoint-every", "2", "--keep-checkpoints", "5",
       "--eval", "--max-eval-examples", "6", "--max-new-tokens", "8", "--eval-batch-size", "4", "--no-plot",
       "--reference", "online"]


def job(out_dir: str, first) -> None:
    """The whole job (SFT, online reference copy, eval with greedy decoding, preference steps,
    checkpoints, save_pretrained); then drop the last checkpoints and resume from step 4: same
    final weights. (The precomputed reference runs under FSDP in `worker`.)"""
    import shutil

    from mio_kernels.train.checkpoint import complete_checkpoints
    from mio_kernels.train.config import parse_args
    from mio_kernels.train.parallelize import barrier
    from mio_kernels.train.trainer import Trainer

    cfg = parse_args(tiny_args(Path(out_dir), *JOB))  # later flags win
    Trainer(cfg).run()
    run = Path(out_dir) / "job"
    if first.d.is_main:
        (run / "final").rename(run / "final_straight")
        for p in complete_checkpoints(run / "checkpoints")[:-2]:  # keep steps 2 and 4
            shutil.rmtree(p)
    barrier(first.d)
    cfg.resume = True
    Trainer(cfg).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env_extra, timeout=240):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_fsdp_matches_one_process(tmp_path):
    steps = "2"
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    threads = torch.get_num_threads()
    try:  # 1 process: here (saves an interpreter start)
        worker(str(tmp_path / "r1"), str(one), int(steps))
    finally:
        torch.set_num_threads(threads)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(HERE), str(tmp_path / "r2"), str(two), steps],
               {"OMP_NUM_THREADS": "1"})
    first_lines = [l for l in proc.stdout.splitlines() if l.startswith("[mio-train]")][:2]
    assert any("distributed: 2 processes, backend gloo, FSDP2" in l for l in first_lines), proc.stdout[:2000]
    from safetensors.torch import load_file

    for r in ("r1", "r2"):  # resumed (from step 4 of 6) == uninterrupted, bit for bit
        job_dir = tmp_path / r / "job"
        x = load_file(str(job_dir / "final_straight" / "model.safetensors"))
        y = load_file(str(job_dir / "final" / "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), r
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["eval_after"]["examples"] == 6
        distributed = json.loads((job_dir / "config.json").read_text())["distributed"]
        assert distributed == ({"processes": 1, "backend": None, "fsdp2": False, "device": "cpu"} if r == "r1" else
                               {"processes": 2, "backend": "gloo", "fsdp2": True, "device": "cpu"})
    rows = lambda r: [json.loads(l) for l in (tmp_path / r / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows("r2")] == [1, 2, 1, 2, 3, 4]
    for x, y in zip(rows("r1"), rows("r2")):  # the whole job: 2 processes track 1 process
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3)

    a, b = torch.load(one), torch.load(two)
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        first = key.endswith("0")
        assert b[key]["loss"] == pytest.approx(a[key]["loss"], rel=LOSS_RTOL if first else 10 * LOSS_RTOL), key
        ga, gb = a[key]["grads"], b[key]["grads"]
        assert ga.keys() == gb.keys()
        assert "head.lm_head.weight" in ga  # the sharded LM head's gradient, gathered
        for name in ga:
            rtol, atol = (RTOL, ATOL) if first else (10 * RTOL, 1e-3 * ga[name].abs().max().item())
            torch.testing.assert_close(gb[name], ga[name], rtol=rtol, atol=atol, msg=f"{key} {name}")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
