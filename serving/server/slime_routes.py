"""The SGLang routes slime calls beyond generation and weight pushes: `/server_info`,
`/weights_checker`, `/pull_weights`, `/post_process_weights`, `/start_profile`, `/stop_profile`.

Bodies and answers follow SGLang (and, for `/pull_weights`, the engine side slime's patched
SGLang adds): weight-checker and post-process answers are `{"success", "message"}` with 200 or 400;
the profiler routes answer plain text. Everything that touches parameters runs on the engine thread
between steps, so a check never sees a half-applied update.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rollout_accel.serving.engine import InvalidRequestError
from rollout_accel.serving.server.protocol import check_fields, parse_json_object
from rollout_accel.serving.server.server_args import ServerArgs
from rollout_accel.serving.server.server_info import build_server_info

if TYPE_CHECKING:
    from rollout_accel.serving.engine import Engine

# Buffers recomputed from the config, never part of a weight push (SGLang skips the same kinds).
_DERIVED_BUFFERS = ("inv_freq", "cos_sin_cache", "freqs_cis")
CHECK_ACTIONS = ("snapshot", "reset_tensors", "compare", "checksum")
PROFILE_ACTIVITIES = {"CPU": "CPU", "GPU": "CUDA", "CUDA": "CUDA"}


def _result(ok: bool, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"success": ok, "message": message, **extra}, status_code=200 if ok else 400
    )


class WeightChecker:
    """SGLang's `/weights_checker` actions over the engine's named parameters and buffers.

    snapshot: keep a CPU copy; reset_tensors: overwrite every weight with noise (so a later push
    that misses a tensor is caught); compare: every tensor equals the snapshot bit for bit;
    checksum: SHA-256 per tensor and one over all of them.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.snapshot: dict[str, torch.Tensor] | None = None

    def _state(self) -> list[tuple[str, torch.Tensor]]:
        model = self.engine.model
        named = [(n, p.data) for n, p in model.named_parameters()]
        named += [(n, b) for n, b in model.named_buffers() if not n.endswith(_DERIVED_BUFFERS)]
        if any(t.numel() == 0 for _, t in named):
            raise InvalidRequestError(
                "weights_checker: weights are released; resume_memory_occupation first"
            )
        return named

    def handle(self, action: str) -> tuple[str, dict[str, Any] | None]:
        """Runs one action; returns (message, payload). Raises ValueError on a failed compare."""
        state = self._state()
        if action == "snapshot":
            self.snapshot = {n: t.detach().to("cpu", copy=True) for n, t in state}
            return f"snapshot of {len(state)} tensors", None
        if action == "reset_tensors":
            with torch.no_grad():
                for _, tensor in state:
                    if tensor.is_floating_point():
                        tensor.copy_(torch.rand(tensor.shape, device=tensor.device))
            # Prefix KV computed with the old weights must not be reused.
            self.engine.cache.evict(self.engine.cache.cached_slots)
            return f"reset {len(state)} tensors to random values", None
        if action == "compare":
            return self._compare(state), None
        checksums = {n: _sha256(t) for n, t in state}
        overall = hashlib.sha256()
        for name in sorted(checksums):
            overall.update(name.encode())
            overall.update(checksums[name].encode())
        payload = {
            "checksums": checksums,
            "per_gpu_checksum": overall.hexdigest(),
            "parallelism_info": {
                **dict.fromkeys(("tp_rank", "dp_rank", "pp_rank", "rank"), 0),
                **dict.fromkeys(("tp_size", "dp_size", "pp_size", "size"), 1),
            },
        }
        return f"checksum of {len(checksums)} tensors", payload

    def _compare(self, state: list[tuple[str, torch.Tensor]]) -> str:
        if self.snapshot is None:
            raise InvalidRequestError("action: 'compare' needs a 'snapshot' first")
        current = dict(state)
        if set(current) != set(self.snapshot):
            missing = sorted(set(self.snapshot) ^ set(current))
            raise ValueError(f"check tensor equality failed: names differ: {missing[:5]}")
        errors = []
        for name, expect in self.snapshot.items():
            actual = current[name].detach().cpu()
            if actual.shape != expect.shape or actual.dtype != expect.dtype:
                errors.append(f"name={name} shape/dtype {tuple(actual.shape)} {actual.dtype}")
            elif not torch.equal(actual, expect):
                diff = (actual.float() - expect.float()).abs()
                errors.append(f"name={name} max_abs_err={diff.max().item():.4g}")
        if errors:
            raise ValueError("check tensor equality failed:\n" + "\n".join(errors))
        return f"all {len(current)} tensors equal the snapshot"


def _sha256(tensor: torch.Tensor) -> str:
    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


class Profiler:
    """torch.profiler around the engine thread (where every forward runs), one session at a time;
    the trace goes to `<output_dir>/<id>-TP-0.trace.json.gz` as SGLang names it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session: torch.profiler.profile | None = None
        self.path: Path | None = None
        self._lock = threading.Lock()

    def start(self, body: dict[str, Any]) -> str:
        for key in ("start_step", "num_steps"):
            if body.get(key) is not None:
                raise InvalidRequestError(
                    f"start_profile: '{key}' (step-bounded profiling) is not supported; "
                    "call /stop_profile to end the trace"
                )
        if body.get("profile_by_stage") or body.get("merge_profiles"):
            raise InvalidRequestError(
                "start_profile: per-stage and merged profiles are not supported"
            )
        activities = body.get("activities") or ["CPU", "GPU"]
        if not isinstance(activities, list) or not all(a in PROFILE_ACTIVITIES for a in activities):
            raise InvalidRequestError(
                f"start_profile: 'activities' expected a list of {sorted(PROFILE_ACTIVITIES)}"
            )
        kinds = {
            getattr(torch.profiler.ProfilerActivity, PROFILE_ACTIVITIES[a]) for a in activities
        }
        if self.engine.device.type != "cuda":
            kinds.discard(torch.profiler.ProfilerActivity.CUDA)
        output_dir = Path(
            body.get("output_dir") or os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp")
        )
        with self._lock:
            if self.session is not None:
                raise InvalidRequestError(
                    "Profiling is already in progress. Call /stop_profile first."
                )
            output_dir.mkdir(parents=True, exist_ok=True)
            session = torch.profiler.profile(
                activities=sorted(kinds, key=str),
                record_shapes=bool(body.get("record_shapes")),
                with_stack=bool(body.get("with_stack")),
            )
            self.engine.loop.call(session.start)
            self.session, self.path = session, output_dir / f"{time.time():.0f}-TP-0.trace.json.gz"
        return str(self.path)

    def stop(self) -> str:
        with self._lock:
            if self.session is None:
                raise InvalidRequestError(
                    "Profiling is not in progress. Call /start_profile first."
                )
            session, path = self.session, self.path
            self.session = self.path = None
        self.engine.loop.call(session.stop)
        session.export_chrome_trace(str(path))
        return str(path)


def _body_fields(body: dict[str, Any], allowed: set[str], endpoint: str) -> dict[str, Any]:
    check_fields(body, allowed, endpoint)
    return body


def slime_router(engine: Engine) -> APIRouter:
    """The routes above for one engine; `build_app` includes it."""
    router = APIRouter()
    checker = WeightChecker(engine)
    profiler = Profiler(engine)

    async def body_of(request: Request, endpoint: str) -> dict[str, Any]:
        return parse_json_object(await request.body(), endpoint)

    async def server_info(request: Request) -> JSONResponse:
        loads = await asyncio.to_thread(engine.get_loads)
        args = getattr(request.app.state, "server_args", None) or ServerArgs()
        return JSONResponse(build_server_info(engine, args, loads))

    router.add_api_route("/server_info", server_info, methods=["GET"])
    router.add_api_route("/get_server_info", server_info, methods=["GET"])

    async def weights_checker(request: Request) -> JSONResponse:
        if request.method == "GET":
            action = request.query_params.get("action", "checksum")
        else:
            body = _body_fields(
                await body_of(request, "weights_checker"),
                {"action", "allow_quant_error"},
                "weights_checker",
            )
            action = body.get("action", "checksum")
        if action not in CHECK_ACTIONS:
            raise InvalidRequestError(
                f"weights_checker: 'action' expected one of {list(CHECK_ACTIONS)}, got {action!r}"
            )
        try:
            message, payload = await asyncio.to_thread(
                engine.loop.call, lambda: checker.handle(action)
            )
        except ValueError as exc:
            return _result(False, str(exc))
        return _result(True, message, **({"ranks": [payload]} if payload else {}))

    router.add_api_route("/weights_checker", weights_checker, methods=["GET", "POST"])

    @router.post("/post_process_weights")
    async def post_process_weights(request: Request) -> JSONResponse:
        body = _body_fields(
            await body_of(request, "post_process_weights"),
            {"restore_weights_before_load", "post_process_quantization"},
            "post_process_weights",
        )
        for key in ("restore_weights_before_load", "post_process_quantization"):
            if not isinstance(body.get(key, False), bool):
                raise InvalidRequestError(f"post_process_weights: '{key}' expected true or false")
        # SGLang's hooks act on quantized weights only; ours are plain tensors loaded in place.
        return _result(True, "no quantized weights: nothing to post-process")

    @router.post("/pull_weights")
    async def pull_weights(request: Request) -> JSONResponse:
        _body_fields(
            await body_of(request, "pull_weights"),
            {"local_checkpoint_dir", "source_dir", "target_version"},
            "pull_weights",
        )
        return _result(
            False,
            "pull_weights: disk-delta weight sync (--update-weight-mode delta) is not supported "
            "by rollout-accel; use distributed (default), tensor or disk updates",
        )

    async def start_profile(request: Request) -> Response:
        raw = await request.body()
        body = parse_json_object(raw, "start_profile") if raw.strip() else {}
        _body_fields(
            body,
            {
                "output_dir",
                "start_step",
                "num_steps",
                "activities",
                "profile_by_stage",
                "with_stack",
                "record_shapes",
                "merge_profiles",
                "profile_prefix",
            },
            "start_profile",
        )
        path = await asyncio.to_thread(profiler.start, body)
        return Response(f"Start profiling. Trace: {path}\n", status_code=200)

    async def stop_profile() -> Response:
        path = await asyncio.to_thread(profiler.stop)
        return Response(f"Stop profiling. Trace written to {path}\n", status_code=200)

    router.add_api_route("/start_profile", start_profile, methods=["GET", "POST"])
    router.add_api_route("/stop_profile", stop_profile, methods=["GET", "POST"])
    return router
