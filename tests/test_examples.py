"""The user-loop example runs: step 0 starts at ln 4 (policy == reference) and MIO moves the rewards apart."""
import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "python" / "examples" / "own_training_loop.py"


def test_own_training_loop_example(capsys):
    spec = importlib.util.spec_from_file_location("own_training_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--steps", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    first_loss = float(lines[0].split()[3])
    assert abs(first_loss - math.log(4.0)) < 1e-3
    assert out.metrics["rewards/margins"].item() > 0


def test_trl_example(capsys):
    """The TRL example trains MIO with K = 3 negatives: step 0 is at 2 ln 2 (policy == reference)."""
    import pytest

    pytest.importorskip("trl")
    path = EXAMPLE.parent / "trl_mio.py"
    spec = importlib.util.spec_from_file_location("trl_mio", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logs = module.main(["--steps", "3", "--negatives", "3"])
    assert len(logs) == 3
    # mio at zero rewards: sp(0) + (K + 1) sp(0) / (K + 1) = 2 ln 2, whatever K
    assert abs(logs[0]["loss"] - 2 * math.log(2.0)) < 1e-3
    assert all(math.isfinite(h["loss"]) for h in logs)
