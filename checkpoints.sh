#!/usr/bin/env bash
# Trained actor bundles (logic in lib/bundles.py):
#   ./checkpoints.sh [ACTOR ...] [--manifest PATH] [--root DIR] [--force]
#       download the bundles listed in checkpoints.txt (default: all), verify their SHA-256, unpack
#       into experiments/ACTOR/
#   ./checkpoints.sh --pack ACTOR [--out PATH] [--url-base URL]
#       pack experiments/ACTOR/ into a bundle and print its manifest line
# Paths on the command line are relative to the current folder, not to the repository.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$REPO/.venv/bin/python" ]; then
    echo "checkpoints.sh: $REPO/.venv not found — run ./install.sh first" >&2
    exit 1
fi
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$REPO/.venv/bin/python" -m lib.bundles "$@"
