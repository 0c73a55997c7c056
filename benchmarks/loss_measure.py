"""Timing, peak-memory and floor measurements for bench_loss.py, and the environment stamp.

Peak memory is the extra memory one forward+backward needs on top of what was live before it
(inputs, weights, the model state of the process): the gradients it returns count.
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
  CPU:  peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the resident set
        before the run, in a fresh process per case. glibc would otherwise keep memory freed by
        earlier iterations and hand it back without it showing in RSS, so the memory run first
        returns free heap memory to the OS (malloc_trim) and makes every allocation above 64 KiB its
        own mapping (mallopt), which is unmapped when freed. Afterwards the thresholds are set to
        where glibc's dynamic ones end up after large frees (32 MiB mmap, 64 MiB trim).
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

# --------------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(run: Callable[[], None], device: torch.device, runs: int, min_total_s: float = 0.5,
            max_runs: int = 20) -> None:
    """`runs` calls, and more while they took less than `min_total_s` in all (small shapes)."""
    spent, count = 0.0, 0
    while count < runs or (spent < min_total_s and count < max_runs):
        spent += time_runs(run, device, 1)[0]
        count += 1


def time_runs(run: Callable[[], None], device: torch.device, repeats: int, min_total_s: float = 0.0,
              max_repeats: int = 50) -> List[float]:
    """Seconds per call of `run` (already warmed up), one sample per call; CUDA events on GPU.
    At least `repeats` samples, more while they sum to less than `min_total_s` (small shapes)."""
    times: List[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < max_repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: List[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "samples_s": [round(t, 6) for t in times]}


# --------------------------------------------------------------------------------------------------
# Peak memory.


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(run: Callable[[], None], device: torch.device) -> Dict[str, object]:
    """Extra memory of one call of `run` over what is live before it (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated(device) - base,
                "memory_method": "cuda max_memory_allocated - memory_allocated before"}
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    if not _reset_rss_peak() or _proc_status_kib("VmHWM") is None:
        return {"peak_extra_bytes": None, "memory_method": "unavailable (needs Linux /proc/self/clear_refs)"}
    base = _proc_status_kib("VmRSS")
    run()
    peak = _proc_status_kib("VmHWM")
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    return {"peak_extra_bytes": (peak - base) * 1024, "memory_method": "VmHWM - VmRSS before (fresh process)"}


# --------------------------------------------------------------------------------------------------
# Floors: what the hardware allows for one shape.


def gemm_rates(m: int, h: int, v: int, dtype: torch.dtype, device: torch.device,
               repeats: int = 3) -> Dict[str, float]:
    """Best FLOP/s of torch.matmul in `dtype` for the three GEMM shapes of the LM head on m tokens:
    logits [m,H]x[H,V], dH = dZ [m,V] x W [V,H], dW = dZ^T [V,m] x hidden [m,H]."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(m, h, generator=gen, device=device).to(dtype)
    weight = torch.randn(v, h, generator=gen, device=device).to(dtype)
    d_logits = torch.randn(m, v, generator=gen, device=device).to(dtype)
    shapes = {"logits": lambda: hidden @ weight.T, "d_hidden": lambda: d_logits @ weight,
              "d_weight": lambda: d_logits.T @ hidden}
    rates = {}
    for name, fn in shapes.items():
        fn()                                   # warm-up
        rates[name] = 2.0 * m * h * v / min(time_runs(fn, device, repeats))
    return rates


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Best bytes/s (read + write) of a large tensor copy."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                              # first touch of the pages
    best = min(time_runs(lambda: dst.copy_(src), device, repeats))
    return 2.0 * src.numel() * 4 / best


def min_bytes(n: int, h: int, v: int, itemsize: int) -> int:
    """Traffic no implementation can avoid: read hidden [N,H] and weight [V,H] in the forward and
    again in the backward, write dH [N,H] and dW [V,H]; labels (int64) read once."""
    return 3 * (n * h + v * h) * itemsize + 8 * n


def flops(n: int, h: int, v: int) -> float:
    """8 N H V: forward logits GEMM (2NHV), backward recompute (2NHV), dH and dW GEMMs (2NHV each)."""
    return 8.0 * n * h * v


# --------------------------------------------------------------------------------------------------
# Environment stamp.


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            model = match.group(1).strip()
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def _version(dist: str) -> Optional[str]:
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(repo_dir: str) -> Optional[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def native_build() -> Optional[str]:
    """A short hash of the built native extension (mio_kernels._C), to tell builds apart across processes."""
    import hashlib
    import importlib.util
    try:
        spec = importlib.util.find_spec("mio_kernels._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    with open(spec.origin, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(device: torch.device, repo_dir: str) -> Dict[str, object]:
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mio_kernels": _version("mio-kernels"),
        "mio_kernels_commit": _git_commit(repo_dir),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "torch_threads": torch.get_num_threads(),
        "native_build": native_build(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    env["load_avg_1m_at_start"] = load_average()
    return env
