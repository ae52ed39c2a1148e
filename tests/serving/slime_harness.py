"""Loading slime's own code for tests, on a machine without SGLang, GPUs or GitHub.

slime is found at test time, never vendored: `SLIME_SRC` (a checkout holding `slime/`), or a git
mirror (`SLIME_MIRROR`, default `/work/.mirror/THUDM+slime/repo`) whose HEAD is extracted to a
temporary directory. What cannot run here is stubbed the way slime's own CPU tests stub it
(`tests/plugin_contracts/_shared.py`, `tests/test_external_sglang_engines.py`): SGLang's
`ServerArgs` / `kill_process_tree` imports, Ray's actor fan-out (`.remote` / `ray.get`, run on
threads here), and a CPU backend registered through slime's own accelerator API.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tarfile
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

DEFAULT_MIRROR = "/work/.mirror/THUDM+slime/repo"


def locate_slime(cache_dir: Path) -> Path:
    """A directory with slime's `slime/` package, or pytest.skip with the reason."""
    src = os.environ.get("SLIME_SRC")
    if src:
        if not (Path(src) / "slime" / "__init__.py").exists():
            pytest.skip(f"SLIME_SRC={src} has no slime/ package")
        return Path(src)
    mirror = Path(os.environ.get("SLIME_MIRROR", DEFAULT_MIRROR))
    if not (mirror / "HEAD").exists():
        pytest.skip(
            "slime is not available: set SLIME_SRC to a slime checkout (GitHub is unreachable "
            f"from CI and slime is not on PyPI); no git mirror at {mirror}"
        )
    commit = subprocess.run(
        ["git", "--git-dir", str(mirror), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = cache_dir / f"slime-{commit[:12]}"
    if not (target / "slime" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = target / "slime.tar"
        subprocess.run(
            ["git", "--git-dir", str(mirror), "archive", "-o", str(archive), "HEAD", "slime"],
            check=True,
        )
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
    return target


@dataclasses.dataclass
class StubServerArgs:
    """The SGLang `ServerArgs` fields slime's `_compute_server_args` fills (field names only
    matter: slime keeps the keys that are fields and checks some against `/server_info`)."""

    model_path: str = ""
    trust_remote_code: bool = False
    random_seed: int | None = None
    enable_memory_saver: bool = False
    host: str = "127.0.0.1"
    port: int = 30000
    nccl_port: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    gpu_id_step: int = 1
    base_gpu_id: int = 0
    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    ep_size: int = 1
    skip_server_warmup: bool = False
    enable_draft_weights_cpu_backup: bool = False
    enable_metrics: bool = False
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998
    load_balance_method: str = "round_robin"
    prefill_round_robin_balance: bool = False
    encoder_only: bool = False
    enable_return_routed_experts: bool = False
    dtype: str = "auto"
    mem_fraction_static: float | None = None


def _cpu_accelerator_class() -> type:
    from slime.utils.accelerator.base import Accelerator

    class CpuAccelerator(Accelerator):
        """A CPU backend for slime's accelerator API: gloo for every process group."""

        name = "cpu"
        device_type = "cpu"
        communication_backend_name = "gloo"

        def is_available(self) -> bool:
            return True

        def device(self, index: Any = None) -> torch.device:
            return torch.device("cpu")

        def device_name(self, index: Any = None) -> str:
            return "cpu"

        def set_device(self, index: Any) -> None:
            return None

        def current_device(self) -> str:
            return "cpu"

        def device_count(self) -> int:
            return 0

        def synchronize(self, device: Any = None) -> None:
            return None

        def current_stream(self, device: Any = None) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def mem_get_info(self, device: Any = None) -> tuple[int, int]:
            return (0, 0)

        def memory_allocated(self, device: Any = None) -> int:
            return 0

        def memory_reserved(self, device: Any = None) -> int:
            return 0

        def distributed_device_id(self, index: Any = None) -> None:
            return None

    return CpuAccelerator


class InlineActor:
    """Ray's actor-handle surface (`handle.method.remote(**kw)` -> ref) over a plain object;
    calls run on threads so the trainer can broadcast while the engine call is in flight."""

    def __init__(self, target: Any, pool: ThreadPoolExecutor) -> None:
        self._target, self._pool = target, pool

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        return types.SimpleNamespace(remote=lambda *a, **kw: self._pool.submit(method, *a, **kw))


def inline_ray() -> types.SimpleNamespace:
    """The `ray` functions slime's weight-update helpers call, for InlineActor refs."""

    def get(refs: Any, timeout: float | None = 300) -> Any:
        if isinstance(refs, Future):
            return refs.result(timeout)
        return [r.result(timeout) for r in refs]

    return types.SimpleNamespace(
        get=get,
        _private=types.SimpleNamespace(
            services=types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1")
        ),
    )


def _ray_stand_in() -> dict[str, types.ModuleType]:
    """`ray` and `ray.actor` with the names slime imports at module level, and `get` of
    InlineActor refs; `remote` raises (nothing the harness drives needs a real actor)."""
    ray = types.ModuleType("ray")
    actor = types.ModuleType("ray.actor")

    class ObjectRef:  # annotations only
        pass

    class ActorHandle:  # annotations only
        pass

    def remote(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Ray is not installed here; the slime harness runs without actors")

    ray.ObjectRef = ObjectRef  # type: ignore[attr-defined]
    ray.get = inline_ray().get  # type: ignore[attr-defined]
    ray.remote = remote  # type: ignore[attr-defined]
    ray.actor = actor  # type: ignore[attr-defined]
    actor.ActorHandle = ActorHandle  # type: ignore[attr-defined]
    return {"ray": ray, "ray.actor": actor}


def install_slime(root: Path, cpu_accelerator: bool) -> Callable[[], None]:
    """Puts slime (at `root`) on sys.path with the SGLang stubs, and a CPU accelerator when there
    is no GPU; returns the function that undoes it."""
    saved = set(sys.modules)
    sys.path.insert(0, str(root))
    stubs = {
        "sglang": types.ModuleType("sglang"),
        "sglang.srt": types.ModuleType("sglang.srt"),
        "sglang.srt.server_args": types.ModuleType("sglang.srt.server_args"),
        "sglang.srt.utils": types.ModuleType("sglang.srt.utils"),
    }
    stubs["sglang.srt.server_args"].ServerArgs = StubServerArgs
    stubs["sglang.srt.utils"].kill_process_tree = lambda *a, **kw: None
    if importlib.util.find_spec("ray") is None:
        # A GPU box without Ray (its wheel is too large to carry): slime's weight-update module
        # imports ray at the top, and the harness replaces its Ray calls with `inline_ray`
        # anyway; anything else that reaches for Ray fails loudly.
        stubs.update(_ray_stand_in())
    for name, module in stubs.items():
        sys.modules.setdefault(name, module)
    from slime.utils import accelerator

    if cpu_accelerator:
        accelerator.set_accelerator(_cpu_accelerator_class()())

    def undo() -> None:
        accelerator.reset_accelerator()
        sys.path.remove(str(root))
        for name in list(sys.modules):
            if name.split(".")[0] in ("slime", "sglang") and name not in saved:
                del sys.modules[name]

    return undo


@pytest.fixture(scope="module")
def slime_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """slime on sys.path with the SGLang stubs and a CPU accelerator installed; undone after."""
    root = locate_slime(tmp_path_factory.getbasetemp().parent / "slime-src")
    undo = install_slime(root, cpu_accelerator=True)
    try:
        yield root
    finally:
        undo()
