"""metrics.jsonl: one JSON line per logged optimizer step (rank 0 writes it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


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

    def trim(self, global_step: int) -> None:
        """Drop the lines a killed run wrote after the checkpoint it resumes from."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["global_step"] <= global_step]
        self.path.write_text("".join(line + "\n" for line in keep))
