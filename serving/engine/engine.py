"""The engine: SGLang's offline-engine API over the scheduler and runner, on its own thread.

Callers (the HTTP server, the rollout pool, tests) use `generate` / `async_generate` and the
control methods from any thread or event loop; every state change happens on the engine thread,
between steps (`EngineLoop`). Outputs are SGLang-shaped dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from rollout_accel.serving.engine.config import EngineConfig
from rollout_accel.serving.engine.cuda_graphs import emulated as emulated_graphs
from rollout_accel.serving.engine.detokenizer import DetokenizerState, advance
from rollout_accel.serving.engine.engine_loop import EngineLoop
from rollout_accel.serving.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    RequestNotFoundError,
)
from rollout_accel.serving.engine.kv_pool import RequestTable, SlotAllocator
from rollout_accel.serving.engine.model_runner import MEMORY_TAGS, ModelRunner
from rollout_accel.serving.engine.output import build_output
from rollout_accel.serving.engine.radix_cache import RadixCache
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.engine.request_factory import RequestFactory
from rollout_accel.serving.engine.schedule_policy import make_policy
from rollout_accel.serving.engine.scheduler import Scheduler, SchedulerLimits
from rollout_accel.serving.engine.stop_rules import StopRules
from rollout_accel.serving.engine.weight_sync import DistributedWeightReceiver
from rollout_accel.serving.engine.weights import WeightUpdater
from rollout_accel.serving.models.loader import load_model
from rollout_accel.serving.models.paged_kv import PagedKVCache
from rollout_accel.serving.spec.config import spec_config_from
from rollout_accel.serving.spec.state import attach_spec

log = logging.getLogger(__name__)
Sink = Callable[[dict[str, Any], bool], None]
_CPU_DEFAULT_SLOTS = 131_072


def _current_device(device: torch.device) -> Any:
    """`torch.cuda.device(device)` for CUDA devices, else a no-op context."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _raise_on_error(out: dict[str, Any]) -> dict[str, Any]:
    error = out.get("error")
    if error is not None:
        if error.get("code", 400) >= 500:
            raise EngineDeadError(error["message"])
        raise InvalidRequestError(error["message"])
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
        self.table = RequestTable(
            self.config.max_running_requests + 8, self.context_length + 1, self.device
        )
        self.cache = RadixCache(self.allocator.free, enabled=self.config.enable_prefix_caching)
        graphs = self.config.cuda_graph and (
            self.device.type == "cuda" or emulated_graphs(self.device)
        )
        runner_cls: Any = ModelRunner
        if self.config.sm_share:  # prefill/decode SM sharing (serving/smshare)
            from rollout_accel.serving.smshare.concurrent_step import make_runner_factory

            runner_cls = make_runner_factory(self.config)
        if self.config.pp_size > 1:  # pipeline stages (serving/pipeline)
            from rollout_accel.serving.pipeline.runner import PipelineRunner

            self.runner = PipelineRunner.start(self)
        else:
            # Graph capture launches Triton kernels, which run on the thread's current device:
            # an engine on another GPU than the caller's current one must capture on its own.
            with _current_device(self.device):
                self.runner = runner_cls(
                    self.model,
                    self.kv_cache,
                    self.table,
                    self.eos_ids,
                    cuda_graph_max_bs=min(
                        self.config.cuda_graph_max_bs, self.config.max_running_requests
                    )
                    if graphs
                    else 0,
                    prefill_graph_tokens=self.config.prefill_graph_tokens() if graphs else 0,
                )
        self._weight_version = self.config.weight_version
        self.requests = RequestFactory(
            self.tokenizer, cfg.vocab_size, self.context_length, self.config.seed, self.eos_ids
        )
        self.scheduler = Scheduler(
            self.allocator,
            self.table,
            self.cache,
            make_policy(self.config.schedule_policy, self.config),
            SchedulerLimits(
                self.config.max_running_requests,
                self.config.max_prefill_tokens,
                self.context_length,
            ),
            StopRules(self.tokenizer, self.eos_ids, self.context_length),
            self._emit,
        )
        self.kvreuse = self._make_kvreuse()
        self.scheduler.kvreuse = self.runner.kvreuse = self.kvreuse
        self.spec = attach_spec(self, spec_config_from(self.config, self.device.type == "cuda"))
        self.scheduler.spec = self.spec
        self.runner.verify_stride = self.spec.config.num_draft_tokens if self.spec else 0
        if self.config.pp_size > 1:
            self.weights = self.runner.weight_updater(self.cache, cfg, self.set_weight_version)
        else:
            self.weights = WeightUpdater(self.runner, self.cache, cfg, self.set_weight_version)
        self.receiver = DistributedWeightReceiver(self.device)
        overlap = self.config.overlap_schedule
        if overlap is None:
            overlap = self.device.type == "cuda"
        self.loop = EngineLoop(self.scheduler, self.runner, overlap)
        self.loop.start()

    # -- construction helpers ---------------------------------------------------------------
    def _make_kvreuse(self) -> Any:
        """The KV-reuse hook (serving/kvreuse/engine_hook.py), or None when turned off."""
        if not self.config.kv_reuse:
            return None
        from rollout_accel.serving.kvreuse.blend import BlendSettings
        from rollout_accel.serving.kvreuse.engine_hook import KVReuse

        cfg = self.config
        separator = self.tokenizer.encode(cfg.kv_reuse_separator) if cfg.kv_reuse_separator else []
        return KVReuse(
            self.model,
            self.kv_cache,
            self.allocator,
            self.table,
            BlendSettings(cfg.kv_reuse_recompute_ratio, cfg.kv_reuse_check_layer),
            max_chunk_slots=int(self.allocator.capacity * cfg.kv_reuse_max_chunk_fraction),
            separator=separator,
        )

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

    # -- outputs ----------------------------------------------------------------------------
    def _emit(self, req: Request, finished: bool) -> None:
        """Delivers a stream chunk or the final output to the request's sink (engine thread)."""
        if req.sink is None:
            return
        if finished and req.error is not None:
            out: dict[str, Any] = {"error": req.error}
        elif finished:
            out = build_output(req, self.tokenizer, self._weight_version)
            if self.spec is not None:
                out["meta_info"].update(self.spec.meta(req))
        else:
            if req.detok is None:
                req.detok = DetokenizerState()
            text = advance(
                req.detok, req.output_ids, self.tokenizer, req.params.skip_special_tokens
            )
            out = build_output(req, self.tokenizer, self._weight_version, text)
        try:
            req.sink(out, finished)
        except Exception:  # a caller's callback must not take the engine down
            log.exception("a request's sink raised; output dropped for %s", req.rid)

    @property
    def alive(self) -> bool:
        """False once the engine thread died (every call then raises EngineDeadError)."""
        return self.loop.dead is None and not self.loop.closed

    @property
    def memory_released(self) -> bool:
        return bool(self.runner.released & {"weights", "kv_cache"})

    # -- request construction ---------------------------------------------------------------
    def make_requests(self, *args: Any, **kwargs: Any) -> tuple[list[Request], bool]:
        """Validates a (single or batched) generate call; returns its requests and whether the
        call was batched. Raises InvalidRequestError naming the field."""
        requests, batched = self.requests.build(*args, **kwargs)
        if self.config.pp_size > 1:
            for req in requests:
                if req.grammar is not None:
                    raise InvalidRequestError(
                        "sampling_params: structured output is not supported with pp_size > 1"
                    )
                if req.extra_logprobs is not None:
                    raise InvalidRequestError(
                        "top_logprobs_num / token_ids_logprob: not supported with pp_size > 1"
                    )
        return requests, batched

    def submit(self, requests: list[Request], sinks: list[Sink], wait: bool = True) -> None:
        """Queues validated requests; each sink is called on the engine thread with
        (output, finished) — for streaming chunks and once with the final output. A request the
        engine refuses at admission (its rid is already live) gets one final output holding an
        "error" key. With wait=False this returns at once (no thread blocks on the engine)."""
        self.loop.check_alive()
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
            self.loop.call(add)
        else:
            self.loop.post(add)

    # -- generation -------------------------------------------------------------------------
    def _prepare(self, args: dict[str, Any]) -> tuple[list[Request], bool]:
        requests, batched = self.make_requests(**args)
        if args.get("stream") and batched:
            raise InvalidRequestError("stream: supported for a single prompt only")
        return requests, batched

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
        requests, batched = self._prepare(
            dict(
                prompt=prompt,
                sampling_params=sampling_params,
                input_ids=input_ids,
                return_logprob=return_logprob,
                logprob_start_len=logprob_start_len,
                rid=rid,
                stream=stream,
                **kwargs,
            )
        )
        if stream:
            return self._stream_sync(requests[0])
        futures: list[Future[dict[str, Any]]] = [Future() for _ in requests]

        def sink_for(fut: Future[dict[str, Any]]) -> Sink:
            def sink(out: dict[str, Any], finished: bool) -> None:
                if finished and not fut.done():
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
        requests, batched = self._prepare(
            dict(
                prompt=prompt,
                sampling_params=sampling_params,
                input_ids=input_ids,
                return_logprob=return_logprob,
                logprob_start_len=logprob_start_len,
                rid=rid,
                stream=stream,
                **kwargs,
            )
        )
        if stream:
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
            if not finished and self.alive:
                self.loop.post(lambda: self.scheduler.abort(req.rid))

    # -- control ----------------------------------------------------------------------------
    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Aborts one request (RequestNotFoundError if unknown) or all; each waiting caller gets
        what was produced so far with finish_reason abort. Returns how many were aborted."""
        if abort_all:
            return self.loop.call(self.scheduler.abort_all)
        if not rid:
            raise InvalidRequestError("rid: give a rid or abort_all=true")

        def run() -> int:
            if self.scheduler.abort(rid):
                return 1
            # n > 1 requests carry suffixed rids; abort them as a family.
            family = [r for r in list(self.scheduler.by_rid) if r.startswith(f"{rid}-")]
            for member in family:
                self.scheduler.abort(member)
            if not family:
                raise RequestNotFoundError(f"rid: no live request {rid!r}")
            return len(family)

        return self.loop.call(run)

    def pause_generation(self, mode: str = "abort") -> None:
        """SGLang's modes: `abort` ends every request, `retract` frees their KV (they resume by
        recompute), `in_place` only stops scheduling."""
        if mode not in ("abort", "retract", "in_place"):
            raise InvalidRequestError(f"mode: expected abort, retract or in_place, got {mode!r}")

        def run() -> None:
            self.loop.paused = True
            if mode == "abort":
                self.scheduler.abort_all()
            elif mode == "retract":
                self.scheduler.retract_all()

        self.loop.call(run)

    def continue_generation(self) -> None:
        def run() -> None:
            self.loop.paused = False

        self.loop.call(run)

    @property
    def paused(self) -> bool:
        return self.loop.paused

    def flush_cache(self) -> bool:
        return self.loop.call(self.scheduler.flush_cache)

    def get_loads(self) -> dict[str, Any]:
        return self.loop.call(self.scheduler.loads)

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
        return self.loop.call(
            lambda: self.weights.from_tensors(named_tensors, flush_cache, weight_version)
        )

    def update_weights_from_disk(
        self,
        model_path: str,
        weight_version: str | None = None,
        flush_cache: bool = True,
        recapture_cuda_graph: bool = False,
    ) -> tuple[bool, str]:
        return self.loop.call(
            lambda: self.weights.from_disk(
                model_path, flush_cache, weight_version, recapture_cuda_graph
            )
        )

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str | None = None,
    ) -> tuple[bool, str]:
        """Joins the trainer's broadcast group (blocks the caller until every rank has joined or
        the receiver's timeout passes). Runs on the caller's thread: generation continues."""
        return self.receiver.init_group(
            master_address, master_port, rank_offset, world_size, group_name, backend
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

        return self.loop.call(run)

    def destroy_weights_update_group(
        self, group_name: str = "weight_update_group"
    ) -> tuple[bool, str]:
        return self.loop.call(lambda: self.receiver.destroy(group_name))

    def release_memory_occupation(self, tags: list[str] | None = None) -> tuple[bool, str]:
        """SGLang's tags: weights (to host memory), kv_cache (dropped), cuda_graph; all if None.
        Refused while requests are in flight. Scheduling holds until the memory is resumed."""
        tags = list(MEMORY_TAGS) if tags is None else list(tags)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            return False, f"tags: unknown tag {unknown[0]!r}; known: {list(MEMORY_TAGS)}"

        def run() -> tuple[bool, str]:
            if self.scheduler.has_work:
                return False, "requests are in flight; pause or abort them first"
            if "kv_cache" in tags:
                self.cache.flush()
            self.runner.release(tags)
            return True, f"released {tags}"

        return self.loop.call(run)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> tuple[bool, str]:
        """Takes released memory again; CUDA graphs are captured anew once weights and KV are in."""
        tags = list(MEMORY_TAGS) if tags is None else list(tags)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            return False, f"tags: unknown tag {unknown[0]!r}; known: {list(MEMORY_TAGS)}"

        def run() -> tuple[bool, str]:
            self.runner.resume(tags)
            return True, f"resumed {tags}"

        return self.loop.call(run)

    def add_external_corpus(
        self,
        corpus_id: str | None = None,
        documents: list[str] | None = None,
        token_chunks: list[list[int]] | None = None,
        file_path: str | None = None,
    ) -> Any:
        """Registers a drafting corpus (SGLang's `/add_external_corpus`); requests name it in
        `sampling_params.custom_params.spec_corpus_id`. Needs speculative decoding on."""
        if self.spec is None:
            raise InvalidRequestError(
                "speculative decoding is off: start the engine with speculative_algorithm='NGRAM'"
            )
        return self.spec.registry.add(
            corpus_id,
            documents=documents,
            token_chunks=token_chunks,
            file_path=file_path,
            encode=self.tokenizer.encode,
        )

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

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts what is live and stops the engine thread (bounded by `timeout` seconds)."""
        if self.loop.closed:
            return
        if self.alive:
            try:
                self.loop.call(self.scheduler.abort_all, timeout=timeout)
            except Exception:  # a wedged or dead engine still shuts down
                log.warning("abort on shutdown did not complete", exc_info=True)
        self.loop.stop(timeout)
        if not self.loop.thread.is_alive():
            self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
