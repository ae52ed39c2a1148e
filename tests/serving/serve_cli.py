"""`rollout serve` as a real subprocess (the CLI a slime user runs), for tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from rollout_accel.serving.server import free_port


@contextlib.contextmanager
def rollout_serve(flags: list[str], log_path: Path, timeout: float = 180.0) -> Iterator[str]:
    """Starts `rollout serve FLAGS --port P` and yields its URL once /health_generate is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "rollout_accel.rollout.cli", "serve", *flags, "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, f"rollout serve exited: {log_path.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/health_generate", timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "rollout serve did not become healthy"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
