"""The engine: SGLang's offline-engine API over our scheduler, running on its own thread.

Callers (the HTTP server, the rollout pool, tests) use `generate` / `async_generate` and the
control methods from any thread or event loop; every state change happens on the engine thread,
between forward steps, through a command queue. Outputs are SGLang-shaped dicts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import random
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from rollout_accel.serving.engine.config import EngineConfig
from rollout_accel.serving.engine.errors import (
    EngineClosedError,
    InvalidRequestError,
    RequestNotFoundError,
)
from rollout_accel.serving.engine.kv_pool import RequestTable, SlotAllocator
from rollout_accel.serving.engine.model_runner import ModelRunner
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.engine.sampling_params import SamplingParams
from rollout_accel.serving.engine.schedule_policy import make_policy
from rollout_accel.serving.engine.scheduler import Scheduler, SchedulerLimits
from rollout_accel.serving.engine.slo_policy import check_schedule_fields
from rollout_accel.serving.engine.weight_sync import DistributedWeightReceiver
from rollout_accel.serving.engine.weights import WeightUpdater
from rollout_accel.serving.models.loader import load_model
from rollout_accel.serving.models.paged_kv import PagedKVCache

log = logging.getLogger(__name__)
T = TypeVar("T")
Sink = Callable[[dict[str, Any], bool], None]
_CPU_DEFAULT_SLOTS = 131_072


def _raise_on_error(out: dict[str, Any]) -> dict[str, Any]:
    if "error" in out:
        raise InvalidRequestError(out["error"]["message"])
    return out


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    """An in-process inference engine with SGLang's Python API.

    `Engine(model_path="tiny-qwen3", max_running_requests=64, ...)`; keyword arguments are
    EngineConfig fields. Thread-safe; call `shutdown()` (or use it as a context manager) when done.
    """

    def __init__(self, model_path: str | None = None, **engine_args: Any) -> None:
        if model_path is not None:
            engine_args["model_path"] = model_path
        self.config = EngineConfig.from_kwargs(**engine_args)
        self.device = _pick_device(self.config.device)
        loaded = load_model(
            self.config.model_path,
            dtype=self.config.dtype,
            device=self.device,
            seed=self.config.seed,
        )
        self.model, self.tokenizer, self.model_config = (
            loaded.model,
            loaded.tokenizer,
            loaded.config,
        )
        self.dtype = next(self.model.parameters()).dtype
        if self.device.type == "cuda":
            self.model.fuse_projections()
        cfg = self.model_config
        self.context_length = self.config.context_length or cfg.max_position_embeddings
        self.eos_ids = tuple(cfg.eos_token_ids)
        num_slots = (self.config.max_total_tokens or self._default_slots()) + 1
        self.kv_cache = PagedKVCache(
            cfg.num_hidden_layers,
            num_slots,
            cfg.num_key_value_heads,
            cfg.head_dim,
            self.dtype,
            self.device,
        )
        self.allocator = SlotAllocator(num_slots)
        rows = self.config.max_running_requests + 8
        self.table = RequestTable(rows, self.context_length + 1, self.device)
        self.cache = RadixCache(self.allocator.free, enabled=self.config.enable_prefix_caching)
        self.runner = self._make_runner()
        self._weight_version = self.config.weight_version
        self.scheduler = Scheduler(
            self.runner,
            self.allocator,
            self.table,
            self.cache,
            make_policy(self.config.schedule_policy, self.config),
            self.tokenizer,
            SchedulerLimits(
                self.config.max_running_requests,
                self.config.max_prefill_tokens,
                self.context_length,
            ),
            self.eos_ids,
            lambda: self._weight_version,
            overlap=self.config.overlap_schedule,
        )
        self.weights = WeightUpdater(self)
        self.receiver = DistributedWeightReceiver(self.device)
        self._rng = random.Random(self.config.seed)
        self._rid_counter = itertools.count()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._paused = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rollout-accel-engine", daemon=True)
        self._thread.start()

    # -- construction helpers ---------------------------------------------------------------
    def _default_slots(self) -> int:
        cfg = self.model_config
        if self.device.type != "cuda":
            return _CPU_DEFAULT_SLOTS
        torch.cuda.synchronize(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        per_slot = (
            2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * self.dtype.itemsize
        )
        # Leave room for activations, logits of a full batch and CUDA graphs.
        reserve = 4 * 2**30
        budget = max(int(free * self.config.mem_fraction_static) - reserve, per_slot * 4096)
        return int(budget // per_slot)

    def _make_runner(self) -> ModelRunner:
        if self.device.type == "cuda" and self.config.cuda_graph:
            try:
                from rollout_accel.serving.engine.cuda_graph_runner import CudaGraphModelRunner
            except ImportError:  # pragma: no cover - the GPU runner is optional
                pass
            else:
                return CudaGraphModelRunner(
                    self.model,
                    self.kv_cache,
                    self.table,
                    self.eos_ids,
                    self.config.cuda_graph_max_bs,
                )
        return ModelRunner(self.model, self.kv_cache, self.table, self.eos_ids)

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            idle = self._paused or not self.scheduler.has_work
            self._drain_commands(block=idle)
            if self._paused and self.scheduler.overlapping:
                self.scheduler.drain()
            if self._closed or self._paused or not self.scheduler.has_work:
                continue
            try:
                self.scheduler.step()
            except Exception as exc:  # keep serving: fail what was in flight, not the engine
                log.exception("engine step failed; aborting in-flight requests")
                self.scheduler._pending = None
                for req in list(self.scheduler.by_rid.values()):
                    self.scheduler._finish(
                        req, {"type": "abort", "message": f"engine error: {exc}"}
                    )
                self.scheduler._release_finished()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        # Commands see a settled state: no decode step left queued on the GPU.
        self.scheduler.drain()
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the engine thread between steps and returns its result."""
        if self._closed:
            raise EngineClosedError("the engine was shut down")
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._commands.put(run)
        return future.result()

    # -- request construction ---------------------------------------------------------------
    def _new_rid(self) -> str:
        return uuid.uuid4().hex

    def make_requests(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        rid: str | list[str] | None = None,
        stream: bool = False,
        return_text_in_logprobs: bool = False,
        priority: int | None = None,
        ttft_slo_ms: float | None = None,
    ) -> tuple[list[Request], bool]:
        """Validates a (single or batched) generate call; returns its requests and whether the
        call was batched. Raises InvalidRequestError naming the field."""
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("exactly one of text/prompt and input_ids must be given")
        if prompt is not None:
            if isinstance(prompt, str):
                batched, texts = False, [prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                batched, texts = True, prompt
            else:
                raise InvalidRequestError("text: expected a string or a non-empty list of strings")
            id_lists = [self.tokenizer.encode(t) for t in texts]
        else:
            if not isinstance(input_ids, list) or not input_ids:
                raise InvalidRequestError("input_ids: expected a non-empty list of token ids")
            batched = isinstance(input_ids[0], list)
            id_lists = input_ids if batched else [input_ids]  # type: ignore[list-item]
        count = len(id_lists)
        params_list = self._per_item(sampling_params, count, "sampling_params")
        logprob_list = self._per_item(return_logprob, count, "return_logprob")
        start_list = self._per_item(logprob_start_len, count, "logprob_start_len")
        rids = self._per_item(rid, count, "rid") if isinstance(rid, list) else [rid] * count
        if not isinstance(rid, list) and rid is not None and count > 1:
            raise InvalidRequestError("rid: a batched request needs a list of rids")
        priority, ttft_slo_ms = check_schedule_fields(priority, ttft_slo_ms)
        requests: list[Request] = []
        for index, ids in enumerate(id_lists):
            self._check_ids(ids, f"input_ids[{index}]" if batched else "input_ids")
            params = SamplingParams.from_dict(params_list[index], self.model_config.vocab_size)
            if not isinstance(logprob_list[index], bool):
                raise InvalidRequestError("return_logprob: expected true or false")
            start = start_list[index]
            if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
                raise InvalidRequestError("logprob_start_len: expected an integer")
            for sample in range(params.n):
                base_rid = rids[index]
                this_rid = base_rid if base_rid is not None else self._new_rid()
                if params.n > 1:
                    this_rid = f"{this_rid}-{sample}"
                if not isinstance(this_rid, str) or not this_rid:
                    raise InvalidRequestError("rid: expected a non-empty string")
                seed = params.sampling_seed
                seed = self._rng.getrandbits(62) if seed is None else seed + sample
                requests.append(
                    Request(
                        rid=this_rid,
                        input_ids=list(ids),
                        params=params,
                        seed=seed,
                        return_logprob=logprob_list[index],
                        logprob_start_len=-1 if start is None else start,
                        return_text_in_logprobs=return_text_in_logprobs,
                        stream=stream,
                        priority=priority,
                        ttft_slo_ms=ttft_slo_ms,
                    )
                )
        if len({r.rid for r in requests}) != len(requests):
            raise InvalidRequestError("rid: duplicate rids in one request")
        return requests, batched or len(requests) > 1

    @staticmethod
    def _per_item(value: Any, count: int, name: str) -> list[Any]:
        if isinstance(value, list) and name != "input_ids":
            if len(value) != count:
                raise InvalidRequestError(f"{name}: got {len(value)} entries for {count} prompts")
            return value
        return [value] * count

    def _check_ids(self, ids: Any, field: str) -> None:
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError(f"{field}: expected a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        for tok in ids:
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
                raise InvalidRequestError(
                    f"{field}: token id {tok!r} is outside the vocabulary [0, {vocab})"
                )
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                f"{field}: the prompt has {len(ids)} tokens; the context length is {self.context_length}"
            )

    def submit(self, requests: list[Request], sinks: list[Sink], wait: bool = True) -> None:
        """Queues validated requests; each sink is called on the engine thread with
        (output, finished) — for streaming chunks and once with the final output. A request the
        engine refuses at admission (its rid is already live) gets one final output holding an
        "error" key. With wait=False this returns at once (no thread blocks on the engine)."""
        if self._closed:
            raise EngineClosedError("the engine was shut down")
        for req, sink in zip(requests, sinks, strict=True):
            req.sink = sink

        def add() -> None:
            for req in requests:
                if req.rid in self.scheduler.by_rid:
                    message = f"rid: {req.rid!r} is already running"
                    if req.sink is not None:
                        req.sink({"error": {"message": message, "code": 400}}, True)
                    continue
                self.scheduler.add(req)

        if wait:
            self._call(add)
        else:
            self._commands.put(add)

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        rid: str | list[str] | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Blocking generate; a dict (or a list for batched input / n > 1), or with `stream=True`
        an iterator of cumulative outputs (single prompt)."""
        requests, batched = self.make_requests(
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            rid,
            stream,
            **kwargs,
        )
        if stream:
            if batched:
                raise InvalidRequestError("stream: supported for a single prompt only")
            return self._stream_sync(requests[0])
        futures: list[Future[dict[str, Any]]] = [Future() for _ in requests]

        def sink_for(fut: Future[dict[str, Any]]) -> Sink:
            def sink(out: dict[str, Any], finished: bool) -> None:
                if finished:
                    fut.set_result(out)

            return sink

        self.submit(requests, [sink_for(f) for f in futures])
        outs = [_raise_on_error(f.result()) for f in futures]
        return outs if batched else outs[0]

    def _stream_sync(self, req: Request) -> Iterator[dict[str, Any]]:
        chunks: queue.Queue[tuple[dict[str, Any], bool]] = queue.Queue()
        self.submit([req], [lambda out, fin: chunks.put((out, fin))])
        while True:
            out, finished = chunks.get()
            yield _raise_on_error(out)
            if finished:
                return

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        rid: str | list[str] | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """Like `generate`, awaitable; with `stream=True` returns an async iterator."""
        requests, batched = self.make_requests(
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            rid,
            stream,
            **kwargs,
        )
        if stream:
            if batched:
                raise InvalidRequestError("stream: supported for a single prompt only")
            return self.stream_request(requests[0])
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]

        def sink_for(fut: asyncio.Future[dict[str, Any]]) -> Sink:
            def sink(out: dict[str, Any], finished: bool) -> None:
                if finished:
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))

            return sink

        self.submit(requests, [sink_for(f) for f in futures], wait=False)
        outs = [_raise_on_error(out) for out in await asyncio.gather(*futures)]
        return outs if batched else outs[0]

    async def stream_request(self, req: Request) -> AsyncIterator[dict[str, Any]]:
        """Submits one request and yields its cumulative outputs until it finishes; if the
        consumer stops early, the request is aborted."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[dict[str, Any], bool]] = asyncio.Queue()

        def sink(out: dict[str, Any], finished: bool) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, (out, finished))

        self.submit([req], [sink], wait=False)
        finished = False
        try:
            while not finished:
                out, finished = await chunks.get()
                yield _raise_on_error(out)
        finally:
            if not finished:
                self._commands.put(lambda: self.scheduler.abort(req.rid))

    # -- control ----------------------------------------------------------------------------
    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Aborts one request (RequestNotFoundError if unknown) or all; each waiting caller gets
        what was produced so far with finish_reason abort. Returns how many were aborted."""
        if abort_all:
            return self._call(self.scheduler.abort_all)
        if not rid:
            raise InvalidRequestError("rid: give a rid or abort_all=true")

        def run() -> int:
            found = self.scheduler.abort(rid)
            if not found:
                # n > 1 requests carry suffixed rids; abort them as a family.
                family = [r for r in list(self.scheduler.by_rid) if r.startswith(f"{rid}-")]
                for member in family:
                    self.scheduler.abort(member)
                if not family:
                    raise RequestNotFoundError(f"rid: no live request {rid!r}")
                return len(family)
            return 1

        return self._call(run)

    def pause_generation(self, mode: str = "abort") -> None:
        """SGLang's modes: `abort` ends every request, `retract` frees their KV (they resume by
        recompute), `in_place` only stops scheduling."""
        if mode not in ("abort", "retract", "in_place"):
            raise InvalidRequestError(f"mode: expected abort, retract or in_place, got {mode!r}")

        def run() -> None:
            self._paused = True
            if mode == "abort":
                self.scheduler.abort_all()
            elif mode == "retract":
                self.scheduler.retract_all()

        self._call(run)

    def continue_generation(self) -> None:
        def run() -> None:
            self._paused = False

        self._call(run)

    @property
    def paused(self) -> bool:
        return self._paused

    def flush_cache(self) -> bool:
        return self._call(self.scheduler.flush_cache)

    def get_loads(self) -> dict[str, Any]:
        return self._call(self.scheduler.loads)

    def get_weight_version(self) -> str:
        return self._weight_version

    def set_weight_version(self, version: str) -> None:
        self._weight_version = str(version)

    def update_weights_from_tensor(
        self,
        named_tensors: list[tuple[str, torch.Tensor]],
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> tuple[bool, str]:
        return self._call(
            lambda: self.weights.from_tensors(named_tensors, flush_cache, weight_version)
        )

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None, flush_cache: bool = True
    ) -> tuple[bool, str]:
        return self._call(lambda: self.weights.from_disk(model_path, flush_cache, weight_version))

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str | None = None,
    ) -> tuple[bool, str]:
        """Joins the trainer's broadcast group (blocks until every rank has joined)."""
        return self._call(
            lambda: self.receiver.init_group(
                master_address, master_port, rank_offset, world_size, group_name, backend
            )
        )

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> tuple[bool, str]:
        def run() -> tuple[bool, str]:
            try:
                named = self.receiver.receive(names, dtypes, shapes, group_name)
            except ValueError as exc:
                return False, str(exc)
            return self.weights.from_tensors(named, flush_cache, weight_version)

        return self._call(run)

    def destroy_weights_update_group(
        self, group_name: str = "weight_update_group"
    ) -> tuple[bool, str]:
        return self._call(lambda: self.receiver.destroy(group_name))

    def release_memory_occupation(self, tags: list[str] | None = None) -> tuple[bool, str]:
        return self._call(lambda: self.weights.release(tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> tuple[bool, str]:
        return self._call(lambda: self.weights.resume(tags))

    def server_info(self) -> dict[str, Any]:
        cfg = self.model_config
        return {
            **self.config.to_dict(),
            "model_path": self.config.model_path,
            "served_model_name": self.config.model_path,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "context_length": self.context_length,
            "max_total_num_tokens": self.allocator.capacity,
            "vocab_size": cfg.vocab_size,
            "architecture": cfg.hf_architecture,
            "num_hidden_layers": cfg.num_hidden_layers,
            "page_size": 1,
            "weight_version": self._weight_version,
            "version": "rollout-accel-0.1.0",
        }

    def run_on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Runs `fn` between steps on the engine thread (for extensions like weight sync)."""
        return self._call(fn)

    def shutdown(self) -> None:
        if self._closed:
            return
        try:
            self._call(self.scheduler.abort_all)
        finally:
            self._closed = True
            self._commands.put(lambda: None)
            self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
