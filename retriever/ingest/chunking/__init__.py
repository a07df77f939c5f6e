"""Chunking: documents into token-budgeted, span-exact chunks.

``syntax/v7`` cuts code and config files by their syntax tree (tree-sitter), ``sections/v6``
cuts Markdown, reStructuredText and prose by headings, paragraphs and sentences (both pack
an outline with ``structure.StructuredChunker``), and ``windows/v1`` (overlapping line
windows) cuts everything else and whatever the others cannot trust.
"""

from __future__ import annotations

from retriever.ingest.chunking.base import Chunker, ChunkSpan, TokenCounter
from retriever.ingest.chunking.languages import (
    DOC_LANGUAGES,
    detect_language,
    normalize_language,
)
from retriever.ingest.chunking.structure import StructuredChunker, WordPositions
from retriever.ingest.chunking.windows import TokenOffsets, WindowChunker

__all__ = [
    "DOC_LANGUAGES",
    "ChunkSpan",
    "Chunker",
    "ChunkerSet",
    "StructuredChunker",
    "TokenCounter",
    "WindowChunker",
    "build_chunkers",
    "detect_language",
    "normalize_language",
]


class ChunkerSet:
    """The chunker for each language, with a fallback for all others."""

    def __init__(self, default: Chunker, by_language: dict[str, Chunker] | None = None,
                 config: str = "") -> None:
        """``config`` names the budgets the chunkers were built with (it goes into every
        document's chunking signature, so a change re-chunks)."""
        self._default = default
        self._by_language = dict(by_language or {})
        self.config = config

    def chunker_for(self, language: str) -> Chunker:
        return self._by_language.get(language, self._default)

    @property
    def names(self) -> list[str]:
        return sorted({self._default.name, *(c.name for c in self._by_language.values())})


def build_chunkers(count_tokens: TokenCounter, token_offsets: TokenOffsets, budget: int,
                   overlap: int, max_chars: int, structured: bool = True,
                   whitespace_split: bool = False,
                   word_positions: WordPositions | None = None) -> ChunkerSet:
    """The service's chunkers for a text budget of ``budget`` tokens per chunk.
    ``whitespace_split``: the tokenizer cuts words at whitespace and drops it (BERT's), so a
    chunk's tokens can be read from its text's tokens; ``word_positions``: a text's words and
    the tokens before each, where the tokenizer allows (StructuredChunker)."""
    windows = WindowChunker(count_tokens, token_offsets, budget, overlap, max_chars)
    config = f"budget={budget} overlap={overlap} max_chars={max_chars}"
    if not structured:
        return ChunkerSet(windows, config=config)
    # Imported here: the grammars load only when structured chunking is on.
    from retriever.ingest.chunking import docs, syntax
    code = StructuredChunker("syntax/v7", syntax.OUTLINERS, windows, count_tokens,
                             whitespace_split=whitespace_split,
                             word_positions=word_positions, fill_split_units=True)
    prose = StructuredChunker("sections/v6", docs.OUTLINERS, windows, count_tokens,
                              prose=frozenset(docs.OUTLINERS),
                              whitespace_split=whitespace_split,
                              word_positions=word_positions)
    by_language: dict[str, Chunker] = dict.fromkeys(syntax.OUTLINERS, code)
    by_language.update(dict.fromkeys(docs.OUTLINERS, prose))
    # Languages neither knows are cut by windows, the chunks saying why.
    return ChunkerSet(code, by_language, config=config)
