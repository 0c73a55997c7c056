"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is the directory <run>/checkpoints/step_<global step:08d>/ holding
  DCP files        model and optimizer (sharded under FSDP: each process writes its shards),
                   reference log-probs; the learning-rate schedule is a pure function of the
                   step, so the step (in trainer_state.json) is its whole state
  trainer_state.json  phase, step, data position, evaluation results so far
  rng_rank<r>.pt   every RNG of process r (python, numpy, torch, CUDA)
  COMPLETE.json    written last: step, world size, and the size of every other file.
Atomicity: everything is written (and fsynced) into step_<n>.tmp/, the marker last, then the
directory is renamed to step_<n> (one rename, atomic on POSIX) and the parent fsynced. A crash
at any point leaves either no step_<n> or a complete one. Loading only considers step_<n>
directories whose marker exists and whose files all have the recorded sizes, so a truncated
or half-copied checkpoint is skipped (with a warning) in favour of the previous complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mio_kernels.train.parallelize import Dist, barrier

MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> Dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, app_state: Dict[str, Any], trainer_state: Dict[str, Any],
                    d: Dist, keep: int) -> Path:
    """Write checkpoint `step` atomically (every process calls this). Returns its directory."""
    import torch.distributed.checkpoint as dcp

    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed earlier attempt
        tmp.mkdir(parents=True)
    barrier(d)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(app_state, checkpoint_id=str(tmp), no_dist=not d.enabled)
    rng_file = tmp / f"rng_rank{d.rank}.pt"
    with open(rng_file, "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    barrier(d)
    if d.is_main:
        _write_json(tmp / STATE_FILE, trainer_state)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_json(tmp / MARKER, {"step": step, "world_size": d.world_size, "files": files})
        _fsync_path(tmp)
        if final.exists():  # same step written before (a resumed run repeating it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        for old in complete_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def check_complete(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint, else why not."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {MARKER}: {err}"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written (truncated?)"
    return None


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under `root`, newest first; incomplete ones are skipped with a warning."""
    if not root.is_dir():
        return []
    found: List[Tuple[int, Path]] = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            reason = check_complete(p)
            if reason is None:
                found.append((int(m.group(1)), p))
            else:
                warnings.warn(f"skipping checkpoint {p}: {reason}")
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[0] if found else None


def load_checkpoint(path: Path, app_state: Dict[str, Any], d: Dist) -> Dict[str, Any]:
    """Load `path` into app_state (in place, DCP) and restore this process's RNGs.
    Returns the trainer state. Refuses an incomplete checkpoint."""
    import torch.distributed.checkpoint as dcp

    reason = check_complete(path)
    if reason is not None:
        raise RuntimeError(f"refusing to load checkpoint {path}: {reason}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(app_state, checkpoint_id=str(path), no_dist=not d.enabled)
    info = json.loads((path / MARKER).read_text())
    rng_file = path / f"rng_rank{d.rank}.pt"
    if info["world_size"] == d.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        warnings.warn(f"{path} was written by {info['world_size']} processes, not {d.world_size}: "
                      "weights and optimizer are resharded, RNG states are not restored")
    return json.loads((path / STATE_FILE).read_text())
