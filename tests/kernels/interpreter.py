"""Runs a kernel test script under Triton's CPU interpreter, in a fresh process.

TRITON_INTERPRET must be set before triton is imported, so each script runs as its own process
(with the backend-forcing variable of its kernel family removed, so dispatch tests see defaults).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_interpreter(module: str, *args: str, drop_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != drop_env}
    env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
