"""A stand-in trainer process: joins the server's weight-update group as rank 0 and broadcasts
the seed-1 tiny-qwen3 weights, exactly as an SGLang-speaking trainer (slime) does.

    python weight_pusher.py SERVER_URL MASTER_PORT
"""

from __future__ import annotations

import sys
import threading

import httpx
import torch.distributed as dist

from rollout_accel.serving.engine.weight_sync import init_custom_process_group
from rollout_accel.serving.models import load_model


def main() -> None:
    url, port = sys.argv[1], int(sys.argv[2])
    model = load_model("tiny-qwen3", seed=1).model
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    http = httpx.Client(base_url=url, timeout=120)
    replies: dict[str, httpx.Response] = {}

    def call(key: str, path: str, payload: dict) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: replies.__setitem__(key, http.post(path, json=payload))
        )
        thread.start()
        return thread

    joiner = call(
        "init",
        "/init_weights_update_group",
        {
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "test_group",
            "backend": "gloo",
        },
    )
    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "test_group")
    joiner.join()
    assert replies["init"].json()["success"], replies["init"].text
    updater = call(
        "update",
        "/update_weights_from_distributed",
        {
            "names": [n for n, _ in named],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named],
            "group_name": "test_group",
            "weight_version": "pushed-1",
        },
    )
    for _, tensor in named:
        dist.broadcast(tensor.contiguous(), src=0, group=group)
    updater.join()
    assert replies["update"].json()["success"], replies["update"].text
    reply = http.post("/destroy_weights_update_group", json={"group_name": "test_group"})
    assert reply.json()["success"], reply.text
    print("pushed", len(named))


if __name__ == "__main__":
    main()
