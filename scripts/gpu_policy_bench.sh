#!/usr/bin/env bash
# Policy v2 on one GPU, ~5-6 minutes: the longtail bench at realistic recurrence (default, and with
# the max-of-n tail budget), the old high-recurrence setting, and the e2e scenario (real
# generation by the SFT toy policy). JSON under $OUT (default ./out); one summary table last.
#   OUT=/tmp/out bash scripts/gpu_policy_bench.sh
# Extra flags go to every longtail run (e.g. --steps 6).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
bench() { python3 -c "import sys; from rollout_accel.rollout.bench.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
common=(--model-path qwen3-0.6b-shape --max-len 1024 --steps 8 --policies sync,partial,history
        --no-progress --no-plots)

bench "${common[@]}" --recurrence realistic --out "$OUT/longtail" "$@"
bench "${common[@]}" --recurrence realistic --tail-budget 2 --out "$OUT/longtail-tail" "$@"
bench "${common[@]}" --recurrence high --out "$OUT/longtail-high" "$@"
e2e=(--scenario e2e --policies sync,partial,history --steps 6 --rollout-batch-size 64 --out "$OUT/e2e")
bench "${e2e[@]}" || { echo "e2e on the GPU failed; the same on the CPU (device in results.json)"; \
  bench "${e2e[@]}" --device cpu; }

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {"longtail (realistic)": "longtail", "longtail + tail budget 2": "longtail-tail",
        "longtail (high recurrence)": "longtail-high", "e2e (SFT toy policy)": "e2e"}
summary = {}
print(f"{'run':28s} {'policy':8s} {'step s':>7s} {'vs sync':>8s} {'tok/s':>8s} {'eff grp/s':>9s}")
for title, name in runs.items():
    res = json.loads((out / name / "results.json").read_text())
    summary[name] = {"device": res.get("machine", {}).get("cuda") or res.get("device"),
                     "summary": res["summary"]}
    for row in res["summary"]:
        print(f"{title:28s} {row['policy']:8s} {row['step_time_s']:7.2f} "
              f"{row['speedup_vs_sync']:7.2f}x {row['tokens_per_s']:8.0f} "
              f"{row['effective_groups_per_s']:9.2f}")
(out / "policy_bench.json").write_text(json.dumps(summary, indent=1))
print(f"json: {out / 'policy_bench.json'}")
EOF
