"""setup.py: when the CUDA toolkit's major version differs from torch's CUDA (torch's cpp_extension would
abort the whole install), the build falls back to the CPU part of the extension with one warning naming
both versions and MIO_KERNELS_NO_CUDA=1. Tested with a fake toolkit (a script named nvcc), no build."""
import importlib.util
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("mio_kernels_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)     # not __main__: setup() does not run
    return module


def fake_toolkit(root: Path, release: str) -> str:
    """A CUDA_HOME whose bin/nvcc prints the version banner of `release` (e.g. '12.4')."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    "echo 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.99'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(root)


def test_toolkit_version_is_read_from_cuda_home(setup_py, tmp_path):
    assert setup_py.toolkit_cuda_version(fake_toolkit(tmp_path / "cuda", "12.4")) == "12.4"
    assert setup_py.toolkit_cuda_version(str(tmp_path / "missing")) is None
    assert setup_py.toolkit_cuda_version(None) is None


@pytest.mark.parametrize("toolkit,torch_cuda,differ", [
    ("12.4", "13.0", True), ("13.0", "12.8", True), ("13.0", "13.0", False), ("12.1", "12.8", False),
    (None, "13.0", False), ("12.4", None, False)])
def test_major_mismatch(setup_py, toolkit, torch_cuda, differ):
    message = setup_py.cuda_major_mismatch(toolkit, torch_cuda, "/opt/toolkit")
    assert (message is not None) == differ
    if differ:
        assert f"CUDA {toolkit}" in message and f"CUDA {torch_cuda}" in message
        assert "MIO_KERNELS_NO_CUDA=1" in message and "CPU only" in message and "/opt/toolkit" in message


def _extension(setup_py, monkeypatch, capsys, toolkit_home, torch_cuda):
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", toolkit_home)
    for name in ("MIO_KERNELS_NO_EXT", "MIO_KERNELS_NO_CUDA"):
        monkeypatch.delenv(name, raising=False)
    kwargs = setup_py._extension_kwargs()
    (ext,) = kwargs["ext_modules"]
    return ext, capsys.readouterr().err


def test_mismatched_toolkit_falls_back_to_a_cpu_build(setup_py, monkeypatch, capsys, tmp_path):
    ext, log = _extension(setup_py, monkeypatch, capsys, fake_toolkit(tmp_path / "cuda-12.4", "12.4"), "13.0")
    assert not any(src.endswith(".cu") for src in ext.sources), ext.sources
    assert ("MIO_WITH_CUDA", None) not in ext.define_macros
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, log
    assert "CUDA 12.4" in warnings[0] and "CUDA 13.0" in warnings[0] and "MIO_KERNELS_NO_CUDA=1" in warnings[0]
    assert "building mio_kernels._C (CPU)" in log


def test_matching_toolkit_builds_the_cuda_part(setup_py, monkeypatch, capsys, tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    monkeypatch.setattr(setup_py, "_nvcc_gencode", lambda cuda_home: ["-gencode=arch=compute_90,code=sm_90"])
    ext, log = _extension(setup_py, monkeypatch, capsys, home, "13.0")
    assert any(src.endswith(".cu") for src in ext.sources) and ("MIO_WITH_CUDA", None) in ext.define_macros
    assert "WARNING" not in log


def test_no_cuda_switch_skips_the_check(setup_py, monkeypatch, capsys, tmp_path):
    home = fake_toolkit(tmp_path / "cuda-12.4", "12.4")
    monkeypatch.setattr(setup_py, "toolkit_cuda_version", lambda cuda_home: pytest.fail("toolkit queried"))
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", home)
    monkeypatch.setenv("MIO_KERNELS_NO_CUDA", "1")
    (ext,) = setup_py._extension_kwargs()["ext_modules"]
    assert not any(src.endswith(".cu") for src in ext.sources)
    assert "WARNING" not in capsys.readouterr().err
