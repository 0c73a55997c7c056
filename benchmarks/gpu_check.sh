#!/usr/bin/env bash
# The first GPU run in one command: builds the extension, runs the CUDA tests and the GPU exactness sweep,
# benchmarks the GPU goal shape (N = 32768, H = 4096, V = 128256, bf16) and writes every result file, with
# a manifest (device, versions, commit, date, what was skipped), flat into OUTDIR; at most 8 minutes on
# one H100, the build included. Run it from anywhere on a CUDA machine with torch, triton, pytest, ninja
# and nvcc (no package index needed). --dry-run checks the wiring on any machine and runs nothing.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--budget-s SECONDS]
#
# The interpreter: $PYTHON, else the first of python, python3 that imports torch. Steps and files:
# benchmarks/gpu_check.py.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--budget-s SECONDS]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
PY=${PYTHON:-}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac   # relative path: before cd
cd "$(dirname "$0")/.."
if [ -z "$PY" ]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$(command -v "$candidate")
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no python with torch on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
exec "$PY" benchmarks/gpu_check.py "$OUT" --python "$PY" "$@"
