"""What stage 0 tells every stage about one step: the table updates, the batch's new slots, and
the micro-batches (contiguous runs of the batch's items) that flow through the stages in order.

Everything here is host data (numpy, pickled over the control group); each stage moves what it
needs to its device. Invariant: micro-batches partition the batch's items in order, so their
emitted tokens, concatenated, are the batch's tokens in item order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout_accel.serving.engine.batch import Batch, host_input_ids, pack_layout
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.pipeline.latency import StepFeatures


@dataclass(slots=True)
class MicroBatch:
    """Items [item_lo, item_hi) of the step; tokens [tok_lo, tok_hi) of the packed batch."""

    item_lo: int
    item_hi: int
    tok_lo: int
    tok_hi: int
    rows: np.ndarray  # per item: table row
    ends: np.ndarray  # per item: sequence length after this step
    cu: np.ndarray  # per item + 1: local token offsets
    num_decode: int
    max_q_len: int
    logit_rows: np.ndarray  # local token indices whose logits the head computes
    emit_rows: np.ndarray  # per emitting item: table row
    emit_next: np.ndarray  # per emitting item: position of the sampled token
    out_pos: np.ndarray  # per emitting item: output position (min_new_tokens bans)
    features: StepFeatures
    # Prompt logprobs: (global item index, count, next ids, usable, emits) per item, in order,
    # for micro-batches where some item asked for them; None otherwise.
    lp_plan: list[tuple[int, int, list[int], int, bool]] | None = None

    @property
    def num_tokens(self) -> int:
        return self.tok_hi - self.tok_lo


@dataclass(slots=True)
class StepPlan:
    """One step for every stage (see module docstring)."""

    table_writes: list[tuple[int, int, np.ndarray]]
    row_params: list[tuple[int, tuple[float, float, float], tuple[int, int, int]]]
    token_rows: np.ndarray  # per token: table row
    positions: np.ndarray  # per token
    slots: np.ndarray  # per token
    input_ids: np.ndarray  # per token (decode rows: read on stage 0's device)
    num_decode: int
    micro: list[MicroBatch]
    samplers: dict[int, Any] = field(default_factory=dict)  # row -> SamplingParams (new owners)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # row -> output ids (penalties)
    # Stages may capture missing decode graphs this step (False while layer moves are queued or
    # in flight: the graphs would be dropped again at the next boundary, so run eagerly).
    capture_graphs: bool = True


def _split_items(cu: np.ndarray, count: int) -> list[tuple[int, int]]:
    """`count` contiguous, non-empty item ranges of about equal token counts."""
    n = len(cu) - 1
    count = max(1, min(count, n))
    total = int(cu[-1])
    cuts = [0]
    for k in range(1, count):
        at = int(np.searchsorted(cu, total * k / count, side="left"))
        at = min(max(at, cuts[-1] + 1), n - (count - k))
        cuts.append(at)
    cuts.append(n)
    return [(cuts[i], cuts[i + 1]) for i in range(count)]


def build_plan(
    batch: Batch,
    micro_batches: int,
    table_writes: list[tuple[int, int, np.ndarray]],
    row_params: list[tuple[int, tuple[float, float, float], tuple[int, int, int]]],
) -> StepPlan:
    items = batch.items
    nd = batch.num_decode
    layout = pack_layout(items)
    counts, ends, cu, positions = layout.counts, layout.ends, layout.cu, layout.positions
    ids = host_input_ids(items, layout, nd)
    micro = [
        _micro(items, lo, hi, cu, ends, batch.rows, nd)
        for lo, hi in _split_items(cu, micro_batches)
    ]
    return StepPlan(
        table_writes,
        row_params,
        np.repeat(batch.rows, counts),
        positions,
        batch.slots.numpy().astype(np.int64, copy=False),
        ids,
        nd,
        micro,
    )


def _micro(
    items: list, lo: int, hi: int, cu: np.ndarray, ends: np.ndarray, rows: np.ndarray, nd: int
) -> MicroBatch:
    sub = items[lo:hi]
    local_cu = cu[lo : hi + 1] - cu[lo]
    emitting = [i for i, it in enumerate(sub) if it.emits_token]
    want_lp = any(it.wants_input_logprobs for it in sub)
    lp_plan = None
    if want_lp:
        logit_rows: list[int] = []
        lp_plan = []
        for index, it in enumerate(sub):
            a, b = int(local_cu[index]), int(local_cu[index + 1])
            if it.wants_input_logprobs:
                logit_rows.extend(range(a, b))
                req: Request = it.request
                nxt = req.token_slice(it.start + 1, it.start + it.count + 1)
                usable = min(len(nxt), it.count, len(req.input_ids) - it.start - 1)
                lp_plan.append((lo + index, it.count, list(nxt), usable, it.emits_token))
            elif it.emits_token:
                logit_rows.append(b - 1)
                lp_plan.append((lo + index, 1, [], -1, True))
        logit_np = np.asarray(logit_rows, dtype=np.int64)
    else:
        logit_np = (local_cu[1:] - 1)[emitting].astype(np.int64)
    emit = np.asarray(emitting, dtype=np.int64)
    sub_ends = ends[lo:hi]
    params = [sub[i].request.params for i in emitting]
    decode_here = max(0, min(nd, hi) - lo)
    feats = StepFeatures(
        batch=hi - lo,
        context_tokens=int(sub_ends.sum()),
        prefill_tokens=int(local_cu[-1]) - decode_here,
        emitting=len(emitting),
        sampled=sum(not p.greedy for p in params),
        filtered=sum(p.top_p < 1.0 or p.top_k > 0 or p.min_p > 0.0 for p in params),
    )
    out_pos = np.fromiter(
        (sub[i].start + sub[i].count - len(sub[i].request.input_ids) for i in emitting),
        np.int64,
        len(emitting),
    )
    return MicroBatch(
        item_lo=lo,
        item_hi=hi,
        tok_lo=int(cu[lo]),
        tok_hi=int(cu[hi]),
        rows=rows[lo:hi].copy(),
        ends=sub_ends.copy(),
        cu=local_cu.copy(),
        num_decode=decode_here,
        max_q_len=int((local_cu[1:] - local_cu[:-1]).max()),
        logit_rows=logit_np,
        emit_rows=rows[lo:hi][emit].copy(),
        emit_next=sub_ends[emit].copy(),
        out_pos=out_pos,
        features=feats,
        lp_plan=lp_plan,
    )
