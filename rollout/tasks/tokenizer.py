"""Character-level tokenizer shared by every toy task.

One fixed vocabulary for all tasks, so one model can be trained on any mix of them and token ids
never depend on the data. Ids 0..2 are the specials; the rest are single characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
# '<' and '>' are deliberately absent: they only ever open/close a special token, so encoding
# "<eos>" inside a text is unambiguous.
CHARACTERS: str = "0123456789+-*=,#:;|.() \nabcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """Maps text to ids one character at a time; special tokens are written as `<eos>` etc.

    Invariants: `decode(encode(s)) == s` for every text made of `CHARACTERS` (specials are kept
    with `skip_special_tokens=False`); ids the vocabulary does not have (a model's vocabulary may
    be padded larger) decode to "".
    """

    def __init__(self) -> None:
        self._tokens: tuple[str, ...] = SPECIAL_TOKENS + tuple(CHARACTERS)
        self._ids: dict[str, int] = {tok: i for i, tok in enumerate(self._tokens)}

    @property
    def vocab(self) -> tuple[str, ...]:
        """Every token, indexed by id."""
        return self._tokens

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._ids[tok] for tok in SPECIAL_TOKENS)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text`; `<pad>`, `<bos>` and `<eos>` written in the text become their ids.

        Raises ValueError naming the first character the vocabulary cannot encode.
        """
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode expects str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            if text[i] == "<":
                special = next((tok for tok in SPECIAL_TOKENS if text.startswith(tok, i)), None)
                if special is None:
                    raise ValueError(
                        f"CharTokenizer cannot encode '<' at position {i} of {text!r}: '<' may only "
                        f"open one of the special tokens {', '.join(SPECIAL_TOKENS)}"
                    )
                ids.append(self._ids[special])
                i += len(special)
                continue
            tok_id = self._ids.get(text[i])
            if tok_id is None:
                raise ValueError(
                    f"CharTokenizer cannot encode {text[i]!r} (U+{ord(text[i]):04X}) at position {i} "
                    f"of {text!r}; supported characters: {CHARACTERS!r} and {', '.join(SPECIAL_TOKENS)}"
                )
            ids.append(tok_id)
            i += 1
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary decode to "" (and specials too, by default)."""
        pieces = []
        for raw in ids:
            tok_id = int(raw)
            if not 0 <= tok_id < len(self._tokens):
                continue
            if skip_special_tokens and tok_id < len(SPECIAL_TOKENS):
                continue
            pieces.append(self._tokens[tok_id])
        return "".join(pieces)

    def to_hf(self) -> Tokenizer:
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (same ids, same text).

        Every character is its own pre-token and word; the specials are added tokens, so `<eos>`
        in a text encodes to its id; decoding concatenates (no spaces between tokens). A
        character outside the vocabulary fails to encode, as with `encode`.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {tok: i for i, tok in enumerate(self._tokens)}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
        # [\s\S] rather than '.', which would not match the newline character.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(list(SPECIAL_TOKENS))
        return hf

    def save_hf(self, path: str | Path) -> Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `path` (created if missing).

        Both the engine's `TextTokenizer.from_dir` and transformers' `AutoTokenizer` load them;
        no BOS is added on encode (prompts carry `<bos>` explicitly, as `Task.encode_prompt` does).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.to_hf().save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": False,
            "model_max_length": 1_000_000,
            "chat_template": None,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return path

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
