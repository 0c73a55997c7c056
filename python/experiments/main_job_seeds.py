"""The README's main-job table, reproducibly: the default `mio-train` job (MIO and DPO) for several
seeds, reported as mean ± std over seeds, with the machine it ran on.

    python python/experiments/main_job_seeds.py                 # 3 seeds x {mio, dpo}, 2 runs at a time
    python python/experiments/main_job_seeds.py --seeds 0 1 2 3 4 --jobs 1

Each run is `python -m mio_kernels.train --loss-type L --seed S` in its own process, single-threaded
(`--threads 1`, the default job's own setting), into a temporary output directory. Writes
`main_job_seeds.json` (every run's numbers, the machine, the date) and `main_job_seeds.md` (the table)
to `--out` (default: results/ next to this file).

What repeats where: one seed on one machine with the same thread count gives the same numbers bit for
bit; another CPU (other vector instructions, other library kernels) rounds differently and the runs
drift apart, so a single run's numbers are not expected to carry over. The spread over seeds is the
scale a difference has to beat.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "main_job_seeds"
# (summary.json key, label, digits): read from eval_before and eval_after
METRICS = (("exact_match", "exact match (greedy)", 3), ("rewards/accuracies", "reward accuracy", 3),
           ("logps/chosen", "chosen log-prob", 2))
QUICK = ["--sft-steps", "3", "--steps", "3", "--max-train-examples", "64", "--max-eval-examples", "12",
         "--max-new-tokens", "8", "--tiny-hidden-size", "32", "--tiny-layers", "1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=["mio", "dpo"])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each single-threaded)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="tiny runs for the test suite; numbers mean nothing")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(loss: str, seed: int, workdir: Path, quick: bool) -> Dict[str, object]:
    """One default job; its summary.json plus wall time. Raises with the run's stderr on failure."""
    name = f"{loss}_seed{seed}"
    cmd = [sys.executable, "-m", "mio_kernels.train", "--loss-type", loss, "--seed", str(seed), "--name", name,
           "--output-dir", str(workdir), "--threads", "1", "--no-progress", "--no-save-final", "--no-plot",
           *(QUICK if quick else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((workdir / name / "summary.json").read_text())
    print(f"  {name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"loss": loss, "seed": seed, "wall_time_s": time.perf_counter() - t0,
            "before": {k: summary["eval_before"][k] for k, _, _ in METRICS},
            "after": {k: summary["eval_after"][k] for k, _, _ in METRICS}}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(runs: List[Dict[str, object]], losses: Sequence[str]) -> Dict[str, Dict[str, object]]:
    out = {}
    for loss in losses:
        mine = [r for r in runs if r["loss"] == loss]
        out[loss] = {when: {k: mean_std([r[when][k] for r in mine]) for k, _, _ in METRICS}
                     for when in ("before", "after")}
        out[loss]["wall_time_s"] = mean_std([r["wall_time_s"] for r in mine])
    return out


def table(agg: Dict[str, Dict[str, object]], machine: Dict[str, object], seeds: Sequence[int]) -> str:
    def cell(ms: Dict[str, float], digits: int) -> str:
        return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"

    lines = [f"Default `mio-train` job, mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"before → after preference training. Machine: {machine['cpu']}, {machine['threads_per_run']} thread "
             f"per run, {machine['jobs']} runs at a time on {machine['cpus']} CPUs; {machine['date']}.", "",
             "| loss | " + " | ".join(label for _, label, _ in METRICS) + " | wall time per run |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for loss, res in agg.items():
        cells = [f"{cell(res['before'][k], d)} → {cell(res['after'][k], d)}" for k, _, d in METRICS]
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {res['wall_time_s']['mean']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads_per_run": 1, "jobs": args.jobs,
               "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    import torch
    machine["torch"] = torch.__version__
    print(f"{len(args.seeds) * len(args.losses)} runs ({args.jobs} at a time) on {machine['cpu']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, loss, seed, Path(tmp), args.quick)
                   for seed in args.seeds for loss in args.losses]
        runs = [f.result() for f in futures]
    agg = aggregate(runs, args.losses)
    md = table(agg, machine, args.seeds)
    record = {"experiment": NAME, "quick": args.quick, "seeds": args.seeds, "machine": machine,
              "summary": agg, "runs": runs}
    (args.out / f"{NAME}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{NAME}.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {args.out / NAME}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
