"""SGLang's extra logprob options: `top_logprobs_num` (the k likeliest tokens at each position) and
`token_ids_logprob` (the logprobs of chosen ids at each position), for prompt and output tokens.

They are read off the logits the runner already has (no second forward): `record_output` sits
in the sampler right before the draw (CPU, eager GPU and CUDA-graph decode all sample there) and
`record_input` next to the prompt-logprob gather. One `torch.topk` / `gather` per step covers
every row that asked; the results go to the host with a non-blocking copy, so an overlapped GPU
step is not synchronised. Positions are absolute (prompt positions for input, output index for
output), so a retracted request that recomputes a position overwrites it rather than appending.

Values: output positions use the sampler's distribution, log_softmax(logits / temperature)
(the raw logits for greedy rows), so the top-1 entry of a greedy step is the sampled token with
the same logprob as `output_token_logprobs`; prompt positions use the raw log_softmax, as
`input_token_logprobs` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rollout_accel.serving.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from rollout_accel.serving.engine.request import Request

# One position's results before they are turned into lists: the step's host tensors and the row.
_Pending = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]
# One position's results as lists: top-k (logprob, id) pairs, logprobs of the requested ids.
_Row = tuple[list[tuple[float, int]], list[float]]


@dataclass(slots=True)
class ExtraLogprobs:
    """One request's options and what the runner recorded for them, by absolute position.

    Invariant: `output[p]` belongs to output token p and `input[p]` to prompt token p (the
    distribution that predicted it); a recomputed position replaces the earlier entry.
    """

    top_logprobs_num: int
    token_ids: list[int] | None
    output: dict[int, _Pending | _Row] = field(default_factory=dict)
    input: dict[int, _Pending | _Row] = field(default_factory=dict)

    def row(self, side: str, position: int) -> _Row | None:
        """Lists for one position (converted once, on first read), or None if not recorded."""
        table = self.output if side == "output" else self.input
        entry = table.get(position)
        if entry is None or len(entry) == 2:
            return entry  # type: ignore[return-value]
        top_vals, top_ids, id_vals, row = entry  # type: ignore[misc]
        top: list[tuple[float, int]] = []
        if top_vals is not None and top_ids is not None:
            k = self.top_logprobs_num
            top = list(zip(top_vals[row, :k].tolist(), top_ids[row, :k].tolist(), strict=True))
        chosen = [] if id_vals is None or self.token_ids is None else id_vals[row].tolist()
        done: _Row = (top, chosen[: len(self.token_ids or ())])
        table[position] = done
        return done

    def meta_fields(
        self,
        input_positions: range,
        num_output: int,
        token_text: Callable[[int], str] | None,
    ) -> dict[str, Any]:
        """SGLang's meta_info fields: per position a list of [logprob, token_id, text|None]; the
        first prompt position of `input_positions` is None (nothing predicted it in the range),
        as are positions that were never computed."""

        def triple(logprob: float, token_id: int) -> list[Any]:
            return [logprob, token_id, token_text(token_id) if token_text else None]

        def column(side: str, positions: Sequence[int], skip_first: bool, top: bool) -> list:
            out: list[Any] = []
            for index, position in enumerate(positions):
                got = None if (skip_first and index == 0) else self.row(side, position)
                if got is None:
                    out.append(None)
                elif top:
                    out.append([triple(lp, tid) for lp, tid in got[0]])
                else:
                    ids = self.token_ids or []
                    out.append([triple(lp, tid) for lp, tid in zip(got[1], ids, strict=True)])
            return out

        fields: dict[str, Any] = {}
        outputs = range(num_output)
        if self.top_logprobs_num > 0:
            fields["input_top_logprobs"] = column("input", input_positions, True, True)
            fields["output_top_logprobs"] = column("output", outputs, False, True)
        if self.token_ids is not None:
            fields["input_token_ids_logprobs"] = column("input", input_positions, True, False)
            fields["output_token_ids_logprobs"] = column("output", outputs, False, False)
        return fields


def _per_item(value: Any, count: int, name: str) -> list[Any]:
    if (
        isinstance(value, list)
        and value
        and (name != "token_ids_logprob" or isinstance(value[0], list))
    ):
        if len(value) != count:
            raise InvalidRequestError(f"{name}: got {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def parse_logprob_options(
    top_logprobs_num: int | list[int] | None,
    token_ids_logprob: list[int] | list[list[int]] | None,
    count: int,
    vocab_size: int,
) -> list[tuple[int, list[int] | None]]:
    """Validates SGLang's two options (a value for all prompts, or one per prompt) and returns
    (top_logprobs_num, token_ids or None) per prompt. Raises InvalidRequestError naming the field."""
    nums = _per_item(top_logprobs_num, count, "top_logprobs_num")
    id_lists = _per_item(token_ids_logprob, count, "token_ids_logprob")
    parsed: list[tuple[int, list[int] | None]] = []
    for num, ids in zip(nums, id_lists, strict=True):
        num = 0 if num is None else num
        if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= vocab_size:
            raise InvalidRequestError(
                f"top_logprobs_num: expected an integer in [0, {vocab_size}], got {num!r}"
            )
        if ids is not None:
            if not isinstance(ids, list):
                raise InvalidRequestError("token_ids_logprob: expected a list of token ids")
            for tok in ids:
                if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
                    raise InvalidRequestError(
                        f"token_ids_logprob: {tok!r} is outside the vocabulary [0, {vocab_size})"
                    )
            ids = list(ids) or None  # SGLang treats [] as absent
        parsed.append((num, ids))
    return parsed


def make_extra_logprobs(
    return_logprob: bool, options: tuple[int, list[int] | None]
) -> ExtraLogprobs | None:
    """The request's recorder, or None when nothing extra is asked (SGLang returns the extra
    fields only with return_logprob)."""
    num, ids = options
    if not return_logprob or (num == 0 and ids is None):
        return None
    return ExtraLogprobs(num, ids)


def _compute(
    logprobs: torch.Tensor, options: list[ExtraLogprobs]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Top-k values/ids (k = the largest asked) and the requested ids' logprobs (padded to the
    longest list), all moved to the host without blocking. `options[i]` belongs to row i."""
    top_vals = top_ids = id_vals = None
    # Masked tokens (bans, grammars) have -inf; report the most negative float instead, as SGLang
    # does, so every response stays valid JSON.
    floor = torch.finfo(logprobs.dtype).min
    k = max(o.top_logprobs_num for o in options)
    if k > 0:
        vals, ids = torch.topk(logprobs, k, dim=-1)
        top_vals = vals.clamp_(min=floor).to("cpu", non_blocking=True)
        top_ids = ids.to("cpu", non_blocking=True)
    width = max(len(o.token_ids or ()) for o in options)
    if width > 0:
        index = torch.tensor(
            [(o.token_ids or [])[:width] + [0] * (width - len(o.token_ids or ())) for o in options],
            dtype=torch.int64,
        ).to(logprobs.device, non_blocking=True)
        id_vals = logprobs.gather(1, index).clamp_(min=floor).to("cpu", non_blocking=True)
    return top_vals, top_ids, id_vals


def record_output(
    requests: Sequence[Request], logits: torch.Tensor, output_positions: Sequence[int]
) -> None:
    """Records top-k / chosen-id logprobs for the rows of `logits` (one per request, in order,
    after penalties and bans, before the draw) whose request asked, at each row's output
    position (`output_positions[i]`: the output index of the token row i samples). Cheap when
    none did."""
    rows = [i for i, r in enumerate(requests) if r.extra_logprobs is not None]
    if not rows:
        return
    options = [requests[i].extra_logprobs for i in rows]
    index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
    temps = torch.tensor(
        [1.0 if requests[i].params.greedy else requests[i].params.temperature for i in rows],
        dtype=torch.float32,
    ).to(logits.device, non_blocking=True)
    logprobs = torch.log_softmax(logits.index_select(0, index).float() / temps[:, None], dim=-1)
    top_vals, top_ids, id_vals = _compute(logprobs, options)  # type: ignore[arg-type]
    for row, i in enumerate(rows):
        req = requests[i]
        req.extra_logprobs.output[int(output_positions[i])] = (  # type: ignore[union-attr]
            top_vals,
            top_ids,
            id_vals,
            row,
        )


def record_input(req: Request, logprobs: torch.Tensor, first_position: int) -> None:
    """Records prompt positions: row i of `logprobs` (normalised) predicted prompt token
    `first_position + i`. Only positions after logprob_start_len are reported, so only those
    are computed."""
    extra = req.extra_logprobs
    if extra is None:
        return
    skip = max(req.logprob_start_len + 1 - first_position, 0)
    if skip >= logprobs.shape[0]:
        return
    top_vals, top_ids, id_vals = _compute(logprobs[skip:], [extra] * (logprobs.shape[0] - skip))
    for row in range(logprobs.shape[0] - skip):
        extra.input[first_position + skip + row] = (top_vals, top_ids, id_vals, row)
