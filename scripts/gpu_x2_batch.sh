#!/usr/bin/env bash
# One nvidia-h200-x2 call for the session's remaining GPU figures, bounded to ~590 s:
#   phase A, in parallel: GPU 0 SM sharing (tests + bench); GPU 1 spec bench, then the policy
#   bench (longtail at realistic recurrence, then e2e);
#   phase B, both GPUs: slime external-engine sequence, then the pipeline bench.
# Logs and JSON under $OUT/<part>/; each part's log tail is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
run() {  # run NAME GPUS SECONDS CMD...
  local name=$1 gpus=$2 secs=$3; shift 3
  mkdir -p "$OUT/$name"; local t0=$SECONDS
  OUT="$OUT/$name" CUDA_VISIBLE_DEVICES=$gpus timeout "$secs" "$@" >"$OUT/$name/log" 2>&1
  echo "rc=$? in $((SECONDS - t0)) s" >>"$OUT/$name/log"
}
bench() { python3 -c "import sys; from rollout_accel.rollout.bench.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
export -f bench
T0=$SECONDS
( run smshare_tests 0 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/serving/test_smshare_gpu.py
  run smshare 0 200 python3 scripts/gpu_smshare.py ) &
( run spec 1 110 python3 scripts/gpu_spec_bench.py
  run policy_longtail 1 100 bash -c 'bench --model-path qwen3-0.6b-shape --max-len 1024 --steps 6 --policies sync,partial,history --no-progress --no-plots --recurrence realistic --out "$OUT"'
  run policy_e2e 1 $((290 - (SECONDS - T0))) bash -c 'bench --scenario e2e --policies sync,partial,history --steps 6 --rollout-batch-size 64 --out "$OUT"' ) &
wait
echo "phase A done at $((SECONDS - T0)) s"
run external 0,1 150 env SLIME_SRC="$PWD/.slime-src" python3 scripts/gpu_slime_external.py
run pipeline 0,1 $((585 - (SECONDS - T0))) python3 scripts/gpu_pipeline_bench.py
for d in "$OUT"/*/; do echo "=== $(basename "$d")"; tail -"${TAIL:-12}" "$d/log"; done
