"""Helpers shared by the experiment scripts: argument parsing, seeding, writing tables.

Each experiment writes `<name>.json` (every number it reports), `<name>.md` (the table it
prints) and `<name>.png` into `--out` (default: `results/` next to this file).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration for the test suite (seconds); numbers are not meaningful")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the PNG, JSON and markdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: these ops are too small to gain from more)")
    return parser


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)


def markdown_table(header: Sequence[str], rows: List[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if not math.isfinite(v):
                return str(v)
            return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rounded(obj: Any, digits: int = 5) -> Any:
    """obj with every float rounded to `digits` significant digits (keeps the committed JSON small)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def write_outputs(out: Path, name: str, record: Dict[str, Any], table_md: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(rounded(record), separators=(",", ":")) + "\n")
    (out / f"{name}.md").write_text(table_md + "\n")
    print(table_md)
    print(f"\nwrote {out / name}.{{png,json,md}}")
