"""StructuredChunker's packer: outlines in, exact, budgeted, whole-unit chunks out.

Outlines here are built by hand or drawn by hypothesis over random text, so the packing
rules are pinned independently of any grammar. A whitespace tokenizer (additive counts)
keeps budgets exact; tests/test_chunking_syntax.py and test_chunking_docs.py run the real
outliners through the same checks.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_chunking import assert_covers, assert_exact, ws_count, ws_offsets

from retriever.ingest.chunking.outline import Fallback, Unit
from retriever.ingest.chunking.structure import StructuredChunker
from retriever.ingest.chunking.windows import WindowChunker

_WORD = re.compile(r"\S+")


def chunker(outline, budget: int = 40, overlap: int = 4, **kw) -> StructuredChunker:
    windows = WindowChunker(ws_count, ws_offsets, budget, overlap)
    return StructuredChunker("test/v1", {"lang": outline}, windows, ws_count, **kw)


def words(text: str) -> int:
    return len(_WORD.findall(text))


CODE = '''"""Module doc."""
import os
import sys

# the answer
CONST = 42


def small(a):
    return a


class Big:
    """A class too big for one chunk."""

    def one(self):
        x = 1
        y = 2
        return x + y

    def two(self):
        a = [1, 2, 3]
        b = [4, 5, 6]
        c = [7, 8, 9]
        return a + b + c

    def three(self):
        return 3
'''


def code_outline(c: str) -> list[Unit]:
    """A hand outline of CODE, as a Python outliner would give it."""
    def at(s: str, end: str | None = None) -> tuple[int, int]:
        i = c.index(s)
        j = c.index(end, i) + len(end) if end else i + len(s)
        return i, j

    def method(name: str, end: str) -> Unit:
        s, e = at(f"    def {name}(self):", end)
        body = c[s:e]
        stmts = []
        for m in re.finditer(r"^        \S.*$", body, re.M):
            stmts.append(Unit(s + m.start(), s + m.end(), "statements"))
        return Unit(s, e, "method", f"def {name}", stmts, signature=f"def {name}(self):")

    cls_s = c.index("class Big")
    return [
        Unit(*at('"""Module doc."""'), "docstring", standalone=True),
        Unit(*at("import os", "import sys"), "imports", standalone=True),
        Unit(*at("CONST = 42"), "statements"),
        Unit(*at("def small(a):", "return a"), "function", "def small",
             signature="def small(a):"),
        Unit(cls_s, len(c), "class", "class Big", [
            Unit(*at('    """A class too', 'chunk."""'), "statements"),
            method("one", "return x + y"),
            method("two", "return a + b + c"),
            method("three", "return 3"),
        ], signature="class Big:"),
    ]


def test_whole_units_symbols_and_kinds() -> None:
    spans = chunker(code_outline, budget=30).chunk(CODE, language="lang")
    assert_exact(CODE, spans)
    assert_covers(CODE, spans)
    assert all(s.token_count <= 30 and words(s.text) == s.token_count for s in spans)
    # A tiny docstring and imports block (under TINY_SHARE of the budget) do not stand
    # alone: they join what follows (the comment above CONST travels with CONST).
    assert spans[0].text.startswith('"""Module doc."""\nimport os\nimport sys\n\n# the answer')
    # The class head (its line and docstring) joins the first method's chunk; the tiny last
    # method joins its neighbour.
    one = next(s for s in spans if "def one" in s.text)
    assert "\nclass Big:\n" in "\n" + one.text and one.symbol == "class Big > def one"
    assert one.text.index("class Big:") < one.text.index("def one")
    two = next(s for s in spans if "def two" in s.text)
    assert "return a + b + c" in two.text and two.kind == "method"
    assert two.symbol == "class Big > def two, def three" and two.context == "class Big:"
    for s in spans:
        assert s.chunker == "" and s.fallback == ""


def test_small_neighbours_merge_and_fitting_file_is_one_chunk() -> None:
    spans = chunker(code_outline, budget=400).chunk(CODE, language="lang")
    assert len(spans) == 1 and spans[0].text == CODE
    assert spans[0].symbol == "def small, class Big"


IMPORTS = "".join(f"import module_{i}\n" for i in range(8))


def head_outline(c: str) -> list[Unit]:
    """A module of a docstring, an imports block and one statement (``X = 1``)."""
    d = c.index('"""', 3) + 3
    i, j = c.index("import"), c.index("\nX") + 1
    return [Unit(0, d, "docstring", standalone=True),
            Unit(i, j - 1, "imports", standalone=True), Unit(j, len(c), "statements")]


def test_imports_and_docstring_that_are_not_tiny_stand_alone() -> None:
    doc = " ".join(["A module docstring that says what the module is for."] * 2)
    code = f'"""{doc}"""\n{IMPORTS}\nX = 1\n'
    spans = chunker(head_outline, budget=40).chunk(code, language="lang")  # tiny: < 14 tokens
    assert [s.kind for s in spans] == ["docstring", "imports", "statements"]
    assert spans[1].text == IMPORTS


def test_a_tiny_module_docstring_and_the_imports_are_one_chunk() -> None:
    """A docstring too small to stand alone goes with the imports after it (the module's
    head, one chunk of its own), not into a scrap of one line before them."""
    code = f'"""Tiny doc."""\n{IMPORTS}\nX = 1\n'
    spans = chunker(head_outline, budget=40).chunk(code, language="lang")
    assert_exact(code, spans)
    assert [s.text for s in spans] == [f'"""Tiny doc."""\n{IMPORTS}', "X = 1\n"]
    assert spans[0].kind == "imports"
    # Together over the budget: each stays whole on its own.
    spans = chunker(head_outline, budget=17).chunk(code, language="lang")
    assert [s.text for s in spans][:2] == ['"""Tiny doc."""\n', IMPORTS]


def test_neighbours_merge_at_cuts_their_own_text_decides() -> None:
    """Small units merge up to the budget; where a chunk ends is decided by the units' own
    text once it is half full (content-defined), so an edit, an insertion or a deletion
    changes only the chunks next to it: the rest keep their text, hence their ids and
    vectors. (Packing a run as evenly as possible moved every cut when one unit changed.)"""
    def fn(i: int, extra: int = 0) -> str:
        body = "".join(f"    t = t + {j}\n" for j in range(extra))
        return f"def f{i}(a):\n    t = a * {i}\n{body}    return t\n"

    def outline(c: str) -> list[Unit]:
        units = []
        for m in re.finditer(r"def f(\d+)\(a\):\n(?:    .*\n)*", c):
            units.append(Unit(m.start(), m.end(), "function", f"def f{m.group(1)}"))
        return units

    def texts(code: str) -> list[str]:
        spans = chunker(outline, budget=60).chunk(code, language="lang")
        assert_exact(code, spans)
        assert_covers(code, spans)
        assert all(s.token_count <= 60 for s in spans)
        return [s.text for s in spans]

    base = "\n".join(fn(i) for i in range(40))
    before = texts(base)
    assert len(before) > 6 and any(t.count("def ") > 1 for t in before)  # they do merge
    variants = {
        "appended": base + "\n" + fn(40),
        "grown": "\n".join(fn(i, 4 if i == 20 else 0) for i in range(40)),
        "deleted": "\n".join(fn(i) for i in range(40) if i != 20),
        "inserted": "\n".join(fn(i) for i in [*range(20), 99, *range(20, 40)]),
        "first edited": base.replace("t = a * 0", "t = a * 100"),
    }
    for name, code in variants.items():
        after = texts(code)
        changed = [t for t in after if t not in before]
        assert 1 <= len(changed) <= 3, (name, len(changed), len(after))



def test_generated_code_is_cut_by_windows() -> None:
    """A file that says near its top that a tool wrote it falls back to windows: its
    units are per-field boilerplate named after the hand-written types."""
    headers = ["// Code generated by applyconfiguration-gen. DO NOT EDIT.\n",
               "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n",
               "// @generated by bindgen 0.69\n",
               "// <auto-generated>\n//     This code was generated by a tool.\n"
               "// </auto-generated>\n",
               "# This file is automatically generated; do not modify it.\n"]
    for head in headers:
        text = head + CODE
        spans = chunker(code_outline, budget=30).chunk(text, language="lang")
        assert {(s.chunker, s.fallback, s.kind) for s in spans} == {
            ("windows/v1", "generated", "window")}, head
        assert_covers(text, spans)
    # Words about generating things are not a marker; nor is a marker far down the file.
    # Nor is a marker in a string of the code (pip's setuptools_build.py).
    for text in ('"""Values generated by f are cached; edit them freely."""\n' + CODE,
                 CODE + "\n" * 2100 + "# Code generated by x. DO NOT EDIT.\n",
                 'filename = "<auto-generated setuptools caller>"\n' + CODE,
                 'tag = "@generated"\n' + CODE):
        spans = chunker(code_outline, budget=30).chunk(text, language="lang")
        assert {s.fallback for s in spans} == {""}
    # Prose keeps its sections: a generated reference page is still read by headings.
    prose = chunker(code_outline, budget=30, prose=frozenset({"lang"}))
    spans = prose.chunk(headers[0] + CODE, language="lang")
    assert {s.fallback for s in spans} == {""}


def test_oversized_leaf_is_windowed_inside_its_span() -> None:
    body = "\n".join(f"    v{i} = {i} + {i}" for i in range(40))
    c = f"def f():\n{body}\n\ndef g():\n    return 1\n"
    g0 = c.index("def g")

    def outline(text: str) -> list[Unit]:
        return [Unit(0, g0 - 1, "function", "def f", signature="def f():"),
                Unit(g0, len(text), "function", "def g")]

    spans = chunker(outline, budget=20).chunk(c, language="lang")
    assert_exact(c, spans)
    assert_covers(c, spans)
    f_spans = [s for s in spans if s.symbol == "def f"]
    assert len(f_spans) > 2 and all(s.end_char <= g0 for s in f_spans)
    assert all(s.context == "def f():" for s in f_spans)
    assert spans[-1].text == "def g():\n    return 1\n"  # g fits: whole, never mixed with f


def test_fallbacks_name_their_reason() -> None:
    def broken(text: str) -> list[Unit]:
        raise Fallback("parse-error")

    def buggy(text: str) -> list[Unit]:
        raise RuntimeError("bug")

    text = "a b c\nd e f\n"
    for outline, reason in ((broken, "parse-error"), (buggy, "error")):
        spans = chunker(outline).chunk(text, language="lang")
        assert [(s.chunker, s.fallback, s.kind) for s in spans] == [
            ("windows/v1", reason, "window")]
    spans = chunker(broken).chunk(text, language="other")
    assert spans[0].fallback == "unsupported-language"
    minified = "x=1;" * 2000 + "\n"
    spans = chunker(code_outline).chunk(minified, language="lang")
    assert {s.fallback for s in spans} == {"minified"}
    assert_covers(minified, spans)


def test_sentences_split_a_paragraph_on_one_long_line() -> None:
    sentences = [f"Sentence number {i} says a few more words here." for i in range(12)]
    c = "# Title\n\n" + " ".join(sentences) + "\n"
    p0 = c.index("Sentence")

    def outline(text: str) -> list[Unit]:
        kids, pos = [], p0
        for s in sentences:
            i = text.index(s, pos)
            kids.append(Unit(i, i + len(s), "sentences"))
            pos = i + len(s)
        para = Unit(p0, len(text) - 1, "paragraph", children=kids)
        return [Unit(0, len(text), "section", "Title", [para], signature="# Title")]

    spans = chunker(outline, budget=30, prose=frozenset({"lang"})).chunk(c, language="lang")
    assert_exact(c, spans)
    assert_covers(c, spans)
    assert len(spans) > 2
    # Cut between sentences, not inside one: every chunk of the paragraph ends a sentence.
    for s in spans[1:]:
        assert s.text.rstrip().endswith("here."), s.text
        assert s.symbol == "Title"


# -- properties over random outlines -----------------------------------------------------------
@st.composite
def text_and_outline(draw: st.DrawFn) -> tuple[str, list[Unit]]:
    lines = draw(st.lists(st.one_of(
        st.just(""), st.just("   "),
        st.text(alphabet="ab é{}();\t", min_size=1, max_size=30),
        st.lists(st.sampled_from(["w", "xy", "zzz", "ü"]), min_size=1, max_size=60).map(
            " ".join)), min_size=0, max_size=40))
    content = "\n".join(lines) + draw(st.sampled_from(["", "\n"]))

    def units(lo: int, hi: int, depth: int) -> list[Unit]:
        if hi - lo < 2 or depth > 3:
            return []
        cuts = sorted(set(draw(st.lists(st.integers(lo, hi), max_size=6))))
        out = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            if draw(st.booleans()):
                out.append(Unit(a, b, draw(st.sampled_from(["function", "class", "x"])),
                                draw(st.sampled_from(["", "f", "g"])),
                                units(a, b, depth + 1),
                                standalone=draw(st.booleans())))
        return out

    return content, units(0, len(content), 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_and_outline(), st.integers(min_value=3, max_value=40))
def test_any_outline_packs_exactly(case: tuple[str, list[Unit]], budget: int) -> None:
    content, units = case
    spans = chunker(lambda _: units, budget=budget, overlap=1).chunk(content, language="lang")
    assert_exact(content, spans)
    assert_covers(content, spans)
    for s in spans:
        assert s.token_count == words(s.text) <= budget


@settings(max_examples=200, deadline=None)
@given(text_and_outline())
def test_units_that_fit_are_never_split(case: tuple[str, list[Unit]]) -> None:
    content, units = case
    budget = 25
    spans = chunker(lambda _: units, budget=budget, overlap=1).chunk(content, language="lang")
    # A top-level unit with a whole line of its own that fits lies inside one chunk.
    for u in units:
        text = content[u.start:u.end]
        own_lines = (u.start == 0 or content[u.start - 1] == "\n") and (
            u.end == len(content) or content[u.end] == "\n")
        if own_lines and text.strip() and words(text) <= budget and len(text) < 4000:
            first = len(content[: u.start]) + (len(text) - len(text.lstrip()))
            last = u.start + len(text.rstrip()) - 1
            inside = [s for s in spans if s.start_char <= first and last < s.end_char]
            assert inside, (u, text, spans)


def test_a_unit_that_fits_is_not_split_by_the_comments_above_it() -> None:
    """The lines between two units go to the one that follows (its leading comments): a
    definition that fits, under a comment block that does not fit with it, was split at
    its own statements. It is now cut from the gap, which is packed as a piece of its own
    (found in crcmod, setuptools and packaging: 12 of ~1,200 files)."""
    head = "def a a\n"
    gap = "".join(f"# c{i} c c c c c c\n" for i in range(4))  # 32 words
    body = "def f x y\n" + "".join(f"    s{i} s{i} s{i}\n" for i in range(1, 7))  # 22 words
    content = head + "\n" + gap + "\n" + body
    at = content.index("def f")
    kids = [Unit(content.index(f"s{i} s{i}"), content.index(f"s{i} s{i}") + 8, "statements")
            for i in range(1, 7)]
    units = [Unit(0, len(head) - 1, "function", "def a", [], "def a a", False),
             Unit(at, len(content) - 1, "function", "def f", kids, "def f x y", False)]
    spans = chunker(lambda _: units, budget=25, overlap=1).chunk(content, language="lang")
    assert_exact(content, spans)
    assert_covers(content, spans)
    whole = [sp for sp in spans if sp.start_char <= at and len(content) - 1 <= sp.end_char]
    assert len(whole) == 1 and whole[0].symbol == "def f", spans


def test_text_after_the_last_unit_does_not_split_a_unit_that_fits() -> None:
    """Found by the property test above: a top-level unit that fits, followed by lines no
    unit claims, was packed with them into one oversized segment and cut mid-line at its
    child's end. The trailing lines are now a piece of their own."""
    content = ("\n\n   \n;\n;\n;\nw w w w w w w w w w xy zzz zzz zzz\nw w w w w w w w w")
    child = Unit(26, 27, "function", "", [], "", False)
    units = [Unit(0, 46, "function", "", [child], "", False)]
    spans = chunker(lambda _: units, budget=25, overlap=1).chunk(content, language="lang")
    assert [content[s.start_char:s.end_char] for s in spans] == [
        ";\n;\n;\nw w w w w w w w w w xy zzz zzz zzz\n", "w w w w w w w w w"]
