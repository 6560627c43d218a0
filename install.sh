#!/usr/bin/env bash
# Creates .venv and installs the pinned dependencies.
#   ./install.sh          runtime dependencies
#   ./install.sh --dev    + test tools (pytest, playwright, Debian's chromium for the browser test)
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
    # The web viewer's browser test drives Debian's Chromium (playwright never downloads a browser);
    # install it so that the test runs here instead of skipping.
    if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
        if [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
        elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
        else
            echo "warning: cannot install chromium (not root, no sudo): the web viewer's browser test will skip" >&2
        fi
    fi
fi
echo "[install] done: activate with 'source .venv/bin/activate'"
