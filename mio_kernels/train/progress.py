"""What the user watching a run sees (rank 0 only): log lines, one progress display per phase,
one summary line when a phase ends.

    progress = Progress(enabled=cfg.progress, main=d.is_main)
    with progress.phase("sft", total=300, unit="step") as ph:
        for ...: ph.update(1, loss=0.7)
        ph.summary = "final loss 0.7"          # appended to "sft: 300 steps in 1m02s"

On a terminal (stdout a TTY) a phase is a tqdm bar with its rate and ETA, removed when the phase
ends; otherwise (a log file, a pipe) it is a plain line every PLAIN_EVERY_S seconds (done/total,
elapsed, ETA), never a carriage return. `enabled=False` (--no-progress) shows neither, and also
silences the progress bars of transformers, huggingface_hub and datasets (weight loading and
saving, downloads), as does a non-TTY stdout. Summary and log lines are always printed.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

PLAIN_EVERY_S = 30.0
PREFIX = "[mio-train]"


def duration(seconds: float) -> str:
    """1.2s, 42s, 3m05s, 1h02m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")


def quiet_libraries() -> None:
    """Turn off the progress bars transformers, huggingface_hub and datasets draw themselves."""
    import importlib

    for module, fn in (("transformers.utils.logging", "disable_progress_bar"),
                       ("huggingface_hub.utils", "disable_progress_bars"), ("datasets", "disable_progress_bars")):
        try:
            getattr(importlib.import_module(module), fn)()
        except (ImportError, AttributeError):
            pass


class Progress:
    def __init__(self, enabled: bool = True, main: bool = True, stream: Optional[TextIO] = None):
        self.stream = stream if stream is not None else sys.stdout
        self.main = main
        self.enabled = enabled and main
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.active: Optional[Phase] = None
        if not (enabled and self.tty):
            quiet_libraries()

    @classmethod
    def silent(cls) -> "Progress":
        """No output at all (a library call without a progress display)."""
        return cls(enabled=False, main=False)

    def log(self, msg: str) -> None:
        if not self.main:
            return
        line = f"{PREFIX} {msg}"
        if self.active is not None and self.active.bar is not None:
            self.active.bar.write(line, file=self.stream)  # above the bar, which is redrawn below
        else:
            print(line, file=self.stream, flush=True)

    def warn(self, msg: str) -> None:
        """One line on stderr (rank 0), whatever --progress: an option that cannot act, and the like."""
        if self.main:
            print(f"mio-train: warning: {msg}", file=sys.stderr, flush=True)

    def phase(self, name: str, total: int, unit: str = "step", initial: int = 0) -> "Phase":
        return Phase(self, name, total, unit, initial)


class Phase:
    """One phase's display; use as a context manager. `summary` (set before the end) is appended
    to the summary line; a phase left by an exception prints no summary."""

    def __init__(self, owner: Progress, name: str, total: int, unit: str, initial: int):
        self.owner, self.name, self.total, self.unit = owner, name, total, unit
        self.done, self.start = initial, initial
        self.summary = ""
        self.t0 = self.last_line = time.perf_counter()
        self.postfix: dict = {}
        self.bar = None
        if owner.enabled and owner.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit=unit, file=owner.stream,
                            dynamic_ncols=True, leave=False)

    def __enter__(self) -> "Phase":
        self.owner.active = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.owner.active = None
        if self.bar is not None:
            self.bar.close()
        if exc_type is None:
            elapsed = time.perf_counter() - self.t0
            text = f"{self.name}: {self.done - self.start} {plural(self.unit)} in {duration(elapsed)}"
            self.owner.log(text + (f", {self.summary}" if self.summary else ""))

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in postfix.items()}
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.owner.enabled and time.perf_counter() - self.last_line >= PLAIN_EVERY_S and self.done < self.total:
            self.last_line = time.perf_counter()
            self.owner.log(self.plain_line())

    def plain_line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return (f"{self.name}: {self.done}/{self.total} {plural(self.unit)} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{duration(elapsed)} elapsed, ETA {eta}{extra}")
