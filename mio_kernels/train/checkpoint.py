"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is the directory <run>/checkpoints/step_<global step:08d>/ holding
  DCP files        model and optimizer (sharded under FSDP: each process writes its shards),
                   reference log-probs; the learning-rate schedule is a pure function of the
                   step, so the step (in trainer_state.json) is its whole state
  trainer_state.json  phase, step, data position, evaluation results so far
  rng_rank<r>.pt   every RNG of process r (python, numpy, torch, CUDA)
  COMPLETE.json    written last: step, world size, and the size and SHA-256 of every other file.
Atomicity: everything is written (and fsynced) into step_<n>.tmp/, the marker last, then the
directory is renamed to step_<n> (one rename, atomic on POSIX) and the parent fsynced. A crash
at any point leaves either no step_<n> or a complete one. Resuming takes the newest step_<n>
whose marker exists and whose files all have the recorded sizes and checksums, so a truncated,
half-copied or corrupted checkpoint (even one whose damage keeps the file sizes) is skipped, with
a warning naming the file, in favour of the previous good one. The size check alone (cheap) is
what pruning uses.
"""
from __future__ import annotations

import hashlib
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        sha256 = {rel: file_sha256(tmp / rel) for rel in files}
        _write_json(tmp / MARKER, {"step": step, "world_size": d.world_size, "files": files, "sha256": sha256})
        _fsync_path(tmp)
        if final.exists():  # same step written before (a resumed run repeating it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        for old in complete_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def check_complete(path: Path, verify: bool = True) -> Optional[str]:
    """None if `path` is a complete checkpoint, else why not. verify: also compare every file's
    SHA-256 with the marker's (reads the whole checkpoint)."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        info = json.loads(marker.read_text())
        files, sha256 = info["files"], info["sha256"]
        if not isinstance(files, dict) or set(files) != set(sha256):
            raise ValueError("files and checksums do not match")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"unreadable {MARKER}: {err}"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written (truncated?)"
    if verify:
        for rel, digest in sha256.items():
            if file_sha256(path / rel) != digest:
                return f"{rel} does not match its checksum (corrupted)"
    return None


def complete_checkpoints(root: Path, verify: bool = False) -> List[Path]:
    """Complete checkpoints under `root`, newest first; incomplete ones are skipped with a warning.
    verify: check checksums too (see `latest_checkpoint`, which verifies only what it needs)."""
    if not root.is_dir():
        return []
    found: List[Tuple[int, Path]] = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            reason = check_complete(p, verify)
            if reason is None:
                found.append((int(m.group(1)), p))
            else:
                warnings.warn(f"skipping checkpoint {p}: {reason}")
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest checkpoint that passes verification (sizes and checksums); the newer ones that
    fail it are skipped with a warning naming the file."""
    for path in complete_checkpoints(root):
        reason = check_complete(path, verify=True)
        if reason is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {reason}")
    return None


def load_checkpoint(path: Path, app_state: Dict[str, Any], d: Dist, verify: bool = True) -> Dict[str, Any]:
    """Load `path` into app_state (in place, DCP) and restore this process's RNGs.
    Returns the trainer state. Refuses an incomplete or (verify) corrupted checkpoint."""
    import torch.distributed.checkpoint as dcp

    reason = check_complete(path, verify)
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
