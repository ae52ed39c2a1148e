"""slime's own code drives `rollout serve` as an external engine through one RL step.

slime (found at test time, see slime_harness.py) runs unchanged: its external-engine discovery
(`apply_external_engine_info_to_args`), its `SGLangEngine` actor in external mode (server-args
sanity check against our `/server_info`, registration with a real sglang-router), its HTTP client
for `/generate`, its engine calls (health, pause, flush, release, resume, continue, weights
checker, profiler, ...), and its Megatron-side distributed weight-update helpers
(`connect_rollout_engines_from_distributed`, `update_weights_from_distributed`) as the trainer
process over gloo. Only Ray's actor fan-out is replaced by threads, as slime's own CPU tests do.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch.distributed as dist

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.models import load_model
from tests.serving.router_process import sglang_router, wait_for_workers
from tests.serving.serve_cli import rollout_serve
from tests.serving.slime_harness import InlineActor, inline_ray, slime_modules

__all__ = ["slime_modules"]  # the fixture, re-exported for pytest

PROMPTS = [[1, 2, 3, 4], [9, 8, 7]]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def slime_args(addr: str, tmp_path) -> Namespace:
    """The slime arguments its external-engine path reads (a colocated, offloading run)."""
    return Namespace(
        rollout_external_engine_addrs=[addr],
        rollout_external=True,
        hf_checkpoint="tiny-qwen3",
        seed=0,
        num_gpus_per_node=1,
        rollout_num_gpus_per_engine=1,
        offload_rollout=True,  # colocated runs offload: slime expects enable_memory_saver on
        colocate=True,
        debug_rollout_only=False,
        sglang_pp_size=1,
        sglang_dp_size=1,
        sglang_ep_size=1,
        use_rollout_routing_replay=False,
        fp16=False,
        sglang_router_ip=None,
        sglang_router_port=None,
        sglang_server_concurrency=8,
        use_distributed_post=False,
        update_weight_local_checkpoint_dir=str(tmp_path / "local_ckpt"),
        update_weight_disk_dir=str(tmp_path / "published"),
    )


def reference_outputs(seed: int) -> list[list[int]]:
    with Engine("tiny-qwen3", seed=seed) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_one_rl_step_driven_by_slime(slime_modules, tmp_path, monkeypatch) -> None:
    from slime.backends.megatron_utils.update_weight import update_weight_from_distributed as uwd
    from slime.backends.sglang_utils.external import (
        apply_external_engine_info_to_args,
        external_engine_infos_from_args,
        external_engine_init_kwargs,
    )
    from slime.backends.sglang_utils.sglang_engine import SGLangEngine
    from slime.utils import http_utils

    monkeypatch.setattr(uwd, "ray", inline_ray())
    expected_new = reference_outputs(seed=1)
    with (
        rollout_serve(
            ["--model-path", "tiny-qwen3", "--enable-memory-saver"], tmp_path / "serve.log"
        ) as url,
        sglang_router(tmp_path / "router.log") as router,
    ):
        addr = url.removeprefix("http://")
        args = slime_args(addr, tmp_path)
        router_ip, router_port = router.removeprefix("http://").split(":")

        # 1. init external: discovery, server-args sanity check, router registration.
        apply_external_engine_info_to_args(args)
        assert args.rollout_num_engines == 1 and args.rollout_num_gpus == 1
        (info,) = external_engine_infos_from_args(args)
        assert info.worker_type == "regular"
        assert info.parallel_config == {"tp_size": 1, "pp_size": 1, "ep_size": 1, "moe_dp_size": 1}
        engine = SGLangEngine(
            args, rank=0, worker_type=info.worker_type, base_gpu_id=0, num_gpus_per_engine=1
        )
        engine.init(
            **external_engine_init_kwargs(info), router_ip=router_ip, router_port=int(router_port)
        )
        assert [w["url"] for w in wait_for_workers(router, 1)] == [url]
        assert engine.get_url() == url
        # The check is real: a run without --offload-rollout expects the memory saver off.
        mismatched = SGLangEngine(
            Namespace(**{**vars(args), "offload_rollout": False}),
            rank=0,
            worker_type="regular",
            base_gpu_id=0,
            num_gpus_per_engine=1,
        )
        with pytest.raises(AssertionError, match="enable_memory_saver"):
            mismatched.init(**external_engine_init_kwargs(info))

        # 2. health_generate, 3. generate through the router with slime's HTTP client.
        assert engine.health_generate(timeout=30)
        http_utils.init_http_client(args)
        loop = asyncio.new_event_loop()

        def generate() -> list[dict]:
            async def run() -> list[dict]:
                return await asyncio.gather(
                    *(
                        http_utils.post(
                            f"{router}/generate",
                            {"input_ids": p, "sampling_params": GREEDY, "return_logprob": True},
                        )
                        for p in PROMPTS
                    )
                )

            return loop.run_until_complete(run())

        first = generate()
        assert all(o["meta_info"]["weight_version"] == "default" for o in first)
        assert all(len(o["meta_info"]["output_token_logprobs"]) == 12 for o in first)
        assert [o["output_ids"] for o in first] != expected_new

        # slime's check_weight_update_equal: snapshot the served weights, scramble them.
        assert engine.check_weights("checksum")["success"]

        # 4. pause, 5. release (flushes first), 6. resume the weights for the update.
        engine.pause_generation()
        engine.release_memory_occupation()
        engine.resume_memory_occupation(tags=["weights"])

        # 7. distributed weight update, the trainer side being slime's helpers over gloo.
        trainer = load_model("tiny-qwen3", seed=1).model
        named = [(n, p.detach()) for n, p in trainer.named_parameters()]
        buckets = [named[: len(named) // 2], named[len(named) // 2 :]]
        with ThreadPoolExecutor(max_workers=4) as pool:
            actors = [InlineActor(engine, pool)]
            group = uwd.connect_rollout_engines_from_distributed(
                args, "slime-pp_0", actors, engine_gpu_counts=[1]
            )
            engine.pause_generation()
            engine.flush_cache()
            for bucket in buckets:  # update_weights: one call + broadcast per bucket
                refs = uwd.update_weights_from_distributed("slime-pp_0", group, 1, actors, bucket)
                replies = inline_ray().get(refs)
                assert all(r["success"] for r in replies), replies
            # 8. continue; then the KV cache comes back (slime's onload_kv).
            engine.continue_generation()
            engine.resume_memory_occupation(tags=["kv_cache", "cuda_graph"])
            uwd.disconnect_rollout_engines_from_distributed(args, "slime-pp_0", group, actors)
        assert not dist.is_initialized()  # slime's group is not the default group

        # 9. generate with the new weight version: the trainer's weights, exactly.
        second = generate()
        loop.run_until_complete(http_utils._http_client.aclose())
        loop.close()
        assert all(o["meta_info"]["weight_version"] == "1" for o in second)
        assert [o["output_ids"] for o in second] == expected_new
        assert engine.get_weight_version() == "1"

        # The rest of what slime calls on an engine.
        checksum = engine.check_weights("checksum")
        assert checksum["success"] and checksum["ranks"][0]["parallelism_info"]["tp_size"] == 1
        assert engine.post_process_weights(restore_weights_before_load=True)["success"]
        assert engine.start_profile(output_dir=str(tmp_path / "prof")).status_code == 200
        assert engine.stop_profile().status_code == 200
        assert list((tmp_path / "prof").glob("*.trace.json.gz"))
        with pytest.raises(requests.HTTPError):
            engine.pull_weights(target_version=1)  # disk-delta sync: refused with a message
        engine.shutdown()  # external: slime leaves the server running
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
