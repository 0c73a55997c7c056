"""rewards.png: chosen/rejected rewards and log-probs over the preference steps (from metrics.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def plot_metrics(metrics_path: Path, out_path: Path) -> Optional[Path]:
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "pref"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
              ("sequence log-prob", ("logps/chosen", "logps/rejected")),
              ("loss / reward accuracy", ("loss", "rewards/accuracies"))]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(steps, [r[key] for r in rows], label=key)
        ax.set_title(title)
        ax.set_xlabel("preference step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
