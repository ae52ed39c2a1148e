#!/usr/bin/env bash
# Runs the GPU-marked tests on a machine with an NVIDIA GPU and a torch/triton install of its own
# (no pip install needed: the repo is put on the path as `rollout_accel`).
set -euo pipefail
cd "$(dirname "$0")/.."
pp=$(mktemp -d)
ln -s "$PWD" "$pp/rollout_accel"
export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
# Only modules whose imports exist on a bare GPU image (no FastAPI there).
# test_smshare_gpu.py is left out of the default set: its concurrent runner aborts the process
# ("invalid device context", see README); run it on its own.
python3 -m pytest -q -m gpu -p no:cacheprovider ${*:-tests/kernels tests/serving/test_engine_gpu.py tests/serving/test_logprob_options_gpu.py tests/serving/test_grammar_gpu.py tests/serving/test_spec_gpu.py tests/serving/test_kvreuse_gpu.py tests/serving/test_pipeline_gpu.py}
