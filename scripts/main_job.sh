#!/usr/bin/env bash
# Main job, from a fresh checkout: create a virtual environment, install, then train
# a tiny Parallax model and its softmax twin on the embedded corpus (CPU) and compare.
# Extra arguments go to examples/compare_tiny.py (e.g. --steps 300 --out runs/x).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[train]"
python examples/compare_tiny.py "$@"
