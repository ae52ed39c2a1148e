"""`rollout serve` as a real child process on loopback, for tests that signal it (SIGSTOP,
SIGKILL, SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from rollout_accel.serving.server import free_port


class ServeProcess:
    """Starts `rollout serve --model-path tiny-qwen3` on `port` (a free one by default)."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rollout_accel.rollout.cli",
                "serve",
                "--model-path",
                "tiny-qwen3",
                "--device",
                "cpu",
                "--port",
                str(self.port),
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 90.0) -> ServeProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server on {self.url} did not start in {timeout} s")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
