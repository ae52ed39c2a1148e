"""Which implementation serves a call: the Triton kernel or the plain-PyTorch reference.

Every kernel family uses the same rule: an environment variable may force `reference` or
`triton`; otherwise Triton serves CUDA tensors when it imported, and the reference serves
everything else (it is the CPU path). The variable is read once per process (a kernel call must
not pay for an environment lookup); `reload_overrides()` reads it again, for tests and ablations
that flip it at run time.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["reference", "triton"]


_overrides: dict[str, str] = {}


def reload_overrides() -> None:
    """Forgets the cached overrides; the next call of each family reads its variable again."""
    _overrides.clear()


def choose_backend(env_var: str, device: torch.device, triton_loaded: bool) -> Backend:
    forced = _overrides.get(env_var)
    if forced is None:
        forced = _overrides[env_var] = os.environ.get(env_var, "").strip().lower()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_loaded:
            raise RuntimeError(f"{env_var}=triton but triton could not be imported")
        return "triton"
    if forced:
        raise ValueError(f"{env_var} must be 'reference' or 'triton', got {forced!r}")
    return "triton" if device.type == "cuda" and triton_loaded else "reference"
