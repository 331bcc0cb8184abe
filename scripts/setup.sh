#!/usr/bin/env bash
# Create .venv and install mergenet-fl with its test tools (the README's install step).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, flwr, transformers; print('installed: torch', torch.__version__, '| flwr', flwr.__version__)"
