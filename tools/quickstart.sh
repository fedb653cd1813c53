#!/usr/bin/env bash
# Set up (tools/setup_env.sh), then train the quickstart Deformable DETR on the synthetic shapes
# dataset on the CPU and print the COCOEvaluator table. Extra arguments go to train_net.py
# (e.g. train.max_iter=200 for a shorter run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/setup_env.sh")"
cd "$ROOT"
exec "$PY" train_net.py --config-file configs/quickstart/deformable_detr_shapes.py "$@"
