"""Padded vs padding-free `mio-train` steps on long-tailed response lengths (CPU, built-in model).

    python benchmarks/bench_packed.py            # -> results/packed_cpu.{json,md,png}, a few minutes on 2 cores
    python benchmarks/bench_packed.py --steps 2 --prompts 32 --out /tmp/packed   # quicker

The data is synthetic and seeded (no download): prompt and response lengths are lognormal, the
responses' p99 about 10x their median (like reasoning traces), token ids uniform over the
built-in tokenizer's vocabulary (ending in EOS). Each mode runs in its own process (its peak RSS is
its own): the trainer's real preference steps (forward, backward, AdamW) of the built-in tiny
Llama, same prompts per step in both modes; tokens/s counts real (unpadded) tokens. The FLOP
columns are analytic (linear layers and LM head: 6 FLOPs per parameter per token slot computed;
attention: 12 * hidden FLOPs per (query, key) pair computed, with fwd + bwd), from the exact
micro-batch shapes each mode ran.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = {"padded": "--no-padding-free", "padding_free": "--padding-free"}


def long_tail_lengths(n: int, median: float, p99_ratio: float, seed: int, low: int, high: int) -> torch.Tensor:
    """n lognormal lengths with the given median and p99 / median ratio, clipped to [low, high]."""
    sigma = math.log(p99_ratio) / 2.3263  # z(0.99)
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return x.round().clamp(low, high).long()


def synthetic_examples(args, tok):
    """Seeded preference examples: prompt and 1 + K responses of long-tailed lengths."""
    from mio_kernels.train.data import Example

    n, width = args.prompts, 1 + args.k
    prompts = long_tail_lengths(n, args.prompt_median, 3.0, args.seed, 4, args.max_length // 4)
    responses = long_tail_lengths(n * width, args.median, args.p99_ratio, args.seed + 1, 2,
                                  args.max_length - args.max_length // 4).view(n, width)
    g = torch.Generator().manual_seed(args.seed + 2)
    ids = lambda m: torch.randint(5, len(tok), (m,), generator=g).tolist()
    return [Example(ids(int(p)), [ids(int(r) - 1) + [tok.eos_token_id] for r in rs], "")
            for p, rs in zip(prompts, responses)]


def flops(trainer, spec, indices, cfg):
    """Analytic FLOPs of one step (fwd + bwd) as computed and as useful, per part."""
    from mio_kernels.train.data import collate_rows

    h, layers, inter = cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_intermediate_size
    vocab = trainer.lm.get_output_embeddings().weight.shape[0]
    linear, head, attn = 6 * layers * (4 * h * h + 3 * h * inter), 6 * vocab * h, 12 * layers * h
    out = dict.fromkeys(("head", "head_useful", "linear", "linear_useful", "attention", "attention_useful"), 0.0)
    for mb in trainer.micro_batches(spec, indices):
        batch = collate_rows([trainer.train[i] for i in mb], trainer.pad_id, trainer.packing is not None)
        if trainer.packing is None:
            rows, width = batch["input_ids"].shape
            lengths = batch["attention_mask"].sum(1).tolist()
            slots, pairs = rows * width, rows * width * width
        else:
            cu = batch["cu_seqlens"].tolist()
            lengths = [b - a for a, b in zip(cu, cu[1:])]
            slots, pairs = cu[-1], cu[-1] ** 2  # CPU/sdpa: a dense [N, N] mask, every pair computed
        real = sum(lengths)
        out["head"] += head * slots
        out["head_useful"] += head * real
        out["linear"] += linear * slots
        out["linear_useful"] += linear * real
        out["attention"] += attn * pairs
        out["attention_useful"] += attn * sum(n * (n + 1) / 2 for n in lengths)  # causal pairs
    return out


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(args, mode: str) -> dict:
    """One mode's steps in this process -> its measurements."""
    from mio_kernels.train.config import parse_args
    from mio_kernels.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_args(["--output-dir", tmp, "--name", mode, MODES[mode], "--no-eval", "--no-progress",
                          "--no-plot", "--no-save-final", "--sft-steps", "0", "--threads", str(args.threads),
                          "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_length // 4),
                          "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
                          "--max-tokens-per-micro-batch", str(args.budget), "--steps", str(args.steps + args.warmup),
                          "--seed", str(args.seed)])
        trainer = Trainer(cfg)
    trainer.train = synthetic_examples(args, trainer.tok)
    trainer.state.ref_train = torch.zeros(len(trainer.train), 1 + args.k)  # precomputed reference, constant
    spec = trainer.phases["pref"]
    trainer.state.optimizer = trainer.make_optimizer(spec)
    base = rss_mib()
    tokens = times = 0.0
    parts = {}
    losses = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        stats, _, _, indices = trainer.train_step(spec, step)
        losses.append(stats["loss"].item())
        if step >= args.warmup:
            times += time.perf_counter() - t0
            tokens += trainer.step_tokens(spec, indices)
            for k, v in flops(trainer, spec, indices, cfg).items():
                parts[k] = parts.get(k, 0.0) + v
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "tokens_per_s": tokens / times, "s_per_step": times / args.steps, "tokens": tokens,
            "peak_rss_mib": peak, "peak_over_start_mib": peak - base, "flops": parts, "losses": losses,
            "micro_batches": len(trainer.micro_batches(spec, trainer.step_indices(spec, 0)))}


def machine() -> dict:
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    load = open("/proc/loadavg").read().split()[:3]
    return {"cpu": model, "logical_cpus": torch.get_num_threads() and __import__("os").cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg_1_5_15": load}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64, help="synthetic prompts (each with 1 + K responses)")
    p.add_argument("--k", type=int, default=3, help="rejected responses per prompt")
    p.add_argument("--median", type=float, default=64, help="median response length (tokens)")
    p.add_argument("--p99-ratio", type=float, default=10.0, help="response p99 / median")
    p.add_argument("--prompt-median", type=float, default=32, help="median prompt length")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="prompts per padded micro-batch")
    p.add_argument("--budget", type=int, default=1024, help="--max-tokens-per-micro-batch of padding-free")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the trainer's default for the built-in model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packed_cpu"))
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # internal: one mode, JSON to stdout
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args, args.mode)))
        return
    results = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k not in ("mode", "out")},
               "command": "python benchmarks/bench_packed.py " + " ".join(sys.argv[1:])}
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                              text=True, cwd=ROOT)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(line[0][7:])
        print(f"{mode}: {results[mode]['tokens_per_s']:.0f} tokens/s, peak RSS {results[mode]['peak_rss_mib']:.0f} MiB")
    results["machine"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    from packed_report import write_report

    write_report(results, Path(args.out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
