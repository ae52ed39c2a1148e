"""Profiles decode steps of the engine on the GPU (torch.profiler, CUDA time per kernel).

python scripts/gpu_profile_decode.py [--num-seqs 256] [--ctx 768]
"""

from __future__ import annotations

import argparse

from repo_path import expose_repo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=768)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    expose_repo()
    import threading

    import torch
    from torch.profiler import ProfilerActivity, profile

    from rollout_accel.serving.engine import Engine

    engine = Engine(
        "qwen3-0.6b-shape",
        device="cuda",
        dtype="bfloat16",
        max_running_requests=args.num_seqs,
        cuda_graph_max_bs=args.num_seqs,
        context_length=args.ctx + 128,
        max_prefill_tokens=16384,
        cuda_graph=not args.eager,
    )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(300, 150_000, (args.num_seqs, args.ctx), generator=gen).tolist()
    done = threading.Event()
    counter = {"steps": 0}
    step = engine.loop._step
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    import time

    marks: dict[str, float] = {}
    host = {"s": 0.0}

    def wrapped() -> bool:
        counter["steps"] += 1
        if counter["steps"] == 30:
            prof.__enter__()
            marks["start"] = time.perf_counter()
        t0 = time.perf_counter()
        result = step()
        if 30 <= counter["steps"] < 40:
            host["s"] += time.perf_counter() - t0
        if counter["steps"] == 40:
            torch.cuda.synchronize()
            marks["end"] = time.perf_counter()
            prof.__exit__(None, None, None)
            done.set()
        return result

    engine.loop._step = wrapped
    engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": 60, "ignore_eos": True},
    )
    done.wait()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages)
    wall_ms = (marks["end"] - marks["start"]) * 1e3 / 10
    print(
        f"per decode step over 10 steps (profiled): wall {wall_ms:.2f} ms, "
        f"GPU kernels {device_us / 1e3 / 10:.2f} ms, host in the step loop {host['s'] * 1e2:.2f} ms"
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
