"""GRPO-family loss from LM-head inputs: fused_grpo_loss against the tools people use, interleaved.

Forward+backward of one GRPO loss (TRL 1.16 definitions) straight from hidden [B, T, H], weight
[V, H], labels [B, T], advantages per completion [B], old per-token log-probs (off-policy) and
reference per-token log-probs, for: ours in single pass (6 N H V) and in recompute (8 N H V),
Liger's LigerFusedLinearGRPOLoss, TRL's own GRPOTrainer path (its fused LM head + _compute_loss),
naive PyTorch over full logits and torch.compile of it. What each row runs and how it is matched to
ours: grpo_impls.py.

  1. Check. Every row runs once on the same inputs and is compared with ours in single pass: loss
     (relative to max(|loss|, mean |advantage|)), per-token log-probs where the row returns them
     (max error relative to max |logp|), gradients of hidden and weight (relative norm error).
     A row beyond TOLERANCE is reported FAILED and is not timed.
  2. Time. Rows are interleaved round by round in this process, rotating which goes first
     (bench_interleaved.interleave), so that a shared machine's load drift hits all alike; each row
     reports its median and best wall time, their ratios to ours, and its GEMM floor: the LM-head
     GEMM FLOPs it really does (grpo_impls.Impl.gemm_flop) at the best torch.matmul rate measured at
     the start (bench_loss.measure_floors).
  3. Memory. Each row that passed runs again in a fresh process: peak extra memory of one
     forward+backward over the live inputs, gradients included (loss_measure.peak_extra_bytes).

    python benchmarks/bench_grpo.py                       # 2 x 8192 tokens, H 256, V 32000, dapo + KL, fp32
    python benchmarks/bench_grpo.py --quick               # tiny shape, 1 round (a smoke run)
    python benchmarks/bench_grpo.py --shape 2x4096x256x32000 --loss-type grpo --impls ours_recompute,liger
    python benchmarks/bench_grpo.py --beta 0 --loss-type grpo --zero-advantages 0.5   # half the groups tied
    python benchmarks/bench_grpo.py --importance-sampling-level sequence --beta 0 --loss-type grpo   # GSPO

Writes --out (JSON) and the markdown table beside it (.md), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_interleaved  # noqa: E402
import bench_loss as bench  # noqa: E402
import grpo_impls as impls_mod  # noqa: E402
import loss_measure as measure  # noqa: E402
from grpo_impls import IMPL_NAMES, OURS, PEER_NAMES, GRPOInputs, GRPOOptions  # noqa: E402
from loss_impls import first_line  # noqa: E402

REPO = os.path.dirname(HERE)
DEFAULT_SHAPE = "2x8192x256x32000"
QUICK_SHAPE = "2x128x32x512"
# fp32: loss (relative to max(|loss|, mean |A|)), dH and dW (relative norm errors); per-token log-probs
# (max error relative to max |logp|).
TOLERANCE = 1e-4
LOGPS_TOLERANCE = 1e-5
MIB = 1024.0 ** 2


def parse_shape(text: str):
    dims = [int(d) for d in text.strip().lower().split("x")]
    if len(dims) != 4 or min(dims) < 1:
        raise SystemExit(f"--shape: {text!r} is not BxTxHxV")
    return dims


# --------------------------------------------------------------------------------------------------
# Check.


def snapshot(loss, logps, inputs: GRPOInputs) -> dict:
    return {"loss": float(loss.detach()), "logps": None if logps is None else logps.detach().float().cpu(),
            "d_hidden": inputs.hidden.grad.detach().float().cpu(), "d_weight": inputs.weight.grad.detach().float().cpu()}


def _rel_norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().float().cpu() - want).norm().item() / max(want.norm().item(), 1e-30)


def compare(loss, logps, inputs: GRPOInputs, target: dict) -> dict:
    """Errors of one row against ours; status "ok" or "FAILED" (any error beyond tolerance or not finite)."""
    mask = inputs.mask.cpu()
    scale = max(abs(target["loss"]), inputs.advantages.abs().cpu()[:, None].expand(mask.shape)[mask].mean().item()
                if mask.any() else 1.0)
    errs = {"loss_rel_err": abs(float(loss.detach()) - target["loss"]) / scale}
    if logps is not None and target["logps"] is not None:
        got, want = logps.detach().float().cpu()[mask], target["logps"][mask]
        errs["logps_rel_err"] = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0) if mask.any() else 0.0
    errs["d_hidden_rel_err"] = _rel_norm_err(inputs.hidden.grad, target["d_hidden"])
    errs["d_weight_rel_err"] = _rel_norm_err(inputs.weight.grad, target["d_weight"])
    ok = all(math.isfinite(v) for v in errs.values())
    ok = ok and all(v <= (LOGPS_TOLERANCE if k == "logps_rel_err" else TOLERANCE) for k, v in errs.items())
    return {"status": "ok" if ok else "FAILED", **{k: float(v) for k, v in errs.items()}}


def checked_steps(impls, inputs: GRPOInputs, rows: Dict[str, dict]) -> dict:
    """name -> (impl, step, check) for the rows that ran and agree with ours; every row's outcome
    (skipped, error, FAILED, ok) is recorded in `rows`."""
    steps = {}
    target = None
    for impl in impls:
        row = rows.setdefault(impl.name, {"label": impl.label})
        reason = impl.unavailable(inputs)
        if reason:
            row.update(status="skipped", reason=reason)
            print(f"  {impl.name}: skipped ({reason})", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        try:
            step = impl.build(inputs)
            loss, logps = bench.fwd_bwd(step, inputs)
        except Exception as err:  # one failing row must not end the run
            row.update(status="error", reason=first_line(err))
            print(f"  {impl.name}: error ({row['reason']})", file=sys.stderr, flush=True)
            continue
        finally:
            first_s = time.perf_counter() - t0
        if target is None:
            if impl.name != OURS.name:
                raise SystemExit(f"{OURS.name} (the check target) did not run: {rows[OURS.name]}")
            target = snapshot(loss, logps, inputs)
            check = {"status": "target"}
        else:
            check = compare(loss, logps, inputs, target)
        row.update(check=check, first_run_s=first_s)
        errors = ", ".join(f"{k[:-8]} {v:.1e}" for k, v in check.items() if k.endswith("_rel_err"))
        print(f"  {impl.name}: check {check['status']}{' (' + errors + ')' if errors else ''}  "
              f"[first run {first_s:.1f} s]", file=sys.stderr, flush=True)
        if check["status"] == "FAILED":
            row.update(status="FAILED", reason=f"disagrees with ours beyond {TOLERANCE:g} (not timed): {errors}")
            continue
        steps[impl.name] = (impl, step, check)
        del loss, logps
    inputs.hidden.grad = inputs.weight.grad = None
    return steps


# --------------------------------------------------------------------------------------------------
# Memory: one fresh process per row.


def worker_main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    options = GRPOOptions(**spec["options"])
    inputs = GRPOInputs.from_tensors(torch.load(spec["inputs"]), options)
    impl = impls_mod.impls_by_name()[spec["impl"]]
    step = impl.build(inputs)
    bench.fwd_bwd(step, inputs)                      # warm-up (and compilation)
    inputs.hidden.grad = inputs.weight.grad = None
    result = measure.peak_extra_bytes(lambda: bench.fwd_bwd(step, inputs), inputs.hidden.device)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def _zero_advantages(inputs: dict) -> str:
    share = inputs.get("zero_advantages", 0.0)
    return f" ({share:.0%} of the completions at 0)" if share else ""


def measure_memory(name: str, options: GRPOOptions, inputs_path: str, threads: int, folder: str) -> dict:
    spec_path, result_path = os.path.join(folder, f"spec_{name}.json"), os.path.join(folder, f"memory_{name}.json")
    spec = {"impl": name, "options": impls_mod.options_dict(options), "inputs": inputs_path, "threads": threads,
            "result": result_path}
    result, reason = bench.run_json_worker([sys.executable, os.path.abspath(__file__), "--worker", spec_path], spec,
                                           spec_path, result_path, 3600, label="memory worker")
    return result if reason is None else {"peak_extra_bytes": None, "memory_error": reason}


# --------------------------------------------------------------------------------------------------
# Report.


def add_timing(rows: Dict[str, dict], steps: dict, times: dict, inputs: GRPOInputs, rate: float) -> None:
    ours = times[OURS.name]
    for name, ts in times.items():
        impl = steps[name][0]
        flop = impl.gemm_flop(inputs)
        rows[name].update(status="ok", best_s=min(ts), median_s=statistics.median(ts), all_s=ts,
                          best_vs_ours=min(ts) / min(ours), median_vs_ours=statistics.median(ts) / statistics.median(ours),
                          gemm_factor=impls_mod.GEMM_FACTOR[name], gemm_tokens=impl.gemm_tokens(inputs),
                          gemm_flop=flop, gemm_floor_s=flop / rate, gemm_tflops=flop / statistics.median(ts) / 1e12)


def acceptance(rows: Dict[str, dict]) -> dict:
    """Issue 24's targets: ours (single pass) median <= 0.8x our recompute's and the fastest peer's;
    peak extra memory <= 1/2 the leanest peer's (peers: Liger, TRL, naive, compiled)."""
    ours = rows.get(OURS.name, {})
    out = {}
    if ours.get("status") != "ok":
        return out
    recompute = rows.get("ours_recompute", {})
    if recompute.get("status") == "ok":
        out["median_vs_ours_recompute"] = {"value": ours["median_s"] / recompute["median_s"], "target": 0.8}
    peers = {n: rows[n] for n in PEER_NAMES if rows.get(n, {}).get("status") == "ok"}
    if peers:
        fastest = min(peers, key=lambda n: peers[n]["median_s"])
        out["median_vs_fastest_peer"] = {"value": ours["median_s"] / peers[fastest]["median_s"], "target": 0.8,
                                         "peer": fastest}
    with_memory = {n: r for n, r in peers.items() if r.get("peak_extra_bytes")}
    if with_memory and ours.get("peak_extra_bytes"):
        leanest = min(with_memory, key=lambda n: with_memory[n]["peak_extra_bytes"])
        out["memory_vs_leanest_peer"] = {"value": ours["peak_extra_bytes"] / with_memory[leanest]["peak_extra_bytes"],
                                         "target": 0.5, "peer": leanest}
    for item in out.values():
        item["met"] = item["value"] <= item["target"]
    return out


def _s(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3g}" if x < 10 else f"{x:,.1f}"


def _mib(x: Optional[float]) -> str:
    return "—" if x is None else f"{x / MIB:,.0f}" if x >= 10 * MIB else f"{x / MIB:.2g}"


def _ratio(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _check(check: Optional[dict]) -> str:
    if not check:
        return "—"
    if check["status"] == "target":
        return "target"
    errs = [f"{check[k]:.0e}" for k in ("loss_rel_err", "d_hidden_rel_err", "d_weight_rel_err") if k in check]
    return f"{check['status']} ({' / '.join(errs)})"


def _is_level(opts: dict) -> str:
    level = opts.get("importance_sampling_level", "token")
    return f"{level}-level IS" + (" (GSPO)" if level == "sequence" else "")


def markdown(result: dict) -> str:
    env, shape, opts = result["environment"], result["shape"], result["options"]
    eps = f"eps {opts['epsilon_low']:g}/{opts['epsilon_high']:g}"
    lines = [
        f"### GRPO loss, forward+backward: B={shape['B']} T={shape['T']} H={shape['H']} V={shape['V']} "
        f"({shape['scored_tokens']} scored tokens), {result['dtype']}",
        "",
        f"{opts['loss_type']}, beta {opts['beta']:g}, {eps}, {_is_level(opts)}, "
        f"{'bias-corrected KL' if opts['beta'] else 'no KL term'}"
        f"{', ours logs entropy' if opts.get('log_entropy') else ''}; advantages per completion"
        f"{_zero_advantages(result['inputs'])}, old log-probs "
        f"off-policy (N(0, {result['inputs']['off_policy_std']:g}) log-ratios)"
        f"{', reference log-probs given' if opts['beta'] else ''}. "
        f"{result['rounds']} interleaved round(s); {env['device']}; torch {env['torch']}, liger-kernel "
        f"{env.get('liger_kernel')}, trl {env.get('trl')}; mio-kernels {env.get('mio_kernels_commit')}; "
        f"{env['date_utc']}; load average {env.get('load_avg_1m_at_start')} → {env.get('load_avg_1m_at_end')}.",
        "",
        "| row | GEMM FLOPs | median s | best s | median / ours | GEMM floor s | peak extra MiB | memory / ours "
        "| check (loss / dH / dW rel. err) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours = result["rows"].get(OURS.name, {})
    for name, row in result["rows"].items():
        if row.get("status") != "ok":
            lines.append(f"| {row['label']} | {row.get('status')}: {row.get('reason', '')} | | | | | | | "
                         f"{_check(row.get('check'))} |")
            continue
        n = "N_s" if row["gemm_tokens"] != shape["B"] * shape["T"] else "N"
        mem = row.get("peak_extra_bytes")
        mem_ratio = mem / ours["peak_extra_bytes"] if mem and ours.get("peak_extra_bytes") else None
        lines.append(f"| {row['label']} | {row['gemm_factor']}·{n}·H·V | {_s(row['median_s'])} | {_s(row['best_s'])} "
                     f"| {_ratio(row['median_vs_ours'])} | {_s(row['gemm_floor_s'])} | "
                     f"{_mib(mem) if mem is not None else row.get('memory_error', '—')} | {_ratio(mem_ratio)} | "
                     f"{_check(row.get('check'))} |")
    lines += ["", "N = B·T positions, N_s = scored positions (ours skips padding rows on CPU). GEMM floor: those "
              f"FLOPs at the best torch.matmul rate measured first ({result['floors']['gemm_flops_per_s'] / 1e9:.3g} "
              "GFLOP/s). Peak extra memory: one forward+backward in a fresh process, gradients included."]
    names = {"median_vs_ours_recompute": "ours median / ours recompute median",
             "median_vs_fastest_peer": "ours median / fastest peer's median",
             "memory_vs_leanest_peer": "ours peak memory / leanest peer's"}
    for key, item in result.get("acceptance", {}).items():
        peer = f" ({item['peer']})" if "peer" in item else ""
        lines.append(f"- {names[key]}{peer}: {item['value']:.2f} (target ≤ {item['target']:g}: "
                     f"{'met' if item['met'] else 'NOT met'})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help=f"BxTxHxV (default {DEFAULT_SHAPE}; --quick: {QUICK_SHAPE})")
    p.add_argument("--loss-type", default="dapo", choices=impls_mod.LOSS_TYPES)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (default 0.04; 0: no reference log-probs)")
    p.add_argument("--epsilon-low", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=None,
                   help="default: epsilon-low (TRL's default), 5 for cispo (TRL's recommendation)")
    p.add_argument("--entropy", action="store_true",
                   help="ours also computes the per-token entropies (log_entropy=True), as TRL's trainer always does")
    p.add_argument("--importance-sampling-level", default="token", choices=impls_mod.IMPORTANCE_SAMPLING_LEVELS,
                   help="token (default) or sequence: GSPO, one importance ratio per completion (the exp of its "
                        "mean log-ratio); needs --beta 0, no --entropy and a --loss-type other than cispo")
    p.add_argument("--zero-advantages", type=float, default=0.0,
                   help="fraction of the completions with advantage 0 (TRL's groups whose rewards all agree; default 0)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick: 1)")
    p.add_argument("--impls", default=",".join(IMPL_NAMES),
                   help=f"comma-separated, from {', '.join(IMPL_NAMES)}; {OURS.name} (the check target) always runs "
                        "first")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the memory processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"tiny shape ({QUICK_SHAPE}), 1 round: a smoke run")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory processes")
    p.add_argument("--out", default=None, help="result JSON (a .md table is written beside it; default "
                   "benchmarks/results/cpu-grpo-interleaved.json, cpu-grpo-quick.json with --quick)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    refused = _single_pass_refusal(args)
    if refused:
        p.error(refused)
    if not 0.0 <= args.zero_advantages <= 1.0:
        p.error(f"--zero-advantages must be a fraction in [0, 1], got {args.zero_advantages:g}")
    return args


def _single_pass_refusal(args) -> Optional[str]:
    """Why ours in single pass (the check target, backward_mode='single_pass') cannot run these
    options, else None: at sequence level its gradient is one coefficient per completion, which a
    KL term, the entropy and cispo (a coefficient per token) do not allow."""
    if args.importance_sampling_level != "sequence":
        return None
    blockers = ([f"--beta {args.beta:g} (use --beta 0)"] if args.beta != 0.0 else []) + \
               (["--entropy"] if args.entropy else []) + \
               (["--loss-type cispo"] if args.loss_type == "cispo" else [])
    if not blockers:
        return None
    return (f"--importance-sampling-level sequence cannot be run with {', '.join(blockers)}: {OURS.name} (the "
            "check target, backward_mode='single_pass') has a per-sequence single pass only without a KL term, "
            "entropy or cispo")


def _options(args) -> GRPOOptions:
    eps_high = args.epsilon_high if args.epsilon_high is not None else (5.0 if args.loss_type == "cispo"
                                                                          else args.epsilon_low)
    return GRPOOptions(loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon_low,
                       epsilon_high=eps_high, log_entropy=args.entropy,
                       importance_sampling_level=args.importance_sampling_level)


def _impls(text: str) -> list:
    """Ours (single pass, the check target) first, then the requested rows in order."""
    by_name = impls_mod.impls_by_name()
    requested = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in requested if x not in by_name]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {', '.join(IMPL_NAMES)}")
    return [OURS] + [by_name[x] for x in dict.fromkeys(requested) if x != OURS.name]


def _time_rows(impls, inputs: GRPOInputs, result: dict) -> list:
    """Check every row, then time the ones that agree, interleaved. -> the timed rows' names."""
    rows, rounds = result["rows"], result["rounds"]
    print("[grpo] check against ours (single pass)", file=sys.stderr, flush=True)
    steps = checked_steps(impls, inputs, rows)
    if OURS.name not in steps:
        raise SystemExit(f"{OURS.name} (the check target) did not run: {rows[OURS.name]}")
    print(f"[grpo] {rounds} interleaved round(s) of {', '.join(steps)}", file=sys.stderr, flush=True)
    times = bench_interleaved.interleave(steps, inputs, rounds)
    inputs.hidden.grad = inputs.weight.grad = None
    add_timing(rows, steps, times, inputs, result["floors"]["gemm_flops_per_s"])
    for name in times:
        r = rows[name]
        print(f"  {name}: median {r['median_s']:.3g} s, best {r['best_s']:.3g} s ({r['median_vs_ours']:.2f}x ours), "
              f"GEMM floor {r['gemm_floor_s']:.3g} s", file=sys.stderr, flush=True)
    result["environment"]["load_avg_1m_after_timing"] = measure.load_average()
    return list(times)


def _memory_rows(names, inputs: GRPOInputs, result: dict) -> None:
    rows = result["rows"]
    print("[grpo] peak memory, one fresh process per row", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as folder:
        inputs_path = os.path.join(folder, "inputs.pt")
        torch.save(inputs.tensors(), inputs_path)
        for name in names:
            rows[name].update(measure_memory(name, inputs.options, inputs_path, result["threads"], folder))
            mem = rows[name].get("peak_extra_bytes")
            print(f"  {name}: {_mib(mem)} MiB" if mem is not None else f"  {name}: {rows[name].get('memory_error')}",
                  file=sys.stderr, flush=True)
    ours_mem = rows[OURS.name].get("peak_extra_bytes")
    for row in rows.values():
        if row.get("peak_extra_bytes") and ours_mem:
            row["memory_vs_ours"] = row["peak_extra_bytes"] / ours_mem


def _write(result: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    md_path = os.path.splitext(out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"[grpo] wrote {out} and {md_path} in {result['elapsed_s']:.0f} s", file=sys.stderr)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), torch.float32
    B, T, H, V = parse_shape(args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE))
    options, impls = _options(args), _impls(args.impls)
    out = args.out or os.path.join(HERE, "results", "cpu-grpo-quick.json" if args.quick else
                                   "cpu-grpo-interleaved.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    env = measure.environment(device, REPO)
    env.update(trl=impls_mod.peer_version("trl"), transformers=measure._version("transformers"))
    started, rounds = time.monotonic(), args.rounds or (1 if args.quick else 5)
    print(f"[grpo] B={B} T={T} H={H} V={V} {options.loss_type} beta={options.beta:g}, "
          f"{options.importance_sampling_level}-level IS, {args.threads} threads, "
          f"{rounds} round(s); load average {env['load_avg_1m_at_start']}", file=sys.stderr, flush=True)
    floors = bench.measure_floors(bench.Shape(B, T, H, V, K=0), device, dtype)
    off_policy_std = 0.1
    inputs = impls_mod.make_grpo_inputs(B, T, H, V, options, seed=args.seed, off_policy_std=off_policy_std,
                                        zero_advantages=args.zero_advantages, device=device)
    result = {"schema": 1, "benchmark": "grpo-interleaved", "environment": env, "dtype": "float32",
              "shape": {"B": B, "T": T, "H": H, "V": V, "N": B * T, "scored_tokens": int(inputs.mask.sum())},
              "options": impls_mod.options_dict(options),
              "inputs": {"seed": args.seed, "advantages": "per completion [B], N(0, 1)",
                         "zero_advantages": args.zero_advantages,
                         "off_policy_std": off_policy_std, "ref_std": 0.1,
                         "old_logps": "current per-token log-probs minus N(0, 0.1), kept 1e-3 from the clip bounds",
                         "ref_logps": "current per-token log-probs minus N(0, 0.1)" if options.beta else None},
              "rounds": rounds, "threads": args.threads,
              "tolerance": {"loss_and_grads": TOLERANCE, "logps": LOGPS_TOLERANCE}, "floors": floors, "rows": {}}
    timed = _time_rows(impls, inputs, result)
    if not args.no_memory:
        _memory_rows(timed, inputs, result)
    result["acceptance"] = acceptance(result["rows"])
    result["environment"]["load_avg_1m_at_end"] = measure.load_average()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    _write(result, out)
    return result


if __name__ == "__main__":
    main()
