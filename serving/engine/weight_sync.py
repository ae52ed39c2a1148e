"""Weights broadcast from a trainer over torch.distributed (SGLang's distributed update path).

The trainer is rank 0 of a dedicated process group; each engine joins as `rank_offset` (+ its
tensor-parallel rank, 0 here). The group is built the way SGLang builds it — a TCP rendezvous,
a store prefixed with the group name, then a backend group that is *not* the default group — so a
trainer written for SGLang (slime's) connects to us unchanged. gloo on CPU, nccl on GPU.

Joining blocks until every rank arrives, so it runs on the caller's thread (never the engine
thread: generation continues meanwhile) and gives up after `timeout_s` with a message.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    _new_process_group_helper,
    _world,
    rendezvous,
)

DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"dtypes: unknown dtype {name!r}")
    return DTYPE_NAMES[key]


def init_custom_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: timedelta = timedelta(seconds=120),
) -> dist.ProcessGroup:
    """A process group outside the default one, keyed by `group_name` in the rendezvous store."""
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,
        timeout=timeout,
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class DistributedWeightReceiver:
    """Holds the engine's update groups by name and receives broadcast weights into them.

    `init_group` is thread-safe and may run on any thread; `receive` runs on the engine thread
    (it writes weights). `timeout_s` bounds a rendezvous (the server sets it from
    --weight-group-timeout)."""

    def __init__(self, device: torch.device, timeout_s: float = 30.0) -> None:
        self.device = device
        self.timeout_s = timeout_s
        self.groups: dict[str, dist.ProcessGroup] = {}
        self._lock = threading.Lock()
        self._joining: set[str] = set()

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str | None,
    ) -> tuple[bool, str]:
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if backend == "nccl" and self.device.type != "cuda":
            return False, "backend: nccl needs a GPU engine; use gloo on the CPU"
        with self._lock:
            if group_name in self.groups or group_name in self._joining:
                return False, f"group_name: {group_name!r} already exists"
            self._joining.add(group_name)
        timeout = self.timeout_s
        try:
            group = init_custom_process_group(
                backend,
                f"tcp://{master_address}:{master_port}",
                world_size,
                rank_offset,
                group_name,
                timeout=timedelta(seconds=timeout),
            )
        except Exception as exc:  # rendezvous timeouts, refused connections
            return False, (
                f"init_weights_update_group failed: could not join {group_name!r} at "
                f"{master_address}:{master_port} within {timeout:g} s ({exc})"
            )
        finally:
            with self._lock:
                self._joining.discard(group_name)
        with self._lock:
            self.groups[group_name] = group
        return True, f"joined {group_name!r} as rank {rank_offset} of {world_size}"

    def receive(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str
    ) -> list[tuple[str, torch.Tensor]]:
        """Receives one broadcast (from rank 0) per name, in order."""
        if group_name not in self.groups:
            raise ValueError(f"group_name: no update group {group_name!r}")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError("names, dtypes and shapes must have the same length")
        group = self.groups[group_name]
        tensors = [
            torch.empty(shape, dtype=parse_dtype(dtype), device=self.device)
            for dtype, shape in zip(dtypes, shapes, strict=True)
        ]
        handles = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
        for handle in handles:
            handle.wait()
        return list(zip(names, tensors, strict=True))

    def destroy(self, group_name: str) -> tuple[bool, str]:
        with self._lock:
            group = self.groups.pop(group_name, None)
        if group is None:
            return False, f"group_name: no update group {group_name!r}"
        dist.destroy_process_group(group)
        return True, f"destroyed {group_name!r}"
