"""The engine thread: commands between steps, the step pipeline, and what happens when a step fails.

One step is `batch = scheduler.schedule()`, `handle = runner.launch(batch)`,
`scheduler.process(handle)`. With overlap on, step N+1 is launched before step N is processed, so
the host's bookkeeping for N runs while the device computes N+1; without it each step is processed
right after its launch. It is one code path either way: overlap only changes the order.

Commands (abort, pause, weights, memory, flush...) run on this thread between steps, after the
step in flight has been processed, so they always see a settled state.

Failures: a step that raises is rolled back (its KV slots freed, its requests' counts restored)
and its requests become suspects, scheduled one at a time; a suspect that fails alone is failed
alone (error output, KV freed) and everything else keeps running. An error the engine cannot
contain (a CUDA fault, a failure while recovering) kills the engine: every pending and future
caller gets the error at once instead of waiting forever.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rollout_accel.serving.engine.batch import Batch, CompletedStep, StepHandle
from rollout_accel.serving.engine.errors import EngineClosedError, EngineDeadError
from rollout_accel.serving.engine.model_runner import ModelRunner
from rollout_accel.serving.engine.scheduler import Scheduler

log = logging.getLogger(__name__)
T = TypeVar("T")

_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
_FATAL_MARKERS = ("CUDA error", "CUDA-capable", "cudaError", "NCCL error", "illegal memory access")


def is_fatal(exc: BaseException) -> bool:
    """Errors after which the device state cannot be trusted (sticky CUDA faults)."""
    if _ACCELERATOR_ERROR is not None and isinstance(exc, _ACCELERATOR_ERROR):
        return True
    text = str(exc)
    return isinstance(exc, MemoryError) or any(marker in text for marker in _FATAL_MARKERS)


@dataclass(slots=True)
class LoopTiming:
    """Where the engine thread's time goes: host work per stage, and time blocked waiting for a
    step's results (GPU-bound when waiting dominates, host-bound when it is near zero)."""

    steps: int = 0
    schedule_s: float = 0.0
    launch_s: float = 0.0
    process_s: float = 0.0
    wait_s: float = 0.0

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {
            "schedule": 1e3 * self.schedule_s / n,
            "launch": 1e3 * self.launch_s / n,
            "process": 1e3 * self.process_s / n,
            "wait": 1e3 * self.wait_s / n,
        }


class EngineLoop:
    """Runs the scheduler and the runner on a dedicated thread."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, overlap: bool) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.overlap = overlap
        self.paused = False
        self.closed = False
        self.dead: BaseException | None = None
        self._inflight: StepHandle | None = None
        self._last_launch: tuple[float, bool] | None = None  # (start, drafting) of the last step
        self._idled = False  # the loop waited for work since that step
        self.timing = LoopTiming()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future[Any] | None]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="rollout-accel-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- commands -------------------------------------------------------------------------------
    def check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine failed and stopped: {self.dead}")
        if self.closed:
            raise EngineClosedError("the engine was shut down")

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Runs `fn` on the engine thread between steps and returns its result."""
        self.check_alive()
        if threading.current_thread() is self.thread:
            return fn()
        future: Future[T] = Future()
        self._commands.put((fn, future))
        return future.result(timeout)

    def post(self, fn: Callable[[], Any]) -> None:
        """Queues `fn` for the engine thread without waiting."""
        self.check_alive()
        self._commands.put((fn, None))

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        self._settle()  # commands see a settled state: no step left in flight
        while True:
            fn, future = command
            try:
                result = fn()
            except BaseException as exc:  # the caller gets it; the engine keeps going
                if future is None:
                    log.exception("engine command failed")
                else:
                    future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    # -- the loop -------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Scheduling is held: paused, or weights/KV released."""
        return self.paused or bool(self.runner.released & {"weights", "kv_cache"})

    def _run(self) -> None:
        device = getattr(self.runner, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            # The current device is per thread, and Triton launches on it: this thread must be
            # on the engine's GPU whatever the creating thread's current device is.
            torch.cuda.set_device(device)
        try:
            while not self.closed:
                has_work = self.scheduler.has_work or self._inflight is not None
                self._idled |= self.held or not has_work
                self._run_commands(block=self.held or not has_work)
                if self.closed:
                    break
                if self.held:
                    self._settle()
                    continue
                if not (self.scheduler.has_work or self._inflight is not None):
                    continue
                if not self._step():
                    # Work exists but none can run (e.g. waiting for KV): wait for a command.
                    self._idled = True
                    self._run_commands(block=True)
        except BaseException as exc:  # anything escaping recovery: fail loudly, never hang
            self._die(exc)
        finally:
            if self.dead is None:
                self._fail_commands(EngineClosedError("the engine was shut down"))

    def _step(self) -> bool:
        """One turn of the pipeline; False when nothing could be scheduled or processed."""
        batch: Batch | None = None
        suspect = self.scheduler.suspects[0] if self.scheduler.suspects else None
        timing = self.timing
        try:
            t0 = time.perf_counter()
            batch = self.scheduler.schedule(in_flight=self._inflight is not None)
            t1 = time.perf_counter()
            timing.schedule_s += t1 - t0
            if batch is None:
                if self._inflight is None:
                    return False
                self._settle()
                return True
            handle = self.runner.launch(batch)
            timing.launch_s += time.perf_counter() - t1
            timing.steps += 1
            self._note_period(t0, batch)
        except Exception as exc:
            self._recover(exc, batch, suspect)
            return True
        previous, self._inflight = self._inflight, None
        if previous is not None:
            self._process(previous)
        solo = suspect is not None and [it.request for it in batch.items] == [suspect]
        # A verify step (serving/spec) synchronises, so its results are on the host already:
        # keeping it "in flight" would only hide its rows from the next schedule, which would
        # then run the undrafted rest alone (an extra small step after every verify step).
        # (CPU steps are complete too, but they overlap: that exercises the GPU's pipeline.)
        overlappable = not (isinstance(handle, CompletedStep) and batch.items[-1].draft)
        if self.overlap and overlappable and not solo and not self.scheduler.suspects:
            self._inflight = handle
        else:
            self._process(handle)
            if solo and self.scheduler.suspects and self.scheduler.suspects[0] is suspect:
                self.scheduler.suspects.pop(0)  # it ran alone without failing
        return True

    def _note_period(self, start: float, batch: Batch) -> None:
        """Launch-to-next-launch periods by step kind, for speculative decoding's cost model
        (serving/spec/step_costs); periods that include idle waiting are dropped."""
        spec = self.scheduler.spec
        if spec is None or not spec.active:
            self._last_launch = None
            return
        last, self._last_launch = self._last_launch, (start, bool(batch.items[-1].draft))
        if last is not None and not self._idled:
            spec.proposer.costs.observe(last[1], start - last[0])
        self._idled = False

    def _settle(self) -> None:
        handle, self._inflight = self._inflight, None
        if handle is not None:
            self._process(handle)

    def _process(self, handle: StepHandle) -> None:
        timing = self.timing
        t0 = time.perf_counter()
        try:
            handle.wait()  # results on the host (the scheduler's wait() is then immediate)
            t1 = time.perf_counter()
            timing.wait_s += t1 - t0
            self.scheduler.process(handle)
        except Exception as exc:
            raise _Unrecoverable(exc) from exc
        timing.process_s += time.perf_counter() - t1

    def _recover(self, exc: Exception, batch: Batch | None, suspect: Any) -> None:
        """A schedule or launch failed: roll the batch back, settle the step in flight, then fail
        the request alone (if it ran alone) or isolate the batch's requests as suspects."""
        if is_fatal(exc) or isinstance(exc, _Unrecoverable):
            raise _Unrecoverable(exc) from exc
        log.warning("engine step failed (%s); isolating its requests", exc)
        scheduler = self.scheduler
        try:
            if batch is not None:
                scheduler.rollback(batch)
            self._settle()
            if suspect is not None and scheduler.suspects and scheduler.suspects[0] is suspect:
                scheduler.suspects.pop(0)
                scheduler.fail(suspect, exc)
                scheduler.release_finished()
                return
            involved = (
                [it.request for it in batch.items] if batch is not None else list(scheduler.waiting)
            )
            for req in involved:
                if not req.finished and req not in scheduler.suspects:
                    scheduler.suspects.append(req)
        except _Unrecoverable:
            raise
        except Exception as inner:
            raise _Unrecoverable(inner) from exc

    # -- death and shutdown ---------------------------------------------------------------------
    def _die(self, exc: BaseException) -> None:
        cause = exc.__cause__ if isinstance(exc, _Unrecoverable) and exc.__cause__ else exc
        self.dead = cause
        log.error("engine thread failed; failing every request", exc_info=cause)
        message = f"the engine failed and stopped: {cause}"
        scheduler = self.scheduler
        for req in list(scheduler.by_rid.values()):
            req.error = {"message": message, "code": 500}
            req.status = req.status.FINISHED
            if req.sink is not None:
                try:
                    req.sink({"error": req.error}, True)
                except Exception:
                    log.exception("sink failed while failing a request")
        scheduler.by_rid.clear()
        scheduler.waiting.clear()
        scheduler.running.clear()
        self._fail_commands(EngineDeadError(message))

    def _fail_commands(self, exc: BaseException) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.done():
                future.set_exception(exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread after the current step (bounded wait)."""
        self.closed = True
        self._commands.put((lambda: None, None))
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=timeout)


class _Unrecoverable(RuntimeError):
    """Raised inside the loop when a failure cannot be contained; the loop then dies."""
