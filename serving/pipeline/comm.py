"""The stages' process groups: a gloo control group (pickled commands from stage 0, results and
timings back) and a data group for hidden states, residuals and moved layers (gloo on the CPU,
NCCL on GPUs). Both are built outside the default group, so an engine in a process that uses
torch.distributed for something else (a trainer, weight sync) does not collide with it."""

from __future__ import annotations

import contextlib
import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from rollout_accel.serving.engine.weight_sync import init_custom_process_group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def join_groups(
    ports: tuple[int, int], rank: int, world: int, backend: str, timeout_s: float
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    timeout = timedelta(seconds=timeout_s)
    ctrl = init_custom_process_group(
        "gloo", f"tcp://127.0.0.1:{ports[0]}", world, rank, f"pp-ctrl-{ports[0]}", timeout
    )
    if backend == "gloo":
        return ctrl, ctrl
    data = init_custom_process_group(
        backend, f"tcp://127.0.0.1:{ports[1]}", world, rank, f"pp-data-{ports[1]}", timeout
    )
    return ctrl, data


def broadcast_command(group: dist.ProcessGroup, command: Any = None) -> Any:
    """Stage 0 passes the command; every other stage receives it."""
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def send_object(group: dist.ProcessGroup, obj: Any, dst: int) -> None:
    dist.send_object_list([obj], dst=dst, group=group)


def recv_object(group: dist.ProcessGroup, src: int) -> Any:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, group=group)
    return box[0]


def destroy(*groups: dist.ProcessGroup) -> None:
    for group in dict.fromkeys(groups):
        with contextlib.suppress(Exception):  # a torn-down peer must not block shutdown
            dist.destroy_process_group(group)
