"""The verify step in the engine's pipeline: schedule drafts, launch the verify forward, settle.

`schedule()` asks `plan_drafts` for each decode row's draft; if any row drafts, `schedule_verify`
builds a decode-only batch: rows without drafts first (one token each, the decode kernel), then
verify rows (the last token plus its draft: 1 + d tokens, causal within the row, through the
prefill-over-paged-KV kernel, which computes such extend rows exactly). `launch_verify` runs it,
samples plain rows with the engine's sampler and verifies the drafted ones (`acceptance`), writes
the emitted tokens into the device token table and returns the results on the host.
`settle_verified` (from `process`) appends the accepted tokens after the first, frees the KV slots
of rejected draft tokens and reports acceptance to the proposer.

Invariants: a verify row of item (start, 1 + d) that accepts n drafts and appends j tokens keeps
min(n + 1, j) slots (positions start .. start + keep - 1, all with valid KV for tokens of the
sequence) and frees the other 1 + d - keep at once; `num_computed` becomes start + keep. Drafting
steps are synchronous (the proposer needs each row's last token on the host), and a step with
waiting prompts to admit does not draft (prefill goes first).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from rollout_accel.serving.models.paged_kv import AttentionMetadata
from rollout_accel.serving.spec.acceptance import verify_drafts

if TYPE_CHECKING:
    from rollout_accel.serving.engine.batch import Batch, CompletedStep, PackedLayout, StepResult
    from rollout_accel.serving.engine.model_runner import ModelRunner
    from rollout_accel.serving.engine.request import Request
    from rollout_accel.serving.engine.scheduler import Scheduler
    from rollout_accel.serving.spec.state import SpecState
    from rollout_accel.serving.spec.verify_graphs import VerifyGraphs

GRAPHS_ENV = "ROLLOUT_ACCEL_VERIFY_GRAPHS"  # "0": verify batches run eagerly on GPUs too


def forces_sync(spec: SpecState | None, in_flight: bool, ready: list[Request]) -> bool:
    """A step in which some row may draft is scheduled only once the previous step is processed
    (drafting reads each row's last token on the host); other steps overlap as usual."""
    if not in_flight or spec is None or not spec.active or not ready:
        return False
    return spec.proposer.batch_wants_draft(ready, pending=1)


def plan_drafts(scheduler: Scheduler, decode: list[Request]) -> list[list[int]] | None:
    """Drafts per decode row, or None when this step does not draft."""
    spec = scheduler.spec
    if spec is None or not spec.active or not decode:
        return None
    if any(r.inflight for r in decode):
        return None  # a launched step's tokens are not on the host yet: decode plainly
    limits = scheduler.limits
    if scheduler.waiting and len(scheduler.running) < limits.max_running_requests:
        return None  # admit prompts first
    if not spec.proposer.batch_wants_draft(decode):
        return None  # too little to gain for a synchronous step
    drafts = spec.proposer.propose(decode)
    for req, draft in zip(decode, drafts, strict=True):
        room = limits.context_length - req.seq_len - 1
        if len(draft) > room:
            del draft[max(room, 0) :]
    return drafts if any(drafts) else None


def schedule_verify(
    scheduler: Scheduler, decode: list[Request], drafts: list[list[int]]
) -> Batch | None:
    """A decode-only batch with verify rows, or None when the KV pool cannot hold the drafts."""
    # Imported here: the engine package imports this module while it initialises.
    from rollout_accel.serving.engine.batch import Batch, ForwardItem

    plain = [r for r, d in zip(decode, drafts, strict=True) if not d]
    verify = [(r, d) for r, d in zip(decode, drafts, strict=True) if d]
    need = len(plain) + sum(1 + len(d) for _, d in verify)
    slots = scheduler._alloc(need)
    if slots is None:
        return None
    items = [ForwardItem(r, r.num_computed, 1, True, False) for r in plain]
    items += [ForwardItem(r, r.num_computed, 1 + len(d), True, False, draft=d) for r, d in verify]
    return scheduler._commit(Batch(items, slots, len(plain)))


def _verify_graphs(runner: ModelRunner, ends: np.ndarray, n: int) -> VerifyGraphs | None:
    """The runner's verify graphs when this batch can replay them (CUDA graphs on, memory in,
    the batch within the largest bucket and every row's padded window inside the context)."""
    stride = getattr(runner, "verify_stride", 0)
    if (
        not stride
        or runner.graphs is None
        or runner.released
        or os.environ.get(GRAPHS_ENV, "1") == "0"
    ):
        return None
    graphs = getattr(runner, "verify_graphs", None)
    if graphs is None:
        from rollout_accel.serving.spec.verify_graphs import VerifyGraphs

        graphs = VerifyGraphs(
            runner.model, runner.kv_cache, runner.table, runner.graphs.max_bs, stride
        )
        runner.verify_graphs = graphs
    if not graphs.fits(n) or int(ends.max()) > runner.table.max_context - stride:
        return None
    return graphs


@torch.inference_mode()
def launch_verify(runner: ModelRunner, batch: Batch) -> CompletedStep:
    """One forward over plain and verify decode rows (a CUDA graph when one fits, else eager);
    plain rows sampled by the engine's sampler, verify rows by `verify_drafts`; results on the
    host."""
    from rollout_accel.serving.engine.batch import (
        CompletedStep,
        StepResult,
        pack_layout,
        upload_packed,
    )

    items = batch.items
    nd = batch.num_decode
    n = len(items)
    dev = runner.device
    table = runner.table
    layout = pack_layout(items)
    starts, counts, ends, cu = layout.starts, layout.counts, layout.ends, layout.cu
    ids = np.empty(layout.total, dtype=np.int64)
    for index, it in enumerate(items):
        lo = int(cu[index])
        last = it.request.token_slice(it.start, it.start + 1)
        assert len(last) == 1, "a drafting step needs each row's last token on the host"
        ids[lo] = last[0]
        if it.draft:
            ids[lo + 1 : lo + it.count] = it.draft
    rows = batch.rows
    slots_np = batch.slots.numpy()
    lens_np = counts - 1
    drafts_np = np.zeros((n, int(lens_np.max())), dtype=np.int64)
    for r, it in enumerate(items):
        if it.draft:
            drafts_np[r, : len(it.draft)] = it.draft
    # Per row on the device: table row, sequence end, draft length, drafts.
    rows_t, ends_t, lens_t, drafts_t = upload_packed(
        [rows, ends, lens_np, drafts_np.reshape(-1)], dev
    )
    drafts_t = drafts_t.view(n, -1)
    graphs = _verify_graphs(runner, ends, n)
    if graphs is not None:
        stride = graphs.q_stride
        logits = graphs.run(
            [ids[cu[r] : cu[r + 1]] for r in range(n)],
            starts,
            rows,
            [slots_np[cu[r] : cu[r + 1]] for r in range(n)],
        )
        per_row = logits.view(n, stride, -1)
        plain_logits = per_row[:nd, 0]
        verify_logits = per_row[nd:]
    else:
        logits = _forward_eager(runner, batch, ids, layout)
        plain_logits = logits[torch.from_numpy(cu[:nd]).to(dev)]
        width = int(counts[nd:].max())
        # Row r, position i scores the token after draft[:i]: logits row cu[r] + i (padded with
        # the row's last position; padding is ignored through the draft lengths).
        offsets = np.minimum(np.arange(width)[None, :], counts[nd:, None] - 1)
        gather = torch.from_numpy((cu[nd:-1, None] + offsets).reshape(-1)).to(dev)
        verify_logits = logits[gather].view(n - nd, width, -1)
    requests = [it.request for it in items]
    params = [r.params for r in requests]
    vocab = runner.vocab_size
    need_filter = any((0 < p.top_k < vocab) or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
    tokens: list[int] = [0] * n
    logprobs: list[float] = [0.0] * n
    extra: dict[int, tuple[list[int], list[float]]] = {}
    write_rows: list[int] = []
    write_pos: list[int] = []
    write_tok: list[int] = []
    if nd:
        plain_t, plain_lp = runner.sampler.sample(
            requests[:nd],
            plain_logits,
            rows_t[:nd],
            ends_t[:nd],
            ends[:nd] - np.fromiter((len(r.input_ids) for r in requests[:nd]), np.int64, nd),
        )
        for i, (tok, lp) in enumerate(zip(plain_t.tolist(), plain_lp.tolist(), strict=True)):
            tokens[i], logprobs[i] = tok, lp
            write_rows.append(int(rows[i]))
            write_pos.append(int(ends[i]))
            write_tok.append(tok)
    nv = n - nd
    width = verify_logits.shape[1]
    vrows = rows_t[nd:]
    floats = table.row_floats[vrows]
    ints = table.row_ints[vrows]
    vdrafts = torch.zeros((nv, width - 1), dtype=torch.int64, device=dev)
    k = min(width - 1, drafts_t.shape[1])
    vdrafts[:, :k] = drafts_t[nd:, :k]
    result = verify_drafts(
        verify_logits,
        vdrafts,
        lens_t[nd:],
        temperatures=floats[:, 0],
        top_ks=ints[:, 0],
        top_ps=floats[:, 1],
        min_ps=floats[:, 2],
        seeds=ints[:, 1],
        # Output position of each row's first scored token (sequence position start + 1).
        steps=ends_t[nd:] - lens_t[nd:] - ints[:, 2],
        need_filter=need_filter,
    )
    for r, (emitted, lps) in enumerate(result.emitted()):
        index = nd + r
        tokens[index], logprobs[index] = emitted[0], lps[0]
        if len(emitted) > 1:
            extra[index] = (emitted[1:], lps[1:])
        start = int(starts[index])
        for i, tok in enumerate(emitted):
            write_rows.append(int(rows[index]))
            write_pos.append(start + 1 + i)
            write_tok.append(tok)
    # The device token table: the next decode step reads each row's last token from there.
    scatter = torch.tensor([write_rows, write_pos, write_tok], dtype=torch.int64)
    if runner.is_cuda:
        scatter = scatter.pin_memory().to(dev, non_blocking=True)
    table.token_ids[scatter[0], scatter[1]] = scatter[2]
    return CompletedStep(batch, StepResult(tokens, logprobs, {}, extra))


def _forward_eager(
    runner: ModelRunner,
    batch: Batch,
    ids: np.ndarray,
    layout: PackedLayout,
) -> torch.Tensor:
    """The packed forward without graphs: logits of every computed token [total, vocab]."""
    from rollout_accel.serving.engine.batch import upload_packed

    counts, ends, cu, positions = layout.counts, layout.ends, layout.cu, layout.positions
    n = len(counts)
    rows = batch.rows
    parts = [ids, positions, rows, ends, cu, batch.slots.numpy(), np.repeat(rows, counts)]
    ids_t, pos_t, rows_t, ends_t, cu_t, slots_t, token_rows_t = upload_packed(parts, runner.device)
    runner.table.req_to_token[token_rows_t, pos_t] = slots_t.to(torch.int32)
    max_len = int(ends.max())
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        block_table=runner.table.req_to_token[rows_t, :max_len],
        seq_lens=ends_t.to(torch.int32),
        cu_q_lens=cu_t.to(torch.int32),
        page_size=1,
        is_decode=False,
        max_q_len=int(counts.max()),
        num_decode=batch.num_decode,
        verify=True,
    )
    assert n == len(batch.items)
    return runner.model.forward_paged(ids_t, pos_t, meta, runner.kv_cache, max_position=max_len - 1)


def settle_verified(scheduler: Scheduler, batch: Batch, result: StepResult, now: float) -> None:
    """After `process` appended each row's first token: the rest of the accepted tokens, KV of
    rejected drafts back to the pool, acceptance to the proposer."""
    spec = scheduler.spec
    if spec is None:
        return
    spec.proposer.tick()
    offset = 0
    freed: list[torch.Tensor] = []
    for index, item in enumerate(batch.items):
        lo, offset = offset, offset + item.count
        if item.is_prefill:
            continue
        req = item.request
        drafted = len(item.draft) if item.draft else 0
        more_tokens, more_lps = result.extra.get(index, ([], []))
        accepted = len(more_tokens)
        if drafted or spec.active:  # plain runs of a speculative engine keep no drafting state
            spec.record_verify(req, drafted, accepted)
        if not drafted:
            continue
        appended = 1
        for tok, lp in zip(more_tokens, more_lps, strict=True):
            if req.finished:
                break
            scheduler._append_token(req, tok, lp, now)
            appended += 1
        keep = min(accepted + 1, appended)
        if keep < item.count:
            freed.append(batch.slots[lo + keep : lo + item.count])
        if req.row is not None:
            req.num_computed = item.start + keep
    if freed:
        scheduler.allocator.free(torch.cat(freed))
