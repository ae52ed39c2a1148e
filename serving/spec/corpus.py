"""External corpora for drafting, with SGLang's NGRAM `/add_external_corpus` semantics.

A corpus is a named `NgramIndex`. `add` takes exactly one source:
  * `documents`: strings, tokenised with the engine tokenizer (no special tokens); empty ones are
    skipped, as SGLang does.
  * `token_chunks`: lists of token ids. Here each chunk is one document (a draft never runs from
    one chunk into the next), and SGLang's separator id -2**31 inside a chunk also splits it.
    (SGLang appends chunks into one stream; its HTTP route only accepts `documents`/`file_path`,
    chunks are what its tokenizer manager forwards to the scheduler. We take them over HTTP too,
    so a controller that already holds token ids does not detokenise them.)
  * `file_path`: a file on the server. `*.jsonl`: one JSON value per non-empty line, a string
    (a document, SGLang's format) or a list of token ids (a chunk). Any other file: its whole
    text is one document.
`corpus_id` may be omitted (a fresh hex id is generated, as SGLang does); an id already present
is refused (SGLang: remove it first). Removing an unknown id succeeds (SGLang erases silently).

All corpora together hold at most `max_total_tokens` tokens (SGLang's
`--speculative-ngram-external-corpus-max-tokens`); an add that would exceed it is refused whole
with an error naming the limit. Adds build their index on the caller's thread and publish it
atomically, so the engine thread never waits on tokenisation or sorting.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout_accel.serving.spec.draft_index import IndexConfig, NgramIndex

SGLANG_SEPARATOR = -(2**31)  # SGLang's document separator inside token chunks


class CorpusError(ValueError):
    """A bad corpus request; the message names the field (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class AddedCorpus:
    corpus_id: str
    loaded_token_count: int
    message: str


class CorpusRegistry:
    """Named corpora under one token budget. Thread-safe: adds and removes may come from any
    thread while the engine thread reads indexes with `get`."""

    def __init__(
        self,
        max_total_tokens: int = 10_000_000,
        index_config: IndexConfig | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if max_total_tokens < 1:
            raise ValueError("max_total_tokens must be >= 1")
        self.max_total_tokens = max_total_tokens
        self.index_config = index_config or IndexConfig()
        self.vocab_size = vocab_size
        self._corpora: dict[str, NgramIndex] = {}
        self._lock = threading.Lock()

    # -- queries ----------------------------------------------------------------------------

    def get(self, corpus_id: str) -> NgramIndex | None:
        return self._corpora.get(corpus_id)

    def list(self) -> dict[str, int]:
        """corpus_id -> loaded token count (SGLang's `corpus_token_counts`)."""
        return {cid: index.num_tokens for cid, index in list(self._corpora.items())}

    @property
    def total_tokens(self) -> int:
        return sum(index.num_tokens for index in list(self._corpora.values()))

    # -- changes ----------------------------------------------------------------------------

    def add(
        self,
        corpus_id: str | None = None,
        *,
        documents: Sequence[str] | None = None,
        token_chunks: Sequence[Sequence[int]] | None = None,
        file_path: str | None = None,
        encode: Callable[[str], list[int]] | None = None,
    ) -> AddedCorpus:
        """Tokenise, index and publish one corpus. `encode` tokenises documents."""
        if corpus_id is not None and (not isinstance(corpus_id, str) or not corpus_id):
            raise CorpusError("corpus_id: expected a non-empty string")
        given = [
            name
            for name, value in (
                ("file_path", file_path),
                ("documents", documents),
                ("token_chunks", token_chunks),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise CorpusError(
                "give exactly one of file_path, documents, token_chunks"
                + (f" (got {', '.join(given)})" if given else "")
            )
        cid = corpus_id or uuid.uuid4().hex
        if cid in self._corpora:
            raise CorpusError(
                f"corpus_id: external corpus {cid!r} already exists. Remove it before adding a "
                "new corpus with the same id."
            )
        if file_path is not None:
            docs = self._read_file(file_path, encode)
        elif documents is not None:
            docs = self._encode_documents(documents, encode, "documents")
        else:
            docs = self._check_chunks(token_chunks, "token_chunks")
        loaded = sum(len(d) for d in docs)
        if loaded == 0:
            raise CorpusError(f"{given[0]}: external corpus is empty; no tokens were loaded")
        index = NgramIndex(self.index_config)
        for doc in docs:
            index.add_document(doc)
        index.build()
        with self._lock:
            if cid in self._corpora:
                raise CorpusError(f"corpus_id: external corpus {cid!r} already exists")
            total = self.total_tokens
            if total + loaded > self.max_total_tokens:
                raise CorpusError(
                    f"{given[0]}: {loaded} tokens would exceed the external-corpus budget of "
                    f"{self.max_total_tokens} tokens ({total} loaded; "
                    "--speculative-ngram-external-corpus-max-tokens)"
                )
            self._corpora[cid] = index
        return AddedCorpus(cid, loaded, f"Loaded corpus '{cid}' with {loaded} tokens.")

    def remove(self, corpus_id: str) -> str:
        if not isinstance(corpus_id, str) or not corpus_id:
            raise CorpusError("corpus_id is required.")
        with self._lock:
            self._corpora.pop(corpus_id, None)
        return f"Removed corpus '{corpus_id}'."

    def clear(self) -> None:
        with self._lock:
            self._corpora.clear()

    # -- parsing ----------------------------------------------------------------------------

    def _encode_documents(
        self, documents: Any, encode: Callable[[str], list[int]] | None, field: str
    ) -> list[list[int]]:
        if not isinstance(documents, list | tuple):
            raise CorpusError(f"{field}: expected a list of strings")
        if encode is None:
            raise CorpusError(f"{field}: this engine has no tokenizer; send token_chunks")
        out = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise CorpusError(f"{field}[{i}]: expected a string")
            if doc:
                out.append(list(encode(doc)))
        return [d for d in out if d]

    def _check_chunks(self, chunks: Any, field: str) -> list[list[int]]:
        if not isinstance(chunks, list | tuple):
            raise CorpusError(f"{field}: expected a list of lists of token ids")
        docs: list[list[int]] = []
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, list | tuple):
                raise CorpusError(f"{field}[{i}]: expected a list of token ids")
            current: list[int] = []
            for j, tok in enumerate(chunk):
                if isinstance(tok, bool) or not isinstance(tok, int):
                    raise CorpusError(f"{field}[{i}][{j}]: expected an integer token id")
                if tok == SGLANG_SEPARATOR:
                    docs.append(current)
                    current = []
                    continue
                if tok < 0 or (self.vocab_size is not None and tok >= self.vocab_size):
                    raise CorpusError(
                        f"{field}[{i}][{j}]: token id {tok} is outside the vocabulary "
                        f"[0, {self.vocab_size})"
                    )
                current.append(tok)
            docs.append(current)
        return [d for d in docs if d]

    def _read_file(
        self, file_path: Any, encode: Callable[[str], list[int]] | None
    ) -> list[list[int]]:
        if not isinstance(file_path, str) or not file_path:
            raise CorpusError("file_path: expected a non-empty string")
        path = Path(file_path)
        if not path.is_file():
            raise CorpusError(f"file_path: external corpus path does not exist: {file_path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"file_path: cannot read {file_path} ({exc})") from exc
        if path.suffix != ".jsonl":
            return self._encode_documents([text], encode, "file_path")
        docs: list[list[int]] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"file_path: invalid JSON at line {line_no}: {exc.msg}") from exc
            where = f"file_path line {line_no}"
            if isinstance(record, str):
                docs += self._encode_documents([record], encode, where)
            elif isinstance(record, list):
                docs += self._check_chunks([record], where)
            else:
                raise CorpusError(f"{where}: expected a JSON string or a list of token ids")
        return docs
