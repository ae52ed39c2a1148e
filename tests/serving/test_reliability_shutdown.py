"""SIGTERM stops `rollout serve` within a bounded time even with the engine thread wedged and
requests hanging on it (issue 20: 11). Real process, real signal, a real gloo group."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import httpx
import torch.distributed as dist

from rollout_accel.serving.engine.weight_sync import init_custom_process_group
from rollout_accel.serving.server import free_port
from tests.serving.serve_process import ServeProcess


def test_sigterm_exits_in_bounded_time_with_a_wedged_engine_thread() -> None:
    server = ServeProcess(None, "--shutdown-grace", "1", "--weight-group-timeout", "300")
    group = None
    try:
        server.wait_ready()
        port = free_port()
        http = httpx.Client(base_url=server.url, timeout=300)
        joined: dict = {}
        joiner = threading.Thread(
            target=lambda: joined.update(
                reply=http.post(
                    "/init_weights_update_group",
                    json={
                        "master_address": "127.0.0.1",
                        "master_port": port,
                        "rank_offset": 1,
                        "world_size": 2,
                        "group_name": "wedge",
                        "backend": "gloo",
                    },
                )
            )
        )
        joiner.start()
        group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "wedge")
        joiner.join(60)
        assert joined["reply"].json()["success"], joined["reply"].text

        def hang(path: str, body: dict) -> None:
            # The server goes away under us: expected.
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{server.url}{path}", json=body, timeout=60)

        # The engine thread now waits for a broadcast that never comes (wedged for 300 s) ...
        hung = [
            threading.Thread(
                target=hang,
                args=(
                    "/update_weights_from_distributed",
                    {
                        "names": ["lm_head.weight"],
                        "dtypes": ["float32"],
                        "shapes": [[4, 4]],
                        "group_name": "wedge",
                    },
                ),
            )
        ]
        # ... and generations queue behind it.
        hung += [
            threading.Thread(
                target=hang,
                args=(
                    "/generate",
                    {"input_ids": [i + 1], "sampling_params": {"max_new_tokens": 4}},
                ),
            )
            for i in range(4)
        ]
        for t in hung:
            t.start()
        time.sleep(1.0)
        assert server.proc.poll() is None
        start = time.perf_counter()
        server.signal(signal.SIGTERM)
        server.proc.wait(timeout=20)
        took = time.perf_counter() - start
        # Grace 1 s: uvicorn closes connections after 1 s, the engine gets 1 s, the watchdog
        # fires by 2 * 1 + 5 s whatever is still blocked.
        assert took < 10, f"SIGTERM took {took:.1f} s"
        for t in hung:
            t.join(30)
    finally:
        server.stop()
        if group is not None:
            dist.destroy_process_group(group)
