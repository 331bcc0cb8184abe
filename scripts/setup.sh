#!/usr/bin/env bash
# Create .venv and install mergenet-fl with the studies' and the tests' dependencies (the
# README's install step; the groups are in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e . --group studies --group dev  # groups: pyproject.toml
.venv/bin/python -c "import torch, torchvision, flwr, transformers; print('installed: torch', torch.__version__, '| flwr', flwr.__version__)"
