#!/usr/bin/env bash
# The developers' check before touching csrc/cuda: builds the CUDA part of the native extension against
# PyPI's CUDA torch on a machine without a GPU, and checks that the built .so holds the sm_80 and sm_90
# kernels, none of them spilling (cuobjdump). Not run in CI: the CUDA wheels are several GB.
#
#   bash python/check_cuda_build.sh [--dry-run]     # --dry-run: print the steps, install and build nothing
#
# It never touches the repository's .venv or builds in place: it installs torch into a side venv outside
# the repository and builds a copy of the tree (tracked and untracked, not ignored files) into that venv.
# Environment:
#   CUDA_HOME            the toolkit (default: the toolkit of the nvcc on PATH, found through
#                        `nvcc -dryrun`, since a wrapper script named nvcc misleads torch's guess)
#   MIO_CUDA_BUILD_VENV  the side venv (default: ${XDG_CACHE_HOME:-~/.cache}/mio-kernels-cuda-build-venv)
#   TORCH_SPEC           the torch to build against (default: torch==2.13.0, PyPI's CUDA 13.0 build);
#                        its CUDA major version must be the toolkit's
#   PYTHON               the interpreter for the venv (default: python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ARCHS="80 90"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${MIO_CUDA_BUILD_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mio-kernels-cuda-build-venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

say() { echo "check_cuda_build: $*"; }
fail() { say "error: $*"; exit 1; }
run() { if [ "$DRY" = 1 ]; then say "  (dry run) $*"; else "$@"; fi; }

# 1. The toolkit.
if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null; then
        TOP=$(nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
        [ -n "$TOP" ] && CUDA_HOME=$(cd "$TOP" && pwd -P)
    fi
    [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && CUDA_HOME=/usr/local/cuda
fi
[ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || fail "no CUDA toolkit found: set CUDA_HOME to one (bin/nvcc)"
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || fail "$CUDA_HOME has no include/cuda_runtime.h: not a CUDA toolkit root"
TOOLKIT=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
say "[1/5] CUDA toolkit $TOOLKIT at $CUDA_HOME"

# 2. The side venv with PyPI's CUDA torch.
case "$VENV" in "$PWD"/*) git check-ignore -q "$VENV" || fail "$VENV is inside the repository and not ignored" ;; esac
VPY=$VENV/bin/python
WANT=${TORCH_SPEC#torch==}
if [ -x "$VPY" ] && "$VPY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$WANT' or torch.version.cuda is None)" 2>/dev/null; then
    say "[2/5] side venv $VENV: torch $("$VPY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
else
    say "[2/5] side venv $VENV: installing $TORCH_SPEC (the CUDA build: several GB) and the build tools"
    run "$PY" -m venv "$VENV"
    run "$VPY" -m pip install -q --upgrade pip
    run "$VPY" -m pip install -q "$TORCH_SPEC" numpy ninja pybind11 setuptools wheel
fi

# 3. torch's CUDA major must be the toolkit's, or setup.py falls back to a CPU-only build.
if [ "$DRY" = 1 ] && [ ! -x "$VPY" ]; then
    say "[3/5] (dry run) would compare torch.version.cuda's major with the toolkit's ($TOOLKIT)"
else
    TORCH_CUDA=$("$VPY" -c 'import torch; print(torch.version.cuda)')
    [ "${TORCH_CUDA%%.*}" = "${TOOLKIT%%.*}" ] || fail "torch is built with CUDA $TORCH_CUDA, the toolkit is CUDA $TOOLKIT: \
install a torch for CUDA ${TOOLKIT%%.*} (TORCH_SPEC) or point CUDA_HOME at a CUDA ${TORCH_CUDA%%.*} toolkit"
    say "[3/5] torch CUDA $TORCH_CUDA matches the toolkit's major version ($TOOLKIT)"
fi

# 4. Build a copy of the tree into the side venv (not editable: nothing is written into this checkout).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mio-cuda-build.XXXXXX")
[ "$DRY" = 1 ] && trap 'rm -rf "$WORK"' EXIT
if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -co --exclude-standard | while IFS= read -r f; do [ -f "$f" ] && echo "$f"; done > "$WORK/files"
else
    find setup.py csrc mio_kernels -type f ! -name '*.so' ! -path '*__pycache__*' > "$WORK/files"
fi
say "[4/5] building the extension for sm_${ARCHS// /, sm_} from a copy of the tree ($(wc -l < "$WORK/files") files) in $WORK"
run mkdir -p "$WORK/src"
run tar -cf "$WORK/src.tar" -T "$WORK/files"
run tar -xf "$WORK/src.tar" -C "$WORK/src"
if [ "$DRY" = 1 ]; then
    say "  (dry run) CUDA_HOME=$CUDA_HOME MIO_KERNELS_CUDA_ARCHS='${ARCHS// /;}' $VPY -m pip install -v --no-build-isolation --no-deps $WORK/src > $WORK/build.log"
else
    CUDA_HOME=$CUDA_HOME MIO_KERNELS_CUDA_ARCHS="${ARCHS// /;}" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$VPY" -m pip install -v --no-build-isolation --no-deps "$WORK/src" > "$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log"; fail "the build failed (log: $WORK/build.log)"; }
    grep -q "mio-kernels setup: building mio_kernels._C with CUDA" "$WORK/build.log" \
        || { grep "mio-kernels setup:" "$WORK/build.log" || true; fail "setup.py did not build the CUDA part (log: $WORK/build.log)"; }
fi

# 5. The .so: an ELF per arch, every kernel's registers and local memory (spills), and it imports.
CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
if [ ! -x "$CUOBJDUMP" ]; then   # a minimal toolkit may lack it; triton ships one
    for p in "$VPY" .venv/bin/python; do
        [ -x "$p" ] || continue
        c=$("$p" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)
        [ -n "$c" ] && [ -x "$c" ] && { CUOBJDUMP=$c; break; }
    done
fi
[ -x "$CUOBJDUMP" ] || fail "no cuobjdump (neither in $CUDA_HOME/bin nor inside triton)"
if [ "$DRY" = 1 ]; then
    say "[5/5] (dry run) would list the .so's ELF files and resource usage with $CUOBJDUMP (--list-elf, -res-usage):"
    say "      expect sm_${ARCHS// /, sm_}, the same kernels for each, LOCAL:0 and STACK:0 for every kernel; then import it"
    say "dry run ok"
    exit 0
fi
SO=$(cd "$WORK" && "$VPY" -c 'import glob, os, sysconfig; print(*glob.glob(os.path.join(sysconfig.get_paths()["platlib"], "mio_kernels", "_C*.so")))')
[ -n "$SO" ] && [ -f "$SO" ] || fail "no mio_kernels/_C*.so in the side venv"
"$CUOBJDUMP" --list-elf "$SO" > "$WORK/elf.txt"
"$CUOBJDUMP" -res-usage "$SO" > "$WORK/res.txt"
for a in $ARCHS; do
    grep -q "sm_$a.cubin" "$WORK/elf.txt" || fail "the .so has no sm_$a code: $(tr '\n' ' ' < "$WORK/elf.txt")"
done
SUMMARY=$(awk '/^arch = /{arch=$3} /^ Function /{n[arch]++} /LOCAL:[1-9]|STACK:[1-9]/{bad[arch]++}
    END{for (a in n) printf "%s: %d kernels, %d with local memory (spills)\n", a, n[a], bad[a]+0}' "$WORK/res.txt" | sort)
echo "$SUMMARY" | sed 's/^/check_cuda_build:   /'
echo "$SUMMARY" | grep -q "with local memory" || fail "cuobjdump reported no kernels"
echo "$SUMMARY" | grep -vq " 0 with local memory" && fail "kernels with local memory (spills): see $WORK/res.txt"
[ "$(echo "$SUMMARY" | awk '{print $2}' | sort -u | wc -l)" = 1 ] || fail "the archs hold different kernel counts"
(cd "$WORK" && "$VPY" -c 'import mio_kernels._C as c; assert c.with_cuda, "built without CUDA"') \
    || fail "the built extension does not import with CUDA"
say "[5/5] ok: $SO holds sm_${ARCHS// /, sm_} kernels, none spilling, and imports with CUDA (files: $WORK)"
