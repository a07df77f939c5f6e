"""Structure-aware chunking: an outline of units packed into token-budgeted chunks.

An outliner (``syntax`` for code, ``docs`` for Markdown/RST/prose) says where the units are;
the packer here decides the chunks:

- every unit is widened to whole lines (unless it shares a line with a sibling), and the
  lines between siblings (comments, decorators, blank lines) go to the unit that follows;
- a unit that fits the budget is one chunk, never split; small neighbours (each under half
  the budget) merge up to the budget; a tiny piece (a class's head line, a closing brace)
  joins its neighbour; units marked standalone (imports, the module docstring) stay alone
  unless tiny themselves (a chunk of "import os" alone is a short text that matches short
  queries for the wrong reasons: on requests' history, four of the twelve worst-ranked
  queries had a wrong file's tiny imports chunk on top);
- an oversized unit splits at its children (a class at its methods, a function at its
  statements, a section at its subsections and blocks, a paragraph at its sentences); its
  head and tail text become pieces of the same sequence; each piece carries the symbol path
  and the enclosing signature (embedded in its header, not returned);
- an oversized unit without children, and any chunk that still counts over the budget,
  is cut by ``windows/v1`` inside the unit's span — never mid-line unless one line alone is
  over the budget.

Documents the outline cannot be trusted for (unknown language, parse errors, minified or
generated text with very long lines) degrade to ``windows/v1`` whole, each chunk naming the
chunker that cut it and why. Chunking never raises on any text.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from retriever.ingest.chunking.base import ChunkSpan, TokenCounter
from retriever.ingest.chunking.outline import Fallback, Outliner, Unit
from retriever.ingest.chunking.windows import WindowChunker, _ByteOffsets

log = logging.getLogger(__name__)

# Units under this share of the budget merge with neighbours up to the budget (1.0: any
# unit that fits; on a tuning set, flask's history, filling chunks beat leaving
# half-budget units alone).
SMALL_SHARE = 1.0
# A piece under this share of the budget joins a neighbour even when that one is large.
TINY_SHARE = 0.35
# Text with lines this long is minified or generated: structure does not help it.
MINIFIED_LINE_CHARS = 1000
MINIFIED_MEAN_CHARS = 200
# Kinds that are only parts of their parent (a chunk of them is a part of the parent).
_PARTS = frozenset({"statements", "sentences", "lines", "item", "entry"})
# Nesting followed when splitting (deeper units are cut by windows).
MAX_DEPTH = 24
# Symbol names listed for a chunk of several merged units.
MAX_NAMES = 3


@dataclass(slots=True)
class _Seg:
    """A unit (or a head/tail piece of one) with its final line-widened span."""

    start: int
    end: int
    unit: Unit | None  # None: a head or tail piece of the parent
    kind: str
    tokens: int = 0


@dataclass(slots=True)
class _Piece:
    start: int
    end: int
    symbol: str
    kind: str
    context: str
    tokens: int
    windowed: bool = False


class StructuredChunker:
    """A ``Chunker`` for the languages ``outliners`` knows; ``windows`` cuts the rest."""

    def __init__(self, name: str, outliners: Mapping[str, Outliner], windows: WindowChunker,
                 count_tokens: TokenCounter, *, prose: frozenset[str] = frozenset()) -> None:
        self.name = name
        self._outliners = dict(outliners)
        self._windows = windows
        self._count = count_tokens
        self._prose = prose  # long lines are normal there (a paragraph per line)
        self.budget = windows.budget
        self.max_chars = windows.max_chars

    @property
    def languages(self) -> frozenset[str]:
        return frozenset(self._outliners)

    def chunk(self, content: str, *, path: str = "", language: str = "text") -> list[ChunkSpan]:
        outliner = self._outliners.get(language)
        if outliner is None:
            return self._fallback(content, "unsupported-language")
        if language not in self._prose and _minified(content):
            return self._fallback(content, "minified")
        try:
            units = outliner(content)
        except Fallback as f:
            return self._fallback(content, f.reason)
        except Exception:  # a bug in an outliner must not lose the document
            log.exception("outliner for %s failed on %s; cutting it by windows", language, path)
            return self._fallback(content, "error")
        try:
            spans = self._pack(content, units)
        except Exception:
            log.exception("packing %s (%s) failed; cutting it by windows", path, language)
            return self._fallback(content, "error")
        return spans

    # -- fallback --------------------------------------------------------------------------
    def _fallback(self, content: str, reason: str) -> list[ChunkSpan]:
        spans = self._windows.chunk(content)
        return [replace(s, kind="window", chunker=self._windows.name, fallback=reason)
                for s in spans]

    # -- packing ---------------------------------------------------------------------------
    def _pack(self, content: str, units: list[Unit]) -> list[ChunkSpan]:
        lines = _Lines(content)
        top = self._segments(content, lines, units, 0, len(content), parent=None)
        if not top:
            return self._fallback(content, "empty-outline") if content.strip() else []
        self._measure(content, top)
        pieces = self._pack_seq(content, lines, top, [], "")
        return self._finish(content, pieces)

    def _segments(self, content: str, lines: _Lines, units: Sequence[Unit], lo: int, hi: int,
                  parent: Unit | None) -> list[_Seg]:
        """Siblings within [lo, hi) as line-widened segments covering it whole (head and
        tail pieces of ``parent`` included)."""
        clean: list[Unit] = []
        pos = lo
        for u in sorted(units, key=lambda u: u.start):
            s, e = max(u.start, pos), min(u.end, hi)
            if e <= s or not content[s:e].strip():
                continue
            if (s, e) != (u.start, u.end):
                u = Unit(s, e, u.kind, u.name, u.children, u.signature, u.standalone)
            clean.append(u)
            pos = e
        if not clean:
            return []
        # Widen to whole lines where no sibling shares the line.
        starts = [u.start for u in clean]
        ends = [u.end for u in clean]
        for i in range(len(clean)):
            ls = lines.start_of(starts[i])
            prev_end = ends[i - 1] if i else lo
            if ls >= prev_end and not content[ls:starts[i]].strip():
                starts[i] = max(ls, lo)
            le = lines.end_of(max(ends[i] - 1, starts[i]))
            next_start = starts[i + 1] if i + 1 < len(clean) else hi
            if le <= next_start and not content[ends[i]:le].strip():
                ends[i] = min(le, hi)
        segs: list[_Seg] = []
        head_kind = parent.kind if parent is not None else "statements"
        # Lines before the first unit: inside a parent, its head (signature, and comments
        # above the first child), a piece of its own that usually merges into the first
        # child's chunk; at top level, the first unit takes them (its leading comments).
        if parent is not None and content[lo:starts[0]].strip():
            segs.append(_Seg(lo, starts[0], None, head_kind))
        else:
            starts[0] = lo
        for i, u in enumerate(clean):
            s = starts[i] if i == 0 else ends[i - 1]  # the gap goes to the unit that follows
            segs.append(_Seg(s, ends[i], u, u.kind))
        # Lines after the last unit: a piece of their own (inside a parent, its tail; at top
        # level, text no unit claims), so that a last unit that fits is not split because
        # of them. The rest of the last unit's own line stays with it.
        tail = ends[-1]
        if tail > lo and content[tail - 1] != "\n":
            tail = min(lines.end_of(tail - 1), hi)
            segs[-1].end = tail
        if content[tail:hi].strip():
            segs.append(_Seg(tail, hi, None, head_kind))
        else:
            segs[-1].end = hi
        return [g for g in segs if g.end > g.start]

    def _measure(self, content: str, segs: list[_Seg]) -> None:
        counts = self._count([content[g.start:g.end] for g in segs])
        for g, c in zip(segs, counts, strict=True):
            g.tokens = c

    def _pack_seq(self, content: str, lines: _Lines, segs: list[_Seg], path: list[str],
                  context: str, depth: int = 0, parent_kind: str = "") -> list[_Piece]:
        """Pieces for a sequence of siblings under symbol ``path``."""
        budget = self.budget
        small = budget * SMALL_SHARE
        segs = self._absorb_tiny(segs)
        groups: list[list[_Seg]] = []
        out: list[_Piece | list[_Seg]] = []
        cur: list[_Seg] = []
        cur_tokens = 0

        def flush() -> None:
            nonlocal cur, cur_tokens
            if cur:
                out.append(cur)
                groups.append(cur)
            cur, cur_tokens = [], 0

        for g in segs:
            standalone = self._standalone(g)
            if self._oversized(g):
                flush()
                out.extend(self._split(content, lines, g, path, context, depth, parent_kind))
            elif standalone or g.tokens >= small:
                flush()
                cur, cur_tokens = [g], g.tokens
                flush()
            else:
                if cur and (cur_tokens + g.tokens > budget
                            or g.end - cur[0].start > self.max_chars):
                    flush()
                cur.append(g)
                cur_tokens += g.tokens
        flush()
        merged = self._merge_tiny(out)
        return [item if isinstance(item, _Piece)
                else self._group_piece(item, path, context, parent_kind) for item in merged]

    def _absorb_tiny(self, segs: list[_Seg]) -> list[_Seg]:
        """An anonymous tiny segment (a definition's signature line, a closing line) next
        to an oversized one joins it, so that the split starts or ends with it instead of
        leaving it a chunk of its own."""
        tiny = self.budget * TINY_SHARE
        out: list[_Seg] = []
        i = 0
        while i < len(segs):
            g = segs[i]
            anonymous = g.unit is None or not (g.unit.name or self._standalone(g))
            if anonymous and g.tokens < tiny:
                nxt = segs[i + 1] if i + 1 < len(segs) else None
                if nxt is not None and self._oversized(nxt):
                    segs[i + 1] = _Seg(g.start, nxt.end, nxt.unit, nxt.kind,
                                       g.tokens + nxt.tokens)
                    i += 1
                    continue
                if out and self._oversized(out[-1]):
                    prev = out[-1]
                    out[-1] = _Seg(prev.start, g.end, prev.unit, prev.kind,
                                   prev.tokens + g.tokens)
                    i += 1
                    continue
            out.append(g)
            i += 1
        return out

    def _standalone(self, g: _Seg) -> bool:
        return g.unit is not None and g.unit.standalone and g.tokens >= self.budget * TINY_SHARE

    def _oversized(self, g: _Seg) -> bool:
        return g.tokens > self.budget or g.end - g.start > self.max_chars

    def _merge_tiny(self, out: list[_Piece | list[_Seg]]) -> list[_Piece | list[_Seg]]:
        """Join each tiny group (a head line, a closing brace) to the next group, else the
        previous one, when the result fits."""
        tiny = self.budget * TINY_SHARE
        items = list(out)

        def tokens(item: _Piece | list[_Seg]) -> int:
            return item.tokens if isinstance(item, _Piece) else sum(g.tokens for g in item)

        def joinable(item: _Piece | list[_Seg]) -> bool:
            if isinstance(item, _Piece):
                return not item.windowed
            return not any(self._standalone(g) for g in item)

        def join(a: _Piece | list[_Seg], b: _Piece | list[_Seg]) -> _Piece | list[_Seg]:
            if isinstance(a, list) and isinstance(b, list):
                return a + b
            big = b if isinstance(b, _Piece) else a
            assert isinstance(big, _Piece)
            return _Piece(_span(a)[0], _span(b)[1], big.symbol, big.kind, big.context,
                          tokens(a) + tokens(b))

        def fits(a: _Piece | list[_Seg], b: _Piece | list[_Seg]) -> bool:
            return (joinable(a) and joinable(b) and tokens(a) + tokens(b) <= self.budget
                    and _span(b)[1] - _span(a)[0] <= self.max_chars)

        i = 0
        while i < len(items):
            item = items[i]
            if isinstance(item, list) and joinable(item) and tokens(item) < tiny:
                if i + 1 < len(items) and fits(item, items[i + 1]):
                    items[i + 1] = join(item, items[i + 1])
                    del items[i]
                    continue
                if i > 0 and fits(items[i - 1], item):
                    items[i - 1] = join(items[i - 1], item)
                    del items[i]
                    continue
            i += 1
        return items

    def _group_piece(self, group: list[_Seg], path: list[str], context: str,
                     parent_kind: str) -> _Piece:
        names = [g.unit.name for g in group if g.unit is not None and g.unit.name]
        if not names and parent_kind:
            # A run of a split unit's body is a part of it (statements of a function are
            # "function"), unless it is one kind of block of its own (a table, a fence).
            kinds = {g.kind for g in group if g.unit is not None}
            kind = kinds.pop() if len(kinds) == 1 else parent_kind
            if kind in _PARTS:
                kind = parent_kind
            return _Piece(group[0].start, group[-1].end, " > ".join(path), kind,
                          context, sum(g.tokens for g in group))
        if len(names) > MAX_NAMES:
            names = [*names[:MAX_NAMES], "…"]
        symbol = " > ".join([*path, ", ".join(names)] if names else path)
        biggest = max(group, key=lambda g: g.tokens)
        kinds = {g.kind for g in group}
        kind = group[0].kind if len(kinds) == 1 else biggest.kind
        return _Piece(group[0].start, group[-1].end, symbol, kind, context,
                      sum(g.tokens for g in group))

    def _split(self, content: str, lines: _Lines, g: _Seg, path: list[str],
               context: str, depth: int, parent_kind: str) -> list[_Piece]:
        """An oversized segment: at its children, else by windows inside its span."""
        u = g.unit
        inner_path = [*path, u.name] if u is not None and u.name else path
        if u is not None and u.children and depth < MAX_DEPTH:
            inner_context = u.signature or context
            segs = self._segments(content, lines, u.children, g.start, g.end, parent=u)
            if segs:
                self._measure(content, segs)
                return self._pack_seq(content, lines, segs, inner_path, inner_context,
                                      depth + 1, parent_kind if u.kind in _PARTS and
                                      parent_kind else u.kind)
        symbol = " > ".join(inner_path)
        kind = g.kind if u is not None and u.name or not parent_kind else parent_kind
        sub = content[g.start:g.end]
        pieces = []
        for s in self._windows.chunk(sub):
            pieces.append(_Piece(g.start + s.start_char, g.start + s.end_char, symbol, kind,
                                 (u.signature if u is not None else "") or context,
                                 s.token_count, windowed=True))
        return pieces

    def _finish(self, content: str, pieces: list[_Piece]) -> list[ChunkSpan]:
        """Trim blank edges, verify each piece against the budget in real tokens, and turn
        pieces into spans."""
        trimmed: list[_Piece] = []
        for p in pieces:
            s, e = _trim(content, p.start, p.end)
            if e > s:
                p.start, p.end = s, e
                trimmed.append(p)
        counts = self._count([content[p.start:p.end] for p in trimmed])
        byte_at = _ByteOffsets(content)
        lines = _Lines(content)
        spans: list[ChunkSpan] = []
        for p, n in zip(trimmed, counts, strict=True):
            if n > self.budget or p.end - p.start > self.max_chars:
                # Token counts of parts do not always add up exactly: cut this one by windows.
                for w in self._windows.chunk(content[p.start:p.end]):
                    a, b = p.start + w.start_char, p.start + w.end_char
                    spans.append(_span_of(content, byte_at, lines, a, b, w.token_count, p))
                continue
            spans.append(_span_of(content, byte_at, lines, p.start, p.end, n, p))
        return spans


# -- helpers ---------------------------------------------------------------------------------
class _Lines:
    """Line starts of a text: line start/end of any offset in O(log n)."""

    def __init__(self, content: str) -> None:
        self._content = content
        self.starts = [0]
        pos = content.find("\n")
        while pos != -1:
            self.starts.append(pos + 1)
            pos = content.find("\n", pos + 1)

    def start_of(self, pos: int) -> int:
        return self.starts[bisect.bisect_right(self.starts, pos) - 1]

    def end_of(self, pos: int) -> int:
        """End of the line holding ``pos``, its newline included."""
        i = bisect.bisect_right(self.starts, pos)
        return self.starts[i] if i < len(self.starts) else len(self._content)

    def number(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)


def _trim(content: str, start: int, end: int) -> tuple[int, int]:
    """Drop leading blank lines (keep the first line's indentation) and trailing
    whitespace after the last line's newline."""
    s = start
    while s < end and content[s].isspace():
        s += 1
    if s >= end:
        return start, start
    nl = content.rfind("\n", start, s)
    s = nl + 1 if nl != -1 else start
    e = end
    while e > s and content[e - 1].isspace():
        e -= 1
    if e < end and content[e] == "\n":
        e += 1  # keep the last line's newline, as windows do
    return s, e


def _span(item: _Piece | list[_Seg]) -> tuple[int, int]:
    if isinstance(item, _Piece):
        return item.start, item.end
    return item[0].start, item[-1].end


def _span_of(content: str, byte_at: _ByteOffsets, lines: _Lines, a: int, b: int,
             tokens: int, p: _Piece) -> ChunkSpan:
    return ChunkSpan(
        text=content[a:b], start_char=a, end_char=b, start_byte=byte_at(a),
        end_byte=byte_at(b), start_line=lines.number(a), end_line=lines.number(max(a, b - 1)),
        token_count=tokens, symbol=p.symbol, kind=p.kind, context=p.context)


def _minified(content: str) -> bool:
    """Very long lines: minified, generated or data; structure will not help."""
    lens = [len(x) for x in content.split("\n") if x.strip()]
    if not lens:
        return False
    longest = max(lens)
    return longest > MINIFIED_LINE_CHARS * 4 or (
        longest > MINIFIED_LINE_CHARS and sum(lens) / len(lens) > MINIFIED_MEAN_CHARS)
