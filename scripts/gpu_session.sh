#!/usr/bin/env bash
# One lent H200 call that runs several parts in turn, each bounded and independent; each part's
# log goes to $OUT/<part>.log and its tail is printed. Parts: tests, smshare, smtests, smscenario,
# smscenario1k, smscenarioburst, smscenario8b, smscenario8b1k, enginetests, smprobe, bench, profile,
# spec, specdiag, specqueue, gemmprobe, kvreuse, slo, policy, external and pipeline (the last two on nvidia-h200-x2). Carried wheels in .whl are installed first if present.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
part() {  # part NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name"; local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; echo "rc=$? in $((SECONDS - t0)) s" >>"$OUT/$name.log"
  tail -${TAIL:-14} "$OUT/$name.log"
}
for p in ${PARTS:-tests smshare bench profile}; do
  case $p in
    tests) part tests 420 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors ${GPU_TESTS:-tests/kernels $(ls tests/serving/*gpu*.py)} ;;
    smshare) part smshare 300 python3 scripts/gpu_smshare.py ;;
    bench) part bench256 150 python3 scripts/gpu_bench.py --num-seqs 256 --skip-hf
           part bench512 150 python3 scripts/gpu_bench.py --num-seqs 512 --skip-hf ;;
    profile) part profile 120 python3 scripts/gpu_profile_decode.py ;;
    spec) part spec 360 python3 scripts/gpu_spec_bench.py ;;
    specdiag) part specdiag 240 python3 scripts/gpu_spec_diag.py ;;
    specqueue) part specqueue 300 python3 scripts/gpu_spec_bench.py --max-running 64 --scales 1,32,128 ;;
    gemmprobe) part gemmprobe 240 python3 scripts/gpu_smshare_gemm_probe.py ;;
    smprobe)  # the probe, then the SM-sharing run on the first layout whose engine came up
      part gemmprobe 240 python3 scripts/gpu_smshare_gemm_probe.py
      export SMSHARE_LAYOUT=$(python3 -c "import json; rows = json.load(open('$OUT/gemm_probe.json'))
print(next((r['job'].split()[1] for r in rows if r['job'].startswith('engine') and r.get('available')), 'split'))")
      echo "SMSHARE_LAYOUT=$SMSHARE_LAYOUT"
      part smshare 300 python3 scripts/gpu_smshare.py ;;
    smtests) part smtests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/serving/test_smshare_gpu.py ;;
    smscenario) part smscenario 330 python3 -m rollout_accel.rollout.cli bench --scenario smshare --out "$OUT/sm_0.6b" ;;
    smscenario1k) part smscenario1k 330 python3 -m rollout_accel.rollout.cli bench --scenario smshare \
        --max-prefill-tokens 1024 --out "$OUT/sm_0.6b_1k" ;;
    smscenarioburst)  # arrivals in a burst: the engine is saturated throughout, the mix shifts
      part smscenarioburst 330 python3 -m rollout_accel.rollout.cli bench --scenario smshare \
        --background 128 --background-new 512 --arrivals 128 --dense-rate 400 --sparse-rate 40 \
        --arrival-new 256 --out "$OUT/sm_burst" ;;
    smscenario8b) part smscenario8b 420 python3 -m rollout_accel.rollout.cli bench --scenario smshare \
        --model qwen3-8b-shape --background 96 --background-new 384 --arrivals 48 --out "$OUT/sm_8b" ;;
    smscenario8b1k) part smscenario8b1k 420 python3 -m rollout_accel.rollout.cli bench --scenario smshare \
        --model qwen3-8b-shape --background 96 --background-new 384 --arrivals 48 \
        --max-prefill-tokens 1024 --out "$OUT/sm_8b_1k" ;;
    enginetests) part enginetests 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/serving/test_engine_gpu.py tests/serving/test_smshare_gpu.py tests/serving/test_spec_gpu.py \
        tests/serving/test_kvreuse_gpu.py tests/serving/test_logprob_options_gpu.py tests/serving/test_grammar_gpu.py ;;
    kvreuse) part kvreuse 300 python3 scripts/gpu_kvreuse_bench.py ;;
    slo) part slo 240 bash scripts/gpu_slo_bench.sh ;;
    policy) part policy 420 bash scripts/gpu_policy_bench.sh ;;
    external) part external 240 env SLIME_SRC="$PWD/.slime-src" python3 scripts/gpu_slime_external.py ;;
    pipeline) part pipeline_tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/serving/test_pipeline_gpu.py
              part pipeline 150 python3 scripts/gpu_pipeline_bench.py --cuda-graph ;;
  esac
done
if [ -n "${KEEP_ONLY:-}" ]; then  # at most 8 files come back: drop the rest (their tails printed)
  find "$OUT" -type f | grep -Ev "$KEEP_ONLY" | xargs -r rm -f
fi
