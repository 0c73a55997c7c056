"""Implementations interleaved in one process, round by round: ours against the peers (or ours in
both backward modes), on the inputs and implementations of bench_loss.py.

On a shared machine the load drifts over minutes; the sweep (bench_loss.py) runs each case in a
fresh process minutes apart, so its ratios carry that drift. Here every round runs each
implementation once, rotating which goes first, and each row reports its best and median time and
their ratios to ours (fused_mio_loss(backend="native"), always the first row). Every row is checked against ours before timing
(bench_loss.compare). The GEMM floor of each row: its LM-head GEMM FLOPs (6 or 8 N H V,
loss_impls.gemm_flop) at the best torch.matmul rate measured at the start. Time only; peak memory
is the sweep's.

    python benchmarks/bench_interleaved.py --shape 2x2048x256x32000 --losses mio --rounds 5
    python benchmarks/bench_interleaved.py --impls native,native_recompute --losses mio,dpo
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_loss as bench  # noqa: E402
import loss_measure as measure  # noqa: E402
from loss_impls import build_reference_free, gemm_flop  # noqa: E402

DEFAULT_IMPLS = "native,native_recompute,cce,liger,trl"


def timed(step, inputs) -> float:
    start = time.perf_counter()
    bench.fwd_bwd(step, inputs)
    return time.perf_counter() - start


def checked_steps(impls, inputs, loss_type: str, dtype) -> dict:
    """name -> (impl, step, check): each built, run once and checked against the first (ours)."""
    steps = {}
    targets = {"ref": bench.snapshot(*bench.fwd_bwd(impls[0].build(inputs, loss_type), inputs), inputs)}
    if any(impl.target == "free" for impl in impls):
        targets["free"] = bench.snapshot(*bench.fwd_bwd(build_reference_free(impls[0].name, inputs, loss_type),
                                                        inputs), inputs)
    for impl in impls:
        reason = impl.unavailable(inputs.hidden.device, loss_type, inputs.num_negatives)
        if reason:
            print(f"  {impl.name}: skipped ({reason})", file=sys.stderr)
            continue
        step = impl.build(inputs, loss_type)
        loss, logps = bench.fwd_bwd(step, inputs)
        steps[impl.name] = (impl, step, bench.compare(loss, logps, inputs, targets[impl.target], dtype))
    return steps


def interleave(steps: dict, inputs, rounds: int) -> dict:
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotate which goes first
            times[name].append(timed(steps[name][1], inputs))
    return times


def loss_rows(steps: dict, times: dict, inputs, loss_type: str, rate: float) -> dict:
    ours = next(iter(times))
    rows = {}
    for name, ts in times.items():
        impl, _, check = steps[name]
        flop = gemm_flop(name, inputs, loss_type)
        rows[name] = {"label": impl.label, "best_s": min(ts), "median_s": statistics.median(ts), "all_s": ts,
                      "gemm_flop": flop, "gemm_floor_s": flop / rate, "check": check,
                      "best_vs_ours": min(ts) / min(times[ours]),
                      "median_vs_ours": statistics.median(ts) / statistics.median(times[ours])}
        print(f"  {impl.label}: best {min(ts):.2f} s, median {statistics.median(ts):.2f} s "
              f"({rows[name]['best_vs_ours']:.2f}x / {rows[name]['median_vs_ours']:.2f}x ours), "
              f"GEMM floor {flop / rate:.2f} s ({flop / (inputs.labels.numel() * inputs.weight.numel()):.0f} NHV), "
              f"check {check['status']}", file=sys.stderr)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2x2048x256x32000", help="PxTxHxV[xK]")
    ap.add_argument("--losses", default="mio")
    ap.add_argument("--impls", default=DEFAULT_IMPLS, help="as bench_loss.py --impls; ours (native, "
                    f"backward_mode='auto') is always the first row (default: {DEFAULT_IMPLS})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    device, dtype = torch.device("cpu"), torch.float32
    shape = bench.parse_shapes(args.shape, ())[0].shape
    impls, _ = bench.select_impls([x.strip() for x in args.impls.split(",")], device, ours="native")
    floors = bench.measure_floors(shape, device, dtype)
    result = {"environment": measure.environment(device, bench.REPO), "shape": shape.as_dict(),
              "rounds": args.rounds, "floors": floors, "losses": {}}
    inputs = bench.make_inputs(shape, device, dtype, args.seed, beta=0.1)
    for loss_type in args.losses.split(","):
        print(f"[interleaved] {bench.report.shape_key(shape.as_dict())} {loss_type}", file=sys.stderr)
        steps = checked_steps(impls, inputs, loss_type, dtype)
        times = interleave(steps, inputs, args.rounds)
        result["losses"][loss_type] = loss_rows(steps, times, inputs, loss_type, floors["gemm_flops_per_s"])
    result["environment"]["load_avg_1m_at_end"] = measure.load_average()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
