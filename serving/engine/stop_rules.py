"""When a request is done: stop tokens, stop strings, max_new_tokens, the context length.

Checked after every appended token, so the common case (no stop strings) costs a few integer
comparisons; stop strings decode only a short tail of the output.
"""

from __future__ import annotations

from typing import Any

from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.models.tokenizer import TextTokenizer


class StopRules:
    """Finishing rules shared by every request of one engine."""

    def __init__(
        self, tokenizer: TextTokenizer, eos_ids: tuple[int, ...], context_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.context_length = context_length

    def check(self, req: Request, token: int) -> dict[str, Any] | None:
        """The finish reason after `token` was appended to `req`'s output, or None."""
        params = req.params
        produced = len(req.output_ids)
        if produced >= params.min_new_tokens:
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids):
                return {"type": "stop", "matched": token}
            if params.stop:
                matched = self._match_stop_string(req)
                if matched is not None:
                    return {"type": "stop", "matched": matched}
        if produced >= params.max_new_tokens:
            return {"type": "length", "length": params.max_new_tokens}
        if req.fill_len >= self.context_length:
            return {"type": "length", "length": produced}
        return None

    def _match_stop_string(self, req: Request) -> str | None:
        longest = max(len(s) for s in req.params.stop)
        # Tokens are at least one byte, so the last `longest + 2` tokens cover any stop string
        # that ends in the newest token (the +2 absorbs multi-byte characters split over tokens).
        tail = self.tokenizer.decode(req.output_ids[-(longest + 2) :], skip_special_tokens=False)
        for stop in req.params.stop:
            if stop in tail:
                return stop
        return None
