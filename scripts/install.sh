#!/usr/bin/env bash
# Create (or reuse) the virtualenv $VENV with torch and archflow's extras: what `make install` runs.
#
#   scripts/install.sh .venv                # the venv's folder: what a study needs (`make repro`)
#   scripts/install.sh .venv dev            # and extras, comma-separated ("dev": tests and interop; "eval", "hf")
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/install.sh .venv dev   # force an index
#
# torch: a torch already in the venv is kept. Otherwise pip names (a dry run, no download) the
# torch==$TORCH_VERSION wheel the configured package index serves; that one is installed when it is a
# CPU build (a local CPU wheel, as on these machines: nothing else is contacted) or when the machine
# has an NVIDIA GPU (nvidia-smi). Otherwise it would be the multi-GB CUDA build, so the CPU build
# comes from PyTorch's CPU index. Installs go through uv when it can be had (pip installs it into the
# venv in seconds; it installs torch ~7x and the extras ~2x faster than pip), else through pip.
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PY=$VENV/bin/python

test -x "$PY" || python3 -m venv "$VENV"
if "$PY" -m pip install -q uv 2>/dev/null && [ -x "$VENV/bin/uv" ]; then
  # --compile-bytecode: write .pyc files as pip does. uv leaves them out by default, and where
  # PYTHONDONTWRITEBYTECODE is set (as on these machines) nothing writes them later, so every process
  # would compile torch's and Lightning's sources again: `import lightning.pytorch` 11 s instead of 4.5.
  install() { "$VENV/bin/uv" pip install -q --compile-bytecode --python "$PY" "$@"; }
else
  echo "install: uv unavailable, installing with pip" >&2
  install() { "$PY" -m pip install -q "$@"; }
fi

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_INDEX:-}" ]; then
  install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
else
  url=$("$PY" -m pip install --dry-run --no-deps --ignore-installed -q --report - "torch==$TORCH_VERSION" 2>/dev/null |
        "$PY" -c "import json, sys; print(json.load(sys.stdin)['install'][0]['download_info']['url'])")
  if [[ "$url" == *+cpu* || "$url" == *%2Bcpu* ]] || command -v nvidia-smi >/dev/null; then
    echo "install: torch from ${url%%\?*}"
    install "torch @ $url"
  else
    echo "install: no NVIDIA GPU and the package index serves a CUDA build: torch $TORCH_VERSION from PyTorch's CPU index"
    install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
install -e ".${EXTRAS:+[$EXTRAS]}"
