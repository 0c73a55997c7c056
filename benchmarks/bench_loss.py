"""Throughput and memory of fused_mio_loss against the tools people use today.

Forward+backward of the DPO and MIO preference losses from LM-head inputs (hidden [S,T,H], weight
[V,H], labels [S,T], precomputed reference log-probs [S]) for: naive PyTorch (our reference
backend), torch.compile of it, Liger-Kernel's LigerFusedLinearDPOLoss, Apple Cut Cross-Entropy
(+ the same loss formula), and each of our available kernel backends. Peers are optional
(`pip install .[bench]`); a missing one is reported as skipped. What each row computes, and how
it is matched to ours: loss_impls.py. How time and memory are measured: loss_measure.py.

    python benchmarks/bench_loss.py --quick                 # a small CPU run, under 2 minutes
    python benchmarks/bench_loss.py                         # the CPU sweep (tens of minutes)
    python benchmarks/bench_loss.py --device cuda           # the GPU sweep (bf16), under 10 minutes on one H100
    python benchmarks/bench_loss.py --shapes 2x1024x256x32000,2x2048x256x32000 --impls naive,liger,ours

Writes <out>/<tag>.json, .md and .png (tag: "cpu" or "gpu-<device>", "-quick" appended for
--quick) and prints the markdown table. On CPU each case (shape, loss, implementation) runs in a
fresh process (peak RSS is per process); on CUDA everything runs in this process (CUDA allocator
statistics).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import loss_measure as measure  # noqa: E402
import loss_report as report  # noqa: E402
from loss_impls import PEERS, Impl, Inputs, build_reference_free, first_line, gemm_flop, ours_impl  # noqa: E402

REPO = os.path.dirname(HERE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Check tolerances: |dloss| / max(1, |loss|), max |dlogp| / max |logp|, ||dG|| / ||G|| for dH and dW
# (the loss and gradients also get a slack from the log-prob difference: see compare()).
TOLERANCES = {torch.float32: (1e-4, 1e-5, 1e-3), torch.bfloat16: (2e-2, 1e-4, 5e-2), torch.float16: (1e-2, 1e-4, 2e-2)}


@dataclass(frozen=True)
class Shape:
    P: int          # prompts
    T: int          # tokens per sequence
    H: int          # hidden size
    V: int          # vocabulary
    K: int = 1      # rejected responses per prompt

    @property
    def S(self) -> int:
        return self.P * (1 + self.K)

    @property
    def N(self) -> int:
        return self.S * self.T

    def as_dict(self) -> Dict[str, int]:
        return {"P": self.P, "K": self.K, "T": self.T, "H": self.H, "V": self.V, "S": self.S, "N": self.N}


@dataclass(frozen=True)
class Case:
    shape: Shape
    losses: Tuple[str, ...]


def default_sweep(device: str, quick: bool, losses: Tuple[str, ...]) -> List[Case]:
    """Sequence-length sweep, plus a vocabulary sweep at one length (first loss only, to bound the time)."""
    if device == "cuda":
        if quick:
            return [Case(Shape(2, t, 4096, 32000), losses) for t in (1024, 2048)]
        cases = [Case(Shape(2, t, 4096, v), losses) for v in (128256, 32000) for t in (1024, 2048, 4096, 8192, 16384)]
        return cases + [Case(Shape(2, 4096, 4096, v), losses[:1]) for v in (65536, 256000)]
    if quick:
        return [Case(Shape(2, 256, 128, 8192), losses)]
    cases = [Case(Shape(2, t, 256, 32000), losses) for t in (512, 1024, 2048, 4096)]
    return cases + [Case(Shape(2, 512, 256, v), losses[:1]) for v in (8192, 128256)]


def parse_shapes(text: str, losses: Tuple[str, ...]) -> List[Case]:
    """'PxTxHxV[xK],...' -> cases."""
    cases = []
    for item in text.split(","):
        dims = [int(d) for d in item.strip().lower().split("x")]
        if len(dims) not in (4, 5):
            raise SystemExit(f"--shapes: {item!r} is not PxTxHxV or PxTxHxVxK")
        cases.append(Case(Shape(*dims), losses))
    return cases


# --------------------------------------------------------------------------------------------------
# Inputs, deterministic from the seed so that every process builds the same tensors.


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int, beta: float,
                ref_logps: Optional[torch.Tensor] = None) -> Inputs:
    """Random inputs, drawn on `device` from `seed` (the same tensors in every process on one device)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.S, shape.T, shape.H, generator=gen, device=device)
    weight = torch.randn(shape.V, shape.H, generator=gen, device=device) / math.sqrt(shape.H)   # logits ~ N(0, 1)
    labels = torch.randint(0, shape.V, (shape.S, shape.T), generator=gen, device=device)
    # Ragged sequences: up to T/8 padding tokens at the end of each row.
    lengths = shape.T - torch.randint(0, shape.T // 8 + 1, (shape.S,), generator=gen, device=device)
    labels[torch.arange(shape.T, device=device)[None, :] >= lengths[:, None]] = -100
    noise = torch.randn(shape.S, generator=gen, device=device)
    inputs = Inputs(hidden=hidden.to(dtype).requires_grad_(), weight=weight.to(dtype).requires_grad_(),
                    labels=labels, ref_logps=torch.zeros(shape.S, device=device),
                    num_prompts=shape.P, num_negatives=shape.K, beta=beta)
    del hidden, weight
    inputs.ref_logps = (reference_logps(inputs, noise) if ref_logps is None else ref_logps).to(device)
    return inputs


def reference_logps(inputs: Inputs, noise: torch.Tensor) -> torch.Tensor:
    """Reference log-probs near the policy's, so that rewards are O(1): l(y) - noise / beta."""
    from mio_kernels import linear_logprobs
    from mio_kernels.backends import available_kernel_backends

    backends = available_kernel_backends(inputs.hidden.device)
    with torch.no_grad():
        logps = linear_logprobs(inputs.hidden, inputs.weight, inputs.labels,
                                backend=backends[0] if backends else "reference").sum(-1)
    return (logps - noise.to(logps.device) / inputs.beta).float()


# --------------------------------------------------------------------------------------------------
# One implementation on one shape: check against ours, time, measure peak memory.


class TargetStore:
    """Ours' loss, log-probs and gradients per (loss, target kind): in memory or as files in a folder."""

    def __init__(self, folder: Optional[str] = None):
        self.folder, self.items = folder, {}

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".pt")

    def put(self, key: str, value: dict) -> None:
        if self.folder:
            torch.save(value, self._path(key))
        else:
            self.items[key] = value

    def get(self, key: str) -> Optional[dict]:
        if self.folder:
            path = self._path(key)
            return torch.load(path) if os.path.exists(path) else None
        return self.items.get(key)


def fwd_bwd(step, inputs: Inputs):
    inputs.hidden.grad = None
    inputs.weight.grad = None
    loss, logps = step()
    loss.backward()
    return loss, logps


def snapshot(loss, logps, inputs: Inputs) -> dict:
    return {"loss": float(loss.detach()), "logps": None if logps is None else logps.detach().float().cpu(),
            "d_hidden": inputs.hidden.grad.detach().cpu(), "d_weight": inputs.weight.grad.detach().cpu()}


def _rel_norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.to(got.device)
    num = (got.float() - want.float()).norm().item()
    return num / max(want.float().norm().item(), 1e-30)


def compare(loss, logps, inputs: Inputs, target: dict, dtype: torch.dtype) -> dict:
    """Loss, sequence log-probs and gradients of one implementation against ours.

    The loss sees the log-probs only through u = l - l_ref, a small difference of two large numbers
    (|l| ~ 11 T here): rounding differences in l of a few ulps are amplified, in the loss and in the
    per-sequence gradient factors, by up to beta * |dl|. So the log-probs are checked relative to their
    size, and the loss and gradients get that slack, 2 * beta * max|dl|, on top of their tolerances.
    """
    tol_loss, tol_logps, tol_grad = TOLERANCES[dtype]
    slack, errs = 0.0, {}
    if logps is not None and target["logps"] is not None:
        want = target["logps"]
        diff = (logps.detach().float().cpu() - want).abs().max().item()
        errs["logps_rel_err"] = diff / max(want.abs().max().item(), 1.0)
        slack = 2.0 * inputs.beta * diff
    errs["loss_rel_err"] = abs(float(loss.detach()) - target["loss"]) / max(1.0, abs(target["loss"]))
    errs["d_hidden_rel_err"] = _rel_norm_err(inputs.hidden.grad, target["d_hidden"])
    errs["d_weight_rel_err"] = _rel_norm_err(inputs.weight.grad, target["d_weight"])
    ok = (errs.get("logps_rel_err", 0.0) <= tol_logps and errs["loss_rel_err"] <= tol_loss + slack
          and errs["d_hidden_rel_err"] <= tol_grad + slack and errs["d_weight_rel_err"] <= tol_grad + slack)
    ok = ok and all(math.isfinite(v) for v in errs.values())
    return {"status": "ok" if ok else "FLAGGED", "slack": slack, **{k: float(v) for k, v in errs.items()}}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_impl(impl: Impl, case: Case, settings: dict, store: TargetStore, role: str,
             ref_logps: Optional[torch.Tensor] = None, inputs: Optional[Inputs] = None) -> List[dict]:
    """Rows for `impl` on every loss of `case`. role: "target" (ours: writes the check targets) or "check".
    `inputs`: reused when given (one process), else drawn from the seed with these `ref_logps`."""
    device, dtype = torch.device(settings["device"]), DTYPES[settings["dtype"]]
    shape = case.shape
    base = {"shape": shape.as_dict(), "impl": impl.name, "label": impl.label}
    rows = []
    for loss_type in case.losses:
        row = dict(base, loss=loss_type)
        rows.append(row)
        reason = impl.unavailable(device, loss_type, shape.K)
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        try:
            if inputs is None:
                inputs = make_inputs(shape, device, dtype, settings["seed"], settings["beta"], ref_logps)
            step = impl.build(inputs, loss_type)
            # Warm-up run(s); the first one is also the correctness check.
            loss, logps = fwd_bwd(step, inputs)
            if role == "target":
                store.put(f"{loss_type}/ref", snapshot(loss, logps, inputs))
                row["check"] = {"status": "target"}
                if settings.get("free_target"):
                    free_step = build_reference_free(impl.name, inputs, loss_type)
                    free_loss, free_logps = fwd_bwd(free_step, inputs)
                    store.put(f"{loss_type}/free", snapshot(free_loss, free_logps, inputs))
                    del free_step, free_loss, free_logps
            else:
                target = store.get(f"{loss_type}/{impl.target}")
                row["check"] = compare(loss, logps, inputs, target, dtype) if target else {"status": "unchecked"}
            del loss, logps

            def run():
                fwd_bwd(step, inputs)
            measure.warm_up(run, device, settings["warmup"] - 1, min_total_s=settings["min_time_s"] / 2)
            row.update(measure.summarize(measure.time_runs(run, device, settings["repeats"],
                                                           min_total_s=settings["min_time_s"])))
            inputs.hidden.grad = inputs.weight.grad = None
            row.update(measure.peak_extra_bytes(run, device))
            row["gemm_flop"] = gemm_flop(impl.name, inputs, loss_type)
            row["tflops"] = row["gemm_flop"] / row["median_s"] / 1e12
            row["status"] = "ok"
            row["load_avg_1m"] = measure.load_average()
            row["native_build"] = measure.native_build()
            del step
        except Exception as err:  # one failing case must not end the sweep
            row.update(status="oom" if _is_oom(err) else "error", reason=first_line(err))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            if inputs is not None:
                inputs.hidden.grad = inputs.weight.grad = None
    return rows


# --------------------------------------------------------------------------------------------------
# Orchestration.


def ours_primary(device: torch.device, requested: Optional[str] = None) -> str:
    """The backend of ours that rows are checked against and compared with: the requested one, else the
    first available kernel backend (triton on CUDA, then native), else the reference backend ("naive")."""
    from mio_kernels.backends import available_kernel_backends, unavailable_reason
    if requested in ("reference", "naive"):
        return "naive"
    if requested:
        reason = unavailable_reason(requested, device)
        if reason:
            raise SystemExit(f"--ours {requested}: not available on {device.type}: {reason}")
        return requested
    backends = available_kernel_backends(device)
    return backends[0] if backends else "naive"


def select_impls(names: List[str], device: torch.device, ours: Optional[str] = None) -> Tuple[List[Impl], str]:
    from mio_kernels.backends import available_kernel_backends

    primary = ours_primary(device, ours)
    peers = {impl.name: impl for impl in PEERS}
    chosen: List[Impl] = []

    def add(impl: Impl):
        if all(c.name != impl.name for c in chosen):
            chosen.append(impl)

    for name in names:
        if name == "ours":
            for backend in available_kernel_backends(device):
                add(ours_impl(backend))
        elif name in peers:
            add(peers[name])
        elif name in ("triton", "native"):
            add(ours_impl(name))      # reported as skipped, with the reason, when it cannot run here
        else:
            raise SystemExit(f"--impls: unknown implementation {name!r}")
    target = peers["naive"] if primary == "naive" else ours_impl(primary)
    chosen = [target] + [c for c in chosen if c.name != target.name]
    return chosen, primary


def worker_command(spec_path: str) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", spec_path]


def run_json_worker(command: List[str], spec: dict, spec_path: str, result_path: str, timeout: Optional[float],
                    label: str = "worker"):
    """Write `spec` to spec_path, run `command` in a fresh process -> (the JSON it wrote to result_path,
    None), or (None, why it failed: its exit code and last line, a kill by the OOM killer flagged)."""
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          timeout=timeout)
    if proc.returncode == 0 and os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f), None
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()
    reason = f"{label} exited with {proc.returncode}" + (f": {tail[-1][:200]}" if tail else "")
    if proc.returncode in (-9, 137):
        reason += " (killed: out of memory?)"
    return None, reason


def run_in_subprocess(impl: Impl, case: Case, settings: dict, folder: str, role: str) -> List[dict]:
    tag = f"{impl.name}_{'_'.join(case.losses)}"
    spec_path = os.path.join(folder, f"spec_{tag}.json")
    result_path = os.path.join(folder, f"rows_{tag}.json")
    spec = {"impl": dataclasses.asdict(impl), "shape": dataclasses.asdict(case.shape), "losses": list(case.losses),
            "settings": settings, "folder": folder, "role": role, "result": result_path}
    rows, reason = run_json_worker(worker_command(spec_path), spec, spec_path, result_path,
                                   settings.get("worker_timeout_s"))
    if reason is None:
        return rows
    return [{"shape": case.shape.as_dict(), "impl": impl.name, "label": impl.label, "loss": lt, "status": "error",
             "reason": reason} for lt in case.losses]


def worker_main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    settings = spec["settings"]
    torch.set_num_threads(settings["threads"])
    impl = Impl(**spec["impl"])
    case = Case(Shape(**spec["shape"]), tuple(spec["losses"]))
    ref_logps = torch.load(os.path.join(spec["folder"], "ref_logps.pt"))
    rows = run_impl(impl, case, settings, TargetStore(spec["folder"]), spec["role"], ref_logps)
    with open(spec["result"], "w") as f:
        json.dump(rows, f)


def add_ratios(rows: List[dict], primary: str) -> None:
    ours = {(report.shape_key(r["shape"]), r["loss"]): r for r in rows if r["impl"] == primary and r["status"] == "ok"}
    for row in rows:
        mine = ours.get((report.shape_key(row["shape"]), row["loss"]))
        if row["status"] != "ok" or mine is None:
            continue
        row["time_vs_ours"] = row["median_s"] / mine["median_s"]
        if row.get("peak_extra_bytes") and mine.get("peak_extra_bytes"):
            row["memory_vs_ours"] = row["peak_extra_bytes"] / mine["peak_extra_bytes"]


def measure_floors(shape: Shape, device: torch.device, dtype: torch.dtype) -> dict:
    """Measured right before the shape's cases (a shared machine's load changes during a sweep). The
    compute floor takes the fastest of the three LM-head GEMM shapes, so no implementation can beat it."""
    m = min(shape.N, 8192 if device.type == "cuda" else 2048)
    rates = measure.gemm_rates(m, shape.H, shape.V, dtype, device, repeats=5)
    rate = max(rates.values())
    bandwidth = measure.copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (512 << 20))
    nbytes = measure.min_bytes(shape.N, shape.H, shape.V, torch.empty((), dtype=dtype).element_size())
    return {"gemm_flops_per_s": rate, "gemm_flops_per_s_by_shape": rates, "gemm_tokens": m,
            "compute_floor_s": measure.flops(shape.N, shape.H, shape.V) / rate,
            "bandwidth_bytes_per_s": bandwidth, "min_bytes": nbytes, "memory_floor_s": nbytes / bandwidth}


def output_paths(args, device: torch.device) -> Dict[str, str]:
    tag = args.tag
    if tag is None:
        tag = "cpu" if device.type == "cpu" else "gpu-" + re.sub(r"[^a-z0-9]+", "-",
                                                                  measure.device_name(device).lower()).strip("-")
        if args.quick:
            tag += "-quick"
    os.makedirs(args.out, exist_ok=True)
    return {ext: os.path.join(args.out, f"{tag}.{ext}") for ext in ("json", "md", "png")}


def _write_tables(paths: Dict[str, str], result: dict, primary: str) -> None:
    add_ratios(result["rows"], primary)
    report.write_json(paths["json"], result)
    with open(paths["md"], "w") as f:
        f.write(report.markdown(result) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--shapes", default=None, help="comma-separated PxTxHxV[xK] (default: the device's sweep)")
    p.add_argument("--quick", action="store_true", help="a small sweep (under 2 minutes on a 2-core CPU)")
    p.add_argument("--losses", default="mio,dpo", help="comma-separated loss types (default: mio,dpo)")
    p.add_argument("--impls", default=None,
                   help="comma-separated: naive, naive_dtype, compiled, liger, cce, trl, native_single_pass, "
                        "native_recompute, ours (= every available kernel "
                        "backend), or a backend name (triton, native); default: all of them, naive_dtype only for "
                        "bf16/fp16")
    p.add_argument("--ours", default=None, help="the backend of ours every row is checked against and compared "
                   "with: triton, native or reference (default: the first available of triton, native, reference)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case, at least (default: 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up runs, the first also checks (default: 1 CPU, 2 CUDA)")
    p.add_argument("--min-time", type=float, default=None,
                   help="small shapes: keep timing until the runs add up to this many seconds (default 1, 0.3 "
                        "with --quick)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default: benchmarks/results)")
    p.add_argument("--tag", default=None, help="output file stem (default: cpu / gpu-<device>, -quick for --quick)")
    p.add_argument("--in-process", action="store_true", help="on CPU, run every case in this process (no fresh "
                   "process per case: peak RSS then measured over what earlier cases left behind)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="skip the cases left once this much time has passed (default: 9 on CUDA, none on CPU)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the plan (cases, implementations, output files) as JSON; "
                        "runs nothing and needs no GPU (the device is not opened)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


KNOWN_IMPLS = ("ours", "triton", "native") + tuple(impl.name for impl in PEERS)


def default_impls(dtype: torch.dtype) -> str:
    return ("naive," + ("" if dtype == torch.float32 else "naive_dtype,")
            + "compiled,liger,cce,trl,ours,native_single_pass,native_recompute")


def dry_run_plan(args) -> dict:
    """What main() would run with these arguments, resolved without touching the device: the names are
    checked (unknown ones exit like the real run), availability is left to the run (reported there)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device: {device!r} is not cpu or cuda")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    from mio_kernels.losses import LOSSES
    unknown = [lt for lt in losses if lt not in LOSSES]
    if unknown:
        raise SystemExit(f"--losses: unknown loss type(s) {unknown}")
    cases = parse_shapes(args.shapes, losses) if args.shapes else default_sweep(device, args.quick, losses)
    names = [x.strip() for x in (args.impls or default_impls(DTYPES[dtype_name])).split(",") if x.strip()]
    bad = [n for n in names if n not in KNOWN_IMPLS]
    if bad:
        raise SystemExit(f"--impls: unknown implementation(s) {bad}")
    if args.ours not in (None, "reference", "naive", "triton", "native"):
        raise SystemExit(f"--ours: {args.ours!r} is not triton, native or reference")
    tag = args.tag or ("cpu" if device == "cpu" else "gpu-<device>") + ("-quick" if args.quick else "")
    outputs = [os.path.join(args.out, f"{tag}.{ext}") for ext in ("json", "md") + (() if args.no_plot else ("png",))]
    max_minutes = args.max_minutes if args.max_minutes is not None else (9.0 if device == "cuda" else None)
    return {"dry_run": True, "device": device, "dtype": dtype_name, "losses": list(losses),
            "cases": [c.shape.as_dict() for c in cases], "impls": names, "ours": args.ours,
            "max_minutes": max_minutes, "outputs": outputs}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    if args.dry_run:
        plan = dry_run_plan(args)
        print(json.dumps(plan, indent=1))
        return plan
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    on_cuda = device.type == "cuda"
    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    cases = parse_shapes(args.shapes, losses) if args.shapes else default_sweep(device.type, args.quick, losses)
    impl_names = args.impls or default_impls(dtype)
    impls, primary = select_impls([x.strip() for x in impl_names.split(",") if x.strip()], device, args.ours)
    subprocesses = device.type == "cpu" and not args.in_process
    max_minutes = args.max_minutes if args.max_minutes is not None else (9.0 if on_cuda else None)
    settings = {
        "device": str(device), "dtype": dtype_name, "beta": args.beta, "seed": args.seed,
        "repeats": args.repeats or 3, "warmup": max(1, args.warmup or (2 if on_cuda else 1)),
        "min_time_s": args.min_time if args.min_time is not None else (0.3 if args.quick else 1.0),
        "threads": torch.get_num_threads(), "ours_primary": primary, "quick": args.quick,
        "free_target": any(i.target == "free" for i in impls),
        "memory_method": ("CUDA max_memory_allocated" if on_cuda else
                          "peak RSS of a fresh process per case" if subprocesses else "peak RSS in-process"),
        "worker_timeout_s": 3600,
        "impls": [i.name for i in impls],
    }
    paths = output_paths(args, device)
    result = {"schema": 1, "environment": measure.environment(device, REPO), "settings": settings,
              "shapes": [dict(c.shape.as_dict(), losses=list(c.losses),
                              flop=measure.flops(c.shape.N, c.shape.H, c.shape.V)) for c in cases],
              "rows": []}
    entries = {c.shape: e for c, e in zip(cases, result["shapes"])}
    # A fresh process per case (shape, loss, implementation) on CPU. In one process (CUDA), loss-major,
    # so that compiled peers recompile only when the loss changes or a new shape needs it (dynamic
    # shapes), as in a training run.
    if subprocesses:
        units = [Case(c.shape, (lt,)) for c in cases for lt in c.losses]
    else:
        units = [Case(c.shape, (lt,)) for lt in losses for c in cases if lt in c.losses]
    started = time.monotonic()
    ref_cache: Dict[Shape, torch.Tensor] = {}
    current_loss = None
    for unit in units:
        shape, entry = unit.shape, entries[unit.shape]
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            result["rows"] += [{"shape": shape.as_dict(), "impl": i.name, "label": i.label, "loss": lt,
                                "status": "skipped", "reason": f"time budget ({max_minutes:g} min) spent"}
                               for i in impls for lt in unit.losses]
            continue
        print(f"[bench] {report.shape_key(shape.as_dict())} {'/'.join(unit.losses)}: N={shape.N}",
              file=sys.stderr, flush=True)
        if not subprocesses and unit.losses[0] != current_loss:
            torch._dynamo.reset()
            current_loss = unit.losses[0]
        if "floors" not in entry and "floors_error" not in entry:
            try:
                entry["floors"] = measure_floors(shape, device, dtype)
            except Exception as err:  # e.g. out of memory: the shape is reported without floors
                entry["floors_error"] = first_line(err)
        inputs = None
        if shape not in ref_cache:
            inputs = make_inputs(shape, device, dtype, args.seed, args.beta)
            ref_cache[shape] = inputs.ref_logps.cpu()
        if subprocesses:
            inputs = None                 # each worker process draws its own
        elif inputs is None:
            inputs = make_inputs(shape, device, dtype, args.seed, args.beta, ref_cache[shape])
        with tempfile.TemporaryDirectory(prefix="bench_loss_") as folder:
            store = TargetStore(folder if subprocesses else None)
            if subprocesses:
                torch.save(ref_cache[shape], os.path.join(folder, "ref_logps.pt"))
            for k, impl in enumerate(impls):
                role = "target" if k == 0 else "check"
                t0 = time.monotonic()
                if max_minutes is not None and t0 - started > 60 * max_minutes:
                    result["rows"] += [{"shape": shape.as_dict(), "impl": impl.name, "label": impl.label, "loss": lt,
                                        "status": "skipped", "reason": f"time budget ({max_minutes:g} min) spent"}
                                       for lt in unit.losses]
                    continue
                if subprocesses:
                    rows = run_in_subprocess(impl, unit, settings, folder, role)
                else:
                    rows = run_impl(impl, unit, settings, store, role, ref_cache[shape], inputs)
                for row in rows:
                    print(f"[bench]   {impl.name:>11} {row['loss']:>4}: {row['status']}"
                          + (f" {row['median_s'] * 1e3:.1f} ms" if row["status"] == "ok" else f" ({row.get('reason')})")
                          + f"  [{time.monotonic() - t0:.0f} s]", file=sys.stderr, flush=True)
                result["rows"] += rows
                _write_tables(paths, result, primary)     # a run stopped from outside keeps what it measured
        del inputs
        _write_tables(paths, result, primary)
    result["environment"]["load_avg_1m_at_end"] = measure.load_average()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    report.write_json(paths["json"], result)
    text = report.markdown(result)
    with open(paths["md"], "w") as f:
        f.write(text + "\n")
    if not args.no_plot and report.plot(paths["png"], result):
        print(f"[bench] wrote {paths['png']}", file=sys.stderr)
    print(text)
    print(f"[bench] wrote {paths['json']} and {paths['md']} in {result['elapsed_s']:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
