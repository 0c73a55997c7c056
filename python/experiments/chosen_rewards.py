"""Chosen / rejected reward curves of `dpo` vs `mio` with the trainer's embedded default job.

One SFT warm-up of the embedded default (builtin tiny Llama on the shipped arithmetic preference
data) is saved once; every preference run starts from that same checkpoint with the same seed
(so the same data order) and differs only in --loss-type (and --num-negatives for the K sweep).
Everything goes through the trainer's public CLI, `python -m mio_kernels.train`:

  1. SFT only:    --name sft --steps 0 --reference none --no-eval            -> <work>/sft/final
  2. per (loss, K): --model <work>/sft/final --sft-steps 0 --loss-type L --num-negatives K
                    --steps S                                                 -> <work>/<L>_k<K>/

and reads each run's metrics.jsonl (TRL names: rewards/chosen, rewards/rejected, ...) and
summary.json (held-out evaluation before / after preference training). Runs go two at a time.

Curve statistics are taken on trailing means (25 steps; --quick: 2): the chosen reward at 1/6,
1/2 and the end of the run, its minimum, and late_decline = max - final.

Usage: python python/experiments/chosen_rewards.py [--quick] [--out DIR] [--work DIR]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

import _common

LOSSES = ("dpo", "mio")
CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def trainer(args: Sequence[str], log: Path) -> None:
    """One `python -m mio_kernels.train` run; its output goes to `log`."""
    cmd = [sys.executable, "-m", "mio_kernels.train", "--no-progress", "--threads", "1", *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"trainer failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average (window clipped at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def curve_stats(curves: Dict[str, List[float]], window: int) -> Dict[str, Dict[str, float]]:
    """Per curve, on its `window`-step trailing mean: first, min, max (and their steps), the values
    at 1/6 and 1/2 of the run, final, and late_decline = max - final."""
    stats, steps = {}, curves["step"]
    for key in CURVES:
        s = smooth(curves[key], window)
        hi = max(range(len(s)), key=s.__getitem__)
        lo = min(range(len(s)), key=s.__getitem__)
        stats[key] = {"first": s[0], "max": s[hi], "argmax_step": steps[hi], "min": s[lo], "argmin_step": steps[lo],
                      "at_sixth": s[max(0, len(s) // 6 - 1)], "at_half": s[max(0, len(s) // 2 - 1)], "final": s[-1],
                      "late_decline": s[hi] - s[-1]}
    return stats


def read_run(run_dir: Path) -> Dict[str, object]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "pref"]
    curves = {"step": [r["step"] for r in rows]}
    for key in CURVES + ("loss", "rewards/accuracies"):
        curves[key] = [r[key] for r in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"curves": curves, "eval_before": summary["eval_before"], "eval_after": summary["eval_after"]}


def summarise(record: dict) -> str:
    """Fills record["summary"] and each run's "stats"; returns the markdown table."""
    window, steps = record["config"]["smooth"], record["config"]["steps"]
    record["summary"], rows = {}, []
    for name, run in record["runs"].items():
        s = run["stats"] = curve_stats(run["curves"], window)
        before, after = run["eval_before"] or {}, run["eval_after"] or {}
        sm = record["summary"][name] = {
            "chosen_reward_at_sixth": s["rewards/chosen"]["at_sixth"], "chosen_reward_at_half": s["rewards/chosen"]["at_half"],
            "chosen_reward_final": s["rewards/chosen"]["final"], "chosen_reward_min": s["rewards/chosen"]["min"],
            "chosen_reward_late_decline": s["rewards/chosen"]["late_decline"],
            "rejected_reward_final": s["rewards/rejected"]["final"], "margin_final": s["rewards/margins"]["final"],
            "logp_chosen_first": s["logps/chosen"]["first"], "logp_chosen_final": s["logps/chosen"]["final"],
            "eval_exact_match_before": before.get("exact_match"), "eval_exact_match_after": after.get("exact_match"),
            "eval_reward_accuracy_after": after.get("rewards/accuracies"),
            "eval_rewards_chosen_after": after.get("rewards/chosen"),
            "eval_rewards_rejected_after": after.get("rewards/rejected"),
            "eval_logps_chosen_before": before.get("logps/chosen"), "eval_logps_chosen_after": after.get("logps/chosen"),
        }
        em = [sm["eval_exact_match_before"], sm["eval_exact_match_after"]]
        rows.append([name, sm["chosen_reward_at_sixth"], sm["chosen_reward_at_half"], sm["chosen_reward_final"],
                     f"{sm['chosen_reward_min']:.3f} ({s['rewards/chosen']['argmin_step']})",
                     sm["rejected_reward_final"], sm["margin_final"],
                     f"{sm['logp_chosen_first']:.2f} -> {sm['logp_chosen_final']:.2f}",
                     " -> ".join("-" if v is None else f"{v:.3f}" for v in em),
                     sm["eval_reward_accuracy_after"], sm["eval_rewards_chosen_after"],
                     sm["eval_rewards_rejected_after"]])
    header = ["run", f"chosen r @{steps // 6}", f"chosen r @{steps // 2}", f"chosen r @{steps}", "chosen r min (step)",
              "rejected r final", "margin final", "logp chosen first -> final", "eval exact match before -> after",
              "eval reward acc", "eval r chosen", "eval r rejected"]
    return (f"Training curves: {window}-step trailing means of the per-step metrics; eval: held-out split "
            f"({record['runs'][next(iter(record['runs']))]['eval_after'].get('examples', '?')} prompts) after "
            f"training\n\n" + _common.markdown_table(header, rows))


def plot(record: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, window = record["config"]["ks"], record["config"]["smooth"]
    fig, axes = plt.subplots(len(ks), 3, figsize=(16, 4.2 * len(ks)), squeeze=False)
    colors = {"dpo": "tab:red", "mio": "tab:blue"}
    for i, k in enumerate(ks):
        for loss in LOSSES:
            run = record["runs"][f"{loss}_k{k}"]
            c = run["curves"]
            for ax, keys in zip(axes[i], (("rewards/chosen", "rewards/rejected"), ("rewards/margins",),
                                           ("logps/chosen", "logps/rejected"))):
                for key in keys:
                    style = "--" if key.endswith("rejected") else "-"
                    ax.plot(c["step"], c[key], style, color=colors[loss], alpha=0.15, lw=0.7)
                    ax.plot(c["step"], smooth(c[key], window), style, color=colors[loss], lw=1.6,
                            label=f"{loss.upper()} {key}")
        for ax, title in zip(axes[i], ("rewards (solid chosen, dashed rejected)", "reward margin",
                                       "sequence log-prob (solid chosen, dashed rejected)")):
            ax.set_title(f"{title}, K={k}", fontsize=9)
            ax.set_xlabel("preference step")
            ax.axhline(0.0, color="k", lw=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    cfg = record["config"]
    fig.suptitle(f"builtin tiny Llama, arithmetic preferences: same SFT checkpoint and seed, {cfg['steps']} "
                 f"preference steps, beta={cfg['beta']} (faint: per step; bold: {window}-step mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="directory for the trainer's runs (default: a temporary directory, removed)")
    parser.add_argument("--steps", type=int, default=None, help="preference steps of each run")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="rejected responses per prompt")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--parallel", type=int, default=2, help="trainer runs at a time")
    parser.add_argument("--trainer-args", nargs="*", default=[], help="extra flags for every preference run")
    parser.add_argument("--replot", action="store_true",
                        help="no training: rebuild the table and figure from <out>/chosen_rewards.json")
    args = parser.parse_args(argv)
    if args.replot:
        record = json.loads((args.out / "chosen_rewards.json").read_text())
        table = summarise(record)
        plot(record, args.out / "chosen_rewards.png")
        _common.write_outputs(args.out, "chosen_rewards", record, table)
        return record
    if args.quick:
        args.steps = args.steps or 6
        args.ks = args.ks or [3]
        sft = ["--sft-steps", "10", "--max-train-examples", "64"]
        pref = ["--max-train-examples", "64", "--max-eval-examples", "16", "--max-new-tokens", "12"]
        args.smooth = 2
    else:
        args.steps = args.steps or 600
        args.ks = args.ks or [1, 3]
        sft, pref = [], []
        args.smooth = 25
    _common.setup(args)
    t0 = time.time()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="chosen_rewards_")
        args.work = Path(tmp.name)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    seed = ["--seed", str(args.seed), "--output-dir", str(work)]

    print(f"SFT warm-up (once) -> {work / 'sft' / 'final'}", flush=True)
    trainer([*seed, "--name", "sft", "--steps", "0", "--reference", "none", "--no-eval", "--no-plot", *sft],
            work / "sft.log")
    jobs = [(loss, k) for k in args.ks for loss in LOSSES]

    def pref_run(job):
        loss, k = job
        name = f"{loss}_k{k}"
        trainer([*seed, "--name", name, "--model", str(work / "sft" / "final"), "--sft-steps", "0",
                 "--loss-type", loss, "--num-negatives", str(k), "--beta", str(args.beta), "--steps", str(args.steps),
                 "--no-save-final", "--no-plot", *pref, *args.trainer_args], work / f"{name}.log")
        print(f"  {name} done [{time.time() - t0:.0f}s]", flush=True)
        return name, read_run(work / name)

    print(f"preference runs {[f'{l}_k{k}' for l, k in jobs]}, {args.steps} steps each", flush=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = dict(pool.map(pref_run, jobs))
    for k in args.ks:  # same checkpoint, same reference: the evaluation before training must agree exactly
        before = [runs[f"{loss}_k{k}"]["eval_before"] for loss in LOSSES]
        assert all(b == before[0] for b in before), f"K={k}: runs did not start from the same model: {before}"

    config = {"steps": args.steps, "ks": args.ks, "beta": args.beta, "seed": args.seed, "quick": args.quick,
              "smooth": args.smooth, "sft_args": sft, "pref_args": pref + args.trainer_args,
              "trainer": "python -m mio_kernels.train (embedded default: builtin:tiny-llama, builtin:arithmetic)"}
    record = {"experiment": "chosen_rewards", "config": config, "summary": {}, "runs": runs,
              "seconds": time.time() - t0}
    table = summarise(record)
    plot(record, args.out / "chosen_rewards.png")
    _common.write_outputs(args.out, "chosen_rewards", record, table)
    if tmp is not None:
        tmp.cleanup()
    return record


if __name__ == "__main__":
    main()
