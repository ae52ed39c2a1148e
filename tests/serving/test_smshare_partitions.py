"""`PartitionSet` against a fake CUDA driver (no GPU here): the call sequence and cuda-bindings'
return conventions, rounding and de-duplication of splits, errors named, and cleanup on close and
on failure. The fake stands in only for the driver; on a GPU test_smshare_gpu.py uses the real one.
"""

from __future__ import annotations

import enum
import itertools

import pytest
import torch

from rollout_accel.serving.smshare import partitions as parts


class _Result(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION = 914


class _Sm:
    def __init__(self, count: int) -> None:
        self.smCount = count


class _Resource:
    """An SM resource: which SMs (ids) it holds, and whether a split made it as a group."""

    def __init__(self, ids: range | list[int], grouped: bool = False) -> None:
        self.ids = list(ids)
        self.grouped = grouped
        self.sm = _Sm(len(self.ids))


class _Stream:
    _ids = itertools.count(0x1000)

    def __init__(self) -> None:
        self.handle = next(self._ids)

    def __int__(self) -> int:
        return self.handle


class FakeDriver:
    """cuda-bindings' shape: every call returns (CUresult, *outputs); split groups round up to
    8 SMs; a context remembers the SM ids of its descriptor."""

    CUresult = _Result

    class CUdevResourceType(enum.IntEnum):
        CU_DEV_RESOURCE_TYPE_SM = 1

    class CUgreenCtxCreate_flags(enum.IntEnum):
        CU_GREEN_CTX_DEFAULT_STREAM = 1

    class CUstream_flags(enum.IntEnum):
        CU_STREAM_NON_BLOCKING = 1

    class CUevent_flags(enum.IntEnum):
        CU_EVENT_DISABLE_TIMING = 2

    CUstream = int

    def __init__(self, total: int = 132, fail_stream_at: int | None = None) -> None:
        self.total = total
        self.fail_stream_at = fail_stream_at
        self.contexts: set[int] = set()
        self.context_sms: dict[int, list[int]] = {}
        self.context_grouped: dict[int, bool] = {}
        self.streams: set[int] = set()
        self.made_streams = 0
        self._ctx_ids = itertools.count(1)
        self.current: list[int] = []  # the context stack (green contexts pushed as -id)
        self.events: dict[int, int] = {}  # event -> the context it was created in
        self.recorded: list[tuple[int, int]] = []
        self._event_ids = itertools.count(0x9000)

    def cuInit(self, flags: int):
        return (_Result.CUDA_SUCCESS,)

    def cuGetErrorName(self, err):
        return (_Result.CUDA_SUCCESS, _Result(err).name.encode())

    def cuDeviceGet(self, ordinal: int):
        return (_Result.CUDA_SUCCESS, ordinal)

    def cuDeviceGetDevResource(self, dev, kind):
        assert kind == self.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        return (_Result.CUDA_SUCCESS, _Resource(range(self.total)))

    def cuDevSmResourceSplitByCount(self, groups, resource, flags, min_count):
        assert groups >= 1 and flags == 0
        size = -(-min_count // 8) * 8
        made = min(groups, resource.sm.smCount // size)
        if made < 1 or (groups == 1 and size >= resource.sm.smCount):
            return (_Result.CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION, [], 0, None)
        ids = resource.ids
        result = [_Resource(ids[i * size : (i + 1) * size], grouped=True) for i in range(made)]
        return (_Result.CUDA_SUCCESS, result, made, _Resource(ids[made * size :]))

    def cuDevResourceGenerateDesc(self, resources, count):
        assert count == len(resources) >= 1
        ids = [i for r in resources for i in r.ids]
        assert len(ids) == len(set(ids)), "a descriptor's resources must not overlap"
        return (_Result.CUDA_SUCCESS, ("desc", ids, all(r.grouped for r in resources)))

    def cuGreenCtxCreate(self, desc, dev, flags):
        assert flags == 1
        ctx = next(self._ctx_ids)
        self.contexts.add(ctx)
        self.context_sms[ctx] = desc[1]
        self.context_grouped[ctx] = desc[2]
        return (_Result.CUDA_SUCCESS, ctx)

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        assert ctx in self.contexts and flags == 1
        if self.made_streams == self.fail_stream_at:
            return (_Result.CUDA_ERROR_INVALID_VALUE, None)
        self.made_streams += 1
        stream = _Stream()
        self.streams.add(stream.handle)
        return (_Result.CUDA_SUCCESS, stream)

    def cuCtxFromGreenCtx(self, ctx):
        return (_Result.CUDA_SUCCESS, -ctx)

    def cuCtxPushCurrent(self, ctx):
        self.current.append(ctx)
        return (_Result.CUDA_SUCCESS,)

    def cuCtxPopCurrent(self):
        return (_Result.CUDA_SUCCESS, self.current.pop())

    def cuEventCreate(self, flags):
        assert flags == 2 and self.current, "events are made inside a pushed green context"
        event = next(self._event_ids)
        self.events[event] = self.current[-1]
        return (_Result.CUDA_SUCCESS, event)

    def cuEventRecord(self, event, stream):
        self.recorded.append((event, int(stream)))
        return (_Result.CUDA_SUCCESS,)

    def cuEventDestroy(self, event):
        del self.events[event]
        return (_Result.CUDA_SUCCESS,)

    def cuStreamDestroy(self, stream):
        self.streams.remove(int(stream))
        return (_Result.CUDA_SUCCESS,)

    def cuGreenCtxDestroy(self, ctx):
        self.contexts.remove(ctx)
        return (_Result.CUDA_SUCCESS,)


class _ExternalStream:
    def __init__(self, ptr: int, device=None) -> None:
        self.cuda_stream = ptr


@pytest.fixture
def fake(monkeypatch) -> FakeDriver:
    driver = FakeDriver()
    monkeypatch.setattr(parts, "_driver", lambda: driver)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "ExternalStream", _ExternalStream)
    return driver


DEVICE = torch.device("cuda", 0)


def test_presets_are_one_split_each_sorted_and_closed(fake: FakeDriver) -> None:
    before = parts.live_handles()
    ps = parts.PartitionSet.create(DEVICE, layout="split")
    assert ps.total_sms == 132
    assert ps.describe() == ["120/12", "112/20", "104/28", "96/36", "88/44"]
    assert [p.index for p in ps.presets] == list(range(5))
    for preset in ps.presets:
        assert preset.prefill.sms + preset.decode.sms == 132
        assert preset.prefill.stream.cuda_stream != preset.decode.stream.cuda_stream
    assert len(fake.contexts) == len(fake.streams) == len(fake.events) == 10
    assert not fake.current  # every push was popped
    # Each partition's event belongs to its own green context (cuEventRecord needs the event
    # and the stream in one context).
    assert sorted(fake.events.values()) == sorted(-c for c in fake.contexts)
    preset = ps.presets[0]
    preset.decode.record_done()
    assert fake.recorded == [(preset.decode._done, preset.decode.stream.cuda_stream)]
    assert parts.live_handles()["streams"] == before["streams"] + 10
    ps.close()
    ps.close()  # idempotent
    assert not fake.contexts and not fake.streams and not fake.events
    assert parts.live_handles() == before


def test_rounded_duplicates_and_refused_splits_are_skipped(fake: FakeDriver) -> None:
    ps = parts.PartitionSet.create(DEVICE, decode_sms=(12, 13, 14, 0, 132, 4), layout="split")
    # 13 and 14 round to the 120/12 split; 4 asks for 128 -> 128/4; 0 and 132 are out of range.
    assert ps.describe() == ["128/4", "120/12"]
    assert len(ps.skipped) == 2 and all("not in (0, 132)" in s for s in ps.skipped)
    ps.close()
    fake.total = 16
    ps = parts.PartitionSet.create(DEVICE, decode_sms=(4, 12), layout="split")
    assert ps.describe() == ["8/8"]  # 12 -> min 4 -> 8/8; 4 -> min 12 -> 16: refused
    assert any("CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION" in s for s in ps.skipped)
    ps.close()
    assert not fake.contexts and not fake.streams


def test_a_failing_driver_call_is_named_and_nothing_leaks(fake: FakeDriver) -> None:
    before = parts.live_handles()
    fake.fail_stream_at = 5  # the sixth stream: the third preset's decode side
    with pytest.raises(parts.GreenContextError, match="cuGreenCtxStreamCreate.*INVALID_VALUE"):
        parts.PartitionSet.create(DEVICE, layout="split")
    assert not fake.contexts and not fake.streams and not fake.events
    assert parts.live_handles() == before


def test_open_partitions_reports_failure_and_success(fake: FakeDriver, monkeypatch) -> None:
    monkeypatch.setattr(parts, "unsupported_reason", lambda device: None)
    fake.fail_stream_at = 0
    ps, reason = parts.open_partitions(DEVICE)
    assert ps is None and "cuGreenCtxStreamCreate" in reason
    fake.fail_stream_at = None
    ps, reason = parts.open_partitions(DEVICE, decode_sms=(28,), layout="split")
    assert ps is not None and reason == "ok" and ps.describe() == ["104/28"]
    ps.close()


def _sides(fake: FakeDriver, preset: parts.Preset) -> tuple[list[int], list[int]]:
    return fake.context_sms[preset.prefill._context], fake.context_sms[preset.decode._context]


def test_units_layout_gives_decode_only_grouped_sms(fake: FakeDriver) -> None:
    """The default layout (the H200 fix): the device cut into 8-SM groups; decode takes whole
    groups, prefill the other groups plus the ungrouped remainder; the two sides are disjoint and
    together cover the device."""
    ps = parts.PartitionSet.create(DEVICE)
    assert ps.describe() == ["124/8", "116/16", "108/24", "100/32", "92/40"]
    for preset in ps.presets:
        prefill, decode = _sides(fake, preset)
        assert not set(prefill) & set(decode)
        assert sorted(prefill + decode) == list(range(132))
        assert fake.context_grouped[preset.decode._context]  # every decode SM in a group
        assert not fake.context_grouped[preset.prefill._context]  # holds the remainder
        assert (preset.prefill.sms, preset.decode.sms) == (len(prefill), len(decode))
    ps.close()
    assert not fake.contexts and not fake.streams and not fake.events


def test_units_strict_leaves_the_remainder_idle_and_bad_layouts_are_named(
    fake: FakeDriver,
) -> None:
    ps = parts.PartitionSet.create(DEVICE, decode_sms=(3, 8, 9, 20, 200), layout="units-strict")
    # 3, 8 and 9 all round to one group (kept once); 20 -> two groups; 200 is out of range.
    assert ps.describe() == ["120/8", "112/16"]
    assert any("decode_sms=200" in s for s in ps.skipped)
    for preset in ps.presets:
        prefill, decode = _sides(fake, preset)
        assert not set(prefill) & set(decode) and len(prefill) + len(decode) == 128
        assert fake.context_grouped[preset.prefill._context]
        assert fake.context_grouped[preset.decode._context]
    ps.close()
    fake.total = 16  # two groups: decode may take only one (prefill needs a group)
    ps = parts.PartitionSet.create(DEVICE, decode_sms=(8, 12), layout="units-strict")
    assert ps.describe() == ["8/8"]
    ps.close()
    with pytest.raises(ValueError, match="layout: must be one of"):
        parts.PartitionSet.create(DEVICE, layout="halves")
