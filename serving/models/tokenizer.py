"""Text tokenizer: loads an HF `tokenizer.json`, and builds a byte-level one offline for presets.

The engine only needs encode, decode, special-token ids and the chat template, so we hold a
`tokenizers.Tokenizer` directly rather than depending on transformers at run time.
"""

from __future__ import annotations

import json
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


def build_byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids: 256 bytes, the ChatML specials,
    then filler tokens `<N>` (never produced by encoding; they decode to their name)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(
            f"vocab_size: need at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    specials = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(256 + len(SPECIAL_TOKENS), vocab_size):
        vocab[f"<{i}>"] = i
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
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
