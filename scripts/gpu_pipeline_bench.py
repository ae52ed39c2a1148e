"""Pipeline-parallel decode on 2 GPUs (nvidia-h200-x2): even split vs best static split vs dynamic
layer rebalancing, one run, Qwen3-8B-shaped random bf16 weights.

    OUT=/path python scripts/gpu_pipeline_bench.py [--num-seqs 64] [--max-len 768] [--top-p 0.9]

Memory per GPU: ~8.2 GB of weights (half the 16.4 GB model; stage 0 briefly holds all of it, and
all layers' KV, while starting), KV for its layers: max_total_tokens x layers x 2 x 8 heads x 128
x 2 B (131k tokens, 18 layers: 9.7 GB). Host: stage 0 builds the seeded random weights on the CPU
in float32 (~33 GB RAM, ~1-2 min), moves them to GPU 0 and sends stage 1 its layers over NCCL.
Workload and modes: `rollout_accel.rollout.bench.pipeline_scenario` (same requests in every mode,
tokens checked identical). Prints a table last; writes $OUT/gpu_pipeline_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_path() -> None:
    """Run from a checkout without installing: expose the repo as `rollout_accel`."""
    try:
        import rollout_accel.serving  # noqa: F401
    except ImportError:
        link_dir = Path(tempfile.mkdtemp())
        (link_dir / "rollout_accel").symlink_to(ROOT)
        sys.path.insert(0, str(link_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-8b-shape")
    parser.add_argument("--pp-size", type=int, default=2)
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--micro-batches", type=int, default=0)
    parser.add_argument("--max-total-tokens", type=int, default=131_072)
    parser.add_argument("--no-greedy", action="store_true")
    args = parser.parse_args()
    _import_path()
    import torch

    from rollout_accel.rollout.bench.pipeline_scenario import format_table, run_pipeline_bench

    if torch.cuda.device_count() < args.pp_size:
        sys.exit(f"needs {args.pp_size} GPUs, {torch.cuda.device_count()} visible")
    t0 = time.perf_counter()
    result = run_pipeline_bench(
        args.model,
        args.pp_size,
        args.num_seqs,
        args.max_len,
        args.top_p,
        micro_batches=args.micro_batches,
        greedy_pass=not args.no_greedy,
        max_total_tokens=args.max_total_tokens,
        context_length=4096,
    )
    result["wall_seconds"] = time.perf_counter() - t0
    result["gpus"] = [torch.cuda.get_device_name(i) for i in range(args.pp_size)]
    out = Path(os.environ.get("OUT", "out")) / "gpu_pipeline_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out} ({result['wall_seconds']:.0f} s in all)")
    print(format_table(result))
    if not all(result["tokens_identical"].values()):
        sys.exit("a mode changed the sampled tokens (see the table)")


if __name__ == "__main__":
    main()
