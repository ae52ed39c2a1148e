"""RequestTable: queued slot writes reach the device once per (row, position), latest value.

A GPU keeps an unspecified one of repeated indices in an indexed assignment, so `flush` must
never send a (row, position) twice: a recycled row once received the finished request's stale
prefix instead of its new request's, and the new request attended to another prompt's KV
(seen on an H200 as a wrong first token; the CPU happened to keep the last write).
"""

from __future__ import annotations

import numpy as np
import torch

from rollout_accel.serving.engine.kv_pool import RequestTable


def _capture_sent(table: RequestTable) -> list[np.ndarray]:
    sent: list[np.ndarray] = []
    original = table._to_device

    def spy(array: np.ndarray) -> torch.Tensor:
        sent.append(array.copy())
        return original(array)

    table._to_device = spy  # type: ignore[method-assign]
    return sent


def test_flush_sends_each_position_once_with_its_latest_slot() -> None:
    rng = np.random.default_rng(0)
    table = RequestTable(max_rows=4, max_context=64, device="cpu")
    sent = _capture_sent(table)
    expected = np.zeros((5, 64), dtype=np.int64)
    for _ in range(40):  # overlapping writes to recycled rows, as finish + attach produce
        row = int(rng.integers(0, 4))
        start = int(rng.integers(0, 40))
        slots = rng.integers(1, 10_000, size=int(rng.integers(1, 24)))
        table.write(row, start, slots)
        expected[row, start : start + slots.size] = slots
    table.flush()
    rows, positions, values = sent[0]
    pairs = rows * 64 + positions
    assert np.unique(pairs).size == pairs.size, "a (row, position) was sent twice"
    assert (values == expected[rows, positions]).all()
    written = expected != 0
    assert (table.req_to_token.numpy()[written] == expected[written]).all()
    assert (table.host_slots[written] == expected[written]).all()


def test_flush_of_a_recycled_row_keeps_the_new_requests_prefix() -> None:
    table = RequestTable(max_rows=2, max_context=32, device="cpu")
    sent = _capture_sent(table)
    row = table.alloc()
    table.write(row, 0, np.arange(100, 120))  # the finished request's canonical prefix
    table.free(row)
    again = table.alloc()
    assert again == row
    table.write(again, 0, np.arange(500, 510))  # the next request's cached prefix
    table.flush()
    rows, positions, values = sent[0]
    assert (rows == row).all()
    assert sorted(positions.tolist()) == list(range(20))
    got = dict(zip(positions.tolist(), values.tolist(), strict=True))
    assert [got[p] for p in range(10)] == list(range(500, 510))
    assert [got[p] for p in range(10, 20)] == list(range(110, 120))


def test_rotary_tables_stay_put_unless_they_must_grow() -> None:
    """CUDA graphs hold the rotary tables' address: asking again for covered positions on the
    same device must return the same tensors (a spurious reallocation once left the decode
    graphs reading freed memory); growth is visible through `generation`."""
    from rollout_accel.serving.models.decoder import RotaryEmbedding

    rotary = RotaryEmbedding(head_dim=16, theta=10_000.0, initial_positions=64)
    cos, sin = rotary.tables(40, torch.device("cpu"))
    generation = rotary.generation
    again = rotary.tables(63, torch.device("cpu"))
    assert again[0] is cos and again[1] is sin and rotary.generation == generation
    grown = rotary.tables(64, torch.device("cpu"))
    assert grown[0].shape[0] > 64 and rotary.generation == generation + 1
    assert torch.equal(grown[0][:64], cos)
