"""slime's external-engine sequence against `rollout serve` on GPUs: CUDA graphs on, NCCL weights.

    SLIME_SRC=/path/with/slime python scripts/gpu_slime_external.py [--model-path qwen3-0.6b-shape]

The GPU twin of tests/serving/test_slime_external_engine.py. Needs 2 GPUs (NCCL cannot put two
ranks on one device): `rollout serve` runs on GPU 0 (bf16, CUDA-graph decode, overlap schedule),
this process is slime's trainer rank 0 on GPU 1. slime's own code drives everything —
`apply_external_engine_info_to_args`, `SGLangEngine` in external mode (server-args check,
registration with sglang-router when the wheel is installed), its HTTP client, and its
Megatron-side `connect_rollout_engines_from_distributed` / `update_weights_from_distributed`
over NCCL — in the order of one RL step: init -> health_generate -> generate -> pause ->
release (weights, kv_cache, cuda_graph) -> resume weights -> NCCL weight update -> resume
kv_cache + cuda_graph -> continue -> generate with the new weight_version.

Checks: every pushed tensor's SHA-256 equals the engine's (`/weights_checker checksum`), the new
weight_version is served, and greedy outputs after the push equal an in-process engine built with
the trainer's weights (one prompt at a time on both sides, so batching cannot differ).
Prints a table last; writes JSON to $OUT/gpu_slime_external.json.

Needs on the GPU machine: fastapi, uvicorn, requests, httpx (the server and slime's client) and
pytest (the slime loader); sglang-router optional. slime itself from $SLIME_SRC (a directory
holding slime/), e.g. `git --git-dir <mirror> archive HEAD slime | tar -x -C slime-src`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repo_path import expose_repo

ROOT = Path(__file__).resolve().parents[1]


def _sha256(tensor) -> str:
    import torch

    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="qwen3-0.6b-shape")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--slime-src", default=os.environ.get("SLIME_SRC"))
    parser.add_argument(
        "--cpu", action="store_true", help="dry run of the same sequence on the CPU (gloo, fp32)"
    )
    args_cli = parser.parse_args(argv)
    missing = [
        m
        for m in ("fastapi", "uvicorn", "requests", "httpx", "pytest")
        if not importlib.util.find_spec(m)
    ]
    if missing:
        print(f"missing on this machine: {missing} (carry a --target pip folder on PYTHONPATH)")
        return 2
    if not args_cli.slime_src or not (Path(args_cli.slime_src) / "slime").is_dir():
        print("set SLIME_SRC (or --slime-src) to a directory holding slime/")
        return 2
    pythonpath = expose_repo()
    sys.path.insert(0, str(ROOT))  # tests.serving helpers
    import requests
    import torch

    cpu = args_cli.cpu
    if not cpu and torch.cuda.device_count() < 2:
        print("needs 2 GPUs: engine on GPU 0, trainer (NCCL rank 0) on GPU 1")
        return 2
    if not cpu:
        torch.cuda.set_device(1)
    device, dtype = ("cpu", "float32") if cpu else ("cuda", "bfloat16")
    trainer_device = "cpu" if cpu else "cuda:1"
    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.models import load_model
    from rollout_accel.serving.server import free_port
    from tests.serving.slime_harness import InlineActor, inline_ray, install_slime

    install_slime(Path(args_cli.slime_src), cpu_accelerator=cpu)
    from slime.backends.megatron_utils.update_weight import update_weight_from_distributed as uwd
    from slime.backends.sglang_utils.external import (
        apply_external_engine_info_to_args,
        external_engine_infos_from_args,
        external_engine_init_kwargs,
    )
    from slime.backends.sglang_utils.sglang_engine import SGLangEngine
    from slime.utils import http_utils

    uwd.ray = inline_ray()  # slime's Ray fan-out, on threads (as in its CPU tests)
    timings: dict[str, float] = {}
    card = "CPU" if cpu else torch.cuda.get_device_name(0)
    results: dict = {"card": card, "model": args_cli.model_path}

    def timed(name: str, fn, *a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = time.perf_counter() - start
        return out

    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": pythonpath}
    log = open(Path(tempfile.gettempdir()) / "gpu_slime_external_serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rollout_accel.rollout.cli",
            "serve",
            "--model-path",
            args_cli.model_path,
            "--device",
            device,
            "--dtype",
            dtype,
            "--enable-memory-saver",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    router_proc = None
    ok = False
    try:
        start = time.perf_counter()
        while True:
            if server.poll() is not None:
                print(Path(log.name).read_text()[-3000:])
                return 1
            try:
                if requests.get(f"{url}/health_generate", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        timings["server start (load + CUDA graphs)"] = time.perf_counter() - start
        router_ip = router_port = None
        if importlib.util.find_spec("sglang_router"):
            router_port = free_port()
            router_proc = subprocess.Popen(
                [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                 "--port", str(router_port), "--policy", "round_robin", "--disable-health-check",
                 "--disable-circuit-breaker", "--prometheus-port", str(free_port())],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            router_ip = "127.0.0.1"
            time.sleep(3)
        results["router"] = router_proc is not None
        gen_url = f"http://{router_ip}:{router_port}" if router_ip else url

        args = Namespace(
            rollout_external_engine_addrs=[url.removeprefix("http://")],
            rollout_external=True,
            hf_checkpoint=args_cli.model_path,
            seed=0,
            num_gpus_per_node=2,
            rollout_num_gpus_per_engine=1,
            offload_rollout=True,
            colocate=False,
            debug_rollout_only=False,
            sglang_pp_size=1,
            sglang_dp_size=1,
            sglang_ep_size=1,
            use_rollout_routing_replay=False,
            fp16=False,
            sglang_router_ip=router_ip,
            sglang_router_port=router_port,
            sglang_server_concurrency=64,
            use_distributed_post=False,
        )
        timed("init external", apply_external_engine_info_to_args, args)
        (info,) = external_engine_infos_from_args(args)
        results["server_info_num_gpus"] = info.num_gpus
        engine = SGLangEngine(args, rank=0, base_gpu_id=0, num_gpus_per_engine=info.num_gpus)
        timed("register", engine.init, **external_engine_init_kwargs(info))
        timed("health_generate", engine.health_generate, 60)

        prompts = [[(7 * i + j) % 1000 + 10 for j in range(16 + 8 * i)] for i in range(8)]
        sampling = {"temperature": 0, "max_new_tokens": args_cli.max_new_tokens, "ignore_eos": True}
        http_utils.init_http_client(Namespace(**{**vars(args), "rollout_num_engines": 1}))
        loop = asyncio.new_event_loop()

        def generate(one_at_a_time: bool = False) -> list[dict]:
            async def run() -> list[dict]:
                calls = [
                    lambda p=p: http_utils.post(
                        f"{gen_url}/generate",
                        {"input_ids": p, "sampling_params": sampling, "return_logprob": True},
                    )
                    for p in prompts
                ]
                if one_at_a_time:
                    return [await c() for c in calls]
                return await asyncio.gather(*(c() for c in calls))

            return loop.run_until_complete(run())

        before = timed("generate (old weights)", generate)
        timed("pause", engine.pause_generation)
        timed("release (flush + weights, kv, graphs)", engine.release_memory_occupation)
        timed("resume weights", engine.resume_memory_occupation, ["weights"])

        trainer = load_model(args_cli.model_path, seed=1, dtype=dtype, device=trainer_device).model
        named = [(n, p.detach()) for n, p in trainer.named_parameters()]
        half = len(named) // 2
        with ThreadPoolExecutor(max_workers=4) as pool:
            actors = [InlineActor(engine, pool)]
            group = timed(
                "init NCCL group",
                uwd.connect_rollout_engines_from_distributed,
                args,
                "slime-pp_0",
                actors,
                [info.num_gpus],
            )
            engine.flush_cache()
            start = time.perf_counter()
            for bucket in (named[:half], named[half:]):
                replies = inline_ray().get(
                    uwd.update_weights_from_distributed("slime-pp_0", group, 1, actors, bucket)
                )
                assert all(r["success"] for r in replies), replies
            timings["NCCL weight update (2 buckets)"] = time.perf_counter() - start
            timed(
                "resume kv_cache + cuda_graph",
                engine.resume_memory_occupation,
                ["kv_cache", "cuda_graph"],
            )
            timed("continue", engine.continue_generation)
            uwd.disconnect_rollout_engines_from_distributed(args, "slime-pp_0", group, actors)
        after = timed("generate (new weights)", generate)
        # Prefills from scratch, as the reference's: KV reused from the batched run above would
        # carry that batch's bf16 rounding, and a near-tie could flip a greedy token.
        engine.flush_cache()
        sequential = generate(one_at_a_time=True)
        loop.run_until_complete(http_utils._http_client.aclose())
        loop.close()

        checksums = engine.check_weights("checksum")["ranks"][0]["checksums"]
        pushed = {n: _sha256(t) for n, t in named}
        mismatched = sorted(n for n, h in pushed.items() if checksums.get(n) != h)
        del trainer, named
        if not cpu:
            torch.cuda.empty_cache()
        with Engine(args_cli.model_path, seed=1, dtype=dtype, device=trainer_device) as ref:
            expected = [
                ref.generate(input_ids=p, sampling_params=sampling)["output_ids"] for p in prompts
            ]
        got = [o["output_ids"] for o in sequential]
        results.update(
            weight_version_after=sorted({o["meta_info"]["weight_version"] for o in after}),
            tensors_pushed=len(pushed),
            tensors_mismatched=mismatched[:10],
            outputs_changed=[o["output_ids"] for o in before] != [o["output_ids"] for o in after],
            greedy_equal_to_reference=got == expected,
            greedy_token_agreement=sum(
                a == b
                for g, e in zip(got, expected, strict=True)
                for a, b in zip(g, e, strict=True)
            )
            / sum(len(e) for e in expected),
            cuda_graph_on=not requests.get(f"{url}/server_info").json()["disable_cuda_graph"],
        )
        ok = (
            results["weight_version_after"] == ["1"]
            and not mismatched
            and results["outputs_changed"]
            and results["greedy_equal_to_reference"]
        )
        results["passed"] = ok
    finally:
        for proc in (router_proc, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        log.close()
    results["seconds"] = timings
    out_dir = os.environ.get("OUT", "./out")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "gpu_slime_external.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "seconds"}, indent=2))
    print(f"\n{'step':42s} {'s':>8s}")
    for name, seconds in timings.items():
        print(f"{name:42s} {seconds:8.3f}")
    print(f"\nslime external-engine sequence on {results['card']}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
