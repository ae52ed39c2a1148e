"""Which implementation serves a call: the Triton kernel or the plain-PyTorch reference.

Every kernel family uses the same rule: an environment variable may force `reference` or
`triton` (read on every call, so tests and ablations can flip it); otherwise Triton serves CUDA
tensors when it imported, and the reference serves everything else (it is the CPU path).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["reference", "triton"]


def choose_backend(env_var: str, device: torch.device, triton_loaded: bool) -> Backend:
    forced = os.environ.get(env_var, "").strip().lower()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_loaded:
            raise RuntimeError(f"{env_var}=triton but triton could not be imported")
        return "triton"
    if forced:
        raise ValueError(f"{env_var} must be 'reference' or 'triton', got {forced!r}")
    return "triton" if device.type == "cuda" and triton_loaded else "reference"
