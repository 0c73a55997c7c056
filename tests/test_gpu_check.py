"""benchmarks/gpu_check.sh, the one-command GPU run, checked without a GPU: its --dry-run resolves every
step (the build command, the CUDA tests it selects, bench_loss.py's arguments, the files it would write)
and exits 0; its pytest plugin selects the CUDA-gated tests and stops starting tests at the deadline; its
step runner stops a step at its time limit; its result folder stays within what can be fetched back."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
gpu_check = pytest.importorskip("gpu_check")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    done = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), str(out), "--dry-run"], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable),
                          cwd=str(ROOT / "tests"))     # any working directory: the script finds the repository
    return done, out


def test_dry_run_exits_0_and_checks_every_step(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    text = done.stdout
    assert "FAILED" not in text and text.rstrip().endswith("[gpu_check] dry run ok"), text[-3000:]
    for check in ("setup.py exists and knows MIO_KERNELS_NO_CUDA", "pip runs", "pytest collects tests/",
                  "the CUDA tests are selected", "bench_loss.py accepts the arguments",
                  "bench_loss.py writes bench.json and bench.md into OUTDIR",
                  "the benchmark shape is N = 32768, H = 4096, V = 128256 in bf16"):
        assert f"[gpu_check] ok: {check}" in text, check
    would = {m.group(1): m.group(2) for m in re.finditer(r"\[gpu_check\] (\S+): would run \([^)]*\): (.*)", text)}
    assert list(would) == ["build", "tests-cuda", "bench", "tests-device"]
    assert "-m pip install --no-build-isolation --no-deps --no-index -e ." in would["build"]
    assert f"--junitxml={out}/tests-cuda.xml" in would["tests-cuda"] and "-p gpu_check" in would["tests-cuda"]
    bench = would["bench"]
    for arg in ("--device cuda", "--dtype bfloat16", "--shapes 2x8192x4096x128256", f"--out {out}", "--tag bench",
                "--max-minutes"):
        assert arg in bench, arg
    impls = bench.split("--impls ")[1].split()[0].split(",")
    assert {"native_single_pass", "native_recompute", "triton", "liger", "cce", "trl", "naive", "compiled"} <= set(impls)


def test_dry_run_selects_the_cuda_tests(dry_run):
    done, _ = dry_run
    selected = re.findall(r"cuda test: (\S+)", done.stdout)
    files = {node.split("::")[0] for node in selected}
    assert {"tests/test_cuda_sweep.py", "tests/test_native.py"} <= files
    assert any("test_cuda_matches_float64_oracle" in node for node in selected)
    sweep = [n for n in selected if n.startswith("tests/test_cuda_sweep.py::")]
    for part in ("bf16", "fp16", "fp32", "native-single_pass", "native-recompute", "triton-recompute", "reference-auto"):
        assert any(part in n for n in sweep), part
    # Nothing that runs without a device is in this group.
    assert not any(n.startswith(("tests/test_losses.py", "tests/test_train")) for n in selected)


def test_dry_run_manifest_and_output_folder(dry_run):
    done, out = dry_run
    assert sorted(os.listdir(out)) == ["manifest.json"]           # a dry run writes nothing else
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dry_run"] is True and manifest["budget_s"] == 480
    assert [s["step"] for s in manifest["steps"]] == ["build", "tests-cuda", "bench", "tests-device"]
    assert all(s["status"] == "dry-run" for s in manifest["steps"])
    env = manifest["environment"]
    for key in ("torch", "torch_cuda", "triton", "nvcc", "git_commit", "python"):
        assert key in env, key
    assert manifest["started_utc"] and manifest["finished_utc"]
    assert manifest["selected_tests"]["cuda"]["count"] > 50
    plan = manifest["bench_plan"]
    assert [c["N"] for c in plan["cases"]] == [32768] and plan["cases"][0]["V"] == 128256
    assert plan["cases"][0]["H"] == 4096 and plan["cases"][0]["T"] == 8192 and plan["dtype"] == "bfloat16"
    # What a real run writes: flat, few, safe names; the time limits fit the 8-minute budget.
    names = set(gpu_check.FILES.values())
    planned = {Path(p).name for s in manifest["steps"] for p in s["outputs"]} | {s["log"] for s in manifest["steps"]}
    assert planned <= names and len(names) <= 8 and all(SAFE_NAME.match(n) for n in names)
    assert all("/" not in n for n in names)
    # No step may run past the deadline (tests: + 30 s for the one test running when it passes).
    for step in manifest["steps"]:
        assert step["timeout_s"] <= step["budget_left_s"] + (30 if step["step"].startswith("tests-") else 0), step
    assert manifest["steps"][0]["budget_left_s"] <= 480


def test_plugin_selects_cuda_gated_tests_and_stops_at_the_deadline(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent('''
        import pytest
        DEVICE = "cpu"

        @pytest.mark.skipif(False, reason="no CUDA device here")
        def test_gated():
            pass

        @pytest.mark.parametrize("device", ["cpu", "cuda"])
        def test_param(device):
            pass

        @pytest.mark.skipif(False, reason="nvcc not on PATH")
        def test_not_gated():
            pass
    '''))
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    pass\n")
    listing, xml = tmp_path / "selected.txt", tmp_path / "junit.xml"

    def run(select, **extra):
        env = dict(os.environ, PYTHONPATH=str(BENCH_DIR), MIO_GPU_CHECK_SELECT=select, MIO_GPU_CHECK_LIST=str(listing),
                   **extra)
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_check", "-p", "no:cacheprovider",
                               "--continue-on-collection-errors", "-o", "junit_family=xunit1", f"--junitxml={xml}", "--rootdir", str(tmp_path),
                               str(tmp_path)], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)

    done = run("cuda")
    assert done.returncode == 0, done.stdout[-2000:]
    assert sorted(listing.read_text().split("\n")[:-1]) == ["cuda test_fake.py::test_gated",
                                                            "cuda test_fake.py::test_param[cuda]"]
    done = run("device")
    assert listing.read_text().split("\n")[:-1] == ["device test_fake.py::test_not_gated"]   # [cpu]: a CPU test
    # A module that cannot be imported (a trainer test without transformers) is listed, not counted.
    (tmp_path / "test_broken.py").write_text("import no_such_module_for_gpu_check\n")
    done = run("cuda", MIO_GPU_CHECK_DEADLINE="0")      # long past: nothing is started
    summary = gpu_check.junit_summary(str(xml))
    assert summary["tests"] == 2 and summary["skipped_at_deadline"] == 2 and summary["passed"] == 0
    assert summary["skipped_at_deadline_tests"] == ["test_fake::test_gated", "test_fake::test_param[cuda]"]
    assert len(summary["modules_not_collected"]) == 1 and "no_such_module" in summary["modules_not_collected"][0]
    assert summary["failed"] == summary["errors"] == 0


def test_step_runner_stops_a_step_at_its_limit_and_records_it(tmp_path):
    check = gpu_check.Check(str(tmp_path), sys.executable, budget_s=60, dry_run=False)
    ok = check.run("quick", [sys.executable, "-c", "print('hello')"], "run_log", timeout=60)
    slow = check.run("slow", [sys.executable, "-c", "import time; time.sleep(60)"], "run_log", timeout=1)
    assert ok["status"] == "ok" and ok["rc"] == 0
    assert slow["status"] == "stopped at its time limit" and slow["seconds"] < 30
    log = (tmp_path / "run.log").read_text()
    assert "hello" in log and "===== slow: stopped at its time limit" in log
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["step"] for s in manifest["steps"]] == ["quick", "slow"] and manifest["files"]["run_log"] == "run.log"
    check.skip_step("bench", 500)
    assert check.manifest["skipped_steps"][0]["step"] == "bench" and "500 s needed" in \
        check.manifest["skipped_steps"][0]["reason"]


def test_logs_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOG_CAP", 5 << 20)
    log = tmp_path / "build.log"
    log.write_bytes(b"x" * (9 << 20))
    gpu_check._cap_log(str(log))
    assert log.stat().st_size <= 5 << 20


def test_bench_dry_run_rejects_unknown_arguments():
    import bench_loss
    with pytest.raises(SystemExit, match="unknown implementation"):
        bench_loss.main(["--dry-run", "--device", "cuda", "--impls", "ours,not-a-peer"])
    with pytest.raises(SystemExit, match="unknown loss"):
        bench_loss.main(["--dry-run", "--device", "cuda", "--losses", "mio,nope"])
    plan = bench_loss.main(["--dry-run", "--device", "cpu", "--out", "somewhere", "--tag", "t"])
    assert plan["dtype"] == "float32" and plan["outputs"] == [os.path.join("somewhere", f"t.{e}")
                                                               for e in ("json", "md", "png")]
