#!/usr/bin/env bash
# `rollout bench` on a GPU machine without installing the package (its image has torch, triton,
# aiohttp, rich, matplotlib). Extra flags pass through, e.g.:
#   bash scripts/gpu_rollout_bench.sh --model-path qwen3-0.6b-shape --max-len 2048 --out "$OUT/bench"
set -euo pipefail
cd "$(dirname "$0")/.."
pp=$(mktemp -d)
ln -s "$PWD" "$pp/rollout_accel"
export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import sys; from rollout_accel.rollout.bench.cli import main; sys.exit(main(sys.argv[1:]))" "$@"
