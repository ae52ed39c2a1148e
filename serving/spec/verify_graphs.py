"""Verify steps replayed from CUDA graphs (GPU only).

A verify batch of up to `max_bs` rows is laid out with a fixed stride of Q = num_draft_tokens
query slots per row: row r's last token and its d <= Q - 1 drafts take slots r * Q .. r * Q + d,
the rest of its slots are padding tokens (id 0, K/V into the reserved slot 0, positions after the
row's real ones, so causality hides them from the real queries). Rows are padded up to the
bucket with the table's spare row and seq_len 0. The graph covers the slot-table update, the
block-table gather and the forward (verify attention, `kernels/verify_attention*`); sampling and
acceptance run after it, as in the eager path. Buckets and the memory-pool discipline follow
`engine/cuda_graphs.DecodeGraphs`; the runner drops these graphs whenever it releases memory.
"""

from __future__ import annotations

import numpy as np
import torch

from rollout_accel.serving.engine.cuda_graphs import DecodeGraphs
from rollout_accel.serving.engine.kv_pool import RequestTable
from rollout_accel.serving.models.decoder import CausalLM
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache


class VerifyGraphs(DecodeGraphs):
    """Captured verify graphs over static inputs; `run` stages a batch and replays. Capture,
    buckets, the memory pool and release are `DecodeGraphs`'; the layout is the verify one."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        table: RequestTable,
        max_bs: int,
        q_stride: int,
    ) -> None:
        self.q_stride = q_stride  # the input layout below needs it
        super().__init__(model, kv_cache, table, max_bs)

    def _allocate_inputs(self) -> None:
        max_bs, q_stride = self.max_bs, self.q_stride
        n = max_bs * q_stride
        # Per token: ids, positions, table rows, slots; per row: rows, seq_lens. One copy a step.
        self.static = torch.zeros(4 * n + 2 * max_bs, dtype=torch.int64, device=self.device)
        self._hosts = [torch.zeros_like(self.static, device="cpu") for _ in range(2)]
        if self.device.type == "cuda":
            self._hosts = [h.pin_memory() for h in self._hosts]
        self._flip = 0
        self.cu_q_lens = torch.arange(max_bs + 1, dtype=torch.int32, device=self.device) * q_stride

    def fits(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.max_bs

    def _views(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.max_bs * self.q_stride
        ids, pos, trows, slots = t[:n], t[n : 2 * n], t[2 * n : 3 * n], t[3 * n : 4 * n]
        rows, seq = t[4 * n : 4 * n + self.max_bs], t[4 * n + self.max_bs :]
        return ids, pos, trows, slots, rows, seq

    def _body(self, bs: int) -> torch.Tensor:
        n = bs * self.q_stride
        ids, pos, trows, slots, rows, seq = self._views(self.static)
        table = self.table
        table.req_to_token[trows[:n], pos[:n]] = slots[:n].to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots[:n],
            block_table=table.req_to_token.index_select(0, rows[:bs]),
            seq_lens=seq[:bs].to(torch.int32),
            cu_q_lens=self.cu_q_lens[: bs + 1],
            page_size=1,
            is_decode=False,
            max_q_len=self.q_stride,
            num_decode=0,
            verify=True,
        )
        return self.model.forward_paged(
            ids[:n], pos[:n], meta, self.kv_cache, logit_rows=None, max_position=self.width - 1
        )

    def _pad_host(self, host: np.ndarray, start_row: int, end_row: int) -> None:
        q = self.q_stride
        ids, pos, trows, slots, rows, seq = self._views_np(host)
        for arr in (ids, pos, slots):
            arr[start_row * q : end_row * q] = 0
        trows[start_row * q : end_row * q] = self.table.pad_row
        rows[start_row:end_row] = self.table.pad_row
        seq[start_row:end_row] = 0

    def _views_np(self, host: np.ndarray) -> tuple[np.ndarray, ...]:
        n = self.max_bs * self.q_stride
        return (
            host[:n],
            host[n : 2 * n],
            host[2 * n : 3 * n],
            host[3 * n : 4 * n],
            host[4 * n : 4 * n + self.max_bs],
            host[4 * n + self.max_bs :],
        )

    def _stage_padding(self, start: int, end: int) -> None:
        """Padding rows [start, end) in the device inputs (staged through a host buffer)."""
        host_t = self._hosts[0]
        self._pad_host(host_t.numpy(), start, end)
        self.static.copy_(host_t)

    @torch.inference_mode()
    def run(
        self,
        ids: list[np.ndarray],
        starts: np.ndarray,
        rows: np.ndarray,
        slots: list[np.ndarray],
    ) -> torch.Tensor:
        """Row r computes tokens `ids[r]` (1 <= len <= Q) at positions starts[r].. into
        `slots[r]`. Returns logits [bs * Q, vocab]: row r position i at r * Q + i (a view of
        the graph's output, valid until the next replay)."""
        self.ensure_current()
        bs = len(ids)
        q = self.q_stride
        bucket = next(b for b in self.buckets if b >= bs)
        self._flip ^= 1
        host_t = self._hosts[self._flip]
        h_ids, h_pos, h_trows, h_slots, h_rows, h_seq = self._views_np(host_t.numpy())
        offs = np.arange(q)
        pos = np.minimum(starts[:, None] + offs[None, :], self.width - 1)
        h_pos[: bs * q] = pos.reshape(-1)
        h_trows[: bs * q] = np.repeat(rows, q)
        h_ids[: bs * q] = 0
        h_slots[: bs * q] = 0
        for r in range(bs):
            k = len(ids[r])
            h_ids[r * q : r * q + k] = ids[r]
            h_slots[r * q : r * q + k] = slots[r]
        h_rows[:bs] = rows
        h_seq[:bs] = starts + q
        self._pad_host(host_t.numpy(), bs, bucket)
        self.static.copy_(host_t, non_blocking=True)
        self.graphs[bucket].replay()
        self.replays += 1
        return self.outputs[bucket][: bs * q]
