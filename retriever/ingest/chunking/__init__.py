"""Chunking: documents into token-budgeted, span-exact chunks.

One module per family; ``chunker_for(language)`` picks the chunker. Today every language
uses overlapping line windows; syntax-aware and heading-aware chunkers plug in here.
"""

from __future__ import annotations

from retriever.ingest.chunking.base import Chunker, ChunkSpan, TokenCounter
from retriever.ingest.chunking.languages import DOC_LANGUAGES, detect_language
from retriever.ingest.chunking.windows import WindowChunker

__all__ = [
    "DOC_LANGUAGES",
    "ChunkSpan",
    "Chunker",
    "ChunkerSet",
    "TokenCounter",
    "WindowChunker",
    "detect_language",
]


class ChunkerSet:
    """The chunker for each language, with a fallback for all others."""

    def __init__(self, default: Chunker, by_language: dict[str, Chunker] | None = None) -> None:
        self._default = default
        self._by_language = dict(by_language or {})

    def chunker_for(self, language: str) -> Chunker:
        return self._by_language.get(language, self._default)

    @property
    def names(self) -> list[str]:
        return sorted({self._default.name, *(c.name for c in self._by_language.values())})
