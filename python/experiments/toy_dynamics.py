"""Likelihood dynamics of `dpo` vs `mio` on a softmax policy over a small discrete response set.

Preference set from an optimal-response table: N prompts, M = N + U responses; response i is the
optimal answer to prompt i. Each prompt's K rejected responses are other prompts' answers ("the
right answer to a different question"), in one of two tables:
  balanced  prompt i rejects answers i+1..i+K (mod N): every answer is chosen once, rejected K times;
  popular   answer 0 is the first rejected response of every other prompt (prompt 0 rejects
            answer 1), the other K-1 as in balanced: one answer is a common wrong answer.
The other responses of prompt i (other answers, U filler responses) are "unseen" in its pairs.

Policy: logits[x, y] = ref_logits[x, y] + h_x . w_y with w trainable (init 0: the policy starts
at the reference) and h_x fixed unit prompt features with pairwise cosine c:
  c = 0    h_x one-hot, so the logits themselves are the parameters (the tabular toy);
  c > 0    prompts share parameters, as similar prompts do through an LM's features.
A world is a (table, c) pair. The reference sets the four starting scenarios: the chosen and the
rejected entries of each prompt are "normal" (logit 0, like every unseen response) or "very
unlikely" (logit --low = -10, probability ~3e-6).
Full-batch gradient descent on the mean over prompts of `get_loss(name).fn(u_w, u_l, beta).loss`
(autograd through our loss), u = log pi - log pi_ref.

Recorded (mean over prompts): p(chosen), sum_k p(rejected_k), p(all unseen), chosen log-ratio u_w;
and the worst prompt's u_w. "Chosen lowered" = some prompt's u_w fell below 0 (its chosen became
less likely than under the reference) or mean p(chosen) ended > 1% below its maximum.
For tabular K = 1 the DPO step is exactly Delta logits = lr*beta*sigma(-margin)*(e_w - e_l) / N,
which can only raise the chosen; for any K the chosen logit gets +(1 - softmax_w) > 0.

Usage: python python/experiments/toy_dynamics.py [--quick] [--out DIR]
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Tuple

import torch

import _common
from mio_kernels.losses import get_loss

SCENARIOS = {  # name: (chosen level, rejected level) in the reference
    "both very unlikely": ("low", "low"),
    "chosen normal, rejected very unlikely": ("normal", "low"),
    "chosen very unlikely, rejected normal": ("low", "normal"),
    "both normal": ("normal", "normal"),
}
LOSSES = ("dpo", "mio")
World = Tuple[str, float]  # (table, c)


def prompt_features(n: int, c: float) -> torch.Tensor:
    """[N, N+1] unit rows with h_i . h_j = c for i != j."""
    return torch.cat([math.sqrt(1.0 - c) * torch.eye(n), math.sqrt(c) * torch.ones(n, 1)], dim=1)


def rejected_table(table: str, n: int, k: int) -> torch.Tensor:
    """[K, N] rejected response of each prompt."""
    rows = torch.arange(n)
    rej = torch.stack([(rows + 1 + j) % n for j in range(k)])
    if table == "popular":
        rej[0] = torch.where(rows == 0, torch.ones_like(rows), torch.zeros_like(rows))
        for j in range(1, k):  # keep each prompt's K negatives distinct and != its own answer
            rej[j] = torch.where(rej[j] == 0, (rows + 1 + k) % n, rej[j])
    elif table != "balanced":
        raise ValueError(f"table must be balanced|popular, got {table!r}")
    return rej


def run_batch(loss: str, k: int, settings: List[Tuple[str, World]], args) -> List[Dict[str, object]]:
    """All (scenario, world) settings for one loss and K at once: R independent policies, batched."""
    r, n, m = len(settings), args.prompts, args.prompts + args.filler
    rows = torch.arange(n)
    rej_rows = rows.expand(k, n)
    rejected = torch.stack([rejected_table(world[0], n, k) for _, world in settings])   # [R, K, N]
    ridx = torch.arange(r)[:, None, None]
    level = {"low": args.low, "normal": 0.0}
    ref_logits = torch.zeros(r, n, m)
    unseen = torch.ones(r, n, m, dtype=torch.bool)
    for i, (scenario, _) in enumerate(settings):
        ref_logits[i, rows, rows] = level[SCENARIOS[scenario][0]]
        ref_logits[i, rej_rows, rejected[i]] = level[SCENARIOS[scenario][1]]
        unseen[i, rows, rows] = False
        unseen[i, rej_rows, rejected[i]] = False

    feats = torch.stack([prompt_features(n, world[1]) for _, world in settings])   # [R, N, F]
    w = torch.zeros(r, m, feats.shape[-1], requires_grad=True)
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    loss_fn = get_loss(loss).fn
    opt = torch.optim.SGD([w], lr=args.lr)
    stride = max(1, args.steps // args.points)
    snaps, steps = [], []
    worst_u_w, max_p_w = torch.zeros(r), torch.zeros(r)
    for step in range(args.steps + 1):
        logp = torch.log_softmax(ref_logits + feats @ w.transpose(1, 2), dim=-1)     # [R, N, M]
        u = logp - ref_logp
        u_w, u_l = u[:, rows, rows], u[ridx, rej_rows, rejected]                     # [R, N], [R, K, N]
        # the prompts of all R policies side by side: P = R * N
        out = loss_fn(u_w.reshape(-1), u_l.transpose(0, 1).reshape(k, -1), args.beta, 0.0)
        with torch.no_grad():
            p = logp.exp()
            p_w = p[:, rows, rows].mean(-1)
            worst_u_w = torch.minimum(worst_u_w, u_w.min(-1).values)
            max_p_w = torch.maximum(max_p_w, p_w)
            if step % stride == 0 or step == args.steps:
                steps.append(step)
                snaps.append(torch.stack([p_w, p[ridx, rej_rows, rejected].sum(1).mean(-1),
                                          (p * unseen).sum(-1).mean(-1), u_w.mean(-1), u_w.min(-1).values]))
        if step < args.steps:
            opt.zero_grad(set_to_none=True)
            # sum over policies of each one's mean-over-prompts loss (they share no parameter)
            (out.loss.sum() / n).backward()
            opt.step()
    snaps = torch.stack(snaps).tolist()                               # [T, 5, R]
    results = []
    for i, (scenario, (table, c)) in enumerate(settings):
        curve = {"step": steps}
        for j, key in enumerate(("p_chosen", "p_rejected", "p_unseen", "u_chosen", "u_chosen_worst")):
            curve[key] = [snap[j][i] for snap in snaps]
        late_drop = math.log(max_p_w[i].item()) - math.log(curve["p_chosen"][-1])
        results.append({
            "loss": loss, "scenario": scenario, "table": table, "c": c, "k": k,
            "p_chosen_start": curve["p_chosen"][0], "p_chosen_max": max_p_w[i].item(),
            "p_chosen_end": curve["p_chosen"][-1],
            "p_rejected_start": curve["p_rejected"][0], "p_rejected_end": curve["p_rejected"][-1],
            "p_unseen_start": curve["p_unseen"][0], "p_unseen_end": curve["p_unseen"][-1],
            "u_chosen_end": curve["u_chosen"][-1],
            "u_chosen_worst_min": worst_u_w[i].item(), "u_chosen_worst_end": curve["u_chosen_worst"][-1],
            "chosen_late_drop": late_drop,
            "chosen_lowered": bool(worst_u_w[i].item() < 0.0 or late_drop > 0.01),
            "curve": curve,
        })
    return results


def world_name(table: str, c: float) -> str:
    return "tabular" if (table == "balanced" and c == 0) else f"{table} table, c={c}"


def plot(record: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, cfg = record["runs"], record["config"]
    rows = [(table, c, k) for table, c in cfg["worlds"] for k in cfg["ks"]]
    height = 3.0 * len(rows) + 0.8  # inches; the top 0.8 hold the title and the legend
    fig, axes = plt.subplots(len(rows), len(SCENARIOS), figsize=(4.2 * len(SCENARIOS), height),
                             squeeze=False, sharex=True)
    colors = {"p_chosen": "tab:green", "p_rejected": "tab:red", "p_unseen": "tab:gray"}
    style = {"dpo": "-", "mio": "--"}
    for i, (table, c, k) in enumerate(rows):
        for j, scenario in enumerate(SCENARIOS):
            ax = axes[i][j]
            for r in runs:
                if (r["table"], r["c"], r["k"], r["scenario"]) != (table, c, k, scenario):
                    continue
                for key, color in colors.items():
                    ax.semilogy(r["curve"]["step"], r["curve"][key], style[r["loss"]], color=color, lw=1.2,
                                label=f"{r['loss'].upper()} {key[2:]}")
                if table == "popular":  # the common wrong answer's own prompt
                    ax.semilogy(r["curve"]["step"], [math.exp(u) * r["p_chosen_start"] for u in
                                                     r["curve"]["u_chosen_worst"]],
                                style[r["loss"]], color="tab:olive", lw=1.0, label=f"{r['loss'].upper()} worst chosen")
            ax.set_ylim(1e-9, 1.5)
            ax.set_title(f"{scenario}\n{world_name(table, c)}, K={k}", fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("GD step")
            if j == 0:
                ax.set_ylabel("probability (mean over prompts)")
    handles, labels = {}, {}
    for ax in axes.flat:  # one legend for the figure, with every line kind that appears
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.3 / height))
    fig.suptitle(f"dpo (solid) vs mio (dashed), beta={cfg['beta']}: mean over prompts of p(chosen), "
                 f"sum of p(rejected), p(unseen); olive: the prompt whose chosen log-ratio is lowest",
                 fontsize=10, y=1 - 0.05 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_world(text: str) -> World:
    table, _, c = text.partition(":")
    return table, float(c or 0.0)


def main(argv=None) -> dict:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--low", type=float, default=-10.0, help="reference logit of a 'very unlikely' response")
    parser.add_argument("--worlds", type=parse_world, nargs="+", default=None,
                        help="TABLE:C pairs, e.g. balanced:0 (tabular) balanced:0.8 popular:0.8")
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    defaults = (dict(worlds=[("balanced", 0.0)], ks=[1], steps=200) if args.quick else
                dict(worlds=[("balanced", 0.0), ("balanced", 0.8), ("popular", 0.8)], ks=[1, 4], steps=3000))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.prompts, args.filler, args.points = 8, 8, 150
    _common.setup(args)
    t0 = time.time()
    settings = [(scenario, world) for world in args.worlds for scenario in SCENARIOS]
    runs = [run for k in args.ks for loss in LOSSES for run in run_batch(loss, k, settings, args)]
    order = {name: i for i, name in enumerate(SCENARIOS)}
    worlds = [tuple(w) for w in args.worlds]
    runs.sort(key=lambda r: (worlds.index((r["table"], r["c"])), r["k"], order[r["scenario"]],
                             LOSSES.index(r["loss"])))
    config = {key: getattr(args, key) for key in ("beta", "lr", "low", "worlds", "ks", "steps", "prompts", "filler",
                                                   "seed", "quick")}

    def where(r):
        return f"{r['scenario']} ({world_name(r['table'], r['c'])}, K={r['k']})"

    summary = {
        "dpo_lowers_chosen_in": [where(r) for r in runs if r["loss"] == "dpo" and r["chosen_lowered"]],
        "mio_lowers_chosen_in": [where(r) for r in runs if r["loss"] == "mio" and r["chosen_lowered"]],
        "mio_chosen_ratio_fixed_point_(K+1)^(1/beta)": {str(k): (k + 1) ** (1.0 / args.beta) for k in args.ks},
    }
    record = {"experiment": "toy_dynamics", "config": config, "summary": summary, "runs": runs,
              "seconds": time.time() - t0}
    header = ["world", "K", "scenario", "loss", "p_w start", "p_w max", "p_w end", "worst u_w min", "worst u_w end",
              "p_rej start", "p_rej end", "p_unseen start", "p_unseen end", "chosen lowered"]
    rows = [[world_name(r["table"], r["c"]), r["k"], r["scenario"], r["loss"], r["p_chosen_start"],
             r["p_chosen_max"], r["p_chosen_end"], r["u_chosen_worst_min"], r["u_chosen_worst_end"],
             r["p_rejected_start"], r["p_rejected_end"], r["p_unseen_start"], r["p_unseen_end"],
             "yes" if r["chosen_lowered"] else "no"] for r in runs]
    table = _common.markdown_table(header, rows)
    table += (f"\n\nDPO lowers the chosen likelihood in: {summary['dpo_lowers_chosen_in'] or 'none'}"
              f"\n\nMIO lowers the chosen likelihood in: {summary['mio_lowers_chosen_in'] or 'none'}")
    plot(record, args.out / "toy_dynamics.png")
    _common.write_outputs(args.out, "toy_dynamics", record, table)
    return record


if __name__ == "__main__":
    main()
