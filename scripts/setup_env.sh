#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything the
# tests, the benchmark and the Megatron example need. Idempotent: a second run is fast.
#
# Python 3.12 is required because megatron-core >= 0.17 needs it. On Linux x86_64, PyPI's torch
# for 3.12 is a CUDA 13 build: it runs on the CPU here and lets the CUDA extension compile.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${DEEPEP_MEGATRON_VENV:-.venv}
PYTHON=${PYTHON312:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup_env: Python 3.12 not found (set PYTHON312)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.deepep_megatron_deps"
deps_hash=$(cat requirements*.txt setup.py pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$deps_hash" ]; then
  echo "setup_env: installing requirements-dev.txt into $VENV (first time: about 3 GB of downloads," \
    "a 5 GB venv with PyPI's CUDA build of torch, several minutes)"
  "${PIP[@]}" install -q --upgrade pip
  # The machine-wide pip constraint (if any) pins torch for other Python versions; ignore it here.
  PIP_CONSTRAINT= "${PIP[@]}" install -q -r requirements-dev.txt
  echo "$deps_hash" > "$stamp"
fi
# Editable install; the CUDA extension is built only where torch has CUDA and nvcc exists,
# unless DEEPEP_MEGATRON_BUILD_EXT=0. Skipped when neither the sources nor the choice changed.
: "${CUDA_HOME:=$( [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda || true )}"
export CUDA_HOME
build_stamp="$VENV/.deepep_megatron_build"
build_hash=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; echo "${DEEPEP_MEGATRON_BUILD_EXT:-auto}") | sha256sum | cut -c1-16)
if [ ! -f "$build_stamp" ] || [ "$(cat "$build_stamp")" != "$build_hash" ]; then
  echo "setup_env: installing the package (editable); where nvcc is found this compiles the CUDA" \
    "extension too (minutes on 2 cores)"
  start=$(date +%s)
  PIP_CONSTRAINT= "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
  echo "$build_hash" > "$build_stamp"
  echo "setup_env: package installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" - <<'PY'
import torch
from deepep_megatron.backends import extension
if not extension.extension_available():
    print(f"setup_env: compiled extension not available ({extension.unavailable_reason}): the portable backend serves")
elif not torch.cuda.is_available():
    print("setup_env: compiled extension built; no GPU here, so the portable backend serves")
else:
    print("setup_env: compiled extension built; it serves CUDA tensors")
PY
echo "setup_env: ready ($("$VENV/bin/python" --version), $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
