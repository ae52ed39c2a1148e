"""`/update_weights_from_tensor` payloads: pickled (name, tensor) pairs in base64, unpickled with an
allow-list.

SGLang's trainers pickle `[(name, tensor), ...]` (torch's multiprocessing pickler for CUDA tensors,
which travel as IPC handles to a server on the same GPU; plain pickle for CPU tensors) and send it
base64-encoded in JSON. Plain `pickle.loads` runs whatever callable the payload names, so we
resolve globals through an allow-list: tensor and storage rebuilders, dtypes, devices, sizes and
`OrderedDict`. The one allowed rebuilder that itself unpickles (`torch.storage._load_from_bytes`,
used for CPU storages) is replaced by `torch.load(..., weights_only=True)`, torch's own restricted
loader. `unsafe=True` (the server's `--unsafe-pickle`) restores plain pickle for trainers that
send other objects.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from collections import OrderedDict
from typing import Any

import torch
import torch.multiprocessing.reductions as mp_reductions

from rollout_accel.serving.engine.errors import InvalidRequestError


def _load_storage_bytes(raw: bytes) -> Any:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): (
            mp_reductions.rebuild_cuda_tensor
        ),
        ("torch.multiprocessing.reductions", "rebuild_tensor"): mp_reductions.rebuild_tensor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch._tensor", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "TypedStorage"): torch.TypedStorage,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or (name.endswith("Storage") and isinstance(value, type)):
            allowed[("torch", name)] = value
    return allowed


_ALLOWED = _allowed_globals()


class _TensorUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; anything else is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a weight payload (tensors only; "
                "start the server with --unsafe-pickle to trust the trainer fully)"
            ) from None


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The client side: pickled (name, tensor) pairs, base64 (SGLang's shape)."""
    return base64.b64encode(pickle.dumps(list(named_tensors))).decode("ascii")


def deserialize_named_tensors(
    payload: str | bytes, unsafe: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `serialize_named_tensors`; raises InvalidRequestError naming the field."""
    field = "serialized_named_tensors"
    if not isinstance(payload, str | bytes):
        raise InvalidRequestError(f"{field}: expected a base64 string")
    try:
        raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else payload
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{field}: not base64 ({exc})") from exc
    try:
        named = pickle.loads(raw) if unsafe else _TensorUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:
        raise InvalidRequestError(f"{field}: cannot decode ({exc})") from exc
    if isinstance(named, dict):
        named = list(named.items())
    if not isinstance(named, list) or not all(
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
        for item in named
    ):
        raise InvalidRequestError(f"{field}: expected a list of (name, tensor) pairs")
    return [(name, tensor) for name, tensor in named]
