"""Verification of engine requests: their sampling parameters into `verify_drafts`.

The runner scores a row's last token plus its drafts in one forward and hands the logits here;
the parameter tensors are built exactly as the engine's batch sampler builds them (greedy rows
temperature 0, the same seeds, output positions and `need_filter`), so a verified token is the
token plain decoding would have drawn. Rows with penalties or min_new_tokens bans never carry
drafts (the proposer skips them), so no position-dependent logit rule applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rollout_accel.serving.spec.acceptance import VerifyResult, verify_drafts


def pad_drafts(drafts: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """[R, width] int64 drafts (zero-padded) and their lengths."""
    out = np.zeros((len(drafts), width), dtype=np.int64)
    lens = np.zeros(len(drafts), dtype=np.int64)
    for r, d in enumerate(drafts):
        out[r, : len(d)] = d
        lens[r] = len(d)
    return out, lens


def verify_requests(
    requests: Sequence[Any],
    logits: torch.Tensor,
    output_positions: np.ndarray,
    drafts: Sequence[Sequence[int]],
    vocab_size: int,
) -> VerifyResult:
    """logits [R, W, V]: row r's position i scores the token after drafts[r][:i] (W - 1 >= every
    draft length). `output_positions[r]`: output tokens row r has before its first scored one."""
    rows, width, _ = logits.shape
    params = [r.params for r in requests]
    for p, req in zip(params, requests, strict=True):
        assert not p.has_penalties, f"{req.rid}: rows with penalties do not draft"
    floats = np.array(
        [(0.0 if p.greedy else p.temperature, p.top_p, p.min_p) for p in params], dtype=np.float32
    ).reshape(rows, 3)
    draft_np, lens_np = pad_drafts(drafts, width - 1)
    ints = np.concatenate(
        [
            np.array([(p.top_k, r.seed) for p, r in zip(params, requests, strict=True)]).reshape(
                rows, 2
            ),
            np.asarray(output_positions, dtype=np.int64).reshape(rows, 1),
            lens_np.reshape(rows, 1),
            draft_np,
        ],
        axis=1,
    ).astype(np.int64)
    dev = logits.device
    floats_t = torch.from_numpy(floats)
    ints_t = torch.from_numpy(np.ascontiguousarray(ints))
    if dev.type == "cuda":
        floats_t = floats_t.pin_memory().to(dev, non_blocking=True)
        ints_t = ints_t.pin_memory().to(dev, non_blocking=True)
    need_filter = any((0 < p.top_k < vocab_size) or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
    return verify_drafts(
        logits.float(),
        ints_t[:, 4:],
        ints_t[:, 3],
        temperatures=floats_t[:, 0],
        top_ks=ints_t[:, 0],
        top_ps=floats_t[:, 1],
        min_ps=floats_t[:, 2],
        seeds=ints_t[:, 1],
        steps=ints_t[:, 2],
        need_filter=need_filter,
    )
