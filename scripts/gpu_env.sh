# Sourced by the GPU scripts (from the repository root): carried wheels in .whl installed into
# /tmp/site, the checkout importable as `rollout_accel`, both on PYTHONPATH; $OUT created and
# the card named in $OUT/card.txt.
OUT=${OUT:-out}; mkdir -p "$OUT"
# Once per process tree: a GPU script run by another (gpu_session.sh parts) finds it done.
if [ -n "${ROLLOUT_ACCEL_GPU_ENV:-}" ]; then return 0; fi
export ROLLOUT_ACCEL_GPU_ENV=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
_repo_link=$(mktemp -d); ln -s "$PWD" "$_repo_link/rollout_accel"
export PYTHONPATH="$_repo_link${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt" || true
