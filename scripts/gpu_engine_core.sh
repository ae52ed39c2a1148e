#!/usr/bin/env bash
# The engine-core checks on a GPU machine, in one call: the gpu-marked tests (kernels, engine:
# greedy vs the CPU path, graphs vs eager, overlap vs synchronous, release/resume with graphs),
# then the engine benchmark at 256 and 512 sequences and a decode profile. Logs and JSON go to
# $OUT; the benchmark tables print last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
bash scripts/gpu_tests.sh ${GPU_TESTS:-tests/kernels tests/serving/test_engine_gpu.py} 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
pp=$(mktemp -d); ln -s "$PWD" "$pp/rollout_accel"; export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
python3 scripts/gpu_profile_decode.py 2>&1 | tee "$OUT/profile.log" | tail -30
OUT_512="$OUT/b512"; mkdir -p "$OUT_512"
OUT="$OUT_512" python3 scripts/gpu_bench.py --num-seqs 512 --skip-hf 2>&1 | tee "$OUT/bench512.log" | tail -8
python3 scripts/gpu_bench.py --num-seqs 256 --skip-batch 2>&1 | tee "$OUT/bench256.log" | tail -8
