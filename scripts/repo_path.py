"""Lets a script run from a checkout without installing the package.

`expose_repo()` makes the repository importable as `rollout_accel` (a symlink to it in a
temporary directory, put first on sys.path) unless it already is, and returns the PYTHONPATH a
child process needs to import it the same way.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expose_repo() -> str:
    try:
        import rollout_accel.serving  # noqa: F401

        return os.environ.get("PYTHONPATH", "")
    except ImportError:
        link = Path(tempfile.mkdtemp())
        (link / "rollout_accel").symlink_to(ROOT)
        sys.path.insert(0, str(link))
        return os.pathsep.join(p for p in (str(link), os.environ.get("PYTHONPATH")) if p)
