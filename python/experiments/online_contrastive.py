"""RL with verifiable rewards as contrastive learning: GRPO vs online DPO vs online MIO on the same samples.

All three methods start from the main job's SFT model (the default `mio-train` SFT warm-up: builtin
tiny Llama, 300 steps on the shipped arithmetic training solutions, seed 0; trained once through the
trainer's CLI and cached under <out>/runs/, which git ignores). Then, for each method and seed, the
same number of online steps; one step:

  1. B training prompts (the seed's order, the same for every method), G completions each sampled
     from the current policy (transformers `generate`, temperature 1, no top-k / top-p);
  2. the verifier scores them: reward 1 when the text after the last '####' is the right answer
     (the trainer's exact-match check), else 0;
  3. one optimizer step of the method on those samples (the samples budget, B x G, is the same for
     every method):
       grpo  `fused_grpo_loss`, loss_type "dapo" (token-level normaliser), on-policy, no KL (beta 0),
             on all B x G samples, advantages (r - mean_group) / (std_group + 1e-4);
       dpo   `fused_mio_loss(loss_type="dpo")`, K = 1: per usable prompt (at least one right and one
             wrong sample) chosen = its first right sample, rejected = its first wrong one;
       mio   `fused_mio_loss(loss_type="mio")`, K = --k (3) for every prompt of the batch: the same
             chosen, and the prompt's distinct wrong samples (first-drawn first), repeated cyclically
             when it has fewer than K (so no prompt is dropped and every wrong sample is used);
     reference = the SFT model: the chosen/rejected sequences' log-probs under it are computed per
     step (forward only) before the update. A step with no usable prompt makes no update (for GRPO
     too: with 0/1 rewards its advantages are all zero then).

Hidden states go through the trainer's `PreferenceModel` (backbone -> last hidden states and the
LM head's weight -> the fused op; `HeadTasks.preference` for DPO/MIO, a head task calling
`fused_grpo_loss` for GRPO); reference scoring and the held-out evaluation are the trainer's
`evaluate.sequence_logps` and `evaluate.evaluate` (greedy exact match on the 300 held-out prompts
and the log-prob of their reference solutions).

Recorded per step: mean reward, fraction of usable prompts, the policy's log-probs (sequence sums,
before the update) of the chosen sample and of the first wrong sample of each usable prompt (the
same pair for every method), the mean per-token entropy of the sampling distribution over the
generated tokens, wall time; every --eval-every steps (and at 0): held-out exact match (greedy)
and the held-out reference solutions' log-prob.

Usage: python python/experiments/online_contrastive.py [--quick] [--out DIR] [--steps N] [--jobs J]
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import _common

NAME = "online_contrastive"
METHODS = ("grpo", "dpo", "mio")
COLORS = {"grpo": "tab:green", "dpo": "tab:red", "mio": "tab:blue"}
ADV_EPS = 1e-4  # TRL's group-std epsilon
# the per-step series of a run (None where a step has no usable prompt)
SERIES = ("mean_reward", "usable_fraction", "logp_chosen", "logp_rejected", "entropy", "loss", "step_time_s")


def parse_args(argv=None):
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--steps", type=int, default=None, help="online steps per run (default 200; --quick 3)")
    p.add_argument("--prompts", type=int, default=None, help="B: prompts per step (default 16)")
    p.add_argument("--samples", type=int, default=None, help="G: completions per prompt (default 8)")
    p.add_argument("--k", type=int, default=3, help="MIO's negatives per prompt (wrong samples, repeated if fewer)")
    p.add_argument("--beta", type=float, default=0.5, help="DPO/MIO beta (the main job's default for the tiny model)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (the main job's)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default 25)")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out prompts (default 300)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="sampling and greedy decoding limit")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each single-threaded)")
    p.add_argument("--sft", type=Path, default=None,
                   help="SFT model directory (default: <out>/runs/online_contrastive_sft[_quick]/final, trained if absent)")
    p.add_argument("--replot", action="store_true", help="no training: rebuild table and figure from <out>/<name>.json")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(seeds=[0, 1, 2], steps=3 if quick else 200, prompts=4 if quick else 16,
                    samples=4 if quick else 8, eval_every=2 if quick else 25, eval_examples=8 if quick else 300)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.max_new_tokens = min(args.max_new_tokens, 12)
    return args


# ----------------------------------------------------------------------------- the SFT model

# quick: a 1-block, 32-wide model after 10 SFT steps on 64 rows (numbers mean nothing)
QUICK_SFT = ["--sft-steps", "10", "--max-train-examples", "64", "--tiny-hidden-size", "32", "--tiny-layers", "1"]


def ensure_sft(args) -> Path:
    """The main job's SFT model (mio-train with its SFT warm-up and no preference steps), trained
    through the trainer's CLI unless its `final/` is already there."""
    if args.sft is not None:
        return args.sft
    name = "online_contrastive_sft" + ("_quick" if args.quick else "")
    work = (args.out / "runs").resolve()
    final = work / name / "final"
    if (final / "config.json").is_file():
        print(f"SFT model: {final} (cached)", flush=True)
        return final
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mio_kernels.train", "--name", name, "--output-dir", str(work), "--steps", "0",
           "--reference", "none", "--no-eval", "--no-plot", "--no-progress", "--threads", "1", "--seed", "0",
           "--overwrite", *(QUICK_SFT if args.quick else [])]
    print(f"SFT model: training it ({' '.join(cmd[1:])})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"SFT failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    print(f"SFT model: done in {time.perf_counter() - t0:.0f}s -> {final}", flush=True)
    return final


# ----------------------------------------------------------------------------- pieces of a step

def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[B, G] rewards -> [B, G] advantages normalised per group: (r - mean) / (std + 1e-4) (TRL's
    scale_rewards="group"; unbiased std as torch's default). A group with equal rewards gets 0."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + ADV_EPS)


def select_pairs(rewards: Sequence[Sequence[float]], completions: Sequence[Sequence[Sequence[int]]],
                 k: int) -> List[Tuple[int, int, List[int]]]:
    """Per usable prompt (at least one right and one wrong sample): (prompt, chosen sample, K wrong
    samples). Chosen = the first right sample; the wrong ones = the prompt's distinct wrong
    completions in the order drawn, then repeated cyclically up to K. The first of them is the
    DPO rejected one."""
    out = []
    for i, (rs, comps) in enumerate(zip(rewards, completions)):
        right = [j for j, r in enumerate(rs) if r > 0]
        wrong = [j for j, r in enumerate(rs) if r <= 0]
        if not right or not wrong:
            continue
        distinct, seen = [], set()
        for j in wrong:
            key = tuple(comps[j])
            if key not in seen:
                seen.add(key)
                distinct.append(j)
        out.append((i, right[0], [distinct[n % len(distinct)] for n in range(k)]))
    return out


def grpo_head_task(hidden, weight, bias, labels, advantages):
    """A head task (model.HeadTasks style) running `fused_grpo_loss` on the LM head's inputs."""
    from mio_kernels import fused_grpo_loss

    out = fused_grpo_loss(hidden, weight, labels, advantages=advantages, bias=bias, loss_type="dapo",
                          beta=0.0, check_values=False)
    return {"loss": out.loss, "token_logps": out.token_logps}


class OnlineRun:
    """One method, one seed: the policy and a frozen reference (both the SFT model at start)."""

    def __init__(self, sft: Path, method: str, seed: int, args):
        from mio_kernels.objective import PreferenceConfig
        from mio_kernels.train.data import load_rows, tokenize_rows
        from mio_kernels.train.model import HeadTasks, PreferenceModel, load_model_and_tokenizer
        from mio_kernels.train.parallelize import Dist

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.method, self.seed, self.args = method, seed, args
        torch.manual_seed(seed)
        self.lm, self.tok = load_model_and_tokenizer(str(sft))
        ref_lm, _ = load_model_and_tokenizer(str(sft))
        ref_lm.requires_grad_(False).eval()
        self.model, self.ref = PreferenceModel(self.lm), PreferenceModel(ref_lm)
        self.d, self.pad, self.eos = Dist(), self.tok.pad_token_id, self.tok.eos_token_id
        k = {"dpo": 1, "mio": args.k}.get(method, 1)
        self.k = k
        # DPO/MIO: the op's own module (FusedMIOLoss) through the trainer's head task; eval: K = 3 rejected
        self.tasks = HeadTasks(PreferenceConfig(loss_type="dpo" if method == "dpo" else "mio", beta=args.beta,
                                                num_negatives=k))
        self.eval_tasks = HeadTasks(PreferenceConfig(loss_type="mio", beta=args.beta, num_negatives=3))
        rows, src = load_rows("builtin:arithmetic", "train")
        self.train, _ = tokenize_rows(rows, src, self.tok, 128, 96, 3)  # prompts (and, for tests, the gold responses)
        erows, esrc = load_rows("builtin:arithmetic", "test")
        self.held_out, _ = tokenize_rows(erows, esrc, self.tok, 128, 96, 3, args.eval_examples)
        from mio_kernels.train.evaluate import sequence_logps
        self.ref_eval = sequence_logps(self.ref, self.held_out, self.eval_tasks, 100, self.pad, self.d).sums
        self.opt = torch.optim.AdamW(self.lm.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts, step: int):
        """G completions per prompt (token ids up to and including EOS), and the mean per-token
        entropy of the sampling distribution over all generated tokens."""
        from mio_kernels.train.data import collate_prompts

        G = self.args.samples
        batch = collate_prompts(prompts, self.pad)
        torch.manual_seed(self.seed * 1_000_003 + step)  # same draws for every method at the same policy
        self.lm.eval()
        out = self.lm.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=self.args.max_new_tokens, num_return_sequences=G,
                               pad_token_id=self.pad, eos_token_id=self.eos, output_logits=True,
                               return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        completions, alive = [], torch.zeros(new.shape, dtype=torch.bool)
        for r, row in enumerate(new.tolist()):
            n = row.index(self.eos) + 1 if self.eos in row else len(row)
            completions.append(row[:n])
            alive[r, :n] = True
        logits = torch.stack(out.logits, 1).float()  # [B*G, T, V] raw logits (temperature 1)
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        entropy = (ent[alive[:, :ent.shape[1]]]).mean().item()
        grouped = [completions[i * G:(i + 1) * G] for i in range(len(prompts))]
        return grouped, entropy

    # ------------------------------------------------------------------ updates
    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lm.parameters(), 1.0)
        self.opt.step()

    def grpo_step(self, prompts, completions, rewards: torch.Tensor, pairs) -> Dict[str, Optional[float]]:
        from mio_kernels.train.data import Example, collate

        G = rewards.shape[1]
        adv = group_advantages(rewards).reshape(-1)
        examples = [Example(p.prompt, [c], p.answer) for p, comps in zip(prompts, completions) for c in comps]
        batch = collate(examples, self.pad, responses=[0])
        self.lm.train()
        out = self.model(**batch, task=grpo_head_task, advantages=adv)
        sums = out["token_logps"].sum(-1).detach()
        chosen = [sums[i * G + c].item() for i, c, _ in pairs]
        rejected = [sums[i * G + w[0]].item() for i, _, w in pairs]
        if pairs:  # else every advantage is 0: no update
            self.update(out["loss"])
        return {"loss": out["loss"].item() if pairs else None, "logp_chosen": _mean(chosen),
                "logp_rejected": _mean(rejected)}

    def contrastive_step(self, prompts, completions, pairs) -> Dict[str, Optional[float]]:
        from mio_kernels.train.data import Example, collate
        from mio_kernels.train.evaluate import sequence_logps

        if not pairs:
            return {"loss": None, "logp_chosen": None, "logp_rejected": None}
        examples = [Example(prompts[i].prompt, [completions[i][c]] + [completions[i][j] for j in wrong[:self.k]],
                            prompts[i].answer) for i, c, wrong in pairs]
        P = len(examples)
        ref = sequence_logps(self.ref, examples, self.tasks, len(examples), self.pad, self.d).sums  # [P, 1+K]
        batch = collate(examples, self.pad)  # the op's layout: P chosen rows, then K blocks of P rejected
        self.lm.train()
        out = self.model(**batch, task=self.tasks.preference, ref_logps=ref.T.reshape(-1))
        logps = out["policy_logps"].detach()
        self.update(out["loss"])
        return {"loss": out["loss"].item(), "logp_chosen": logps[:P].mean().item(),
                "logp_rejected": logps[P:2 * P].mean().item()}

    # ------------------------------------------------------------------ evaluation and the run
    def evaluate(self) -> Dict[str, float]:
        from mio_kernels.train.evaluate import evaluate

        self.lm.eval()
        result, _ = evaluate(self.model, self.held_out, self.ref_eval, self.tok, self.eval_tasks, 100,
                             self.args.max_new_tokens, self.d, self.lm.config)
        return {"exact_match": result["exact_match"], "logp_heldout_chosen": result["logps/chosen"]}

    def run(self) -> Dict[str, object]:
        from mio_kernels.train.data import sample_order
        from mio_kernels.train.evaluate import is_correct

        args, t_start = self.args, time.perf_counter()
        series = {key: [] for key in SERIES}
        evals = {"step": [], "exact_match": [], "logp_heldout_chosen": []}
        updates = 0

        def do_eval(step):
            e = self.evaluate()
            evals["step"].append(step)
            for key in ("exact_match", "logp_heldout_chosen"):
                evals[key].append(e[key])

        do_eval(0)
        for step in range(args.steps):
            t0 = time.perf_counter()
            prompts = [self.train[i] for i in sample_order(len(self.train), self.seed, step * args.prompts, args.prompts)]
            completions, entropy = self.sample(prompts, step)
            texts = [self.tok.batch_decode(c, skip_special_tokens=True) for c in completions]
            rewards = torch.tensor([[float(is_correct(t, p)) for t in ts] for ts, p in zip(texts, prompts)])
            pairs = select_pairs(rewards.tolist(), completions, self.k)
            if self.method == "grpo":
                res = self.grpo_step(prompts, completions, rewards, pairs)
            else:
                res = self.contrastive_step(prompts, completions, pairs)
            updates += bool(pairs)
            row = {"mean_reward": rewards.mean().item(), "usable_fraction": len(pairs) / len(prompts),
                   "entropy": entropy, **res, "step_time_s": time.perf_counter() - t0}
            for key in SERIES:
                series[key].append(row[key])
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                do_eval(step + 1)
        return {"method": self.method, "seed": self.seed, "series": series, "evals": evals, "updates": updates,
                "wall_time_s": time.perf_counter() - t_start}


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def run_one(sft: str, method: str, seed: int, args) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = OnlineRun(Path(sft), method, seed, args).run()
    print(f"  {method} seed {seed}: exact match {result['evals']['exact_match'][0]:.3f} -> "
          f"{result['evals']['exact_match'][-1]:.3f} in {time.perf_counter() - t0:.0f}s", flush=True)
    return result


# ----------------------------------------------------------------------------- summary, table, figure

def mean_std(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def window_mean(values: Sequence[Optional[float]], lo: int, hi: int) -> Optional[float]:
    return _mean([v for v in values[lo:hi] if v is not None])


def summarise(record: dict) -> str:
    """Fills record["summary"] (per method, mean ± std over seeds) and returns the markdown."""
    cfg = record["config"]
    steps, w = cfg["steps"], max(1, min(10, cfg["steps"] // 5))
    record["summary"] = summary = {}
    rows = []
    for method in cfg["methods"]:
        runs = [r for r in record["runs"] if r["method"] == method]
        s = summary[method] = {
            "exact_match_start": mean_std([r["evals"]["exact_match"][0] for r in runs]),
            "exact_match_end": mean_std([r["evals"]["exact_match"][-1] for r in runs]),
            "exact_match_best": mean_std([max(r["evals"]["exact_match"]) for r in runs]),
            "heldout_logp_chosen_start": mean_std([r["evals"]["logp_heldout_chosen"][0] for r in runs]),
            "heldout_logp_chosen_end": mean_std([r["evals"]["logp_heldout_chosen"][-1] for r in runs]),
            "wall_time_s": mean_std([r["wall_time_s"] for r in runs]),
            "updates": mean_std([r["updates"] for r in runs]),
        }
        for key in ("mean_reward", "usable_fraction", "logp_chosen", "logp_rejected", "entropy"):
            s[f"{key}_first"] = mean_std([window_mean(r["series"][key], 0, w) for r in runs])
            s[f"{key}_last"] = mean_std([window_mean(r["series"][key], steps - w, steps) for r in runs])

        def ms(x, d=3):
            return "-" if x is None else f"{x['mean']:.{d}f} ± {x['std']:.{d}f}"

        def fl(key, d=2):
            return f"{ms(s[key + '_first'], d)} → {ms(s[key + '_last'], d)}"

        rows.append([method, f"{ms(s['exact_match_start'])} → {ms(s['exact_match_end'])}", ms(s["exact_match_best"]),
                     fl("mean_reward"), fl("usable_fraction"), fl("logp_chosen"), fl("logp_rejected"), fl("entropy"),
                     f"{ms(s['heldout_logp_chosen_start'], 2)} → {ms(s['heldout_logp_chosen_end'], 2)}",
                     f"{s['wall_time_s']['mean']:.0f} s"])
    header = ["method", f"held-out exact match, step 0 → {steps}", "best eval", f"mean reward (first → last {w} steps)",
              "usable prompts", "chosen log-prob (samples)", "rejected log-prob (samples)", "entropy / token",
              "held-out reference-solution log-prob", "wall time per run"]
    intro = (f"Online steps from the main job's SFT model: {steps} steps x {cfg['prompts']} prompts x {cfg['samples']} "
             f"samples (temperature 1), lr {cfg['lr']}, DPO/MIO beta {cfg['beta']}, MIO K = {cfg['k']} (wrong samples "
             f"repeated when fewer); mean ± std over seeds {', '.join(map(str, cfg['seeds']))}; "
             f"held-out: {cfg['eval_examples']} prompts, greedy. Log-probs are sequence sums (nats) under the policy "
             f"before each update, of the same pair for every method (first right / first wrong sample of each usable "
             f"prompt). {record['machine']}.")
    return intro + "\n\n" + "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + \
        "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def _smooth(values: Sequence[Optional[float]], window: int) -> List[float]:
    out = []
    for i in range(len(values)):
        v = [x for x in values[max(0, i - window + 1):i + 1] if x is not None]
        out.append(sum(v) / len(v) if v else float("nan"))
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    import numpy as np

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # nan-means of steps no seed could use

    cfg = record["config"]
    window = max(1, min(10, cfg["steps"] // 10))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [(axes[0, 0], "evals", "exact_match", "held-out exact match (greedy)"),
              (axes[0, 1], "series", "logp_chosen", f"chosen sample's log-prob under the policy ({window}-step mean)"),
              (axes[1, 0], "evals", "logp_heldout_chosen", "held-out reference solutions' log-prob"),
              (axes[1, 1], "series", "mean_reward", f"mean reward of the samples ({window}-step mean)")]
    for method in cfg["methods"]:
        runs = [r for r in record["runs"] if r["method"] == method]
        for ax, where, key, title in panels:
            if where == "evals":
                x = np.array(runs[0]["evals"]["step"])
                ys = np.array([r["evals"][key] for r in runs], dtype=float)
            else:
                x = np.arange(1, cfg["steps"] + 1)
                ys = np.array([_smooth(r["series"][key], window) for r in runs], dtype=float)
            mean, std = np.nanmean(ys, 0), (np.nanstd(ys, 0, ddof=1) if len(runs) > 1 else np.zeros(ys.shape[1]))
            ax.plot(x, mean, color=COLORS[method], lw=1.6, label=method.upper(), marker="o" if where == "evals" else None,
                    ms=3)
            ax.fill_between(x, mean - std, mean + std, color=COLORS[method], alpha=0.2)
            ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("online step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"GRPO vs online DPO vs online MIO from the SFT model: {cfg['prompts']} prompts x {cfg['samples']} "
                 f"samples per step, mean ± std over {len(cfg['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        record = json.loads((args.out / f"{NAME}.json").read_text())
        table = summarise(record)
        plot(record, args.out / f"{NAME}.png")
        _common.write_outputs(args.out, NAME, record, table)
        return record
    _common.setup(args)
    t0 = time.perf_counter()
    sft = ensure_sft(args)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    print(f"{len(jobs)} online runs ({args.jobs} at a time): {args.steps} steps x {args.prompts} prompts x "
          f"{args.samples} samples", flush=True)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, str(sft), m, s, args) for m, s in jobs]
            runs = [f.result() for f in futures]
    else:
        runs = [run_one(str(sft), m, s, args) for m, s in jobs]
    from main_job_seeds import cpu_model
    import datetime
    machine = (f"{cpu_model()} ({os.cpu_count()} CPUs), {args.jobs} runs at a time, {args.threads} thread each, "
               f"{datetime.date.today().isoformat()}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "sft", "replot")}
    record = {"experiment": NAME, "config": config, "machine": machine, "runs": runs,
              "total_wall_time_s": time.perf_counter() - t0}
    table = summarise(record)
    plot(record, args.out / f"{NAME}.png")
    _common.write_outputs(args.out, NAME, record, table)
    print(f"total wall time {record['total_wall_time_s'] / 60:.1f} min")
    return record


if __name__ == "__main__":
    main()
