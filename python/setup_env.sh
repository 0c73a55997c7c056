#!/usr/bin/env bash
# Creates .venv in the repository root with the CPU set-up (pinned) and installs mio-kernels into it.
# Idempotent: re-running only installs what is missing. Usage: bash python/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch 2.13.0 is the CPU build here; triton 3.7.1 is what torch 2.13 pins; numpy for the Triton interpreter.
python -m pip install -q torch==2.13.0 triton==3.7.1 numpy \
    "transformers>=4.46" "datasets>=3.0" tqdm matplotlib pyyaml pytest ninja pybind11 setuptools wheel
# Peers the tests and benchmarks compare against (TRL's DPOTrainer and fused head, Liger, Cut Cross-Entropy);
# --no-deps where pip would otherwise fetch another torch.
python -m pip install -q trl==1.16.0 peft accelerate
python -m pip install -q --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# --no-build-isolation: the native extension builds against the torch installed above.
python -m pip install -q --no-build-isolation -e .
