"""Overlapping line windows budgeted in the embedder's tokens.

A window grows line by line until the next line would pass the budget. It then ends at the
best break inside its second half — after a blank line, or before a line that starts at
column 0 (a top-level definition, a heading) — so units that fit are rarely cut. The next
window starts with whole trailing lines of the previous one, up to ``overlap`` tokens. A
line longer than the budget is cut between tokens, at a whitespace gap where there is one,
never inside a token.

A window also holds at most ``max_chars`` characters, so that text the tokenizer folds into
a few tokens (a 1 MiB word is one [UNK]) cannot make a huge chunk that every hit then
carries. A line longer than that is first cut at the cap, at the last whitespace or else
punctuation in the cap's second half, else right at the cap (then inside a token: there is
no better place). The default cap is far above what a full window of code or prose holds
(about 3 characters a token: a 222-token window of code, prose, markup or JSON measured at
most 2.8k characters over 40k windows), so it only cuts such degenerate text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from retriever.ingest.chunking.base import ChunkSpan, TokenCounter

_LINE = re.compile(r"[^\n]*\n|[^\n]+")
# Matched from a position, these end right after the last whitespace / punctuation
# character before the match's end bound: where an over-long line is best cut.
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)
_LAST_PUNCT = re.compile(r".*[^\w\s]", re.DOTALL)
DEFAULT_MAX_CHARS = 4096

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


_SURROGATE = re.compile("[\ud800-\udfff]")


_Chunk = Callable[..., list[ChunkSpan]]


def surrogate_safe(chunk: _Chunk) -> _Chunk:
    """A chunker's ``chunk`` that takes lone surrogates, which no tokenizer does: the text
    is cut with each as U+FFFD (the same characters at the same offsets, and the same UTF-8
    length: 3 bytes, as Python's surrogatepass writes one), so its spans are spans of the
    original, whose text they return."""
    @functools.wraps(chunk)
    def wrapper(self: object, content: str, **kw: str) -> list[ChunkSpan]:
        if _SURROGATE.search(content) is None:
            return chunk(self, content, **kw)
        spans = chunk(self, _SURROGATE.sub("\ufffd", content), **kw)
        return [replace(s, text=content[s.start_char:s.end_char]) for s in spans]
    return wrapper


class WindowChunker:
    name = "windows/v1"

    def __init__(
        self,
        count_tokens: TokenCounter,
        token_offsets: TokenOffsets,
        budget: int,
        overlap: int,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        if not 0 <= overlap < budget:
            raise ValueError(f"overlap must be in [0, budget), got {overlap} for {budget}")
        if max_chars < 2:
            raise ValueError(f"max_chars must be at least 2, got {max_chars}")
        self._count = count_tokens
        self.token_offsets = token_offsets
        self.budget = budget
        self.overlap = overlap
        self.max_chars = max_chars

    @surrogate_safe
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
            first_char = units[start].start_char
            while (end < n and used + units[end].tokens <= self.budget
                   and units[end].end_char - first_char <= self.max_chars):
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
                start = self._overlap_start(units, start, end, must_end)
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
            # (A blank line of any length needs no cut: no window starts or ends on one, and
            # one that does not fit under the cap ends the window before it.)
            if not blank and (tokens > self.budget or e - s > self.max_chars):
                long_lines.append(len(units) - 1)
        if long_lines:
            units = self._split_long(content, units, set(long_lines))
        return units

    def _split_long(self, content: str, units: list[_Unit], long_idx: set[int]) -> list[_Unit]:
        """Cut each long unit into pieces within both the character cap and the budget."""
        # First at the character cap, then each piece still over the budget between tokens.
        segs = [(i, a, b) for i in sorted(long_idx)
                for a, b in _cut_chars(content, units[i].start_char, units[i].end_char,
                                       self.max_chars)]
        counts = self._count([content[a:b] for _, a, b in segs])
        over = [k for k, c in enumerate(counts) if c > self.budget]
        offsets = dict(zip(over, self.token_offsets([content[segs[k][1] : segs[k][2]]
                                                for k in over]), strict=True))
        pieces: dict[int, list[_Unit]] = {}
        for k, ((i, a, b), c) in enumerate(zip(segs, counts, strict=True)):
            u = units[i]
            cuts = self._cut_tokens(content, a, b, offsets[k]) if k in offsets else [(a, b, c)]
            for pa, pb, tokens in cuts:
                blank = not content[pa:pb].strip()
                pieces.setdefault(i, []).append(_Unit(
                    pa, pb, u.line_no, 0 if blank else tokens, blank,
                    pa == u.start_char and u.top_level))
        result: list[_Unit] = []
        for i, u in enumerate(units):
            result.extend(pieces.get(i, [u]))
        return result

    def _cut_tokens(self, content: str, start: int, end: int, offs: list[tuple[int, int]]
                    ) -> list[tuple[int, int, int]]:
        """``content[start:end]`` (whose tokens are at ``offs``, relative to ``start``) as
        (start, end, tokens) pieces of at most ``budget`` tokens, cut between tokens."""
        out: list[tuple[int, int, int]] = []
        t = 0
        piece_start = start
        while t < len(offs):
            stop = min(t + self.budget, len(offs))
            if stop < len(offs):
                # Prefer a whitespace gap in the second half of the piece.
                for j in range(stop, t + self.budget // 2, -1):
                    if offs[j][0] > offs[j - 1][1]:
                        stop = j
                        break
            end_char = start + offs[stop][0] if stop < len(offs) else end
            # A piece cut inside a word can tokenize longer on its own: shrink until the
            # piece, counted alone, fits.
            tokens = self._count([content[piece_start:end_char]])[0]
            while tokens > self.budget and stop - t > 1:
                stop = max(t + 1, stop - (tokens - self.budget))
                end_char = start + offs[stop][0]
                tokens = self._count([content[piece_start:end_char]])[0]
            out.append((piece_start, end_char, tokens))
            piece_start = end_char
            t = stop
        return out

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

    def _overlap_start(self, units: list[_Unit], start: int, end: int, nxt: int) -> int:
        """Where the next window starts: whole units before ``end`` up to ``overlap`` tokens,
        always after ``start`` so that every window advances, and leaving room in the budget
        and under the character cap for unit ``nxt``, the first new one, so that no window
        is all overlap."""
        room = min(self.overlap, self.budget - units[nxt].tokens)
        last_char = units[nxt].end_char
        j, used = end, 0
        while (j - 1 > start and used + units[j - 1].tokens <= room
               and last_char - units[j - 1].start_char <= self.max_chars):
            used += units[j - 1].tokens
            j -= 1
        # Do not start on a piece inside a split line unless the overlap covers it whole.
        return j


def _cut_chars(content: str, start: int, end: int, cap: int) -> list[tuple[int, int]]:
    """``content[start:end]`` as consecutive (start, end) pieces of at most ``cap``
    characters, each cut after the last whitespace, else punctuation, in the second half of
    its room, else at the cap."""
    out: list[tuple[int, int]] = []
    pos = start
    while end - pos > cap:
        low, limit = pos + cap // 2, pos + cap
        m = _LAST_SPACE.match(content, low, limit) or _LAST_PUNCT.match(content, low, limit)
        cut = m.end() if m is not None else limit
        out.append((pos, cut))
        pos = cut
    out.append((pos, end))
    return out


class _ByteOffsets:
    """Char offset -> UTF-8 byte offset, fast for ASCII and correct for the rest: the byte
    offset of every ``_BLOCK``-th character is taken once, so an answer encodes at most one
    block, in any order (overlapping windows ask for offsets behind the last one: encoding
    from the start each time made a 1 MB non-ASCII document take seconds)."""

    _BLOCK = 4096

    def __init__(self, content: str) -> None:
        self._content = content
        self._ascii = content.isascii()
        self._marks: list[int] | None = None  # byte offset of char k * _BLOCK

    def __call__(self, char: int) -> int:
        if self._ascii:
            return char
        if self._marks is None:
            marks, b, text = [0], 0, self._content
            for start in range(0, len(text), self._BLOCK):
                b += len(text[start:start + self._BLOCK].encode("utf-8", "surrogatepass"))
                marks.append(b)
            self._marks = marks
        k = min(char // self._BLOCK, len(self._marks) - 1)
        start = k * self._BLOCK
        return self._marks[k] + len(self._content[start:char].encode("utf-8", "surrogatepass"))
