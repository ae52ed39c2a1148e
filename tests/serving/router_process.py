"""The real sglang-router (PyPI `sglang-router`, the Rust router slime launches) as a subprocess,
for tests that put it in front of our servers."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout_accel.serving.server import free_port


@contextlib.contextmanager
def sglang_router(log_path: Path, policy: str = "round_robin") -> Iterator[str]:
    """Starts the router with no workers (they register with POST /workers, as slime does) and
    yields its URL; skips the test with the reason if the wheel is missing or cannot run here."""
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("sglang-router is not installed (pip install sglang-router; in the dev extras)")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        policy,
        # slime turns both off for its router (_start_router in slime/ray/rollout.py).
        "--disable-health-check",
        "--disable-circuit-breaker",
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        "warn",
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.skip(f"sglang-router exited at start: {log_path.read_text()[-500:]}")
            try:
                if httpx.get(f"{url}/workers", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.skip("sglang-router did not answer /workers within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_workers(router: str, count: int, timeout: float = 30.0) -> list[dict]:
    """Worker registration is asynchronous in the router (202 Accepted); wait until listed."""
    deadline = time.time() + timeout
    while True:
        workers = httpx.get(f"{router}/workers", timeout=5).json()["workers"]
        if len(workers) >= count:
            return workers
        assert time.time() < deadline, f"router lists {len(workers)} of {count} workers"
        time.sleep(0.1)
