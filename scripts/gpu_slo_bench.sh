#!/usr/bin/env bash
# `rollout bench --scenario slo` on one GPU in about 3 minutes, without installing the package:
# qwen3-0.6b-shape (bf16), prompts x4 the CPU default (fresh prompts 2k-6k tokens, 1k-token
# system prompts), prefill budget 8192, load 0.9 of the calibrated prefill rate, 2 rounds x 15 s
# of arrivals x 4 policies. Prints the table last; JSON and the table go to $OUT (default ./out).
# Extra flags pass through (e.g. --load 1.0, --duration 30).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
python3 -c "import sys; from rollout_accel.rollout.bench.slo_scenario import main; sys.exit(main(sys.argv[1:]))" \
  --model-path qwen3-0.6b-shape --scale 2 --max-prefill-tokens 8192 --max-running-requests 256 \
  --load 0.9 --duration 15 --rounds 2 --out "$OUT" "$@"
