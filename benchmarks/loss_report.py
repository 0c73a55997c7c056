"""Markdown table, JSON and PNG plot of a bench_loss.py run."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Dict, List, Optional

MIB = 1024.0 ** 2


def shape_key(shape: Dict[str, int]) -> str:
    return f"P={shape['P']} K={shape['K']} T={shape['T']} H={shape['H']} V={shape['V']}"


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:,.0f}"


def _ratio(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _mib(nbytes: Optional[float]) -> str:
    return "—" if nbytes is None else f"{nbytes / MIB:,.0f}" if nbytes >= 10 * MIB else f"{nbytes / MIB:.2g}"


def _check(check: Optional[dict]) -> str:
    if not check:
        return "—"
    status = check["status"]
    if status in ("target", "unchecked"):
        return status
    errs = (f"dℓ {check['logps_rel_err']:.0e}, " if "logps_rel_err" in check else "") + \
        f"dL {check['loss_rel_err']:.0e}, dH {check['d_hidden_rel_err']:.0e}, dW {check['d_weight_rel_err']:.0e}"
    return f"ok ({errs})" if status == "ok" else f"**FLAGGED** ({errs})"


def _gemms(row: dict, shape: dict) -> str:
    if "gemm_flop" not in row:
        return ""
    return f"{row['gemm_flop'] / (shape['N'] * shape['H'] * shape['V']):.3g}·NHV"


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    primary = settings["ours_primary"]
    out = [
        f"# fused_mio_loss benchmark: {env['device']}",
        "",
        f"{env['date_utc']}; torch {env['torch']}, triton {env['triton']}, mio-kernels {env['mio_kernels']} "
        f"({env['mio_kernels_commit']}), liger-kernel {env['liger_kernel']}, cut-cross-entropy "
        f"{env['cut_cross_entropy']}; {env['torch_threads']} torch threads"
        + (f"; 1-minute load average {env.get('load_avg_1m_at_start')} at start, "
           f"{env.get('load_avg_1m_at_end')} at end" if env["device_type"] == "cpu" else "")
        + ".",
        "",
        f"Forward+backward of the preference loss (sum of token log-probs per sequence, beta={settings['beta']}, "
        f"precomputed reference log-probs, mean over prompts), {settings['dtype']} inputs on {env['device_type']}; "
        f"median [min, max] of at least {settings['repeats']} timed runs (more for small shapes, up to "
        f"{settings.get('min_time_s', 1.0):g} s in all) after at least {settings['warmup']} warm-up run(s). "
        f"`peak MiB`: extra memory of one fwd+bwd over the live inputs ({settings['memory_method']}), gradients "
        f"included. `GEMMs`: the LM-head GEMM FLOPs the row does (6·N·H·V when the logits or the gradient are formed once, 8·N·H·V when the backward recomputes the logits); `TFLOP/s` counts those. Ratios are this row / ours (`{primary}`) for the same shape and loss "
        f"(time > 1: slower than ours; memory > 1: more than ours). `check`: loss and gradients against ours "
        f"before timing (relative errors of the sequence log-probs ℓ, the loss, dH and dW; the loss and gradients "
        f"are allowed 2·β·max|Δℓ| on top of their tolerance, since u = ℓ − ℓ_ref amplifies rounding in ℓ); "
        f"Liger runs reference-free (0.8.5 takes no "
        f"precomputed reference log-probs) and is checked against ours with reference_free=True — the same "
        f"FLOPs and memory. Floors, measured before each shape's cases: 8·N·H·V at the best {settings['dtype']} "
        f"rate of torch.matmul over the three LM-head GEMM shapes on M = min(N, 2048 CPU / 8192 GPU) tokens "
        f"(logits, dH, dW; implementations that keep the logits instead of recomputing them do 6·N·H·V); "
        f"unavoidable bytes (read hidden and weight twice, write dH and dW) at the "
        f"measured copy "
        f"bandwidth.",
        "",
    ]
    builds = sorted({r["native_build"] for r in result["rows"] if r.get("native_build")})
    if len(builds) > 1:
        out += [f"**Warning:** the native extension was rebuilt during this run (builds {', '.join(builds)}): "
                f"rows measured with different builds are mixed.", ""]
    out.append(summary(result))
    rows_by_shape = defaultdict(list)
    for row in result["rows"]:
        rows_by_shape[shape_key(row["shape"])].append(row)
    for shape in result["shapes"]:
        key = shape_key(shape)
        fl = shape.get("floors") or {}
        out.append(f"### {key} (N={shape['N']:,} tokens, 8·N·H·V = {shape['flop'] / 1e12:.3g} TFLOP)")
        out.append("")
        if fl:
            by_shape = fl.get("gemm_flops_per_s_by_shape", {})
            detail = (" (logits " + ", dH ".join(f"{by_shape[k] / 1e12:.3g}" for k in ("logits", "d_hidden"))
                      + f", dW {by_shape['d_weight'] / 1e12:.3g})") if len(by_shape) == 3 else ""
            out.append(f"Floors: compute {_ms(fl['compute_floor_s'])} ms for 8·N·H·V, "
                       f"{_ms(0.75 * fl['compute_floor_s'])} ms for 6·N·H·V, at {fl['gemm_flops_per_s'] / 1e12:.3g} "
                       f"TFLOP/s{detail}; memory traffic {_ms(fl['memory_floor_s'])} ms for {fl['min_bytes'] / MIB:,.0f} MiB "
                       f"at {fl['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s.")
            out.append("")
        out.append("| loss | implementation | fwd+bwd ms, median [min, max] | peak MiB | GEMMs | TFLOP/s | "
                   "time / ours | memory / ours | check |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|---|")
        for row in rows_by_shape[key]:
            if row["status"] != "ok":
                out.append(f"| {row['loss']} | {row['label']} | {row['status']}: {row.get('reason', '')} "
                           f"| | | | | | |")
                continue
            time_cell = f"{_ms(row['median_s'])} [{_ms(row['min_s'])}, {_ms(row['max_s'])}]"
            out.append(f"| {row['loss']} | {row['label']} | {time_cell} | {_mib(row['peak_extra_bytes'])} | "
                       f"{_gemms(row, shape)} | {row['tflops']:.3g} | {_ratio(row.get('time_vs_ours'))} | {_ratio(row.get('memory_vs_ours'))} "
                       f"| {_check(row.get('check'))} |")
        out.append("")
    return "\n".join(out)


def summary(result: dict) -> str:
    """Each implementation against ours and against naive at the largest shape (most tokens, then vocab)."""
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    if not ok:
        return ""
    biggest = max(result["shapes"], key=lambda s: (s["N"] * s["V"], s["N"]))
    key = shape_key(biggest)
    primary = result["settings"]["ours_primary"]
    out = [f"**At the largest shape, {key} (N={biggest['N']:,}):** time and peak extra memory of each "
           f"implementation, and their ratios to ours (`{primary}`) and to naive.", "",
           "| loss | implementation | fwd+bwd ms | peak MiB | GEMMs | time / ours | memory / ours | time / naive "
           "| memory / naive |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for loss in biggest["losses"]:
        rows = [r for r in result["rows"] if shape_key(r["shape"]) == key and r["loss"] == loss]
        naive = next((r for r in rows if r["impl"] == "naive" and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] != "ok":
                out.append(f"| {loss} | {r['label']} | {r['status']} | | | | | | |")
                continue
            t_naive = r["median_s"] / naive["median_s"] if naive else None
            m_naive = (r["peak_extra_bytes"] / naive["peak_extra_bytes"]
                       if naive and r.get("peak_extra_bytes") and naive.get("peak_extra_bytes") else None)
            out.append(f"| {loss} | {r['label']} | {_ms(r['median_s'])} | {_mib(r['peak_extra_bytes'])} | "
                       f"{_gemms(r, biggest)} | {_ratio(r.get('time_vs_ours'))} | {_ratio(r.get('memory_vs_ours'))} | {_ratio(t_naive)} | "
                       f"{_ratio(m_naive)} |")
    return "\n".join(out + [""])


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def _sweeps(shapes: List[dict]):
    """Groups of shapes that differ in exactly one of T or V: (varying key, fixed description, shapes)."""
    groups = []
    for vary, fixed in (("T", ("P", "K", "H", "V")), ("V", ("P", "K", "T", "H"))):
        by_fixed = defaultdict(list)
        for s in shapes:
            by_fixed[tuple(s[k] for k in fixed)].append(s)
        for fixed_vals, members in by_fixed.items():
            if len({m[vary] for m in members}) >= 2:
                desc = ", ".join(f"{k}={v}" for k, v in zip(fixed, fixed_vals))
                groups.append((vary, desc, sorted(members, key=lambda m: m[vary])))
    return groups


def plot(path: str, result: dict, loss: str = "mio") -> bool:
    """Time and peak memory vs T (and vs V for a vocab sweep), one line per implementation."""
    groups = _sweeps(result["shapes"])
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    losses = {r["loss"] for r in result["rows"]}
    if loss not in losses and losses:
        loss = sorted(losses)[0]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    labels = {}
    for (vary, desc, members), (ax_t, ax_m) in zip(groups, axes):
        keys = {shape_key(m) for m in members}
        series = defaultdict(list)
        for row in result["rows"]:
            if row["loss"] == loss and row["status"] == "ok" and shape_key(row["shape"]) in keys:
                series[row["impl"]].append((row["shape"][vary], row["median_s"], row["peak_extra_bytes"]))
                labels[row["impl"]] = row["label"]
        for impl, points in series.items():
            points.sort()
            xs = [p[0] for p in points]
            style = dict(marker="o", linewidth=2.5 if impl == result["settings"]["ours_primary"] else 1.5)
            ax_t.plot(xs, [p[1] * 1e3 for p in points], label=labels[impl], **style)
            mem = [(x, p[2] / MIB) for x, p in zip(xs, points) if p[2] is not None and p[2] > 0]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], label=labels[impl], **style)
        for ax, ylabel in ((ax_t, "fwd+bwd time, ms (median)"), (ax_m, "peak extra memory, MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks(sorted({m[vary] for m in members}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(vary + (" (sequence length)" if vary == "T" else " (vocabulary)"))
            ax.set_ylabel(ylabel)
            ax.set_title(f"{loss}, {desc}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"fused_mio_loss vs peers — {env['device']}\n{env['date_utc']}; torch {env['torch']}, "
                 f"mio-kernels {env['mio_kernels']} ({env['mio_kernels_commit']}), liger {env['liger_kernel']}, "
                 f"cce {env['cut_cross_entropy']}; {result['settings']['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

