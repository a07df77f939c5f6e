"""Overlapping line windows budgeted in the embedder's tokens.

A window grows line by line until the next line would pass the budget. It then ends at the
best break inside its second half — after a blank line, or before a line that starts at
column 0 (a top-level definition, a heading) — so units that fit are rarely cut. The next
window starts with whole trailing lines of the previous one, up to ``overlap`` tokens. A
line longer than the budget is cut between tokens, at a whitespace gap where there is one,
never inside a token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from retriever.ingest.chunking.base import ChunkSpan, TokenCounter

_LINE = re.compile(r"[^\n]*\n|[^\n]+")

# (texts) -> per text, the (start_char, end_char) offsets of each of its tokens.
TokenOffsets = Callable[[Sequence[str]], list[list[tuple[int, int]]]]


@dataclass(slots=True)
class _Unit:
    """A line, or a piece of a line too long for one window."""

    start_char: int
    end_char: int
    line_no: int  # 1-based
    tokens: int
    blank: bool
    top_level: bool  # starts at column 0 and is not blank: a good place to start a window


class WindowChunker:
    name = "windows/v1"

    def __init__(
        self,
        count_tokens: TokenCounter,
        token_offsets: TokenOffsets,
        budget: int,
        overlap: int,
    ) -> None:
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        if not 0 <= overlap < budget:
            raise ValueError(f"overlap must be in [0, budget), got {overlap} for {budget}")
        self._count = count_tokens
        self._offsets = token_offsets
        self.budget = budget
        self.overlap = overlap

    def chunk(self, content: str, *, path: str = "", language: str = "text") -> list[ChunkSpan]:
        units = self._units(content)
        if not units:
            return []
        byte_at = _ByteOffsets(content)
        spans: list[ChunkSpan] = []
        start = 0
        n = len(units)
        must_end = 0  # a window ends after this unit: the first one its predecessor lacks
        while start < n:
            # Skip leading blank units: a window never starts on whitespace.
            while start < n and units[start].blank:
                start += 1
            if start >= n:
                break
            end, used = start, 0
            while end < n and used + units[end].tokens <= self.budget:
                used += units[end].tokens
                end += 1
            if end < n:
                end = self._best_break(units, start, end, must_end + 1)
            # Trim trailing blank units from the window's text.
            last = end
            while last > start and units[last - 1].blank:
                last -= 1
            first_u, last_u = units[start], units[last - 1]
            text = content[first_u.start_char : last_u.end_char]
            spans.append(
                ChunkSpan(
                    text=text,
                    start_char=first_u.start_char,
                    end_char=last_u.end_char,
                    start_byte=byte_at(first_u.start_char),
                    end_byte=byte_at(last_u.end_char),
                    start_line=first_u.line_no,
                    end_line=last_u.line_no,
                    token_count=sum(u.tokens for u in units[start:last]),
                )
            )
            if end >= n:
                break
            must_end = end
            while must_end < n and units[must_end].blank:
                must_end += 1
            if must_end >= n:
                break
            if units[end - 1].blank:
                # A clean break (a blank line: between functions, paragraphs): the next unit
                # starts fresh, so one that fits the budget is never split by overlap.
                start = must_end
            else:
                start = self._overlap_start(units, start, end, units[must_end].tokens)
        return spans

    # -- pieces ----------------------------------------------------------------------------
    def _units(self, content: str) -> list[_Unit]:
        lines = [(m.start(), m.end()) for m in _LINE.finditer(content)]
        if not lines:
            return []
        texts = [content[s:e] for s, e in lines]
        counts = self._count(texts)
        units: list[_Unit] = []
        long_lines: list[int] = []
        for i, ((s, e), text, tokens) in enumerate(zip(lines, texts, counts, strict=True)):
            blank = not text.strip()
            units.append(_Unit(s, e, i + 1, 0 if blank else tokens, blank,
                               not blank and not text[0].isspace()))
            if tokens > self.budget:
                long_lines.append(len(units) - 1)
        if long_lines:
            units = self._split_long(content, units, set(long_lines))
        return units

    def _split_long(self, content: str, units: list[_Unit], long_idx: set[int]) -> list[_Unit]:
        order = sorted(long_idx)
        offsets = self._offsets([content[units[i].start_char : units[i].end_char] for i in order])
        pieces: dict[int, list[_Unit]] = {}
        for i, offs in zip(order, offsets, strict=True):
            u = units[i]
            out: list[_Unit] = []
            t = 0
            piece_start = u.start_char
            while t < len(offs):
                stop = min(t + self.budget, len(offs))
                if stop < len(offs):
                    # Prefer a whitespace gap in the second half of the piece.
                    for j in range(stop, t + self.budget // 2, -1):
                        if offs[j][0] > offs[j - 1][1]:
                            stop = j
                            break
                end_char = u.start_char + offs[stop][0] if stop < len(offs) else u.end_char
                # A piece cut inside a word can tokenize longer on its own: shrink until the
                # piece, counted alone, fits.
                tokens = self._count([content[piece_start:end_char]])[0]
                while tokens > self.budget and stop - t > 1:
                    stop = max(t + 1, stop - (tokens - self.budget))
                    end_char = u.start_char + offs[stop][0]
                    tokens = self._count([content[piece_start:end_char]])[0]
                out.append(_Unit(piece_start, end_char, u.line_no, tokens, False,
                                 piece_start == u.start_char and u.top_level))
                piece_start = end_char
                t = stop
            pieces[i] = out
        result: list[_Unit] = []
        for i, u in enumerate(units):
            result.extend(pieces.get(i, [u]))
        return result

    def _best_break(self, units: list[_Unit], start: int, end: int, least: int) -> int:
        """The end (exclusive) of a full window: the latest good break in its second half,
        and not before ``least`` (so that the window adds something to the previous one)."""
        floor = max(start + max(1, (end - start) // 2), least)
        for j in range(end, floor - 1, -1):
            if j <= start:
                break
            if units[j - 1].blank or (j < len(units) and units[j].top_level):
                return j
        return end

    def _overlap_start(self, units: list[_Unit], start: int, end: int, next_tokens: int) -> int:
        """Where the next window starts: whole units before ``end`` up to ``overlap`` tokens,
        always after ``start`` so that every window advances, and leaving room in the budget
        for the ``next_tokens`` of the first new unit, so that no window is all overlap."""
        room = min(self.overlap, self.budget - next_tokens)
        j, used = end, 0
        while j - 1 > start and used + units[j - 1].tokens <= room:
            used += units[j - 1].tokens
            j -= 1
        # Do not start on a piece inside a split line unless the overlap covers it whole.
        return j


class _ByteOffsets:
    """Char offset -> UTF-8 byte offset, fast for ASCII and correct for the rest."""

    def __init__(self, content: str) -> None:
        self._content = content
        self._ascii = content.isascii()
        self._cache: tuple[int, int] = (0, 0)  # (char, byte) of the last answer

    def __call__(self, char: int) -> int:
        if self._ascii:
            return char
        c0, b0 = self._cache
        if char < c0:
            c0, b0 = 0, 0
        b = b0 + len(self._content[c0:char].encode("utf-8", "surrogatepass"))
        self._cache = (char, b)
        return b
