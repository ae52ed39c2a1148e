"""The presets' offline tokenizer: ids round-trip through decode and encode (clients such as
bench_serving re-tokenise outputs), transformers loads the saved files and agrees, raw bytes."""

from __future__ import annotations

import pytest
import transformers

from rollout_accel.serving.models.tokenizer import SPECIAL_TOKENS, TextTokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.byte_level(512)


def test_ids_from_256_up_round_trip(tok: TextTokenizer) -> None:
    for token_id in range(256, 512):
        assert tok.encode(tok.token_text(token_id)) == [token_id], token_id
    # Non-special ids also round-trip through the default decode (specials are skipped there).
    for token_id in range(256 + len(SPECIAL_TOKENS), 512):
        assert tok.encode(tok.decode([token_id])) == [token_id]
    # ASCII bytes round-trip too; a lone byte above 127 is not valid UTF-8 on its own.
    for token_id in range(128):
        assert tok.encode(tok.token_text(token_id)) == [token_id]


def test_specials_and_stable_ids(tok: TextTokenizer) -> None:
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == [256, 257, 258]
    assert tok.special_ids == frozenset({256, 257, 258})
    assert tok.encode("A") == [65] and tok.vocab_size == 512
    text = "<|im_start|>user\nhi there<|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode(text)) == "user\nhi there"
    with pytest.raises(TokenizerError, match="vocab_size"):
        TextTokenizer.byte_level(100)


def test_any_text_round_trips_and_pieces_shorten_it(tok: TextTokenizer) -> None:
    text = "Grüße, a big cat — 123 ok\n\t🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # multi-letter pieces are used


def test_large_vocab_round_trips() -> None:
    big = TextTokenizer.byte_level(20_000)
    assert big.vocab_size == 20_000
    for token_id in range(256, 20_000, 37):
        assert big.encode(big.token_text(token_id)) == [token_id]


def test_transformers_loads_the_saved_tokenizer(tok: TextTokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "hello a big cat<|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert TextTokenizer.from_dir(tmp_path).encode(text) == tok.encode(text)


def test_token_bytes(tok: TextTokenizer) -> None:
    assert tok.token_bytes(65) == [65]
    assert tok.token_bytes(200) == [200]  # the raw byte, where token_text shows U+FFFD
    assert tok.token_text(200) == "\ufffd"
    piece = tok.token_text(300)
    assert tok.token_bytes(300) == list(piece.encode("utf-8"))
    assert tok.token_bytes(256) == list(b"<|endoftext|>")
