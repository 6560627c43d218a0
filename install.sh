#!/usr/bin/env bash
# Creates .venv and installs the pinned dependencies.
#   ./install.sh          runtime dependencies
#   ./install.sh --dev    + test tools (pytest, playwright driver for the browser test)
# CPU torch 2.13.0 where no NVIDIA GPU is present, the CUDA build otherwise.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip wheel

TORCH_VERSION=2.13.0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA GPU found: installing CUDA torch ${TORCH_VERSION}"
    "$VPY" -m pip install "torch==${TORCH_VERSION}"
else
    echo "[install] no NVIDIA GPU: installing CPU torch ${TORCH_VERSION}"
    # A local wheel (PIP_FIND_LINKS / pip.conf) wins; otherwise PyTorch's CPU index.
    "$VPY" -m pip install "torch==${TORCH_VERSION}" \
        || "$VPY" -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

"$VPY" -m pip install -r requirements.txt

if [ "${1:-}" = "--dev" ]; then
    "$VPY" -m pip install -r requirements-dev.txt
fi
echo "[install] done: activate with 'source .venv/bin/activate'"
