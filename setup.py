"""Maps the four root folders onto the one import root `rollout_accel`.

A top-level `kernels` import would shadow Hugging Face's `kernels` package, which SGLang depends on,
so `kernels/` installs as `rollout_accel.kernels` (and likewise for the other folders).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = ("rollout", "sampling", "serving", "kernels")


def _packages() -> list[str]:
    found = []
    for folder in FOLDERS:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT).as_posix().replace("/", ".")
            found.append(f"rollout_accel.{rel}")
    return found


setup(
    packages=_packages(),
    package_dir={f"rollout_accel.{folder}": folder for folder in FOLDERS},
)
