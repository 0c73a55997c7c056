"""mio-kernels: fused LM-head -> log-prob -> DV/JS preference loss.

The native extension (csrc/) is added by the native-backend work; until then this is a
pure-Python package.
"""
from setuptools import find_packages, setup

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
        "bench": ["liger-kernel", "cut-cross-entropy", "matplotlib"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["mio-train=mio_kernels.train.cli:main"]},
)
