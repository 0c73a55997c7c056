"""metrics.jsonl: one JSON line per logged optimizer step (rank 0 writes it).

A fresh run starts a fresh file. A resumed run first trims the lines written after the
checkpoint it resumes from, atomically (a new file is written, fsynced and renamed over the old
one, so a crash leaves the old or the new file, never half of one); a torn last line (a run
killed mid-write) is dropped, any other unreadable line is an error naming the file and line.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def reset(self) -> None:
        """A fresh run starts a fresh log."""
        if self.enabled and self.path.exists():
            self.path.unlink()

    def append(self, row: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> List[Dict[str, Any]]:
        """The logged rows; a torn last line is dropped (with a warning)."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):
                    warnings.warn(f"{self.path}: dropping its torn last line {number} ({err})")
                    break
                raise ValueError(f"{self.path}: line {number} is not JSON ({err})") from None
        return out

    def trim(self, global_step: int) -> None:
        """Keep the rows up to `global_step` (those of the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [row for row in self.rows() if row["global_step"] <= global_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
