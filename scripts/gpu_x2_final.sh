#!/usr/bin/env bash
# The session's last nvidia-h200-x2 call (~300 s): GPU 0 SM-sharing bench with cuBLAS (not
# cuBLASLt) preferred, in parallel with GPU 1 policy e2e; then the slime external sequence.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
pp=$(mktemp -d); ln -s "$PWD" "$pp/rollout_accel"; export PYTHONPATH="$pp:$PYTHONPATH"
run() {  # run NAME GPUS SECONDS CMD...
  local name=$1 gpus=$2 secs=$3; shift 3
  mkdir -p "$OUT/$name"; local t0=$SECONDS
  OUT="$OUT/$name" CUDA_VISIBLE_DEVICES=$gpus timeout "$secs" "$@" >"$OUT/$name/log" 2>&1
  echo "rc=$? in $((SECONDS - t0)) s" >>"$OUT/$name/log"
}
( run smshare_cublas 0 110 python3 -c "import torch, runpy, sys; torch.backends.cuda.preferred_blas_library('cublas'); sys.argv = ['gpu_smshare.py', '--part', 'c_bench_0.6b_bf16']; runpy.run_path('scripts/gpu_smshare.py', run_name='__main__')" ) &
( run policy_e2e 1 160 python3 -c "import sys; from rollout_accel.rollout.bench.cli import main; sys.exit(main(sys.argv[1:]))" --scenario e2e --policies sync,partial,history --steps 6 --rollout-batch-size 64 --out "$OUT/policy_e2e" ) &
wait
run external 0,1 130 env SLIME_SRC="$PWD/.slime-src" python3 scripts/gpu_slime_external.py
for d in "$OUT"/*/; do echo "=== $(basename "$d")"; tail -"${TAIL:-14}" "$d/log"; done
cat "$OUT"/smshare_cublas/part_*.json 2>/dev/null | head -c 3000
