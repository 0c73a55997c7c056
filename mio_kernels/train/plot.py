"""rewards.png: one run's training curves (from metrics.jsonl) and its held-out evaluations.

Four panels, one quantity family each: the loss over the whole run (SFT warm-up shaded, then
preference training); the implicit rewards (chosen, rejected, margin); the reward accuracy; the
sequence log-probs of chosen and rejected responses. Training curves are shown per step (thin)
and smoothed (thick: a centred moving average, drawn only where its whole window fits, so it
neither lags nor hooks at the ends); the held-out evaluation before and after preference
training is marked on the matching panels when there is one (markers that coincide, as every
reward does at the reference, are one marker). The SFT warm-up's token NLL has its own y-axis
(right). Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

COLORS = {"chosen": "tab:green", "rejected": "tab:red", "margins": "tab:blue", "accuracies": "tab:purple"}
EVAL_STYLE = dict(marker="D", s=60, edgecolors="black", linewidths=1.0, zorder=5)


def half_window(n: int) -> int:
    """Half the smoothing window for n points: the window is 2 * half + 1 ~ n/15 points."""
    return n // 30


def smooth(values: Sequence[float]) -> List[float]:
    """Centred moving average over 2 * half_window + 1 points; NaN (not drawn) within half a window
    of either end, where the whole window does not fit: a shrinking window there would fall back
    to the raw values and hook the curve at its ends."""
    n, half = len(values), half_window(len(values))
    return [sum(values[i - half:i + half + 1]) / (2 * half + 1) if half <= i < n - half else float("nan")
            for i in range(n)]


def _curve(ax, steps, values, label: str, color: str) -> None:
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(values), color=color, linewidth=2.0, label=label)


def _evals(ax, last_step: int, evals: Dict[str, Optional[dict]], keys: Sequence[str], colors: Sequence[str],
           label: str) -> None:
    """Held-out values of `keys` before (step 0) and after (last step) preference training; markers of
    one moment that coincide (every reward is 0 at the reference) are one grey marker saying so."""
    labelled = False
    for x, when in ((0, "before"), (last_step, "after")):
        found = [(evals[when][k], c) for k, c in zip(keys, colors) if evals.get(when) and k in evals[when]]
        if len(found) > 1 and max(v for v, _ in found) - min(v for v, _ in found) <= 1e-12:
            ax.scatter([x], [found[0][0]], color="0.5", label=f"held-out {when}: all {found[0][0]:g}", **EVAL_STYLE)
            continue
        for v, c in found:
            ax.scatter([x], [v], color=c, label=None if labelled else label, **EVAL_STYLE)
            labelled = True


def _finish(ax, title: str, ylabel: str, xlabel: str = "preference step", window: int = 1) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(ax, window)


def _legend(ax, window=1, extra=()) -> None:
    """Below the panel, clear of the data; says what the thin and thick lines are."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    for h, l in extra:
        handles.append(h)
        labels.append(l)
    handles += [Line2D([], [], color="0.4", alpha=0.4, linewidth=0.8),
                Line2D([], [], color="0.4", linewidth=2.0)]
    labels += ["thin: per step", f"thick: smoothed (centred mean of {window} steps)" if isinstance(window, int)
               else f"thick: smoothed ({window})"]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=9, frameon=False)


def _loss_panel(ax, sft: List[dict], pref: List[dict], loss_type: str, has_eval: bool) -> None:
    """Loss over the global step: SFT token NLL (shaded region, its own y-axis on the right: a
    different quantity), then the preference loss (left axis)."""
    extra = []
    if sft:
        end = sft[-1]["global_step"]
        ax.axvspan(0, end, color="0.9", zorder=0)
        ax.text(end / 2, 0.97, "SFT warm-up (shaded)", transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, color="0.35")
        right = ax.twinx()
        _curve(right, [r["global_step"] for r in sft], [r["loss"] for r in sft], "SFT: NLL per response token "
               "(right axis)", "0.3")
        right.set_ylabel("SFT NLL per token")
        extra = list(zip(*right.get_legend_handles_labels()))
    _curve(ax, [r["global_step"] for r in pref], [r["loss"] for r in pref], f"preference loss ({loss_type}, left axis)",
           "tab:orange")
    if has_eval:
        start, stop = pref[0]["global_step"] - 1, pref[-1]["global_step"]
        ax.axvline(start, color="black", linestyle=":", linewidth=1.2,
                   label="held-out eval before (policy = reference)")
        ax.axvline(stop, color="black", linestyle="--", linewidth=1.2, label="held-out eval after")
    _finish(ax, "Loss (whole run)", "preference loss", "optimizer step (SFT, then preference)")
    _legend(ax, "centred mean over ~1/15 of each phase", extra)


def _family_panel(ax, pref: List[dict], evals, prefix: str, names: Sequence[str], title: str, ylabel: str,
                  eval_label: str = "held-out eval (before, after)") -> None:
    steps = [r["step"] for r in pref]
    for name in names:
        _curve(ax, steps, [r[f"{prefix}/{name}"] for r in pref], f"{name} (training batches)", COLORS[name])
    _evals(ax, steps[-1], evals, [f"{prefix}/{n}" for n in names], [COLORS[n] for n in names], eval_label)
    _finish(ax, title, ylabel, window=2 * half_window(len(pref)) + 1)


def plot_metrics(metrics_path: Path, out_path: Path, title: str = "",
                 evals: Optional[Dict[str, Optional[dict]]] = None, num_negatives: Optional[int] = None,
                 loss_type: str = "", length_normalized: bool = False) -> Optional[Path]:
    """Write the figure; None when metrics.jsonl holds no preference step. `evals`: {"before": metrics,
    "after": metrics} of the held-out evaluation (or None / empty: no evaluation is drawn or named);
    `num_negatives` draws the chance level 1/(K+1) of the reward accuracy; `length_normalized`: the
    logged logps/* are per-token means (the loss's reduction), else sequence sums."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    sft = [r for r in rows if r.get("phase") == "sft"]
    pref = [r for r in rows if r.get("phase") == "pref"]
    if not pref:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = {k: v for k, v in (evals or {}).items() if v}
    fig, axes = plt.subplots(2, 2, figsize=(14, 8), layout="constrained")
    _loss_panel(axes[0, 0], sft, pref, loss_type, bool(evals))
    _family_panel(axes[0, 1], pref, evals, "rewards", ("chosen", "rejected", "margins"),
                  "Implicit rewards  r = β·(log π − log π_ref)", "reward (nats × β)")
    if num_negatives:
        axes[1, 0].axhline(1 / (num_negatives + 1), color="0.4", linestyle="--", linewidth=1,
                           label=f"chance 1/(K+1) = {1 / (num_negatives + 1):.2f}")
    _family_panel(axes[1, 0], pref, evals, "rewards", ("accuracies",),
                  "Reward accuracy  1[r_chosen > max_k r_rejected,k]", "fraction of prompts",
                  "held-out eval (before: 0, every reward is 0 at the reference)")
    axes[1, 0].set_ylim(-0.03, 1.03)
    reduction = "mean over response tokens" if length_normalized else "sum over response tokens"
    _family_panel(axes[1, 1], pref, evals, "logps", ("chosen", "rejected"),
                  f"Sequence log-probs of the policy ({reduction})", f"log π(response | prompt), {reduction}")
    axes[0, 1].axhline(0, color="0.6", linewidth=0.6, zorder=0)  # the reference's own rewards
    fig.suptitle(title, fontsize=13)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
