"""Test set-up: without a GPU the Triton kernels run under the interpreter (set before any import
of triton kernels), and kernel launchers poison their outputs so unwritten elements show."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MIO_KERNELS_POISON", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORST_ERRORS = {}  # "backend dtype" -> worst relative error against the float64 oracle


def pytest_terminal_summary(terminalreporter):
    if WORST_ERRORS:
        terminalreporter.write_line("worst relative error vs float64 reference: " + ", ".join(
            f"{key}: {err:.2e}" for key, err in sorted(WORST_ERRORS.items())))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test (the seed is printed on failure so a case can be replayed).
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed
