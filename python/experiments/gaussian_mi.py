"""MI estimation on correlated Gaussians: DV (MINE, the bound behind DPO) vs JS (the bound behind MIO).

x ~ N(0, I_d), y = rho * x + sqrt(1 - rho^2) * eps, so I(x; y) = -(d/2) log(1 - rho^2).
A concat MLP critic T(x, y) is trained to maximise either `dv_mi_estimate` or `js_mi_estimate`
from `mio_kernels.losses`; negatives are the K shuffles (x_i, y_perm_k(i)) of the minibatch.
MI is read off every critic with the DV formula on a large held-out sample (for the JS critic
this is the Deep InfoMax / Poole et al. 2019 read-off: JS training recovers T ~ log p(x,y)/p(x)p(y)).

Gradient variance: at a fixed critic we draw M fresh minibatches, take the gradient g of the
estimate w.r.t. all critic parameters on each, and report
  var = tr Cov(g)             (sum over parameters of the across-minibatch variance), and
  nsr = tr Cov(g) / |E g|^2   (noise-to-signal ratio, scale-free; |E g|^2 is bias-corrected,
                               |mean g|^2 - var/M, and nsr is None where that is not > 0).
At the untrained critic (T ~ 0) the JS gradient is the DV one times sp'(0) = 1/2, so var(DV)/var(JS)
is ~4 there by scale alone and nsr(DV)/nsr(JS) ~1: that is the baseline a "lower variance" claim
has to beat. Both estimators are compared at the same critics: the initial one, the final
JS-trained one (close to the log density ratio, i.e. near the optimum of both objectives, where
|E g| ~ 0 and only var is meaningful) and the final DV-trained one; and each along its own
training trajectory: var averaged over checkpoints at 10%, 50%, 100% of the steps, nsr at 10%
(later the mean gradient is too small to resolve with M minibatches).

Usage: python python/experiments/gaussian_mi.py [--quick] [--out DIR]
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

import _common
from mio_kernels.losses import dv_mi_estimate, js_mi_estimate

ESTIMATORS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {"dv": dv_mi_estimate, "js": js_mi_estimate}
CHECKPOINT_FRACTIONS = (0.1, 0.5, 1.0)


def true_mi(dim: int, rho: float) -> float:
    return -0.5 * dim * math.log(1.0 - rho * rho)


def sample(n: int, dim: int, rho: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, dim, generator=gen)
    y = rho * x + math.sqrt(1.0 - rho * rho) * torch.randn(n, dim, generator=gen)
    return x, y


class ConcatCritic(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x, y], dim=-1)).squeeze(-1)


def critic_scores(critic: ConcatCritic, x: Tensor, y: Tensor, k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Scores of the B positives [B] and of K shuffled negatives per positive [K, B]."""
    b = x.shape[0]
    perms = torch.stack([torch.randperm(b, generator=gen) for _ in range(k)])        # [K, B]
    scores = critic(torch.cat([x, x.repeat(k, 1)]), torch.cat([y, y[perms.flatten()]]))
    return scores[:b], scores[b:].view(k, b)


def train_critic(estimator: str, dim: int, rho: float, k: int, args, seed: int):
    """Adam on -estimate; returns the final critic, {step: state_dict} checkpoints and per-step curves."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                       # same initial critic for DV and JS
    critic = ConcatCritic(dim, args.hidden)
    opt = torch.optim.Adam(critic.parameters(), lr=args.lr)
    objective = ESTIMATORS[estimator]
    ckpt_steps = {max(1, round(f * args.steps)) for f in CHECKPOINT_FRACTIONS}
    checkpoints, curve_obj, curve_dv = {0: copy.deepcopy(critic.state_dict())}, [], []
    for step in range(1, args.steps + 1):
        x, y = sample(args.batch, dim, rho, gen)
        pos, neg = critic_scores(critic, x, y, k, gen)
        value = objective(pos, neg)
        opt.zero_grad(set_to_none=True)
        (-value).backward()
        opt.step()
        curve_obj.append(value.item())
        curve_dv.append(dv_mi_estimate(pos.detach(), neg.detach()).item())
        if step in ckpt_steps:
            checkpoints[step] = copy.deepcopy(critic.state_dict())
    return critic, checkpoints, curve_obj, curve_dv


@torch.no_grad()
def heldout_dv(critic: ConcatCritic, dim: int, rho: float, n: int, gen: torch.Generator) -> float:
    x, y = sample(n, dim, rho, gen)
    pos, neg = critic_scores(critic, x, y, 4, gen)
    return dv_mi_estimate(pos, neg).item()


def gradient_stats(critic: ConcatCritic, estimator: str, dim: int, rho: float, k: int, batch: int,
                   minibatches: int, gen: torch.Generator) -> Dict[str, float]:
    """Across-minibatch tr Cov and noise-to-signal ratio of d(estimate)/d(critic params)."""
    objective = ESTIMATORS[estimator]
    params = list(critic.parameters())
    grads = []
    for _ in range(minibatches):
        x, y = sample(batch, dim, rho, gen)
        pos, neg = critic_scores(critic, x, y, k, gen)
        g = torch.autograd.grad(objective(pos, neg), params)
        grads.append(torch.cat([t.flatten() for t in g]))
    g = torch.stack(grads).double()
    var = g.var(dim=0, unbiased=True).sum().item()
    signal = g.mean(0).square().sum().item() - var / minibatches   # unbiased |E g|^2
    return {"var": var, "nsr": var / signal if signal > 0 else None}


def run_cell(dim: int, rho: float, k: int, args, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    cell = {"rho": rho, "k": k, "true_mi": true_mi(dim, rho)}
    finals = {}
    probe = ConcatCritic(dim, args.hidden)

    def stats_at(state, est):
        probe.load_state_dict(state)
        return gradient_stats(probe, est, dim, rho, k, args.batch, args.minibatches, gen)

    for est in ESTIMATORS:
        critic, ckpts, curve_obj, curve_dv = train_critic(est, dim, rho, k, args, seed)
        finals[est], init = critic.state_dict(), ckpts.pop(0)
        tail = curve_dv[-max(1, args.steps // 10):]
        own = [stats_at(ckpts[step], est) for step in sorted(ckpts)]
        cell[est] = {
            "mi_heldout": heldout_dv(critic, dim, rho, args.eval_n, gen),
            "mi_train_tail_mean": sum(tail) / len(tail),
            "mi_train_tail_std": torch.tensor(tail).std().item() if len(tail) > 1 else 0.0,
            "objective_final": sum(curve_obj[-len(tail):]) / len(tail),
            "own_var": sum(s["var"] for s in own) / len(own),
            "own_nsr_early": own[0]["nsr"],
            "curve_dv": curve_dv[:: max(1, args.steps // 200)],
        }
    # Same critic, both estimators. The initial critic is identical for DV and JS (same seed).
    for name, state in (("init", init), ("js_final", finals["js"]), ("dv_final", finals["dv"])):
        for est in ESTIMATORS:
            s = stats_at(state, est)
            cell[est][f"var_at_{name}"] = s["var"]
            cell[est][f"nsr_at_{name}"] = s["nsr"]
    return cell


def _ratio(cell: dict, key: str) -> Optional[float]:
    """DV / JS of one statistic; None where either side is unresolved."""
    dv, js = cell["dv"][key], cell["js"][key]
    return None if dv is None or js is None else dv / js


def _geomean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _nan(v: Optional[float]) -> float:
    return float("nan") if v is None else v


def plot(record: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, ks, dim = record["cells"], record["config"]["ks"], record["config"]["dim"]
    colors = {"dv": "tab:red", "js": "tab:blue"}
    styles = {k: s for k, s in zip(ks, ["-", "--", ":", "-."])}
    rhos = sorted({c["rho"] for c in cells})

    def row(k):
        return sorted((c for c in cells if c["k"] == k), key=lambda c: c["rho"])

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    ax = axes[0]
    ax.plot(rhos, [true_mi(dim, r) for r in rhos], "k-", lw=2, label="true MI")
    for est in ESTIMATORS:
        for k in ks:
            ax.plot(rhos, [c[est]["mi_heldout"] for c in row(k)], styles[k], color=colors[est], marker="o", ms=3,
                    label=f"{est.upper()} critic, K={k}")
    ax.set(xlabel="rho", ylabel="MI (nats): DV formula, held-out data", title=f"(a) MI estimate, d={dim}")
    ax.legend(fontsize=7)
    ax = axes[1]
    for est in ESTIMATORS:
        for k in ks:
            ax.semilogy(rhos, [c[est]["var_at_js_final"] for c in row(k)], styles[k], color=colors[est], marker="o",
                        ms=3, label=f"{est.upper()} K={k}")
    ax.set(xlabel="rho", ylabel="tr Cov(grad) over minibatches", title="(b) gradient variance, trained critic")
    ax.legend(fontsize=7)
    ax = axes[2]
    for k in ks:
        ax.semilogy(rhos, [_ratio(c, "var_at_js_final") for c in row(k)], styles[k], color="k", marker="o", ms=3,
                    label=f"var, trained JS critic, K={k}")
        ax.semilogy(rhos, [_nan(_ratio(c, "own_nsr_early")) for c in row(k)], styles[k], color="tab:green",
                    marker="s", ms=3, label=f"noise/signal, own critic at 10%, K={k}")
    ax.axhline(4.0, color="gray", lw=0.8)
    ax.axhline(1.0, color="tab:green", lw=0.8)
    ax.set(xlabel="rho", ylabel="DV / JS", title="(c) DV/JS ratios (grey: 4 = scale-only at T=0)")
    ax.legend(fontsize=6)
    ax = axes[3]
    rho_show = max(rhos)
    stride = max(1, record["config"]["steps"] // 200)
    for est in ESTIMATORS:
        for k in ks:
            c = next(c for c in cells if c["k"] == k and c["rho"] == rho_show)
            curve = c[est]["curve_dv"]
            ax.plot([i * stride for i in range(len(curve))], curve, styles[k], color=colors[est], lw=0.8,
                    label=f"{est.upper()} K={k}")
    ax.axhline(true_mi(dim, rho_show), color="k", lw=1.5)
    ax.set(xlabel="step", ylabel="minibatch DV estimate", title=f"(d) training, rho={rho_show}")
    ax.set_ylim(-1, 2 * true_mi(dim, rho_show) + 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--rhos", type=float, nargs="+", default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    full = dict(dim=10, rhos=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], ks=[1, 4, 16], steps=1500,
                batch=128, hidden=128, lr=5e-4, minibatches=50, eval_n=8192)
    quick = dict(dim=4, rhos=[0.5, 0.9], ks=[1, 4], steps=60, batch=64, hidden=32, lr=1e-3, minibatches=8,
                 eval_n=1024)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    _common.setup(args)
    t0 = time.time()
    cells = []
    for k in args.ks:
        for rho in args.rhos:
            c = run_cell(args.dim, rho, k, args, args.seed)
            cells.append(c)
            print(f"K={k:2d} rho={rho:.1f} true={c['true_mi']:.2f} dv={c['dv']['mi_heldout']:.2f} "
                  f"js={c['js']['mi_heldout']:.2f}  var DV/JS at trained critic {_ratio(c, 'var_at_js_final'):.1f}"
                  f"  [{time.time() - t0:.0f}s]", flush=True)
    config = {k: getattr(args, k) for k in ("dim", "rhos", "ks", "steps", "batch", "hidden", "lr", "minibatches",
                                              "eval_n", "seed", "quick")}
    config["checkpoint_fractions"] = list(CHECKPOINT_FRACTIONS)
    summary = {}
    for k in args.ks:
        ks = [c for c in cells if c["k"] == k]
        summary[f"K={k}"] = {
            "mean_abs_err_dv": sum(abs(c["dv"]["mi_heldout"] - c["true_mi"]) for c in ks) / len(ks),
            "mean_abs_err_js": sum(abs(c["js"]["mi_heldout"] - c["true_mi"]) for c in ks) / len(ks),
            "mean_train_std_dv": sum(c["dv"]["mi_train_tail_std"] for c in ks) / len(ks),
            "mean_train_std_js": sum(c["js"]["mi_train_tail_std"] for c in ks) / len(ks),
            **{f"geomean_ratio_{key}": _geomean([_ratio(c, key) for c in ks])
               for key in ("var_at_init", "var_at_js_final", "var_at_dv_final", "own_var",
                           "nsr_at_init", "own_nsr_early")},
        }
    record = {"experiment": "gaussian_mi", "config": config, "summary": summary, "cells": cells,
              "seconds": time.time() - t0}
    table = "MI estimates (nats; DV formula on held-out data for both critics; train std = std of the " \
            "minibatch DV estimate over the last 10% of steps)\n\n"
    table += _common.markdown_table(
        ["K", "rho", "true MI", "DV critic", "JS critic", "DV train std", "JS train std"],
        [[c["k"], c["rho"], c["true_mi"], c["dv"]["mi_heldout"], c["js"]["mi_heldout"],
          c["dv"]["mi_train_tail_std"], c["js"]["mi_train_tail_std"]] for c in cells])
    table += ("\n\nGradient variance, ratio DV / JS (var = tr Cov; nsr = tr Cov / |E g|^2; '-' = mean gradient "
              "not resolved); last two columns: absolute tr Cov at the trained JS critic\n\n")
    table += _common.markdown_table(
        ["K", "rho", "var @init", "var @JS critic", "var @DV critic", "var own", "nsr @init", "nsr own @10%",
         "var JS @JS critic", "var DV @JS critic"],
        [[c["k"], c["rho"], _ratio(c, "var_at_init"), _ratio(c, "var_at_js_final"), _ratio(c, "var_at_dv_final"),
          _ratio(c, "own_var"), _ratio(c, "nsr_at_init"), _ratio(c, "own_nsr_early"),
          c["js"]["var_at_js_final"], c["dv"]["var_at_js_final"]] for c in cells])
    table += "\n\nSummary over rho (ratios: geometric mean of DV/JS)\n\n"
    table += _common.markdown_table(
        ["K", "mean abs err DV", "mean abs err JS", "train std DV", "train std JS", "var @init",
         "var @JS critic", "var @DV critic", "var own", "nsr own @10%"],
        [[k, s["mean_abs_err_dv"], s["mean_abs_err_js"], s["mean_train_std_dv"], s["mean_train_std_js"],
          s["geomean_ratio_var_at_init"], s["geomean_ratio_var_at_js_final"], s["geomean_ratio_var_at_dv_final"],
          s["geomean_ratio_own_var"], s["geomean_ratio_own_nsr_early"]] for k, s in summary.items()])
    plot(record, args.out / "gaussian_mi.png")
    _common.write_outputs(args.out, "gaussian_mi", record, table)
    return record


if __name__ == "__main__":
    main()
