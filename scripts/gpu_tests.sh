#!/usr/bin/env bash
# Runs the GPU-marked tests on a machine with an NVIDIA GPU and a torch/triton install of its own
# (no pip install needed: scripts/gpu_env.sh puts the repo on the path as `rollout_accel`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
# Only modules whose imports exist on a bare GPU image (no FastAPI there).
python3 -m pytest -q -m gpu -p no:cacheprovider ${*:-tests/kernels tests/serving/test_engine_gpu.py tests/serving/test_logprob_options_gpu.py tests/serving/test_grammar_gpu.py tests/serving/test_spec_gpu.py tests/serving/test_kvreuse_gpu.py tests/serving/test_pipeline_gpu.py tests/serving/test_smshare_gpu.py}
