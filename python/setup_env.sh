#!/usr/bin/env bash
# Creates .venv in the repository root with the CPU set-up (pinned) and installs mio-kernels into it.
# Each step says what it does and is skipped when already done: re-running on a complete .venv
# takes seconds. Needs Python >= 3.10 (3.11 tested), network access for the first run, and a C++
# compiler with OpenMP (g++) for the native extension. Usage: bash python/setup_env.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VPY=.venv/bin/python

say() { echo "setup_env: $*"; }
run() { if [ "$DRY" = 1 ]; then say "  (dry run) $*"; else "$@"; fi; }

# check WHAT: exit 0 when WHAT is installed and current in .venv (deps | peers | package).
check() {
    [ -x "$VPY" ] || return 1
    "$VPY" - "$1" "$PWD" <<'EOF' 2>/dev/null
import glob, importlib.metadata as md, json, os, sys
what, root = sys.argv[1], sys.argv[2]

def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None

def at_least(v, low):
    return v is not None and tuple(int(x) for x in v.split(".")[:2]) >= low

if what == "deps":
    ok = (version("torch") or "").split("+")[0] == "2.13.0" and version("triton") == "3.7.1"
    ok &= at_least(version("transformers"), (4, 46)) and at_least(version("datasets"), (3, 0))
    ok &= all(version(d) for d in ("numpy", "tqdm", "matplotlib", "pyyaml", "pytest", "ninja", "pybind11",
                                   "setuptools", "wheel"))
elif what == "peers":
    ok = version("trl") == "1.16.0" and version("liger-kernel") == "0.8.5"
    ok &= version("cut-cross-entropy") == "25.1.1" and bool(version("peft")) and bool(version("accelerate"))
else:  # package: an editable install of this checkout, its extension newer than its sources and loadable
    url = json.loads(md.distribution("mio-kernels").read_text("direct_url.json") or "{}")
    ok = url.get("dir_info", {}).get("editable", False) and url.get("url") == "file://" + os.path.realpath(root)
    libs = glob.glob(os.path.join(root, "mio_kernels", "_C*.so"))
    sources = glob.glob(os.path.join(root, "csrc", "**", "*.*"), recursive=True) + [os.path.join(root, "setup.py")]
    ok &= bool(libs) and os.path.getmtime(libs[0]) > max(map(os.path.getmtime, sources))
    ok &= os.path.exists(os.path.join(os.path.dirname(sys.executable), "mio-train"))
    if ok:
        sys.path.insert(0, root)
        import mio_kernels._C  # built against the torch installed now
sys.exit(0 if ok else 1)
EOF
}

if [ -x "$VPY" ]; then
    say "[1/4] .venv exists ($("$VPY" --version))"
else
    say "[1/4] creating .venv with $("$PY" --version)"
    run "$PY" -m venv .venv
fi

if check deps; then
    say "[2/4] torch 2.13.0 (CPU), triton 3.7.1, transformers, datasets, ...: installed"
else
    say "[2/4] installing torch 2.13.0 (CPU), triton 3.7.1, transformers, datasets, ... (first time: a few minutes)"
    run "$VPY" -m pip install -q --upgrade pip
    # torch 2.13.0 is the CPU build here; triton 3.7.1 is what torch 2.13 pins; numpy for the Triton interpreter.
    run "$VPY" -m pip install -q torch==2.13.0 triton==3.7.1 numpy \
        "transformers>=4.46" "datasets>=3.0" tqdm matplotlib pyyaml pytest ninja pybind11 setuptools wheel
fi

if check peers; then
    say "[3/4] peers the tests compare against (trl, peft, liger-kernel, cut-cross-entropy): installed"
else
    say "[3/4] installing the peers the tests compare against (trl, peft, liger-kernel, cut-cross-entropy)"
    # --no-deps where pip would otherwise fetch another torch.
    run "$VPY" -m pip install -q trl==1.16.0 peft accelerate
    run "$VPY" -m pip install -q --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1
fi

if check package; then
    say "[4/4] mio-kernels and its native extension (mio_kernels._C): installed and current"
else
    CXX_BIN=${CXX:-c++}
    command -v "$CXX_BIN" >/dev/null || CXX_BIN=g++
    if ! command -v "$CXX_BIN" >/dev/null; then
        say "error: no C++ compiler: the native extension needs g++ with OpenMP (Debian/Ubuntu: apt-get install g++)"
        exit 1
    fi
    if ! echo 'int main() { return 0; }' | "$CXX_BIN" -fopenmp -x c++ - -o /dev/null 2>/dev/null; then
        say "error: $CXX_BIN cannot build with -fopenmp: install OpenMP for it (with g++: libgomp, part of gcc)"
        exit 1
    fi
    say "[4/4] installing mio-kernels (editable) and building its native extension with $CXX_BIN (about a minute)"
    # --no-build-isolation: the native extension builds against the torch installed above.
    run "$VPY" -m pip install -q --no-build-isolation -e .
fi
say "done: run commands from .venv/bin/ (.venv/bin/mio-train, .venv/bin/python), or '. .venv/bin/activate' first"
