"""The first GPU run in one command: build, CUDA tests, the GPU-goal benchmark, and a manifest.

    bash benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine, from the repository root
    bash benchmarks/gpu_check.sh OUTDIR --dry-run  # anywhere: checks the wiring, runs nothing

Needs torch (2.11+), triton (3.6+), pytest, ninja and nvcc; no package index (nothing is installed but
this package). Steps, each started only when the time left allows it, all within --budget-s (default
480 s = 8 minutes, the build included; a running step is stopped at the deadline):

  1. build    pip install --no-build-isolation --no-deps --no-index -e .  (the CUDA extension, for this
              GPU's arch only; CUDA_HOME found when unset)                      -> build.log
  2. cuda     pytest over tests/, only the tests that skip without a CUDA device (a skipif whose reason
              names CUDA or a GPU, or a "cuda" parameter), which includes tests/test_cuda_sweep.py: every
              backend x backward mode x bf16/fp16/fp32 against float64  -> tests-cuda.xml (+ run.log)
  3. bench    bench_loss.py at N = 32768 (2 prompts x (1+1) x 8192), H = 4096, V = 128256, bf16, mio:
              ours single pass, ours recompute, Triton, and the peers installed (others: skipped)
                                                                          -> bench.json, bench.md
  4. device   the remaining tests that run on the conftest DEVICE (CUDA here), until the deadline
                                                                          -> tests-device.xml
  manifest.json: device, driver, torch/triton/CUDA/nvcc versions, git commit, dates, every step's command,
  status, time and counts, and everything skipped (steps, tests stopped by the deadline, bench rows).

At most 7 files, flat in OUTDIR, logs capped at 15 MiB. This module is also the pytest plugin that
selects the tests (-p gpu_check, with MIO_GPU_CHECK_SELECT) and skips tests once the deadline
(MIO_GPU_CHECK_DEADLINE, epoch seconds) has passed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUDGET_S = 480
MARGIN_S = 15            # kept back for the manifest and shutdown
BENCH_SHAPE = "2x8192x4096x128256"   # P x T x H x V (K = 1): N = 2 * (1 + 1) * 8192 = 32768 tokens
BENCH_IMPLS = "native_single_pass,native_recompute,triton,liger,cce,trl,naive_dtype,naive,compiled"
# Time plan (seconds): the most a step may take, and the least worth starting it with.
BUILD_MAX, CUDA_TESTS_MAX, BENCH_MAX = 300, 150, 270
MIN_START = {"build": 45, "cuda": 30, "bench": 60, "device": 30}
BENCH_RESERVE = 150      # the build and the CUDA tests leave this much for the benchmark
LAST_IMPL_S = 75         # the benchmark stops starting implementations this long before its end
LOG_CAP = 15 << 20
# What a dry run assumes each step takes, to print the time plan a real run would follow.
EXPECTED_S = {"build": 120, "tests-cuda": 120, "bench": 200}
FILES = {"manifest": "manifest.json", "build_log": "build.log", "run_log": "run.log",
         "cuda_xml": "tests-cuda.xml", "device_xml": "tests-device.xml", "bench_json": "bench.json",
         "bench_md": "bench.md"}
DEADLINE_REASON = "gpu_check: time budget spent before this test started"

# ------------------------------------------------------------------------------------------------
# pytest plugin (-p gpu_check): test selection and the deadline.

GATE = re.compile(r"\bcuda\b|\bgpus?\b", re.IGNORECASE)


def cuda_gated(item) -> bool:
    """A test that skips without a CUDA device: a skipif naming CUDA/GPU, or a 'cuda' parameter."""
    for mark in item.iter_markers("skipif"):
        reason = mark.kwargs.get("reason") or (mark.args[1] if len(mark.args) > 1 else "")
        if GATE.search(str(reason)):
            return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(str(v).startswith("cuda") for v in callspec.params.values())


def device_test(item) -> bool:
    """A test of a module that runs on conftest's DEVICE (CUDA where there is one), or that takes a device,
    unless its device parameter is the CPU."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and str(callspec.params.get("device", "")).startswith("cpu"):
        return False
    return getattr(getattr(item, "module", None), "DEVICE", None) is not None or "device" in item.fixturenames


def group_of(item):
    return "cuda" if cuda_gated(item) else "device" if device_test(item) else None


def pytest_collection_modifyitems(config, items):
    wanted = [g for g in os.environ.get("MIO_GPU_CHECK_SELECT", "").split(",") if g]
    if not wanted:
        return
    keep, drop = [], []
    for item in items:
        (keep if group_of(item) in wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    listing = os.environ.get("MIO_GPU_CHECK_LIST")
    if listing:
        with open(listing, "w") as f:
            f.writelines(f"{group_of(item)} {item.nodeid}\n" for item in keep)


def pytest_runtest_setup(item):
    deadline = os.environ.get("MIO_GPU_CHECK_DEADLINE")
    if deadline and time.time() > float(deadline):
        import pytest
        pytest.skip(DEADLINE_REASON)


# ------------------------------------------------------------------------------------------------
# The driver.


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def _query(cmd, timeout=30):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def find_cuda_home():
    """CUDA_HOME as set, else the toolkit of the nvcc on PATH (nvcc -dryrun names its TOP: a wrapper
    script named nvcc outside the toolkit misleads torch's own guess), else the conventional location."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"], "CUDA_HOME"
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            dry = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
            if top:
                candidates.insert(0, os.path.normpath(top.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.realpath(home), "found"
    return None, "no CUDA toolkit found"


def environment(py: str) -> dict:
    """Versions and the device, from a fresh interpreter (this one never imports torch or the package)."""
    probe = ("import json, platform, torch\n"
             "try:\n import triton; tv = triton.__version__\nexcept Exception as e: tv = None\n"
             "d = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,"
             " 'triton': tv, 'cuda_available': torch.cuda.is_available()}\n"
             "if d['cuda_available']:\n p = torch.cuda.get_device_properties(0)\n"
             " d.update(device=p.name, capability=f'{p.major}.{p.minor}', device_memory_gib=round(p.total_memory / 2**30, 1),"
             " multiprocessors=p.multi_processor_count, device_count=torch.cuda.device_count())\n"
             "print(json.dumps(d))\n")
    env = json.loads(_query([py, "-c", probe], timeout=120) or "{}")
    smi = _query(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    cuda_home, how = find_cuda_home()
    nvcc_out = _query([os.path.join(cuda_home, "bin", "nvcc"), "--version"]) if cuda_home else None
    release = re.search(r"release (\d+\.\d+)", nvcc_out or "")
    commit = _query(["git", "rev-parse", "HEAD"])
    dirty = _query(["git", "status", "--porcelain", "--untracked-files=no"])
    env.update(nvidia_smi=smi, cuda_home=cuda_home, cuda_home_source=how, nvcc=release.group(1) if release else None,
               git_commit=commit, git_dirty=None if dirty is None else bool(dirty), cpu_count=os.cpu_count(),
               python_executable=py)
    return env


class Check:
    """One gpu_check run: the time budget, the steps and the manifest."""

    def __init__(self, out: str, py: str, budget_s: float, dry_run: bool):
        self.out, self.py, self.dry_run = out, py, dry_run
        self.start = time.monotonic()
        self.deadline = self.start + budget_s - MARGIN_S
        self.assumed_s = 0.0     # dry run: the time the steps would have taken so far
        self.failed_checks = []
        self.manifest = {"schema": 1, "tool": "benchmarks/gpu_check.sh", "dry_run": dry_run, "budget_s": budget_s,
                         "started_utc": _utc(), "steps": [], "skipped_steps": [], "files": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic() - self.assumed_s

    def path(self, key: str) -> str:
        return os.path.join(self.out, FILES[key])

    def write_manifest(self) -> None:
        self.manifest["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.manifest["files"] = {k: v for k, v in FILES.items() if os.path.exists(os.path.join(self.out, v))}
        tmp = self.path("manifest") + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)
        os.replace(tmp, self.path("manifest"))

    def skip_step(self, name: str, needed: float) -> None:
        reason = f"{max(self.left(), 0):.0f} s left of the budget, {needed:.0f} s needed to start"
        self.manifest["skipped_steps"].append({"step": name, "reason": reason})
        say(f"{name}: skipped ({reason})")

    def run(self, name: str, cmd, log_key: str, timeout: float, env=None, outputs=()) -> dict:
        """Run (or, dry, print) one step; its output goes to the log file."""
        step = {"step": name, "command": shlex.join(cmd), "log": FILES[log_key],
                "outputs": [os.path.basename(p) for p in outputs], "timeout_s": round(timeout),
                "budget_left_s": round(self.left())}
        if env:
            step["env"] = {k: v for k, v in env.items() if k.startswith(("MIO_", "CUDA_HOME", "MAX_JOBS"))}
        self.manifest["steps"].append(step)
        say(f"{name}: {'would run' if self.dry_run else 'running'} (<= {timeout:.0f} s, log {FILES[log_key]}): "
            f"{step['command']}")
        if self.dry_run:
            step["status"] = "dry-run"
            self.assumed_s += min(EXPECTED_S.get(name, 0), timeout)
            return step
        t0 = time.monotonic()
        with open(self.path(log_key), "a") as log:
            log.write(f"\n===== {name}: {step['command']}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, **(env or {})))
            try:
                step["rc"] = proc.wait(timeout=max(timeout, 1))
                step["status"] = "ok" if step["rc"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                step["rc"], step["status"] = None, "stopped at its time limit"
            log.write(f"===== {name}: {step['status']} after {time.monotonic() - t0:.0f} s\n")
        _cap_log(self.path(log_key))
        step["seconds"] = round(time.monotonic() - t0, 1)
        say(f"{name}: {step['status']} in {step['seconds']:.0f} s")
        self.write_manifest()
        return step


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _kill_group(proc) -> None:
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _cap_log(path: str) -> None:
    """Keep a log under the size limit: its first 2 MiB and its last part."""
    if not os.path.exists(path) or os.path.getsize(path) <= LOG_CAP:
        return
    with open(path, "rb") as f:
        head = f.read(2 << 20)
        f.seek(-(LOG_CAP - (3 << 20)), os.SEEK_END)
        tail = f.read()
    with open(path, "wb") as f:
        f.write(head + b"\n[... gpu_check: log cut to stay under 15 MiB ...]\n" + tail)


# ------------------------------------------------------------------------------------------------
# Steps.


def build(check: Check, env: dict) -> None:
    cmd = [check.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    build_env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    if env.get("cuda_home"):
        build_env["CUDA_HOME"] = env["cuda_home"]
    cap = env.get("capability")
    if cap and not os.environ.get("MIO_KERNELS_CUDA_ARCHS"):
        build_env["MIO_KERNELS_CUDA_ARCHS"] = cap.replace(".", "")   # this GPU's arch only: half the nvcc time
    budget = min(BUILD_MAX, check.left() - BENCH_RESERVE - MIN_START["cuda"])
    if not check.dry_run and budget < MIN_START["build"]:
        return check.skip_step("build", MIN_START["build"] + BENCH_RESERVE + MIN_START["cuda"])
    step = check.run("build", cmd, "build_log", budget, build_env)
    if step.get("status") == "failed" and check.left() > BENCH_RESERVE + 60:
        # no pip (or pip refuses): the in-place build of the same extension
        check.run("build-inplace", [check.py, "setup.py", "build_ext", "--inplace"], "build_log",
                  min(BUILD_MAX, check.left() - BENCH_RESERVE), build_env)
    if not check.dry_run:
        probe = ("import json; from mio_kernels import _native as n; "
                 "print(json.dumps({'unavailable': n.unavailable_reason(), 'with_cuda': n.with_cuda()}))")
        check.manifest["extension"] = json.loads(_query([check.py, "-c", probe], timeout=120) or
                                                 '{"unavailable": "import failed", "with_cuda": false}')


def tests_command(check: Check, group: str):
    xml = check.path(f"{group}_xml")
    cmd = [check.py, "-m", "pytest", "tests", "-p", "gpu_check", "-q", "-rfEs", "--continue-on-collection-errors",
           "-o", "junit_family=xunit1", f"--junitxml={xml}", "--durations=15"]
    env = {"MIO_GPU_CHECK_SELECT": group,
           "PYTHONPATH": os.pathsep.join([HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return cmd, env, xml


def run_tests(check: Check, group: str, budget: float) -> None:
    if not check.dry_run and budget < MIN_START[group]:
        return check.skip_step(f"tests-{group}", MIN_START[group])
    cmd, env, xml = tests_command(check, group)
    env["MIO_GPU_CHECK_DEADLINE"] = f"{time.time() + budget:.0f}"
    # The deadline stops starting tests; the hard limit leaves a running test 30 s to finish.
    step = check.run(f"tests-{group}", cmd, "run_log", budget + 30, env, outputs=[xml])
    if not check.dry_run:
        step["results"] = res = junit_summary(xml)
        # rc 5: no test selected; rc 1 with no failure and no error: only modules that could not be
        # imported here (listed in the results), which hold no selected test as far as can be known
        if step["rc"] == 5 or (step["rc"] == 1 and res.get("tests") is not None and not res["failed"]
                               and not res["errors"]):
            step["status"] = "ok"
        check.write_manifest()


def junit_summary(path: str) -> dict:
    """Counts, failures and deadline-skipped tests from a junit file."""
    if not os.path.exists(path):
        return {"error": "no junit file (pytest stopped before writing it)"}
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, deadline_skipped, skip_reasons, not_collected = [], [], {}, []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is not None and outcome.tag == "error" and outcome.get("message") == "collection failure":
            # e.g. a trainer test module importing transformers, absent on a bare GPU image
            lines = (outcome.text or "").strip().splitlines()
            not_collected.append(f"{case.get('file') or case.get('name')}: {lines[-1][:200] if lines else ''}")
            continue
        counts["tests"] += 1
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            message = outcome.get("message", "")
            if DEADLINE_REASON in message:
                deadline_skipped.append(name)
            else:
                skip_reasons[message[:160]] = skip_reasons.get(message[:160], 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append(f"{name}: {(outcome.get('message') or '').splitlines()[0][:300] if outcome.get('message') else ''}")
    return dict(counts, failures=failures[:100], skipped_at_deadline=len(deadline_skipped),
                skipped_at_deadline_tests=deadline_skipped[:300], skip_reasons=skip_reasons,
                modules_not_collected=not_collected)


def bench_cmd(check: Check, minutes: float, ours: str):
    return [check.py, os.path.join("benchmarks", "bench_loss.py"), "--device", "cuda", "--dtype", "bfloat16",
            "--shapes", BENCH_SHAPE, "--losses", "mio", "--impls", BENCH_IMPLS, "--ours", ours,
            "--out", check.out, "--tag", "bench", "--no-plot", "--max-minutes", f"{minutes:.2f}"]


def run_bench(check: Check) -> None:
    budget = min(BENCH_MAX, check.left() - 5)
    if not check.dry_run and budget < MIN_START["bench"]:
        return check.skip_step("bench", MIN_START["bench"])
    ours = "native" if check.dry_run or check.manifest.get("extension", {}).get("with_cuda") else "triton"
    minutes = max(budget - LAST_IMPL_S, 10) / 60
    step = check.run("bench", bench_cmd(check, minutes, ours), "run_log", budget,
                     outputs=[check.path("bench_json"), check.path("bench_md")])
    if not check.dry_run and os.path.exists(check.path("bench_json")):
        with open(check.path("bench_json")) as f:
            rows = json.load(f)["rows"]
        step["rows"] = [{k: r.get(k) for k in ("impl", "loss", "status", "median_s", "peak_extra_bytes",
                                                "time_vs_ours", "reason")} for r in rows]
        check.manifest["skipped_bench_rows"] = [f"{r['impl']} {r['loss']}: {r.get('reason')}" for r in rows
                                                if r["status"] != "ok"]


# ------------------------------------------------------------------------------------------------
# Dry run: every step resolved and checked without a GPU.


def dry_checks(check: Check) -> None:
    def need(ok: bool, what: str) -> None:
        say(("ok: " if ok else "FAILED: ") + what)
        if not ok:
            check.failed_checks.append(what)

    setup_py = os.path.join(REPO, "setup.py")
    need(os.path.exists(setup_py) and "MIO_KERNELS_NO_CUDA" in open(setup_py).read(),
         "setup.py exists and knows MIO_KERNELS_NO_CUDA")
    need(_query([check.py, "-m", "pip", "--version"]) is not None, "pip runs (the build step)")
    need(_query([check.py, "-c", "import pytest, torch, triton"], timeout=120) is not None,
         "torch, triton and pytest import")
    # Test selection: one collection over tests/ with both groups.
    cmd, env, _ = tests_command(check, "cuda")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        listing = os.path.join(tmp, "selected.txt")
        env.update(MIO_GPU_CHECK_SELECT="cuda,device", MIO_GPU_CHECK_LIST=listing)
        collect = [c for c in cmd if not c.startswith(("--junitxml", "--durations"))] + ["--collect-only"]
        done = subprocess.run(collect, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **env),
                              timeout=600)
        lines = open(listing).read().split("\n") if os.path.exists(listing) else []
    selected = {}
    for line in filter(None, lines):
        group, node = line.split(" ", 1)
        selected.setdefault(group, []).append(node)
    need(done.returncode == 0, f"pytest collects tests/ (rc {done.returncode}"
         + (f": {done.stdout.strip().splitlines()[-1]}" if done.returncode and done.stdout.strip() else "") + ")")
    files = sorted({n.split("::")[0] for n in selected.get("cuda", [])})
    need(any(n.startswith("tests/test_cuda_sweep.py::") for n in selected.get("cuda", [])),
         f"the CUDA tests are selected: {len(selected.get('cuda', []))} tests in {', '.join(files) or 'no file'}")
    need(all(os.path.exists(os.path.join(REPO, f)) for f in files), "every selected test file exists")
    dev_files = sorted({n.split("::")[0] for n in selected.get("device", [])})
    say(f"device tests (run on CUDA after the benchmark, until the deadline): {len(selected.get('device', []))} "
        f"in {', '.join(dev_files) or 'no file'}")
    check.manifest["selected_tests"] = {g: {"count": len(v), "files": sorted({n.split("::")[0] for n in v})}
                                        for g, v in selected.items()}
    for node in selected.get("cuda", []):
        say(f"  cuda test: {node}")
    # The benchmark's arguments, through bench_loss.py itself.
    cmd = bench_cmd(check, 3.0, "native") + ["--dry-run"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    plan = json.loads(done.stdout) if done.returncode == 0 else {}
    need(done.returncode == 0, "bench_loss.py accepts the arguments" + (
        "" if done.returncode == 0 else f": {(done.stderr or done.stdout).strip().splitlines()[-1:]}"))
    need(plan.get("outputs") == [check.path("bench_json"), check.path("bench_md")],
         f"bench_loss.py writes {FILES['bench_json']} and {FILES['bench_md']} into OUTDIR")
    need([c.get("N") for c in plan.get("cases", [])] == [32768] and plan.get("dtype") == "bfloat16",
         "the benchmark shape is N = 32768, H = 4096, V = 128256 in bf16")
    check.manifest["bench_plan"] = plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created; files are written flat into it)")
    p.add_argument("--dry-run", action="store_true", help="resolve and check every step, run none (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"total wall-clock budget (default {BUDGET_S})")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    check = Check(os.path.abspath(args.out), args.python, args.budget_s, args.dry_run)
    check.manifest["environment"] = env = environment(args.python)
    say(f"{'dry run' if args.dry_run else 'run'}: device {env.get('device', 'none')}, torch {env.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, nvcc {env.get('nvcc')} at {env.get('cuda_home')}, "
        f"commit {(env.get('git_commit') or 'unknown')[:12]}; budget {args.budget_s:.0f} s; output {check.out}")
    if not args.dry_run and not env.get("cuda_available"):
        say("no CUDA device: nothing to run here (use --dry-run to check the wiring)")
        check.manifest["error"] = "no CUDA device"
        check.write_manifest()
        return 2
    check.write_manifest()
    build(check, env)
    run_tests(check, "cuda", min(CUDA_TESTS_MAX, check.left() - BENCH_RESERVE))
    run_bench(check)
    run_tests(check, "device", check.left() - 35)     # its hard limit (+ 30 s) ends at the deadline
    if args.dry_run:
        dry_checks(check)
    check.manifest["finished_utc"] = _utc()
    check.write_manifest()
    say(f"files in {check.out}: {', '.join(sorted(check.manifest['files'].values()))}")
    if args.dry_run:
        say("dry run " + ("FAILED: " + "; ".join(check.failed_checks) if check.failed_checks else "ok"))
        return 1 if check.failed_checks else 0
    return summarize(check)


def summarize(check: Check) -> int:
    bad = [s["step"] for s in check.manifest["steps"] if s.get("status") != "ok"]
    for s in check.manifest["steps"]:
        res = s.get("results")
        if res and "tests" in res:
            say(f"{s['step']}: {res['passed']} passed, {res['failed']} failed, {res['errors']} errors, "
                f"{res['skipped']} skipped ({res['skipped_at_deadline']} at the deadline), "
                f"{len(res['modules_not_collected'])} test modules not importable here")
            for line in res["failures"][:20]:
                say(f"  FAILED {line}")
    for row in check.manifest.get("skipped_bench_rows", []):
        say(f"bench row not measured: {row}")
    for s in check.manifest["skipped_steps"]:
        say(f"step skipped: {s['step']} ({s['reason']})")
    say("done" + (f"; steps with problems: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
