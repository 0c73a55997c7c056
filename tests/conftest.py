"""Test set-up: without a GPU the Triton kernels run under the interpreter (set before any import
of triton kernels), and kernel launchers poison their outputs so unwritten elements show."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MIO_KERNELS_POISON", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORST_ERRORS = {}  # "backend dtype" -> worst relative error against the float64 oracle


def pytest_addoption(parser):
    # tests/test_random_differential.py: how many seeded random cases, from which seed
    # (also MIO_RANDOM_CASES / MIO_RANDOM_SEED; the options win).
    parser.addoption("--random-cases", type=int, default=None,
                     help="number of randomized differential cases (default: the CI count)")
    parser.addoption("--random-seed", type=int, default=None,
                     help="seed of the first randomized differential case (case i uses seed + i)")


def pytest_terminal_summary(terminalreporter):
    if WORST_ERRORS:
        terminalreporter.write_line("worst relative error vs float64 reference: " + ", ".join(
            f"{key}: {err:.2e}" for key, err in sorted(WORST_ERRORS.items())))


@pytest.fixture
def device():
    return DEVICE


def seed_for_test(nodeid: str) -> int:
    """Each test's inputs come from a seed fixed by its name, so a run is reproducible and CI is not a
    lottery. MIO_TEST_SEED=<int> draws another fixed set (a stress run: loop it over integers to find
    tolerances that hold only for the default draw); a failure prints the variable that replays it."""
    salt = int(os.environ.get("MIO_TEST_SEED", "0"))
    return zlib.crc32(f"{nodeid}|{salt}".encode()) if salt else zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seeded(request):
    torch.manual_seed(seed_for_test(request.node.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when == "call":
        salt = os.environ.get("MIO_TEST_SEED", "0")
        report.sections.append(("test seed", f"MIO_TEST_SEED={salt} (torch seed {seed_for_test(item.nodeid)})"))
    return report


@pytest.fixture(autouse=True)
def keep_threads():
    # Trainer runs set torch's thread count (--threads); the next test gets its own back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


NVCC = shutil.which("nvcc")
CUDA_SOURCES = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def nvcc_ptxas_report(source: str, arch: str, out_dir) -> str:
    """Compile csrc/cuda/<source> with plain nvcc (no torch headers, no GPU) for `arch`; returns
    ptxas' verbose report. Skips when this nvcc cannot target `arch`."""
    listed = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True).stdout
    if f"compute_{arch[3:]}" not in listed:
        pytest.skip(f"this nvcc does not support {arch}")
    out = subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-c",
                          str(CUDA_SOURCES / source), "-o", str(Path(out_dir) / "kernel.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout + out.stderr
