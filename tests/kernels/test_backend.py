"""The one backend-selection rule every kernel family dispatches through."""

from __future__ import annotations

import pytest
import torch

from rollout_accel.kernels import attention, fused_ops, sampling
from rollout_accel.kernels.backend import reload_overrides

FAMILIES = [
    (attention, attention.attention_backend, "flashinfer"),
    (fused_ops, fused_ops.fused_backend, "liger"),
    (sampling, sampling.sampling_backend, "flashinfer"),
]


@pytest.mark.parametrize(("module", "backend", "_"), FAMILIES)
def test_dispatch_defaults_to_reference_on_cpu(module, backend, _, monkeypatch) -> None:
    monkeypatch.delenv(module.ENV_VAR, raising=False)
    reload_overrides()
    assert backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv(module.ENV_VAR, "reference")
    reload_overrides()
    assert backend(torch.device("cuda")) == "reference"


@pytest.mark.parametrize(("module", "backend", "bad"), FAMILIES)
def test_dispatch_rejects_unknown_backend(module, backend, bad, monkeypatch) -> None:
    monkeypatch.setenv(module.ENV_VAR, bad)
    reload_overrides()
    with pytest.raises(ValueError, match=bad):
        backend(torch.device("cpu"))
