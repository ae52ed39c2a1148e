"""The README's SM-sharing timeline: from a `rollout bench --scenario smshare` report, the split
the adaptive planner chose for each mixed step, above the decode rows and prefill tokens of
that step (what the choice was made from).

    python scripts/plot_smshare_timeline.py docs/smshare/h200_0.6b_chunk4096.json \
        docs/smshare/timeline_0.6b.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(Path(argv[0]).read_text())
    columns = report["timeline_columns"]
    steps = [dict(zip(columns, row, strict=True)) for row in report["timelines"]["adaptive"]]
    names = ["whole", *report["presets"]]
    order = {name: i for i, name in enumerate(names)}
    times = [s["t_s"] for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    top.scatter(times, [order[s["preset"]] for s in steps], s=5)
    top.set_yticks(range(len(names)), names)
    top.set_ylabel("prefill/decode SMs")
    result = report["results"]["adaptive"]
    top.set_title(
        f"{report['device']}, {report['model']} (bf16, chunk {report['args']['max_prefill_tokens']}):"
        f" adaptive split per mixed step ({result['throughput_vs_sequential']:.2f}x sequential)"
    )
    bottom.plot(times, [s["decode_rows"] for s in steps], lw=0.8, label="decode rows")
    bottom.set_ylabel("decode rows")
    tokens = bottom.twinx()
    tokens.plot(times, [s["prefill_tokens"] for s in steps], lw=0.6, color="C1", alpha=0.7)
    tokens.set_ylabel("prefill tokens", color="C1")
    bottom.set_xlabel("seconds since the run started")
    fig.tight_layout()
    fig.savefig(argv[1], dpi=100)
    print(f"wrote {argv[1]} ({len(steps)} mixed steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
