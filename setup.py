"""mio-kernels: fused LM-head -> log-prob -> DV/JS preference loss.

Builds the native extension `mio_kernels._C` from csrc/ with torch.utils.cpp_extension
(pybind11, ninja) against the torch already installed in the target environment: the CPU
sources always, the CUDA sources too when that torch is a CUDA build and a CUDA toolkit is
found. No build requirement on torch is declared, so pip's build isolation never pulls a
second torch; under isolation the target environment's site-packages is found through
sysconfig (the isolated build runs the target's interpreter). Without an importable torch
the pure-Python package is built and the `native` backend reports itself unavailable.

Environment switches:
  MIO_KERNELS_NO_EXT=1          build the pure-Python package only
  MIO_KERNELS_NO_CUDA=1         build the CPU part of the extension only
                                (taken automatically, with a warning, when the CUDA toolkit's major
                                version differs from the one torch was built with: torch's
                                cpp_extension would abort the whole install)
  MIO_KERNELS_CUDA_ARCHS=80;90  compute capabilities to compile for (each kept only if nvcc knows it)
  MIO_KERNELS_DEBUG=1           keep debug info (-g; dropped by default: a third of the build time)
  MAX_JOBS=n                    parallel compile jobs (read by torch's ninja build)
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup



def _log(msg):
    print(f"mio-kernels setup: {msg}", file=sys.stderr)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _import_torch():
    try:
        import torch
        return torch
    except ImportError:
        pass
    # pip's build isolation hides the target environment's packages but runs its interpreter,
    # whose sysconfig paths still name them: use the torch installed there (appended, so the
    # isolated environment's setuptools keeps precedence).
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
    try:
        import torch
        return torch
    except ImportError:
        return None


def _ensure_ninja_on_path():
    """torch builds with ninja when `ninja` runs; look in the target environment too."""
    if shutil.which("ninja"):
        return
    candidates = [sysconfig.get_paths().get("scripts")]
    try:
        import ninja  # the PyPI wheel ships the binary
        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + d
            return
    _log("ninja not found; torch falls back to its slower serial build")


def _nvcc_gencode(cuda_home):
    """-gencode flags for the requested archs that this nvcc supports (+ PTX of the newest)."""
    wanted = [a.strip() for a in re.split(r"[;, ]+", os.environ.get("MIO_KERNELS_CUDA_ARCHS", "80;90")) if a.strip()]
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
        known = set(re.findall(r"compute_(\d+)", listed))
    except (OSError, subprocess.CalledProcessError):
        # nvcc older than --list-gpu-arch: sm_80 needs CUDA 11.0, sm_90 needs 11.8
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\d+)\.(\d+)", out)
        ver = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        known = {a for a, need in (("80", (11, 0)), ("90", (11, 8))) if ver >= need}
    archs = [a for a in wanted if a in known]
    for a in wanted:
        if a not in known:
            _log(f"nvcc does not support sm_{a}; not compiling for it")
    flags = []
    for i, a in enumerate(archs):
        code = f"[sm_{a},compute_{a}]" if i == len(archs) - 1 else f"sm_{a}"
        flags.append(f"-gencode=arch=compute_{a},code={code}")
    return flags


def toolkit_cuda_version(cuda_home):
    """'13.0' from `<cuda_home>/bin/nvcc --version` ('release 13.0, V13.0.88'), or None."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_major_mismatch(toolkit_version, torch_cuda, cuda_home=None):
    """The warning to print when the toolkit's CUDA major version differs from torch's (torch's
    cpp_extension raises on that and would abort the whole install), else None (also when either
    version is unknown: then torch's own check decides)."""
    if not toolkit_version or not torch_cuda:
        return None
    tk_major, torch_major = toolkit_version.split(".")[0], torch_cuda.split(".")[0]
    if tk_major == torch_major:
        return None
    where = f" at {cuda_home}" if cuda_home else ""
    return (f"WARNING: the CUDA toolkit{where} is CUDA {toolkit_version}, but torch was built with CUDA "
            f"{torch_cuda}; torch's cpp_extension cannot build across CUDA major versions, so mio_kernels._C is "
            f"built for the CPU only (the native backend will not run on CUDA tensors; the Triton backend is "
            f"unaffected). To build the CUDA part, point CUDA_HOME at a CUDA {torch_major}.x toolkit and reinstall; "
            f"set MIO_KERNELS_NO_CUDA=1 to build the CPU part only without this warning.")


def _extension_kwargs():
    """ext_modules / cmdclass for setup(), or {} for the pure-Python package."""
    if _flag("MIO_KERNELS_NO_EXT"):
        _log("MIO_KERNELS_NO_EXT is set; building without the native extension")
        return {}
    torch = _import_torch()
    if torch is None:
        _log("WARNING: torch is not importable, so the native extension mio_kernels._C is not built "
             "(backend='native' will be unavailable). Install torch first, then reinstall mio-kernels.")
        return {}
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    sources = ["csrc/bindings.cpp", "csrc/logprob_cpu.cpp", "csrc/grad_epilogue.cpp"]
    # -fno-trapping-math (as torch's own build): without it GCC will not if-convert the clamps of
    # the row epilogues' exp, so their AVX2 clones stay scalar (the AVX-512 ones vectorise by masking).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"] + ([] if _flag("MIO_KERNELS_DEBUG") else ["-g0"])
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if _flag("MIO_KERNELS_NO_CUDA"):
        with_cuda = False
    elif torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        _log("torch is a CUDA build but no CUDA toolkit (nvcc) was found; building the CPU part only")
    if with_cuda:
        mismatch = cuda_major_mismatch(toolkit_cuda_version(cpp_extension.CUDA_HOME), torch.version.cuda,
                                       cpp_extension.CUDA_HOME)
        if mismatch:
            _log(mismatch)
            with_cuda = False
    gencode = _nvcc_gencode(cpp_extension.CUDA_HOME) if with_cuda else []
    if with_cuda and not gencode:
        _log("no requested CUDA arch is supported by nvcc; building the CPU part only")
        with_cuda = False

    common = dict(
        name="mio_kernels._C",
        sources=sources,
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        _log(f"building mio_kernels._C with CUDA ({' '.join(gencode)})")
        ext = cpp_extension.CUDAExtension(
            **{**common, "sources": sources + ["csrc/cuda/logprob_cuda.cpp", "csrc/cuda/logprob_epilogue.cu",
                                               "csrc/cuda/grad_epilogue_cuda.cpp", "csrc/cuda/grad_epilogue.cu"]},
            define_macros=[("MIO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + gencode},
        )
    else:
        _log("building mio_kernels._C (CPU)")
        ext = cpp_extension.CppExtension(**common, extra_compile_args={"cxx": cxx})
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


# pip and setuptools run this file as __main__; tests import it for its helpers without building.
if __name__ == "__main__":
    setup(
        name="mio-kernels",
        version="0.1.0",
        description="Memory-efficient fused LM-head preference losses (MIO/DPO) with Triton and native kernels",
        packages=find_packages(include=["mio_kernels", "mio_kernels.*"]),
        package_data={"mio_kernels": ["data/*.jsonl", "data/*.json"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.11", "numpy"],
        extras_require={
            "triton": ["triton>=3.6"],
            "train": ["transformers>=4.46", "datasets>=3.0", "tqdm", "matplotlib", "pyyaml"],
            "bench": ["liger-kernel", "cut-cross-entropy", "trl", "matplotlib"],
            "trl": ["trl>=1.16"],
            "test": ["pytest"],
        },
        entry_points={"console_scripts": ["mio-train=mio_kernels.train.cli:main"]},
        **_extension_kwargs(),
    )
