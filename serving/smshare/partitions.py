"""Disjoint SM partitions of one GPU (green contexts), created once at start-up.

A preset is one (prefill SMs, decode SMs) split of the whole GPU made by ONE
`cuDevSmResourceSplitByCount` call: the split's group becomes the prefill partition and its
remainder the decode partition, so the two never share an SM (two separate green contexts made
from the full device overlap: both start at SM 0). Each partition has a green context and a
stream in it, wrapped as `torch.cuda.ExternalStream`; kernels queued on that stream run only on
the partition's SMs. Creating a green context costs milliseconds, switching streams microseconds:
all presets are made at start-up and switching means choosing streams.

Where green contexts are missing (CPU, compute capability < 9.0, CUDA driver < 12.4,
cuda-bindings not importable, a failing driver call) `open_partitions` returns None and the reason,
logged once; callers then run as if SM sharing were off. `PartitionSet.close()` destroys every
stream and context it made (and is idempotent); `live_handles()` counts what is still alive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_DRIVER_VERSION = 12040  # CUDA 12.4: first driver with green contexts
MIN_CAPABILITY = (9, 0)
# Decode partition sizes tried by default (SMs). On a 132-SM Hopper these give the splits
# 120/12, 112/20, 104/28, 96/36 and 88/44 (the driver rounds a group to its granularity, 8).
DEFAULT_DECODE_SMS: tuple[int, ...] = (12, 20, 28, 36, 44)
# How a preset's two SM sets are cut from the device:
#   "split": ONE split of (total - decode) SMs; its group is prefill, the remainder decode.
#   "units": the device split into groups of UNIT_SMS; decode takes whole groups (decode_sms
#            rounded down to units, at least one), prefill the other groups and the remainder.
#            Every decode SM then belongs to a driver-made group (co-schedulable, as clusters need).
#   "units-strict": as "units", but the remainder is left idle: every SM of both sides is in a group.
LAYOUTS = ("split", "units", "units-strict")
DEFAULT_LAYOUT = "units"
UNIT_SMS = 8  # Hopper's SM-group granularity

_LIVE = {"contexts": 0, "streams": 0}
_logged: set[str] = set()


class GreenContextError(RuntimeError):
    """A driver call for green contexts failed; the message names the call and the error."""


def _driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-bindings >= 12.6
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]  # older cuda-python layout
    return driver


def _error_name(driver: Any, err: Any) -> str:
    try:
        code, name = driver.cuGetErrorName(err)
        if code == driver.CUresult.CUDA_SUCCESS and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is best effort; the code below still identifies the error
        pass
    return repr(err)


def _call(driver: Any, name: str, *args: Any) -> Any:
    """Calls `driver.<name>(*args)`; raises GreenContextError naming the call and the error.

    cuda-bindings returns (CUresult, *outputs): returns None, the one output, or the tuple."""
    out = getattr(driver, name)(*args)
    err, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    if err != driver.CUresult.CUDA_SUCCESS:
        raise GreenContextError(f"{name} failed: {_error_name(driver, err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def unsupported_reason(device: torch.device) -> str | None:
    """Why green-context partitions cannot be made on `device`, or None when they can."""
    if device.type != "cuda":
        return f"device is {device.type}, not cuda"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 9.0"
    try:
        driver = _driver()
    except ImportError:
        return "cuda-bindings is not installed (pip install cuda-bindings)"
    if not hasattr(driver, "cuGreenCtxCreate"):
        return "this cuda-bindings has no green-context API"
    try:
        _call(driver, "cuInit", 0)
        version = int(_call(driver, "cuDriverGetVersion"))
    except GreenContextError as exc:
        return str(exc)
    if version < MIN_DRIVER_VERSION:
        return f"CUDA driver {version // 1000}.{version % 1000 // 10} < 12.4"
    return None


@dataclass(eq=False)
class Partition:
    """One green context with one stream; `sms` is what the driver actually gave.

    `_done` is an event created (driver API) IN this green context: `record_done` marks the end
    of the work queued so far on the stream and `block(stream)` makes another stream wait for it.
    Why not a torch event: cuEventRecord requires the event and the stream to belong to the
    same context, and torch creates its events (its own, the caching allocators' pools) in the
    primary context; waiting on an event of another context is allowed (cuStreamWaitEvent)."""

    sms: int
    stream: torch.cuda.ExternalStream
    _context: Any
    _raw_stream: Any
    _done: Any = None

    def record_done(self) -> None:
        """Marks the end of what is queued on this partition's stream so far."""
        driver = _driver()
        _call(driver, "cuEventRecord", self._done, self._raw_stream)

    def block(self, stream: torch.cuda.Stream) -> None:
        """`stream`'s later work waits for this partition's work up to `record_done`."""
        driver = _driver()
        _call(driver, "cuStreamWaitEvent", driver.CUstream(stream.cuda_stream), self._done, 0)


@dataclass(eq=False)
class Preset:
    """A disjoint (prefill, decode) pair made by one split; `index` orders presets by decode SMs."""

    index: int
    prefill: Partition
    decode: Partition

    @property
    def name(self) -> str:
        return f"{self.prefill.sms}/{self.decode.sms}"


class PartitionSet:
    """The preset splits of one device; owns their contexts and streams until `close()`."""

    def __init__(self, device: torch.device, total_sms: int, presets: list[Preset]) -> None:
        self.device = device
        self.total_sms = total_sms
        self.presets = presets
        self.closed = False
        self.skipped: list[str] = []  # splits the driver refused (the others are usable)

    @classmethod
    def create(
        cls,
        device: torch.device,
        decode_sms: Sequence[int] = DEFAULT_DECODE_SMS,
        layout: str | None = None,
    ) -> PartitionSet:
        """Makes one preset per requested decode size (duplicates after rounding dropped; a
        size the driver cannot split is noted in `skipped`), cut as `layout` says (LAYOUTS).
        Raises GreenContextError (after destroying what it made) when creating a context or
        stream fails."""
        layout = layout or DEFAULT_LAYOUT
        if layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
        driver = _driver()
        _call(driver, "cuInit", 0)
        torch.cuda.init()
        torch.cuda.synchronize(device)  # the primary context is current and active
        dev = _call(driver, "cuDeviceGet", device.index or 0)
        sm_type = driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        whole = _call(driver, "cuDeviceGetDevResource", dev, sm_type)
        total = int(whole.sm.smCount)
        made = cls(device, total, [])
        seen: set[tuple[int, int]] = set()
        units = _split_units(driver, whole) if layout.startswith("units") else None
        try:
            for want in sorted(set(decode_sms)):
                if not 0 < want < total:
                    made.skipped.append(f"decode_sms={want}: not in (0, {total})")
                    continue
                try:
                    if units is None:
                        prefill_res, decode_res = _split_once(driver, whole, total, want)
                    else:
                        prefill_res, decode_res = _take_units(units, want, layout == "units")
                except GreenContextError as exc:  # this split only: the others may still work
                    made.skipped.append(str(exc))
                    continue
                pair = (_sm_count(prefill_res), _sm_count(decode_res))
                if pair[0] < 1 or pair[1] < 1 or pair in seen:
                    continue  # rounding left one side nothing, or repeats an earlier preset
                seen.add(pair)
                prefill = _make_partition(driver, dev, device, prefill_res)
                try:
                    decode = _make_partition(driver, dev, device, decode_res)
                except BaseException:
                    _destroy_partition(driver, prefill)
                    raise
                made.presets.append(Preset(len(made.presets), prefill, decode))
        except BaseException:
            made.close()
            raise
        made.presets.sort(key=lambda p: p.decode.sms)
        for index, preset in enumerate(made.presets):
            preset.index = index
        return made

    def close(self) -> None:
        """Destroys every stream and green context (after the device finished their work)."""
        if self.closed:
            return
        self.closed = True
        driver = _driver()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # cached blocks of these streams go before the streams do
        errors: list[str] = []
        for preset in self.presets:
            for part in (preset.prefill, preset.decode):
                try:
                    _destroy_partition(driver, part)
                except GreenContextError as exc:  # keep destroying the rest
                    errors.append(str(exc))
        self.presets = []
        if errors:
            raise GreenContextError("; ".join(errors))

    def describe(self) -> list[str]:
        return [p.name for p in self.presets]


def live_handles() -> dict[str, int]:
    """Green contexts and streams made here and not destroyed yet (a leak check)."""
    return dict(_LIVE)


def _sm_count(resources: list[Any]) -> int:
    return sum(int(r.sm.smCount) for r in resources)


def _split_once(driver: Any, whole: Any, total: int, want: int) -> tuple[list[Any], list[Any]]:
    """Layout "split": (prefill, decode) resources of one split of `total - want` SMs."""
    result, groups, remainder = _call(
        driver, "cuDevSmResourceSplitByCount", 1, whole, 0, total - want
    )
    if int(groups) < 1:
        raise GreenContextError(f"{total - want}/{want}: the driver made no group")
    return [result[0]], [remainder]


def _split_units(driver: Any, whole: Any) -> tuple[list[Any], Any]:
    """Layout "units": the device as groups of UNIT_SMS SMs, and what is left over."""
    total = int(whole.sm.smCount)
    result, groups, remainder = _call(
        driver, "cuDevSmResourceSplitByCount", total // UNIT_SMS, whole, 0, UNIT_SMS
    )
    made = [result[i] for i in range(int(groups))]
    if len(made) < 2:
        raise GreenContextError(f"cuDevSmResourceSplitByCount made {len(made)} unit groups")
    return made, remainder


def _take_units(
    units: tuple[list[Any], Any], want: int, with_remainder: bool
) -> tuple[list[Any], list[Any]]:
    """Layouts "units*": decode takes whole groups (`want` rounded down, at least one), prefill
    the other groups and, `with_remainder`, the remainder (it has no co-scheduling guarantee)."""
    groups, remainder = units
    size = int(groups[0].sm.smCount)
    count = max(1, want // size)
    if count >= len(groups):
        raise GreenContextError(f"decode_sms={want}: leaves no unit group for prefill")
    has_rest = with_remainder and remainder is not None and int(remainder.sm.smCount) > 0
    rest = [remainder] if has_rest else []
    return groups[count:] + rest, groups[:count]


def _make_partition(driver: Any, dev: Any, device: torch.device, resources: list[Any]) -> Partition:
    desc = _call(driver, "cuDevResourceGenerateDesc", resources, len(resources))
    flags = int(driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
    context = _call(driver, "cuGreenCtxCreate", desc, dev, flags)
    _LIVE["contexts"] += 1
    try:
        non_blocking = int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
        raw = _call(driver, "cuGreenCtxStreamCreate", context, non_blocking, 0)
    except BaseException:
        _call(driver, "cuGreenCtxDestroy", context)
        _LIVE["contexts"] -= 1
        raise
    _LIVE["streams"] += 1
    stream = torch.cuda.ExternalStream(int(raw), device=device)
    part = Partition(_sm_count(resources), stream, context, raw)
    try:
        part._done = _green_event(driver, context)
    except BaseException:
        _destroy_partition(driver, part)
        raise
    return part


def _green_event(driver: Any, context: Any) -> Any:
    """An event (no timing) created while the green context is current: it belongs to it."""
    ctx = _call(driver, "cuCtxFromGreenCtx", context)
    _call(driver, "cuCtxPushCurrent", ctx)
    try:
        flags = int(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        return _call(driver, "cuEventCreate", flags)
    finally:
        _call(driver, "cuCtxPopCurrent")


def _destroy_partition(driver: Any, part: Partition) -> None:
    if part._done is not None:
        event, part._done = part._done, None
        _call(driver, "cuEventDestroy", event)
    if part._raw_stream is not None:
        raw, part._raw_stream = part._raw_stream, None
        _call(driver, "cuStreamDestroy", raw)
        _LIVE["streams"] -= 1
    if part._context is not None:
        context, part._context = part._context, None
        _call(driver, "cuGreenCtxDestroy", context)
        _LIVE["contexts"] -= 1


def log_once(message: str) -> None:
    """Logs `message` (a warning: SM sharing was asked for) the first time it is seen."""
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def open_partitions(
    device: torch.device,
    decode_sms: Sequence[int] = DEFAULT_DECODE_SMS,
    layout: str | None = None,
) -> tuple[PartitionSet | None, str]:
    """The preset partitions of `device`, or (None, why not) — logged once; never raises."""
    reason = unsupported_reason(device)
    if reason is None:
        try:
            partitions = PartitionSet.create(device, decode_sms, layout)
        except Exception as exc:  # any creation failure: run as today
            reason = f"green-context creation failed: {exc}"
        else:
            if partitions.presets:
                if partitions.skipped:
                    log_once(f"SM sharing: splits refused by the driver: {partitions.skipped}")
                return partitions, "ok"
            skipped = "; ".join(partitions.skipped)
            partitions.close()
            reason = f"the driver made no usable split ({skipped or 'all rounded away'})"
    log_once(f"SM sharing unavailable ({reason}); prefill and decode time-share the GPU")
    return None, reason
