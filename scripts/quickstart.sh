#!/usr/bin/env bash
# Set up, then run the default heterogeneous federation with Flower's simulation engine:
# ResNet-8 and MobileNetV2 on CIFAR-10, a BERT-style encoder on SST-2, 3 rounds of MergeNet.
# Extra arguments are Hydra overrides, e.g.: bash scripts/quickstart.sh adapter=avg num_rounds=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Use this environment (not a fresh uv one), offline, and one CPU per simulated client.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export PATH="$PWD/.venv/bin:$PATH"  # flwr starts flower-superlink from the PATH
NODES=$(python -m simulations.config "$@")
flwr run . --stream \
  --federation-config "num-supernodes=${NODES} client-resources-num-cpus=1" \
  --run-config "overrides='$*' output-dir='$PWD/outputs'"
echo "Results: the newest folder in $PWD/outputs (summary.md, metrics.jsonl, *.png)"
