#!/usr/bin/env bash
# Set up, then run the default heterogeneous federation with Flower's simulation engine:
# a ResNet-8 on CIFAR-10 and a BERT-style encoder on SST-2, 5 rounds of MergeNet.
# Extra arguments are Hydra overrides, e.g.: bash scripts/quickstart.sh adapter=avg num_rounds=3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Use this environment (not a fresh uv one), offline.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export PATH="$PWD/.venv/bin:$PATH"  # flwr starts flower-superlink from the PATH
# Check the whole federation first (every problem at once); one SuperNode per client.
FEDERATION=$(python -m simulations.config "$@")
before=$(ls -d outputs/*/ 2>/dev/null || true)
flwr run . --stream --federation-config "$FEDERATION" \
  --run-config "overrides='$*' output-dir='$PWD/outputs'"
# `flwr run --stream` exits 0 even when the ServerApp failed: judge the run by its results.
run=$(ls -td outputs/*/ 2>/dev/null | head -1 || true)
if [ -z "$run" ] || grep -qxF "$run" <<<"$before" || [ ! -f "${run}run.json" ]; then
  echo "the run wrote no results; see the log above" >&2
  exit 1
fi
python -m simulations.results check "$run"
echo "Results: $run (summary.md, metrics.jsonl, *.png)"
