"""The chunker contract: a document's text in, exact spans out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Token lengths of texts in the embedder's own tokenizer, special tokens excluded.
TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk: ``text == content[start_char:end_char]``; lines are 1-based inclusive,
    bytes are 0-based offsets into the UTF-8 content, end exclusive."""

    text: str
    start_char: int
    end_char: int
    start_byte: int
    end_byte: int
    start_line: int
    end_line: int
    token_count: int
    # What the chunk is: its symbol or heading path ("class Session > def request",
    # "Install > From source"), "" when none; its kind ("function", "section", "window"...).
    symbol: str = ""
    kind: str = ""
    # The chunker that cut it ("syntax/v7", "windows/v1"...; "" = the document's chunker)
    # and, when a structured chunker degraded to windows, why ("parse-error", ...).
    chunker: str = ""
    fallback: str = ""
    # Embedded in the header but not returned: the enclosing signature of a piece of a
    # split definition ("def request(self, method, url):"), "" when none.
    context: str = ""


class Chunker(Protocol):
    """Cuts one document into chunks of at most ``budget`` tokens and a bounded number of
    characters each (so that no hit carries an outsized text).

    ``name`` (e.g. "windows/v1") is part of every chunk id it produces: a change to how a
    chunker cuts must change its name so old vectors are not reused for new texts.
    """

    name: str

    def chunk(self, content: str, *, path: str, language: str) -> list[ChunkSpan]:
        """Spans covering every non-blank line of ``content``, in order; adjacent spans may
        overlap. Never raises on any text."""
        ...
