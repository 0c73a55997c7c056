"""Single pass vs recompute of ours (native backend), interleaved in one process.

On a shared machine the load drifts over minutes; alternating the two modes run by run and
comparing their best (and median) times cancels most of that drift, where separate processes
minutes apart do not. Also reports the GEMM-only floor of each mode (6 or 8 N H V FLOPs at the best
measured torch.mm rate of the chunk GEMM).

    python benchmarks/bench_backward_mode.py --shape 2x1024x256x32000 --rounds 5 --losses mio,dpo
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from mio_kernels import fused_mio_loss
from mio_kernels.backends.native_backend import chunk_budget_bytes

MODES = {"single_pass": 6, "recompute": 8}   # GEMM FLOPs per N H V


def make_inputs(p: int, t: int, h: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = 2 * p
    hidden = torch.randn(s, t, h, generator=g) * 0.5
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)
    labels = torch.randint(0, v, (s, t), generator=g)
    labels[:, : t // 8] = -100   # prompts
    # A reference near the policy (rewards of order 1, as in training): with saturated rewards the
    # rejected rows' gradients underflow to 0 and recompute skips them, which training never sees.
    with torch.no_grad():
        policy = fused_mio_loss(hidden, weight, labels, reference_free=True, backend="native").policy_logps
    return hidden, weight, labels, policy + torch.randn(s, generator=g) * 5


def step(inputs, loss_type: str, mode: str) -> float:
    hidden, weight, labels, ref = inputs
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    start = time.perf_counter()
    out = fused_mio_loss(hidden, weight, labels, ref_logps=ref, loss_type=loss_type, backend="native",
                         backward_mode=mode)
    out.loss.backward()
    return time.perf_counter() - start


def gemm_rate(rows: int, h: int, v: int, repeats: int = 5) -> float:
    """Best FLOP/s of the chunk's logits GEMM [rows, H] x [H, V]."""
    a, b = torch.randn(rows, h), torch.randn(h, v)
    out = torch.empty(rows, v)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * h * v / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2x1024x256x32000", help="PxTxHxV (S = 2P rows of T tokens)")
    ap.add_argument("--losses", default="mio,dpo")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p, t, h, v = (int(x) for x in args.shape.split("x"))
    n = 2 * p * t
    inputs = make_inputs(p, t, h, v)
    rate = gemm_rate(min(n, chunk_budget_bytes(torch.device("cpu")) // (v * 4)), h, v)
    result = {"shape": dict(P=p, T=t, H=h, V=v, N=n), "threads": args.threads, "rounds": args.rounds,
              "machine": f"{cpu_name()}, {os.cpu_count()} cores",
              "load_avg_1m_start": os.getloadavg()[0], "gemm_flops_per_s": rate, "losses": {}}
    for loss_type in args.losses.split(","):
        times = {m: [] for m in MODES}
        for mode in MODES:
            step(inputs, loss_type, mode)   # warm-up
        for r in range(args.rounds):
            for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):   # alternate which goes first
                times[mode].append(step(inputs, loss_type, mode))
        row = {m: {"best_s": min(ts), "median_s": statistics.median(ts), "all_s": ts,
                   "gemm_floor_s": MODES[m] * n * h * v / rate} for m, ts in times.items()}
        row["ratio_best"] = row["single_pass"]["best_s"] / row["recompute"]["best_s"]
        row["ratio_median"] = row["single_pass"]["median_s"] / row["recompute"]["median_s"]
        result["losses"][loss_type] = row
        print(f"{loss_type}: single_pass best {row['single_pass']['best_s']:.2f} s (floor "
              f"{row['single_pass']['gemm_floor_s']:.2f}), recompute best {row['recompute']['best_s']:.2f} s "
              f"(floor {row['recompute']['gemm_floor_s']:.2f}); single/recompute best {row['ratio_best']:.2f}, "
              f"median {row['ratio_median']:.2f}")
    result["load_avg_1m_end"] = os.getloadavg()[0]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
