"""Text tokenizer: loads an HF `tokenizer.json`, and builds a byte-level one offline for presets.

The engine only needs encode, decode, special-token ids and the chat template, so we hold a
`tokenizers.Tokenizer` directly rather than depending on transformers at run time.
"""

from __future__ import annotations

import functools
import itertools
import json
import string
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen-style ChatML template; rendered with jinja2 when a request arrives as chat messages.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Texts longer than this are tokenised without holding the GIL (see `encode`).
_GIL_FREE_CHARS = 4096


class TokenizerError(ValueError):
    """A tokenizer directory we cannot use."""


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, so byte-level BPE round-trips any text."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@functools.cache
def _byte_decoder() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(_byte_alphabet())}


def _filler_pieces(count: int) -> list[str]:
    """`count` lowercase letter strings, shortest first, those with a leading space ("Ġ" in the
    byte alphabet) before the bare ones, as in GPT-style vocabularies: " aa", " ab", ..., "aa",
    ... Letters and one leading space stay in one ByteLevel pre-token, so a whole piece reaches
    the model and can match as one token."""
    pieces: list[str] = []
    for length in itertools.count(2):
        words = [
            "".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=length)
        ]
        for piece in ["Ġ" + word for word in words] + words:
            pieces.append(piece)
            if len(pieces) == count:
                return pieces
    raise AssertionError("unreachable")


def build_byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer with exactly `vocab_size` ids: 256 bytes (ids 0-255), the ChatML
    specials (256-258), then multi-letter pieces (`_filler_pieces`).

    It is a Unigram model with one score for every piece, so encoding picks the segmentation with
    the fewest tokens: a piece's own text encodes back to that one piece, i.e. every id from 256
    up round-trips through decode and encode (clients that re-tokenise outputs count right).
    Bytes above 127 alone are not valid UTF-8 and cannot round-trip on their own."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(
            f"vocab_size: need at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    pieces = (
        _byte_alphabet()
        + list(SPECIAL_TOKENS)
        + _filler_pieces(vocab_size - 256 - len(SPECIAL_TOKENS))
    )
    tok = Tokenizer(models.Unigram([(piece, -1.0) for piece in pieces], None, False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


class TextTokenizer:
    """encode / decode / chat template over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config = config or {}
        self.chat_template: str | None = self.config.get("chat_template")
        # Byte-level pieces (GPT-2 / Qwen style) spell raw bytes in a printable alphabet.
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.special_ids = frozenset(
            idx for idx, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"model_path: no tokenizer.json in {str(path)!r}")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(Tokenizer.from_file(str(file)), config)

    @classmethod
    def byte_level(cls, vocab_size: int) -> TextTokenizer:
        return cls(
            build_byte_level_tokenizer(vocab_size),
            {"chat_template": CHATML_TEMPLATE, "eos_token": "<|endoftext|>"},
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:
            # `encode` holds the GIL throughout (seconds for a long text: every other thread,
            # the server's event loop included, stops); `encode_batch` releases it.
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    @property
    def is_byte_level(self) -> bool:
        """Whether pieces spell raw bytes in GPT-2's printable alphabet."""
        return self._byte_level

    def piece(self, token_id: int) -> str | None:
        """The token's vocabulary entry as stored (byte-alphabet form for byte-level)."""
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's raw bytes (OpenAI's `bytes` field). Byte-level pieces map back exactly,
        so a lone byte of a multi-byte character keeps its value where `token_text` shows
        U+FFFD; other tokens fall back to the UTF-8 of their text."""
        piece = self._tok.id_to_token(token_id)
        if piece is not None and self._byte_level and token_id not in self.special_ids:
            decoder = _byte_decoder()
            if all(ch in decoder for ch in piece):
                return [decoder[ch] for ch in piece]
        return list(self.token_text(token_id).encode("utf-8"))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise TokenizerError("chat_template: this model's tokenizer has none")
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )

    def save(self, path: str | Path, eos_token: str = "<|endoftext|>") -> None:
        """Writes tokenizer.json and tokenizer_config.json (transformers' AutoTokenizer loads them)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos_token,
            "pad_token": eos_token,
            "model_max_length": 1_000_000,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
