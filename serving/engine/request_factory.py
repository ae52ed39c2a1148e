"""Validated requests from a generate call (SGLang's offline-engine arguments).

Single or batched prompts (text or ids), per-prompt sampling parameters, `n` > 1 fanned out into
one request per sample with its own rid suffix and seed. Every refusal is an InvalidRequestError
naming the field.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from rollout_accel.serving.engine.errors import InvalidRequestError
from rollout_accel.serving.engine.grammar import make_grammar
from rollout_accel.serving.engine.logprob_options import make_extra_logprobs, parse_logprob_options
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.engine.sampling_params import SamplingParams
from rollout_accel.serving.engine.slo_policy import check_schedule_fields
from rollout_accel.serving.models.tokenizer import TextTokenizer


class RequestFactory:
    """Builds `Request`s for one engine (its tokenizer, vocabulary and context length)."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        vocab_size: int,
        context_length: int,
        seed: int,
        eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.context_length = context_length
        self._rng = random.Random(seed)

    def _new_rid(self) -> str:
        return uuid.uuid4().hex

    def build(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        rid: str | list[str] | None = None,
        stream: bool = False,
        return_text_in_logprobs: bool = False,
        priority: int | None = None,
        ttft_slo_ms: float | None = None,
        top_logprobs_num: int | list[int] | None = None,
        token_ids_logprob: list[int] | list[list[int]] | None = None,
        segments: Any = None,
    ) -> tuple[list[Request], bool]:
        """Validates a (single or batched) generate call; returns its requests and whether the
        call was batched. Raises InvalidRequestError naming the field."""
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("exactly one of text/prompt and input_ids must be given")
        if prompt is not None:
            if isinstance(prompt, str):
                batched, texts = False, [prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                batched, texts = True, prompt
            else:
                raise InvalidRequestError("text: expected a string or a non-empty list of strings")
            id_lists = [self.tokenizer.encode(t) for t in texts]
        else:
            if not isinstance(input_ids, list) or not input_ids:
                raise InvalidRequestError("input_ids: expected a non-empty list of token ids")
            batched = isinstance(input_ids[0], list)
            id_lists = input_ids if batched else [input_ids]  # type: ignore[list-item]
        priority, ttft_slo_ms = check_schedule_fields(priority, ttft_slo_ms)
        count = len(id_lists)
        params_list = self._per_item(sampling_params, count, "sampling_params")
        logprob_list = self._per_item(return_logprob, count, "return_logprob")
        start_list = self._per_item(logprob_start_len, count, "logprob_start_len")
        extras = parse_logprob_options(top_logprobs_num, token_ids_logprob, count, self.vocab_size)
        rids = self._per_item(rid, count, "rid") if isinstance(rid, list) else [rid] * count
        if not isinstance(rid, list) and rid is not None and count > 1:
            raise InvalidRequestError("rid: a batched request needs a list of rids")
        segment_lists = self._segments(segments, id_lists, batched)
        requests: list[Request] = []
        for index, ids in enumerate(id_lists):
            self._check_ids(ids, f"input_ids[{index}]" if batched else "input_ids")
            params = SamplingParams.from_dict(params_list[index], self.vocab_size)
            if not isinstance(logprob_list[index], bool):
                raise InvalidRequestError("return_logprob: expected true or false")
            start = start_list[index]
            if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
                raise InvalidRequestError("logprob_start_len: expected an integer")
            for sample in range(params.n):
                base_rid = rids[index]
                this_rid = base_rid if base_rid is not None else self._new_rid()
                if params.n > 1:
                    this_rid = f"{this_rid}-{sample}"
                if not isinstance(this_rid, str) or not this_rid:
                    raise InvalidRequestError("rid: expected a non-empty string")
                seed = params.sampling_seed
                seed = self._rng.getrandbits(62) if seed is None else seed + sample
                requests.append(
                    Request(
                        rid=this_rid,
                        input_ids=list(ids),
                        params=params,
                        seed=seed,
                        return_logprob=logprob_list[index],
                        logprob_start_len=-1 if start is None else start,
                        return_text_in_logprobs=return_text_in_logprobs,
                        stream=stream,
                        priority=priority,
                        ttft_slo_ms=ttft_slo_ms,
                        extra_logprobs=make_extra_logprobs(logprob_list[index], extras[index]),
                        grammar=make_grammar(params, self.tokenizer, self.vocab_size, self.eos_ids),
                        segments=list(segment_lists[index]),
                    )
                )
        if len({r.rid for r in requests}) != len(requests):
            raise InvalidRequestError("rid: duplicate rids in one request")
        return requests, batched or len(requests) > 1

    @staticmethod
    def _segments(value: Any, id_lists: list[Any], batched: bool) -> list[list[tuple[int, int]]]:
        """The `segments` field (KV reuse, see serving/kvreuse/segments.py), one list per prompt."""
        from rollout_accel.serving.kvreuse.segments import parse_segments, parse_segments_batch

        lens = [len(ids) if isinstance(ids, list) else 0 for ids in id_lists]
        if batched:
            return parse_segments_batch(value, lens)
        return [parse_segments(value, lens[0])]

    @staticmethod
    def _per_item(value: Any, count: int, name: str) -> list[Any]:
        if isinstance(value, list) and name != "input_ids":
            if len(value) != count:
                raise InvalidRequestError(f"{name}: got {len(value)} entries for {count} prompts")
            return value
        return [value] * count

    def _check_ids(self, ids: Any, field: str) -> None:
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError(f"{field}: expected a non-empty list of token ids")
        vocab = self.vocab_size
        for tok in ids:
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
                raise InvalidRequestError(
                    f"{field}: token id {tok!r} is outside the vocabulary [0, {vocab})"
                )
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                f"{field}: the prompt has {len(ids)} tokens; the context length is {self.context_length}"
            )
