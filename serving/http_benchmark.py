"""HTTP server vs in-process engine, same workload, same run.

    python -m rollout_accel.serving.http_benchmark [--concurrency 1,64,256] [--out FILE]

The server runs in its own process (as `rollout serve` would); the load generator keeps
`concurrency` requests in flight with the async client. The in-process path drives an identical
Engine with `async_generate` at the same concurrency. Workload (fixed): 32-token prompts
(distinct), 64 new tokens each with ignore_eos, temperature 0.7; 2 x concurrency requests
(at least 16). Reports requests/s, output tokens/s, p50/p99 latency, and HTTP/in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from typing import Any

import torch

from rollout_accel.serving.client import EngineClient
from rollout_accel.serving.engine import Engine
from rollout_accel.serving.server import free_port

NEW_TOKENS = 64
PROMPT_LEN = 32


def _payloads(count: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 500, (PROMPT_LEN,), generator=gen).tolist(),
            "sampling_params": {
                "max_new_tokens": NEW_TOKENS,
                "temperature": 0.7,
                "ignore_eos": True,
            },
        }
        for _ in range(count)
    ]


async def _drive(send, payloads: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(payload: dict[str, Any]) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            out = await send(payload)
            latencies.append(time.perf_counter() - start)
            tokens += out["meta_info"]["completion_tokens"]

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in payloads))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "seconds": elapsed,
        "requests_per_s": len(payloads) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "p50_latency_s": latencies[len(latencies) // 2],
        "p99_latency_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def _start_server(model: str, port: int, max_running: int) -> subprocess.Popen:
    code = (
        "from rollout_accel.serving.engine import Engine; from rollout_accel.serving.server import serve; "
        f"serve(Engine({model!r}, max_running_requests={max_running}), port={port})"
    )
    return subprocess.Popen([sys.executable, "-c", code])


async def _wait_healthy(client: EngineClient, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if await client.health():
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("server did not become healthy")


async def run(concurrencies: list[int], model: str) -> list[dict[str, Any]]:
    max_running = max(concurrencies)
    port = free_port()
    proc = _start_server(model, port, max_running)
    rows = []
    try:
        client = EngineClient(f"http://127.0.0.1:{port}", retries=30)
        await _wait_healthy(client)
        engine = Engine(model, max_running_requests=max_running)
        try:
            warm = _payloads(8)
            await _drive(client.generate, warm, 8)
            await _drive(lambda p: engine.async_generate(**p), warm, 8)
            for concurrency in concurrencies:
                payloads = _payloads(max(16, 2 * concurrency))
                await client.flush_cache()
                engine.flush_cache()
                http = await _drive(client.generate, payloads, concurrency)
                local = await _drive(lambda p: engine.async_generate(**p), payloads, concurrency)
                rows.append(
                    {
                        "concurrency": concurrency,
                        "requests": len(payloads),
                        "http": http,
                        "in_process": local,
                        "http_over_in_process": http["output_tokens_per_s"]
                        / local["output_tokens_per_s"],
                    }
                )
        finally:
            engine.shutdown()
            await client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", default="1,64,256", help="comma-separated concurrency levels"
    )
    parser.add_argument("--model-path", default="tiny-qwen3")
    parser.add_argument("--out", help="write results JSON here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = asyncio.run(run(levels, args.model_path))
    print(f"{'conc':>5} {'path':<11}{'req/s':>8}{'out tok/s':>11}{'p50 s':>8}{'p99 s':>8}")
    for row in rows:
        for path in ("in_process", "http"):
            r = row[path]
            print(
                f"{row['concurrency']:>5} {path:<11}{r['requests_per_s']:>8.1f}{r['output_tokens_per_s']:>11.0f}"
                f"{r['p50_latency_s']:>8.2f}{r['p99_latency_s']:>8.2f}"
            )
        print(f"{'':>5} HTTP / in-process output tokens/s: {row['http_over_in_process']:.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"machine": platform.machine(), "threads": torch.get_num_threads(), "rows": rows},
                fh,
                indent=2,
            )
    return rows


if __name__ == "__main__":
    main()
