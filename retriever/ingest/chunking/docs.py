"""Outliners for prose: Markdown, reStructuredText and plain text.

Each turns a document into its top-level units (see ``outline``): sections by heading, each
holding the blocks before its first subsection and then its subsections; blocks (paragraph,
code block, table, list, quote, HTML, directive...); a paragraph's sentences, a list's items
and a long code block's blank-line-separated groups of lines as the places an oversized
unit may be split.

Kinds: Markdown gives "section", "paragraph", "code_block", "table", "list" > "item",
"quote", "html" and "front_matter" (standalone); reStructuredText "section", "paragraph",
"code_block" (literal and doctest blocks), "directive" (named, e.g. "code-block"), "table",
"list" > "item" (bullets, enumerations, fields, definitions), "quote", "comment" and
"footnote"; plain text "paragraph". Split points below them are "sentences" (of paragraphs,
items and quotes) and "lines" (of code blocks, HTML, comments and code directives). Rules,
transitions and one-line link targets make no unit: the packer gives their lines to the unit
that follows.

Why line-based parsers and not the installed tree-sitter grammars:

* A crash in a grammar's C scanner kills the process; it cannot become a ``Fallback``. The
  Markdown scanner has a long record of such aborts, and tree-sitter-markdown 0.5.x under
  tree-sitter 0.26 is reported to crash on larger files (tree-sitter-markdown#251).
* Its ``section`` nodes ignore setext headings (an underlined title nests inside the
  previous ATX section), so the heading tree would have to be rebuilt anyway; its offsets
  are UTF-8 bytes, ours are characters.
* Chunking needs block boundaries, not inline syntax. The CommonMark/GFM rules that decide
  them (fences, indented code, ATX and setext headings, lists with lazy continuation, block
  quotes, HTML blocks, pipe tables, front matter) fit in a few hundred lines; RST needs a
  line parser in any case (indentation and adornments), and the two share the machinery.

Every scan moves forward over lines and every regex is anchored and bounded or cannot
backtrack, so the work is linear in the text (a 1 MB line or 1 MB of short lines takes a
fraction of a second). Nothing here raises: prose always has paragraphs, so these
outliners never fall back; extremely long lines are the caller's concern.
"""

from __future__ import annotations

import re
from itertools import accumulate

from retriever.ingest.chunking.outline import Outliner, Unit

__all__ = ["OUTLINERS", "outline_markdown", "outline_rst", "outline_text", "sentences"]

# Names and signatures go into symbol paths and embedded headers: never a whole long line.
_MAX_LABEL = 200


def _label(text: str) -> str:
    text = " ".join(text[: _MAX_LABEL * 2].split())
    return text[:_MAX_LABEL]


# -- lines -------------------------------------------------------------------------------------
class _Lines:
    """The document split at ``\\n``, with each line's start offset, indentation (columns,
    tabs to the next multiple of 4) and blankness."""

    __slots__ = ("blank", "content", "indent", "n", "starts", "text")

    def __init__(self, content: str) -> None:
        self.content = content
        self.text = content.split("\n")
        self.n = len(self.text)
        self.starts = [0, *accumulate(len(t) + 1 for t in self.text[:-1])]
        self.blank = [not t or t.isspace() for t in self.text]
        self.indent = [_indent(t) for t in self.text]

    def span(self, a: int, b: int) -> tuple[int, int]:
        """From line ``a``'s first non-space character to line ``b``'s last one (both lines
        non-blank)."""
        ta, tb = self.text[a], self.text[b]
        return (self.starts[a] + len(ta) - len(ta.lstrip()), self.starts[b] + len(tb.rstrip()))

    def stripped(self, i: int) -> str:
        return self.text[i].strip()

    def last_nonblank(self, a: int, b: int) -> int:
        """The last non-blank line in [a, b] (``a`` itself must be non-blank)."""
        while b > a and self.blank[b]:
            b -= 1
        return b

    def unit(self, a: int, b: int, kind: str, name: str = "", children: list[Unit] | None = None,
             signature: str = "", standalone: bool = False) -> Unit:
        start, end = self.span(a, b)
        return Unit(start, end, kind, name, children or [], signature, standalone)

    def groups(self, a: int, b: int) -> list[Unit]:
        """Runs of non-blank lines in [a, b] as "lines" units, where there are two or more
        (an oversized code block splits between them)."""
        out: list[Unit] = []
        i = a
        while i <= b:
            if self.blank[i]:
                i += 1
                continue
            j = i
            while j + 1 <= b and not self.blank[j + 1]:
                j += 1
            out.append(self.unit(i, j, "lines"))
            i = j + 1
        return out if len(out) > 1 else []


def _indent(t: str) -> int:
    if not t or (t[0] != " " and t[0] != "\t"):
        return 0
    k = len(t) - len(t.lstrip(" \t"))
    head = t[:k]
    if "\t" not in head:
        return k
    col = 0
    for ch in head:
        col = col + 1 if ch == " " else col + 4 - col % 4
    return col


# -- sentences ---------------------------------------------------------------------------------
# The end of a sentence: a run of terminal punctuation (not inside a run: the lookbehind keeps
# the scan linear on a line of dots), any closing quotes or brackets, then whitespace or the
# end of the paragraph. Candidates are then vetted in Python.
# A CJK full stop, exclamation or question mark ends a sentence with no space after it.
_SENTENCE_END = re.compile(r"(?<![.!?\u2026])[.!?\u2026]++[\"'\u2019\u201d)\]\u00bb*_]*+(?=\s|\Z)"
                           r"|[\u3002\uff01\uff1f]++[\u300d\u300f\uff09\u201d\u2019]*+")
_ABBREVIATIONS = frozenset({
    "e.g", "i.e", "etc", "vs", "cf", "al", "approx", "ca", "viz", "resp", "dr", "mr", "mrs", "ms",
    "mx", "prof", "sr", "jr", "st", "mt", "rev", "gen", "capt", "lt", "sgt", "fig", "figs",
    "eq", "eqs", "vol", "vols", "pp", "ch", "chap", "sect", "ref", "refs", "ed", "eds", "inc",
    "ltd", "corp", "dept", "univ", "assn", "bros", "jan", "feb", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "avg", "incl", "excl", "misc",
})
# Abbreviations only before a number ("No. 5", "p. 12", "Sec. 3"); words otherwise.
_NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "p", "sec", "art", "para", "op", "nr"})
_DOTTED_ABBREVIATION = re.compile(r"(?:[A-Za-z]{1,2}\.)+[A-Za-z]{1,2}")
_OPENERS = "([{\"'\u2018\u201c\u00ab*_"
_CLOSERS = "\"'\u2019\u201d)]\u00bb*_"
_NON_SPACE = re.compile(r"\S")
_WORD = re.compile(r"[^\W_]")


def sentences(content: str, start: int, end: int) -> list[Unit]:
    """The sentences of ``content[start:end]`` (a paragraph), as "sentences" units, or none
    when it is one sentence. Does not split after abbreviations ("e.g.", "Dr.", "Fig."),
    initials, ellipses, before a lowercase word, or after a run without a letter or digit;
    decimals, versions, dotted names and URLs never split because a sentence end must be
    followed by whitespace."""
    if end - start < 4:  # "A. B" is the shortest pair
        return []
    cuts: list[int] = []
    scanned, has_word = start, False  # whether the sentence since the last cut has a word
    for m in _SENTENCE_END.finditer(content, start, end):
        cut = m.end()
        nxt = _NON_SPACE.search(content, cut, end)
        if nxt is None:
            break
        p = m.start()
        if not has_word:
            has_word = _WORD.search(content, scanned, p) is not None
            scanned = p
        punct = content[p:cut].rstrip(_CLOSERS)
        after = content[nxt.start()]
        if not has_word or after.islower() or "\u2026" in punct or ".." in punct:
            continue
        if punct == ".":
            before = content[max(start, p - 40) : p]
            word = before.rsplit(None, 1)[-1] if before and not before[-1].isspace() else ""
            word = word.lstrip(_OPENERS)
            lower = word.lower()
            if (lower in _ABBREVIATIONS
                    or (lower in _NUMBER_ABBREVIATIONS and after.isdigit())
                    or (len(word) == 1 and word.isupper())
                    or (len(word) <= 2 and word.isdigit())
                    or _DOTTED_ABBREVIATION.fullmatch(word)):
                continue
        cuts.append(cut)
        scanned, has_word = cut, False
    if not cuts:
        return []
    out: list[Unit] = []
    pos = start
    for cut in [*cuts, end]:
        first = _NON_SPACE.search(content, pos, cut)
        if first is not None:
            out.append(Unit(first.start(), cut, "sentences"))
        pos = cut
    return out if len(out) > 1 else []


def _paragraph(lines: _Lines, a: int, b: int, kind: str = "paragraph") -> Unit:
    start, end = lines.span(a, b)
    return Unit(start, end, kind, children=sentences(lines.content, start, end))


# -- nesting -----------------------------------------------------------------------------------
def _nest(flat: list[tuple[int, Unit]]) -> list[Unit]:
    """(level, unit) in document order, level 0 for a block and 1.. for a section whose unit
    so far spans its heading, into the tree: each block goes to the innermost open section,
    each section closes those of its level or deeper and ends where its last child ends."""
    top: list[Unit] = []
    stack: list[tuple[int, Unit]] = []

    def close(section: Unit) -> None:
        if section.children:
            section.end = max(section.end, section.children[-1].end)

    for level, unit in flat:
        if level:
            while stack and stack[-1][0] >= level:
                close(stack.pop()[1])
        (stack[-1][1].children if stack else top).append(unit)
        if level:
            stack.append((level, unit))
    while stack:
        close(stack.pop()[1])
    return top


def _or_whole(content: str, units: list[Unit]) -> list[Unit]:
    """The outline, or one paragraph of the whole text when only rules and link targets
    (which make no units) have text: prose never falls back for want of units."""
    if units or not content.strip():
        return units
    start = len(content) - len(content.lstrip())
    return [Unit(start, len(content.rstrip()), "paragraph")]


# -- Markdown ----------------------------------------------------------------------------------
_HTML_RAW = re.compile(r"<(?:script|pre|style|textarea)(?:[\s>]|$)", re.IGNORECASE)
_HTML_RAW_END = re.compile(r"</(?:script|pre|style|textarea)>", re.IGNORECASE)
_HTML_BLOCK_TAGS = (
    "address|article|aside|base|basefont|blockquote|body|caption|center|col|colgroup|dd|"
    "details|dialog|dir|div|dl|dt|fieldset|figcaption|figure|footer|form|frame|frameset|"
    "h[1-6]|head|header|hr|html|iframe|legend|li|link|main|menu|menuitem|nav|noframes|ol|"
    "optgroup|option|p|param|search|section|summary|table|tbody|td|tfoot|th|thead|title|tr|"
    "track|ul"
)
_HTML_BLOCK = re.compile(rf"</?(?:{_HTML_BLOCK_TAGS})(?:[\s/>]|$)", re.IGNORECASE)
# A whole open or closing tag alone on its line (CommonMark's type 7; tried on short lines).
_HTML_TAG_LINE = re.compile(
    r"(?:<[A-Za-z][A-Za-z0-9-]*(?:\s+[A-Za-z_:][\w.:-]*(?:\s*=\s*(?:[^\s\"'=<>`]+|'[^']*'"
    r"|\"[^\"]*\"))?)*\s*/?>|</[A-Za-z][A-Za-z0-9-]*\s*>)\s*"
)
_NO_WS = str.maketrans("", "", " \t")
_QUOTE_MARKS = re.compile(r"(?:>[ \t]*)+")
_NO_DELIM = str.maketrans("", "", "|:- \t")


def _atx_level(s: str) -> int:
    """The level of an ATX heading line (stripped), 0 if it is not one."""
    k = len(s) - len(s.lstrip("#"))
    return k if 1 <= k <= 6 and (len(s) == k or s[k] in " \t") else 0


def _atx_name(s: str, level: int) -> str:
    rest = s[level:].strip()
    bare = rest.rstrip("#")
    if not bare:
        return ""
    if bare != rest and bare[-1] in " \t":  # a closing sequence: "## Title ##"
        rest = bare
    return _label(rest)


def _fence_open(s: str) -> tuple[str, int] | None:
    """(char, length) when the stripped line opens a code fence."""
    if not s or s[0] not in "`~":
        return None
    c = s[0]
    k = len(s) - len(s.lstrip(c))
    if k < 3 or (c == "`" and "`" in s[k:]):
        return None
    return c, k


def _fence_closes(s: str, fence: tuple[str, int]) -> bool:
    c, k = fence
    return len(s) >= k and s[0] == c and not s.strip(c)


def _thematic(s: str) -> bool:
    if not s or s[0] not in "*-_":
        return False
    r = s.translate(_NO_WS)
    return len(r) >= 3 and not r.strip(s[0])


def _setext(s: str) -> int:
    """1 or 2 when the stripped line underlines a setext heading, else 0."""
    if s and s[0] in "=-" and not s.strip(s[0]):
        return 1 if s[0] == "=" else 2
    return 0


def _md_marker(s: str) -> tuple[str, int, bool] | None:
    """(list type, marker width, has content) when the stripped line starts a list item."""
    c = s[0]
    if c in "-*+":
        if len(s) == 1 or s[1] in " \t":
            return c, 1, len(s) > 1 and not s[1:].isspace()
        return None
    if "0" <= c <= "9":
        k = 1
        while k < len(s) and k < 10 and "0" <= s[k] <= "9":
            k += 1
        if k <= 9 and k < len(s) and s[k] in ".)" and (k + 1 == len(s) or s[k + 1] in " \t"):
            return "o" + s[k], k + 1, k + 1 < len(s) and not s[k + 1 :].isspace()
    return None


def _content_column(t: str, indent: int, width: int) -> int:
    """Where a list item's content starts: after the marker and 1-4 spaces."""
    rest = t.lstrip(" \t")[width:]
    spaces = len(rest) - len(rest.lstrip(" "))
    if not rest.strip() or spaces > 4:
        spaces = 1
    return indent + width + max(spaces, 1)


def _html_start(s: str, interrupting: bool) -> str | None:
    """How an HTML block that starts on this stripped line ends: a marker to find, "" for
    a blank line; None when the line starts no HTML block."""
    if not s.startswith("<"):
        return None
    if _HTML_RAW.match(s):
        return "raw"
    if s.startswith("<!--"):
        return "-->"
    if s.startswith("<?"):
        return "?>"
    if s.startswith("<![CDATA["):
        return "]]>"
    if s.startswith("<!") and len(s) > 2 and s[2].isalpha():
        return ">"
    if _HTML_BLOCK.match(s):
        return ""
    if not interrupting and len(s) <= 1000 and _HTML_TAG_LINE.fullmatch(s):
        return ""
    return None


def _table_cells(header: str, delimiter: str) -> bool:
    """Whether two stripped lines start a GFM pipe table (same number of cells)."""
    if "|" not in header or "|" not in delimiter or "-" not in delimiter:
        return False
    if delimiter[0] not in "|:-" or delimiter.translate(_NO_DELIM):
        return False
    cells = _cells(delimiter)
    for cell in cells:
        cell = cell.strip()
        cell = cell[1:] if cell.startswith(":") else cell
        cell = cell[:-1] if cell.endswith(":") else cell
        if not cell or cell.strip("-"):
            return False
    return len(cells) == len(_cells(header.replace("\\|", "")))


def _cells(s: str) -> list[str]:
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") else s
    return s.split("|")


class _Markdown:
    def __init__(self, content: str) -> None:
        self.lines = _Lines(content)
        self.flat: list[tuple[int, Unit]] = []

    def outline(self) -> list[Unit]:
        L = self.lines
        i = self._front_matter()
        while i < L.n:
            if L.blank[i]:
                i += 1
                continue
            i = self._block(i) + 1
        return _nest(self.flat)

    def _emit(self, unit: Unit, level: int = 0) -> None:
        self.flat.append((level, unit))

    def _front_matter(self) -> int:
        L = self.lines
        first = L.text[0].rstrip()
        if first not in ("---", "+++"):
            return 0
        ends = ("---", "...") if first == "---" else ("+++",)
        for j in range(1, L.n):
            if L.text[j].rstrip() in ends:
                self._emit(L.unit(0, j, "front_matter", standalone=True))
                return j + 1
        return 0

    def _interrupts(self, s: str, lazy: bool = False) -> bool:
        """Whether a stripped line indented less than 4 ends a paragraph; ``lazy``: one
        inside a quote or list item that the line does not continue (then any list marker
        starts a list, as in CommonMark)."""
        c = s[0]
        if c == "#":
            return _atx_level(s) > 0
        if c in "`~":
            return _fence_open(s) is not None
        if c == ">":
            return True
        if c in "*-_" and _thematic(s):
            return True
        if c in "-*+" or "0" <= c <= "9":
            m = _md_marker(s)
            return m is not None and (lazy or m[2] and (m[0][0] != "o"
                                                        or s.startswith("1") and m[1] == 2))
        if c == "<":
            return _html_start(s, interrupting=True) is not None
        return False

    def _block(self, i: int) -> int:
        """Emit the block (or heading) starting at non-blank line ``i``; its last line."""
        L = self.lines
        if L.indent[i] >= 4:
            j = i
            while j + 1 < L.n and (L.blank[j + 1] or L.indent[j + 1] >= 4):
                j += 1
            j = L.last_nonblank(i, j)
            self._emit(L.unit(i, j, "code_block", children=L.groups(i, j)))
            return j
        s = L.stripped(i)
        c = s[0]
        if c in "`~" and (fence := _fence_open(s)):
            j = i + 1
            while j < L.n and not (L.indent[j] < 4 and _fence_closes(L.stripped(j), fence)):
                j += 1
            j = L.last_nonblank(i, min(j, L.n - 1))
            self._emit(L.unit(i, j, "code_block", children=L.groups(i, j),
                              signature=_label(s)))
            return j
        if c == "#" and (level := _atx_level(s)):
            self._emit(L.unit(i, i, "section", name=_atx_name(s, level), signature=_label(s)),
                       level)
            return i
        if c == ">":
            return self._quote(i)
        if c == "<" and (end := _html_start(s, interrupting=False)) is not None:
            return self._html(i, s, end)
        if c in "*-_" and _thematic(s):
            return i  # a rule: no unit; its line goes with what follows
        if (c in "-*+" or "0" <= c <= "9") and (marker := _md_marker(s)):
            return self._list(i, marker)
        if i + 1 < L.n and "|" in s and _table_cells(s, L.stripped(i + 1)):
            return self._table(i)
        return self._paragraph(i)

    def _paragraph(self, i: int) -> int:
        L = self.lines
        j = i + 1
        while j < L.n and not L.blank[j]:
            if L.indent[j] < 4:
                s = L.stripped(j)
                if level := _setext(s):
                    name = _label(" ".join(L.stripped(k) for k in range(i, min(j, i + 20))))
                    self._emit(L.unit(i, j, "section", name=name, signature=name), level)
                    return j
                if self._interrupts(s):
                    break
                if "|" in s and j + 1 < L.n and _table_cells(s, L.stripped(j + 1)):
                    break
            j += 1
        self._emit(_paragraph(L, i, j - 1))
        return j - 1

    def _table(self, i: int) -> int:
        L = self.lines
        j = i + 2
        while j < L.n and not L.blank[j] and not (L.indent[j] < 4
                                                  and self._interrupts(L.stripped(j))):
            j += 1
        self._emit(L.unit(i, j - 1, "table", signature=_label(L.stripped(i))))
        return j - 1

    def _quote(self, i: int) -> int:
        """A block quote: its ``>`` lines, and lines continuing a paragraph inside it."""
        L = self.lines
        fence: tuple[str, int] | None = None
        para = False
        j = i
        while j < L.n and not L.blank[j]:
            s = L.stripped(j)
            if L.indent[j] < 4 and s[0] == ">":
                marks = _QUOTE_MARKS.match(s)
                inner = s[marks.end() if marks else 1 :].strip()
                if fence is not None:
                    if _fence_closes(inner, fence):
                        fence = None
                    para = False
                elif opened := _fence_open(inner):
                    fence, para = opened, False
                else:
                    para = bool(inner) and not _atx_level(inner) and not _thematic(inner)
            elif not para or (L.indent[j] < 4 and self._interrupts(s, lazy=True)):
                break
            j += 1
        self._emit(_paragraph(L, i, j - 1, "quote"))
        return j - 1

    def _html(self, i: int, s: str, end: str) -> int:
        L = self.lines
        j = i
        if end == "":
            while j + 1 < L.n and not L.blank[j + 1]:
                j += 1
        elif end == "raw":
            if not _HTML_RAW_END.search(s):
                j += 1
                while j < L.n and not _HTML_RAW_END.search(L.text[j]):
                    j += 1
        elif end not in s[2:]:
            j += 1
            while j < L.n and end not in L.text[j]:
                j += 1
        j = L.last_nonblank(i, min(j, L.n - 1))
        self._emit(L.unit(i, j, "html", children=L.groups(i, j)))
        return j

    def _list(self, i: int, marker: tuple[str, int, bool]) -> int:
        """A list: items of one marker type, each with its indented (or lazy) lines."""
        L = self.lines
        kind, width, _ = marker
        col = _content_column(L.text[i], L.indent[i], width)
        first = L.stripped(i)[width:].strip()
        fence = _fence_open(first)
        para = fence is None and bool(first)
        empty = not first  # an item that starts empty ends at a blank line
        starts = [i]
        ends: list[int] = []
        last, j, prev_blank = i, i + 1, False
        while j < L.n:
            if L.blank[j]:
                prev_blank = True
                j += 1
                continue
            ind = L.indent[j]
            s = L.stripped(j)
            if ind >= col and not (empty and prev_blank):
                empty = False
                if fence is not None:
                    if ind - col < 4 and _fence_closes(s, fence):
                        fence = None
                elif ind - col < 4 and (opened := _fence_open(s)):
                    fence, para = opened, False
                else:
                    para = True
                last, j, prev_blank = j, j + 1, False
                continue
            if fence is not None:  # the item ends and its fence with it
                fence, para = None, False
            m = _md_marker(s) if ind < 4 else None
            if m is not None and m[0] == kind and not _thematic(s):
                ends.append(last)
                starts.append(j)
                col = _content_column(L.text[j], ind, m[1])
                rest = s[m[1]:].strip()
                fence = _fence_open(rest)
                para, empty = fence is None and bool(rest), not rest
                last, j, prev_blank = j, j + 1, False
                continue
            if not prev_blank and para and not (ind < 4 and self._interrupts(s, lazy=True)):
                last, j = j, j + 1  # a lazy continuation line
                continue
            break
        ends.append(last)
        items = [_paragraph(L, a, b, "item") for a, b in zip(starts, ends, strict=True)]
        self._emit(L.unit(i, last, "list", children=items))
        return last


def outline_markdown(content: str) -> list[Unit]:
    """Markdown (CommonMark + GFM tables + front matter) as sections and blocks."""
    return _or_whole(content, _Markdown(content).outline())


# -- reStructuredText --------------------------------------------------------------------------
_ADORNMENT_CHARS = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_BULLET_CHARS = "-*+\u2022\u2023\u2043"
_BULLET = re.compile(rf"[{_BULLET_CHARS}](?: +|$)")
_ENUMERATOR = r"(?:\d{1,9}|#|[ivxlcdm]{1,8}|[IVXLCDM]{1,8}|[A-Za-z])"
_ENUMERATED = re.compile(rf"(?:{_ENUMERATOR}[.)]|\({_ENUMERATOR}\))(?: +|$)")
_DIRECTIVE = re.compile(
    r"\.\.[ \t]+(?:\|[^|]{1,200}\|[ \t]+)?([A-Za-z0-9][\w:+.-]{0,100}?)::(?:\s|$)")
_CODE_DIRECTIVES = frozenset({
    "code", "code-block", "sourcecode", "literalinclude", "highlight", "math", "raw",
    "parsed-literal", "productionlist", "testcode", "testoutput", "doctest", "ipython",
    "jupyter-execute", "prompt", "graphviz", "mermaid", "csv-table",
})
_NO_SIMPLE_TABLE = str.maketrans("", "", "= \t")
_MAX_DEPTH = 8


def _adornment(s: str) -> bool:
    """An RST section adornment or transition: one punctuation character repeated, from
    column 0 (``s`` is the line, right-stripped)."""
    return len(s) >= 2 and s[0] in _ADORNMENT_CHARS and not s.strip(s[0])


class _Rst:
    def __init__(self, content: str) -> None:
        self.lines = _Lines(content)
        self.styles: dict[tuple[str, bool], int] = {}
        self.no_table_until = -1  # simple-table scans that failed: none closes before this

    def outline(self) -> list[Unit]:
        flat: list[tuple[int, Unit]] = []
        self._blocks(0, self.lines.n, 0, flat)
        return _nest(flat)

    def _level(self, char: str, over: bool) -> int:
        return self.styles.setdefault((char, over), len(self.styles) + 1)

    def _title(self, i: int, hi: int) -> tuple[int, int, str] | None:
        """(level, last line, title) when a section title starts at line ``i``."""
        L = self.lines
        s = L.text[i].rstrip()
        under = L.text[i + 1].rstrip() if i + 1 < hi else ""
        if under[:1] not in _ADORNMENT_CHARS and s[:1] not in _ADORNMENT_CHARS:
            return None
        if (_adornment(s) and i + 2 < hi and not L.blank[i + 1]
                and L.text[i + 2].rstrip().startswith(s[0])
                and _adornment(L.text[i + 2].rstrip())):
            title = L.stripped(i + 1)
            if not _adornment(title):
                return self._level(s[0], True), i + 2, title
        if (L.indent[i] == 0 and not _adornment(s) and _adornment(under)
                and (len(under) >= len(s) or len(under) >= 4)):
            return self._level(under[0], False), i + 1, s.strip()
        return None

    def _blocks(self, lo: int, hi: int, depth: int, flat: list[tuple[int, Unit]]) -> None:
        """Emit the blocks (and at depth 0 the titles) of lines [lo, hi)."""
        L = self.lines
        base = next((L.indent[k] for k in range(lo, hi) if not L.blank[k]), 0)
        literal_after: int | None = None  # the indent of a paragraph that ended with "::"
        i = lo
        while i < hi:
            if L.blank[i]:
                i += 1
                continue
            ind = L.indent[i]
            if literal_after is not None and ind > literal_after:
                j = self._indented_end(i, hi, literal_after)
                flat.append((0, L.unit(i, j, "code_block", children=L.groups(i, j))))
                literal_after, i = None, j + 1
                continue
            literal_after = None
            if depth == 0 and (title := self._title(i, hi)):
                level, j, name = title
                name = _label(name)
                flat.append((level, L.unit(i, j, "section", name=name, signature=name)))
                i = j + 1
                continue
            s = L.stripped(i)
            if ind > base:
                j = self._indented_end(i, hi, base)
                flat.append((0, self._nested(i, j, "quote", depth)))
                i = j + 1
                continue
            c = s[0]
            if c == "." and s.startswith("..") and (len(s) == 2 or s[2] in " \t"):
                i = self._explicit(i, hi, s, depth, flat) + 1
                continue
            if c in "+=" and (j := self._table(i, hi, s)) >= 0:
                flat.append((0, L.unit(i, j, "table", signature=_label(s))))
                i = j + 1
                continue
            if c in _ADORNMENT_CHARS and ind == 0 and _adornment(s):
                i += 1  # a transition: no unit
                continue
            if c == ">" and s.startswith(">>>") and (len(s) == 3 or s[3] == " "):
                j = i
                while j + 1 < hi and not L.blank[j + 1]:
                    j += 1
                flat.append((0, L.unit(i, j, "code_block")))
                i = j + 1
                continue
            if (key := self._item_key(i, hi, s)) is not None:
                j = self._list(i, hi, key, flat)
                i = j + 1
                continue
            j = i
            while j + 1 < hi and not L.blank[j + 1] and L.indent[j + 1] == ind:
                j += 1
            flat.append((0, _paragraph(L, i, j)))
            if L.text[j].rstrip().endswith("::"):
                literal_after = ind
            i = j + 1

    def _indented_end(self, i: int, hi: int, indent: int) -> int:
        """The last non-blank line of the block from ``i`` indented deeper than ``indent``."""
        L = self.lines
        j = i
        while j + 1 < hi and (L.blank[j + 1] or L.indent[j + 1] > indent):
            j += 1
        return L.last_nonblank(i, j)

    def _nested(self, i: int, j: int, kind: str, depth: int) -> Unit:
        """Lines [i, j] as one unit whose children are their blocks."""
        return self.lines.unit(i, j, kind, children=self._children(i, j, depth))

    def _children(self, a: int, b: int, depth: int) -> list[Unit]:
        if a > b:
            return []
        if depth + 1 >= _MAX_DEPTH:
            return self.lines.groups(a, b)
        flat: list[tuple[int, Unit]] = []
        self._blocks(a, b + 1, depth + 1, flat)
        return [u for _, u in flat]

    def _explicit(self, i: int, hi: int, s: str, depth: int,
                  flat: list[tuple[int, Unit]]) -> int:
        """A directive, comment, footnote or target: the marker line and its indented body."""
        L = self.lines
        j = self._indented_end(i, hi, L.indent[i])
        if (s.startswith(".. _") or s.startswith("__ ")) and j == i:
            return j  # a hyperlink target: no unit; it goes with what follows
        m = _DIRECTIVE.match(s[:400])
        if m is None:
            kind = "footnote" if s.startswith(".. [") else "comment"
            flat.append((0, L.unit(i, j, kind, children=L.groups(i, j))))
            return j
        name = m.group(1).lower()
        # The argument names what the directive is about ("py:function requests.get",
        # "code-block python"): the symbol path carries it.
        argument = s[m.end():].strip()
        unit = L.unit(i, j, "directive", name=_label(f"{name} {argument}".strip()),
                      signature=_label(s))
        if name.split(":")[-1] in _CODE_DIRECTIVES:
            unit.children = L.groups(i, j)
        else:
            unit.children = self._children(i + 1, j, depth)
        flat.append((0, unit))
        return j

    def _table(self, i: int, hi: int, s: str) -> int:
        """The last line of a grid or simple table starting at line ``i``, else -1."""
        L = self.lines
        if len(s) >= 3 and s[0] == "+" and s[1] in "-=" and s[-1] == "+" and not s.strip("+-="):
            j = i
            while j + 1 < hi and not L.blank[j + 1] and L.stripped(j + 1)[:1] in ("+", "|"):
                j += 1
            return j
        if "=" in s and " " in s and not s.translate(_NO_SIMPLE_TABLE) and i >= self.no_table_until:
            # Simple table: ends at a border line followed by a blank line (or the end).
            j = i + 1
            while j < hi:
                if L.blank[j]:
                    if j + 1 >= hi or L.blank[j + 1]:
                        break
                else:
                    t = L.stripped(j)
                    if (t[0] == "=" and not t.translate(_NO_SIMPLE_TABLE)
                            and (j + 1 >= hi or L.blank[j + 1])):
                        return j
                j += 1
            self.no_table_until = j
        return -1

    def _item_key(self, i: int, hi: int, s: str) -> str | None:
        """The list type of an item starting at line ``i``: a bullet character, an
        enumerator's format, ":" for a field, "def" for a definition-list term."""
        L = self.lines
        c = s[0]
        if c in _BULLET_CHARS and _BULLET.match(s):
            return c
        m = _ENUMERATED.match(s[:16]) if c.isalnum() or c in "(#" else None
        if m is not None:
            nxt = i + 1
            if (nxt >= hi or L.blank[nxt] or L.indent[nxt] > L.indent[i]
                    or _ENUMERATED.match(L.stripped(nxt))):
                text = m.group()
                return "()" if text.startswith("(") else text.rstrip()[-1]
            return None
        if s.startswith(":") and len(s) > 1 and s[1] not in ": ":
            k = s.find(":", 1, 200)
            if k > 1 and s[k - 1] != " " and (k + 1 == len(s) or s[k + 1] in " \t"):
                return ":"
        if i + 1 < hi and not L.blank[i + 1] and L.indent[i + 1] > L.indent[i]:
            return "def"
        return None

    def _list(self, i: int, hi: int, key: str, flat: list[tuple[int, Unit]]) -> int:
        """Items of one type at one indent, each with its deeper-indented lines."""
        L = self.lines
        ind = L.indent[i]
        items: list[Unit] = []
        a = i
        while True:
            b = self._indented_end(a, hi, ind)
            items.append(_paragraph(L, a, b, "item"))
            j = b + 1
            while j < hi and L.blank[j]:
                j += 1
            if (j < hi and L.indent[j] == ind
                    and self._item_key(j, hi, L.stripped(j)) == key):
                a = j
                continue
            break
        flat.append((0, L.unit(i, b, "list", children=items)))
        return b


def outline_rst(content: str) -> list[Unit]:
    """reStructuredText as sections (levels in order of first adornment style) and blocks."""
    return _or_whole(content, _Rst(content).outline())


# -- plain text --------------------------------------------------------------------------------
def outline_text(content: str) -> list[Unit]:
    """Plain prose: paragraphs separated by blank lines, each split into sentences."""
    L = _Lines(content)
    out: list[Unit] = []
    i = 0
    while i < L.n:
        if L.blank[i]:
            i += 1
            continue
        j = i
        while j + 1 < L.n and not L.blank[j + 1]:
            j += 1
        out.append(_paragraph(L, i, j))
        i = j + 1
    return out


OUTLINERS: dict[str, Outliner] = {
    "markdown": outline_markdown,
    "rst": outline_rst,
    "text": outline_text,
}
