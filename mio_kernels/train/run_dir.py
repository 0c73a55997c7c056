"""A run directory belongs to one run: decide, before any work, whether this job starts fresh,
resumes, or is refused; never mix two runs' checkpoints and metrics.

  no flag      the directory must not hold a run (missing or empty), else refused;
  --overwrite  the directory is deleted, then the run starts fresh;
  --resume     the newest verified checkpoint is continued, after checking that every option that
               changes the model, the data, the loss or the reference is the checkpoint's; with no
               good checkpoint, a run that stopped before its first one starts over (its files
               removed), a finished run without checkpoints is refused (nothing to resume).
Nothing is created here: the trainer creates (or clears) the directory once its set-up succeeded,
so a failed start leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from mio_kernels.train import checkpoint as ckpt
from mio_kernels.train.config import MAY_CHANGE_ON_RESUME, ConfigError, TrainConfig, flag


class RunDirError(ConfigError):
    """The run directory cannot be used as asked; the message says what to pass instead."""


@dataclass
class RunPlan:
    run_dir: Path
    resume_from: Optional[Path]  # a verified checkpoint, or None: start fresh
    clear: bool                  # delete the directory's contents first

    def apply(self) -> None:
        """Clear (if planned) and create the run directory (rank 0 only)."""
        if self.clear and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)


def run_identity(cfg: TrainConfig) -> Dict[str, Any]:
    """The options a resumed run must share with its checkpoint (automatic values resolved)."""
    values = dataclasses.asdict(cfg)
    values.update(beta=cfg.resolved_beta(), lr=cfg.resolved_lr(), sft_steps=cfg.resolved_sft_steps(),
                  eval_dataset=cfg.resolved_eval_dataset())
    values["reference_log_probs"] = REFERENCE_SUMS
    return {k: v for k, v in values.items() if k not in MAY_CHANGE_ON_RESUME}


REFERENCE_SUMS = "sequence sums"  # how checkpoints store reference log-probs (older versions: the loss's reduction)


def _saved_reference_convention(saved: Dict[str, Any]) -> str:
    """Older checkpoints stored per-token means for a length-normalised loss; sums otherwise."""
    from mio_kernels.losses import LOSSES

    spec = LOSSES.get(saved.get("loss_type"))
    normalised = saved.get("average_log_prob") or (spec is not None and spec.length_normalized)
    return REFERENCE_SUMS if not normalised else "per-token means (an older version)"


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> str:
    """'' when they agree, else "--opt A (checkpoint) vs B (now); ..." for each differing option."""
    diffs = [f"{flag(k)} {saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return "; ".join(diffs)


def _contents(run_dir: Path) -> str:
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _saved_identity(path: Path) -> Dict[str, Any]:
    state = json.loads((path / ckpt.STATE_FILE).read_text())  # verified by its checksum
    if "config" not in state:
        raise RunDirError(f"--resume: checkpoint {path} records no configuration (written by an older "
                          "version?): it cannot be checked, pass --overwrite to start over")
    saved = state["config"]
    saved.setdefault("reference_log_probs", _saved_reference_convention(saved))
    return saved


def plan_run(cfg: TrainConfig) -> RunPlan:
    run_dir = cfg.run_dir
    holds = run_dir.is_dir() and any(run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    if cfg.overwrite or not holds:
        return RunPlan(run_dir, None, clear=holds)
    if not cfg.resume:
        # offer --resume only where it would do something: a finished run without checkpoints has nothing
        if (run_dir / "summary.json").exists() and not ckpt.complete_checkpoints(run_dir / "checkpoints"):
            raise RunDirError(f"run directory {run_dir} already holds a finished run without checkpoints "
                              f"({_contents(run_dir)}): pass --overwrite to delete it and start over, or choose "
                              "another --name")
        raise RunDirError(f"run directory {run_dir} already holds a run ({_contents(run_dir)}): pass --resume "
                          "to continue it, --overwrite to delete it and start over, or choose another --name")
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        if (run_dir / "summary.json").exists():
            raise RunDirError(f"--resume: {run_dir} holds a finished run without checkpoints, nothing to resume: "
                              "pass --overwrite to start over, or choose another --name")
        return RunPlan(run_dir, None, clear=True)  # stopped before its first checkpoint: start over
    diffs = config_differences(_saved_identity(path), run_identity(cfg))
    if diffs:
        raise RunDirError(f"--resume: options differ from checkpoint {path}: {diffs}. They must match on resume "
                          f"(those that may change: {', '.join(flag(n) for n in MAY_CHANGE_ON_RESUME)})")
    return RunPlan(run_dir, path, clear=False)
