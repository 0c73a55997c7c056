"""rewards.png: one run's training curves (from metrics.jsonl) and its held-out evaluations.

Four panels, one quantity family each: the loss over the whole run (SFT warm-up shaded, then
preference training); the implicit rewards (chosen, rejected, margin); the reward accuracy; the
sequence log-probs of chosen and rejected responses. Training curves are shown raw (faint) and
smoothed (a centred moving average); the held-out evaluation before and after preference
training is marked on the matching panels. Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

COLORS = {"chosen": "tab:green", "rejected": "tab:red", "margins": "tab:blue", "accuracies": "tab:purple"}
EVAL_STYLE = dict(marker="D", s=60, edgecolors="black", linewidths=1.0, zorder=5)


def smooth(values: Sequence[float]) -> List[float]:
    """Centred moving average over ~1/15 of the points; near the ends the window shrinks
    symmetrically (the first and last points are their own values: no lag, no end bias)."""
    n = len(values)
    out = []
    for i in range(n):
        half = min(n // 30, i, n - 1 - i)
        window = values[i - half:i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _curve(ax, steps, values, label: str, color: str) -> None:
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(values), color=color, linewidth=2.0, label=label)


def _evals(ax, last_step: int, evals: Dict[str, Optional[dict]], key: str, color: str, label: str) -> None:
    """Held-out values of `key` before (step 0) and after (last step) preference training."""
    points = [(x, evals[when][key]) for x, when in ((0, "before"), (last_step, "after"))
              if evals.get(when) and key in evals[when]]
    if points:
        ax.scatter(*zip(*points), color=color, label=label or None, **EVAL_STYLE)


def _finish(ax, title: str, ylabel: str, xlabel: str = "preference step") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(ax)


def _legend(ax) -> None:
    """Below the panel, clear of the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=9, frameon=False)


def _loss_panel(ax, sft: List[dict], pref: List[dict], loss_type: str) -> None:
    """Loss over the global step: SFT token NLL (shaded region), then the preference loss."""
    if sft:
        end = sft[-1]["global_step"]
        ax.axvspan(0, end, color="0.9", zorder=0)
        ax.text(end / 2, 0.97, "SFT warm-up (shaded)", transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, color="0.35")
        _curve(ax, [r["global_step"] for r in sft], [r["loss"] for r in sft], "SFT: NLL per response token",
               "0.3")
    _curve(ax, [r["global_step"] for r in pref], [r["loss"] for r in pref], f"preference loss ({loss_type})",
           "tab:orange")
    start, stop = pref[0]["global_step"] - 1, pref[-1]["global_step"]
    ax.axvline(start, color="black", linestyle=":", linewidth=1.2, label="held-out eval before (policy = reference)")
    ax.axvline(stop, color="black", linestyle="--", linewidth=1.2, label="held-out eval after")
    _finish(ax, "Loss (whole run)", "loss", "optimizer step (SFT, then preference)")


def _family_panel(ax, pref: List[dict], evals, prefix: str, names: Sequence[str], title: str, ylabel: str,
                  eval_label: str = "held-out eval (before, after)") -> None:
    steps = [r["step"] for r in pref]
    for i, name in enumerate(names):
        key = f"{prefix}/{name}"
        _curve(ax, steps, [r[key] for r in pref], f"{name} (training batches)", COLORS[name])
        _evals(ax, steps[-1], evals, key, COLORS[name], eval_label if i == len(names) - 1 else "")
    _finish(ax, title, ylabel)


def plot_metrics(metrics_path: Path, out_path: Path, title: str = "",
                 evals: Optional[Dict[str, Optional[dict]]] = None, num_negatives: Optional[int] = None,
                 loss_type: str = "") -> Optional[Path]:
    """Write the figure; None when metrics.jsonl holds no preference step. `evals`: {"before": metrics,
    "after": metrics} of the held-out evaluation (or None); `num_negatives` draws the chance level
    1/(K+1) of the reward accuracy."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    sft = [r for r in rows if r.get("phase") == "sft"]
    pref = [r for r in rows if r.get("phase") == "pref"]
    if not pref:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = evals or {}
    fig, axes = plt.subplots(2, 2, figsize=(14, 8), layout="constrained")
    _loss_panel(axes[0, 0], sft, pref, loss_type)
    _family_panel(axes[0, 1], pref, evals, "rewards", ("chosen", "rejected", "margins"),
                  "Implicit rewards  r = β·(log π − log π_ref)", "reward (nats × β)")
    if num_negatives:
        axes[1, 0].axhline(1 / (num_negatives + 1), color="0.4", linestyle="--", linewidth=1,
                           label=f"chance 1/(K+1) = {1 / (num_negatives + 1):.2f}")
    _family_panel(axes[1, 0], pref, evals, "rewards", ("accuracies",),
                  "Reward accuracy  1[r_chosen > max_k r_rejected,k]", "fraction of prompts",
                  "held-out eval (before: 0, all rewards are 0 at the reference)")
    axes[1, 0].set_ylim(-0.03, 1.03)
    _family_panel(axes[1, 1], pref, evals, "logps", ("chosen", "rejected"),
                  "Sequence log-probs of the policy", "log π(response | prompt)")
    axes[0, 1].axhline(0, color="0.6", linewidth=0.6, zorder=0)  # the reference's own rewards
    fig.suptitle(title, fontsize=13)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
