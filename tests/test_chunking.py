"""WindowChunker: exact spans, token budgets, overlap, coverage and break choice.

Most tests use a whitespace tokenizer (a token is a run of non-space characters), whose
counts are additive and predictable, to pin the algorithm down exactly. Tests marked
``integration`` run the same checks with the embedder's own tokenizer (loads the model).
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Sequence

import pytest

from retriever.ingest.chunking import ChunkerSet, ChunkSpan, TokenCounter, WindowChunker
from retriever.ingest.chunking.windows import TokenOffsets

_WORD = re.compile(r"\S+")


def ws_count(texts: Sequence[str]) -> list[int]:
    return [len(_WORD.findall(t)) for t in texts]


def ws_offsets(texts: Sequence[str]) -> list[list[tuple[int, int]]]:
    return [[(m.start(), m.end()) for m in _WORD.finditer(t)] for t in texts]


def ws_chunker(budget: int, overlap: int) -> WindowChunker:
    return WindowChunker(ws_count, ws_offsets, budget, overlap)


# -- the properties every chunking must have ---------------------------------------------------
def non_blank_lines(content: str) -> list[tuple[int, int, int]]:
    """(line number, start char, end char without the newline) of each non-blank line."""
    out, pos = [], 0
    for no, line in enumerate(content.split("\n"), start=1):
        if line.strip():
            out.append((no, pos, pos + len(line)))
        pos += len(line) + 1
    return out


def assert_exact(content: str, spans: Sequence[ChunkSpan]) -> None:
    """Text, byte offsets and line numbers of every span agree with ``content``."""
    data = content.encode("utf-8")
    for s in spans:
        assert s.text, s
        assert s.text.strip(), f"a span of only whitespace: {s}"
        assert content[s.start_char : s.end_char] == s.text
        assert data[s.start_byte : s.end_byte] == s.text.encode("utf-8")
        assert s.start_byte == len(content[: s.start_char].encode("utf-8"))
        assert s.start_line == content.count("\n", 0, s.start_char) + 1
        assert s.end_line == content.count("\n", 0, s.end_char - 1) + 1
        assert s.start_line <= s.end_line


def assert_covers(content: str, spans: Sequence[ChunkSpan]) -> None:
    """Every non-whitespace character of every non-blank line lies inside some span."""
    for no, a, b in non_blank_lines(content):
        inside = [s for s in spans if s.start_char < b and s.end_char > a]
        assert inside, f"line {no} {content[a:b]!r} is in no span"
        for c in range(a, b):
            if not content[c].isspace():
                assert any(s.start_char <= c < s.end_char for s in inside), (
                    f"char {c} ({content[c]!r}) of line {no} is in no span"
                )


def assert_progress(spans: Sequence[ChunkSpan]) -> None:
    """Spans are in order; each starts after, and reaches past, its predecessor."""
    for prev, cur in zip(spans, spans[1:], strict=False):
        assert cur.start_char > prev.start_char, (prev, cur)
        assert cur.end_char > prev.end_char, f"span is all overlap: {prev} then {cur}"
        assert cur.start_line >= prev.start_line


def assert_budget(content: str, spans: Sequence[ChunkSpan], count: TokenCounter, budget: int,
                  overlap: int) -> None:
    for s in spans:
        n = count([s.text])[0]
        assert n <= budget, f"{n} tokens > budget {budget}: {s.text!r}"
        assert s.token_count == n, s
    for prev, cur in zip(spans, spans[1:], strict=False):
        if cur.start_char < prev.end_char:
            shared = count([content[cur.start_char : prev.end_char]])[0]
            assert shared <= overlap, f"{shared} tokens of overlap > {overlap}"


def assert_all(content: str, spans: Sequence[ChunkSpan], count: TokenCounter, budget: int,
               overlap: int) -> None:
    assert_exact(content, spans)
    assert_covers(content, spans)
    assert_progress(spans)
    assert_budget(content, spans, count, budget, overlap)


def assert_cuts_between_tokens(line: str, spans: Sequence[ChunkSpan],
                               offsets: TokenOffsets) -> None:
    """No span boundary falls strictly inside a token of ``line``; every token is in a span."""
    tokens = offsets([line])[0]
    bounds = {b for s in spans for b in (s.start_char, s.end_char)}
    for a, e in tokens:
        assert not any(a < b < e for b in bounds), f"a cut inside token {line[a:e]!r}"
        assert any(s.start_char <= a and e <= s.end_char for s in spans), line[a:e]


# -- code-like documents used below ------------------------------------------------------------
def function(name: str, body_lines: int) -> str:
    body = "".join(f"    v{i} = {name}_arg + {i}\n" for i in range(body_lines))
    return f"def {name}({name}_arg):\n{body}    return v0\n"


SOURCE = (
    "import os\nimport sys\n\n\n"
    + function("alpha", 5) + "\n\n" + function("beta", 9) + "\n"
    + "class Gamma:\n    '''Doc.'''\n\n    def m(self):\n        return 1\n\n"
    + "# café naïve — 😀 emoji and 中文字符 text\n"
    + "\n".join(f"CONST_{i} = {i}  # comment number {i}" for i in range(12)) + "\n"
)


# -- unit tests (whitespace tokenizer) ---------------------------------------------------------
def test_constructor_rejects_bad_budget_and_overlap() -> None:
    with pytest.raises(ValueError):
        ws_chunker(0, 0)
    with pytest.raises(ValueError):
        ws_chunker(10, 10)
    with pytest.raises(ValueError):
        ws_chunker(10, -1)
    assert ws_chunker(10, 9).budget == 10


@pytest.mark.parametrize("content", ["", "\n", " ", "\n\n\n", "  \t \n \r\n\t\n", "\u3000\n\x0c"])
def test_empty_or_whitespace_content_gives_no_spans(content: str) -> None:
    assert ws_chunker(8, 2).chunk(content, path="x.py", language="python") == []


def test_small_document_is_one_exact_span() -> None:
    content = "\n\ndef f():\n    return 1\n\n\n"
    (span,) = ws_chunker(50, 5).chunk(content)
    assert span.text == "def f():\n    return 1\n"
    assert (span.start_char, span.end_char) == (2, 24)
    assert (span.start_line, span.end_line) == (3, 4)
    assert span.token_count == 4


def test_document_without_trailing_newline() -> None:
    content = "a b\nc d"
    (span,) = ws_chunker(8, 0).chunk(content)
    assert span.text == content
    assert (span.start_line, span.end_line, span.end_char) == (1, 2, len(content))


@pytest.mark.parametrize(("budget", "overlap"), [(1, 0), (3, 1), (8, 0), (8, 3), (16, 8), (40, 10),
                                                 (400, 50)])
def test_properties_on_source_code(budget: int, overlap: int) -> None:
    spans = ws_chunker(budget, overlap).chunk(SOURCE, path="m.py", language="python")
    assert_all(SOURCE, spans, ws_count, budget, overlap)
    if ws_count([SOURCE])[0] > budget:
        assert len(spans) > 1


def test_windows_fill_greedily_and_overlap_whole_lines() -> None:
    content = "  a b c\n" * 10  # indented: no good breaks, 3 tokens a line
    spans = ws_chunker(10, 4).chunk(content)
    assert [(s.start_line, s.end_line) for s in spans] == [(1, 3), (3, 5), (5, 7), (7, 9),
                                                           (9, 10)]
    assert [s.token_count for s in spans] == [9, 9, 9, 9, 6]
    assert_all(content, spans, ws_count, 10, 4)


def test_no_overlap_when_zero() -> None:
    content = "  a b c\n" * 10
    spans = ws_chunker(10, 0).chunk(content)
    assert [(s.start_line, s.end_line) for s in spans] == [(1, 3), (4, 6), (7, 9), (10, 10)]
    for prev, cur in zip(spans, spans[1:], strict=False):
        assert cur.start_char >= prev.end_char


def test_no_window_is_only_a_repeat_of_the_previous_one() -> None:
    # Line 2 (5 tokens) fits the overlap, but line 3 (6 tokens) does not fit beside it: a
    # window holding only line 2 again would add nothing.
    content = "  a b c d e\n  f g h i j\n  k l m n o p\n"
    spans = ws_chunker(10, 5).chunk(content)
    assert [(s.start_line, s.end_line) for s in spans] == [(1, 2), (3, 3)]
    assert_all(content, spans, ws_count, 10, 5)


def test_non_ascii_offsets_are_exact() -> None:
    lines = ["é è ê ë", "😀 🎉 👍🏽 x", "中文 字符 测试", "e\u0301 n\u0303 mixed ascii", "plain"]
    content = "\n".join(lines * 6) + "\n"
    for budget, overlap in [(3, 1), (5, 2), (9, 4)]:
        spans = ws_chunker(budget, overlap).chunk(content)
        assert len(spans) > 3
        assert_all(content, spans, ws_count, budget, overlap)
        assert any(s.end_byte - s.start_byte > s.end_char - s.start_char for s in spans)


def test_long_single_line_is_cut_between_tokens() -> None:
    words = [f"w{i}é" for i in range(230)]
    line = " ".join(words)
    for budget, overlap in [(10, 0), (10, 3), (17, 5), (64, 8)]:
        spans = ws_chunker(budget, overlap).chunk(line)
        assert len(spans) >= len(words) // budget
        assert all(s.start_line == s.end_line == 1 for s in spans)
        assert_all(line, spans, ws_count, budget, overlap)
        assert_cuts_between_tokens(line, spans, ws_offsets)


def test_long_line_inside_a_document_is_cut_and_neighbours_kept() -> None:
    long_line = "    " + " ".join(f"t{i}" for i in range(50))
    content = "def f():\n" + long_line + "\n    return 1\n"
    spans = ws_chunker(12, 2).chunk(content)
    assert_all(content, spans, ws_count, 12, 2)
    assert spans[0].start_line == 1
    assert spans[-1].end_line == 3
    start = content.index(long_line)
    assert sum(1 for s in spans if s.start_line == s.end_line == 2) >= 3
    tokens = [(start + a, start + e) for a, e in ws_offsets([long_line])[0]]
    bounds = {b for s in spans for b in (s.start_char, s.end_char)}
    for a, e in tokens:
        assert not any(a < b < e for b in bounds)


@pytest.mark.parametrize("separator", ["\n", ""], ids=["blank-line", "column-0"])
@pytest.mark.parametrize("overlap", [0, 4])
def test_break_between_functions_keeps_each_whole(separator: str, overlap: int) -> None:
    fa, fb = function("alpha", 6), function("beta", 6)
    content = fa + separator + fb
    budget = 40
    assert ws_count([fa + fb])[0] > budget
    assert ws_count([fb])[0] + overlap <= budget
    spans = ws_chunker(budget, overlap).chunk(content, path="m.py", language="python")
    assert_all(content, spans, ws_count, budget, overlap)
    for text in (fa, fb):
        a = content.index(text)
        b = a + len(text)
        assert any(s.start_char <= a and b <= s.end_char for s in spans), (
            f"{text.splitlines()[0]!r} is split: {[(s.start_line, s.end_line) for s in spans]}"
        )


def test_function_that_fits_is_not_split_by_overlap_from_the_one_before() -> None:
    # beta alone fits the budget, but not together with 8 tokens of alpha's tail carried
    # over as overlap: a window that starts at a blank-line break needs no overlap.
    fa, fb = function("alpha", 6), function("beta", 6)
    content = fa + "\n" + fb
    budget, overlap = 40, 8
    assert ws_count([fb])[0] <= budget < ws_count([fb])[0] + overlap
    spans = ws_chunker(budget, overlap).chunk(content)
    assert_all(content, spans, ws_count, budget, overlap)
    a = content.index(fb)
    assert any(s.start_char <= a and a + len(fb) <= s.end_char for s in spans), (
        [(s.start_line, s.end_line) for s in spans]
    )


def test_break_is_taken_only_in_the_second_half() -> None:
    # A blank line right after the first line is not worth a nearly empty window.
    content = "title here\n\n" + "".join(f"  line {i} of text\n" for i in range(20))
    spans = ws_chunker(20, 0).chunk(content)
    assert_all(content, spans, ws_count, 20, 0)
    assert spans[0].end_line > 2
    assert spans[0].token_count > 10


_ALPHABET = (
    "abcdefgh xyz" + "  \t\n\n\n" + "é😀中文\u3000\u2028\x0b\r" + "e\u0301" + "{}();=#"
)


@pytest.mark.parametrize("seed", range(200))
def test_random_text_properties(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([0, 1, 5, 40, 200, 600])
    content = "".join(rng.choice(_ALPHABET) for _ in range(n))
    if rng.random() < 0.3:  # sometimes one long line without newlines
        content = content.replace("\n", " ")
    budget = rng.randint(1, 24)
    overlap = rng.randint(0, budget - 1)
    spans = ws_chunker(budget, overlap).chunk(content)
    assert_all(content, spans, ws_count, budget, overlap)
    if not content.strip():
        assert spans == []


# -- the character cap -------------------------------------------------------------------------
def capped(budget: int, overlap: int, max_chars: int) -> WindowChunker:
    return WindowChunker(ws_count, ws_offsets, budget, overlap, max_chars)


def assert_chars(spans: Sequence[ChunkSpan], max_chars: int) -> None:
    for s in spans:
        assert len(s.text) <= max_chars, f"{len(s.text)} chars > {max_chars}: {s}"


def test_a_huge_word_is_cut_at_the_character_cap() -> None:
    # One token to the tokenizer (as a 1 MiB word is one [UNK]), far more than the cap.
    content = "".join(random.Random(5).choice("abcdefghij") for _ in range(10_500))
    for overlap in (0, 4):
        spans = capped(50, overlap, 1000).chunk(content)
        assert_all(content, spans, ws_count, 50, overlap)
        assert_chars(spans, 1000)
        assert [len(s.text) for s in spans] == [1000] * 10 + [500]
        assert "".join(s.text for s in spans) == content  # no overlap: pieces never share


def test_the_cap_cuts_after_whitespace_else_punctuation() -> None:
    spaced = "abcdefghi " * 50  # 10 chars a word
    spans = capped(1000, 0, 64).chunk(spaced)
    assert_all(spaced, spans, ws_count, 1000, 0)
    assert_chars(spans, 64)
    assert all(len(s.text) == 60 and s.text.endswith(" ") for s in spans[:-1])
    assert all(s.text.startswith("a") for s in spans)

    punctuated = "abcdefghi," * 50  # no whitespace: one token to ws_count
    spans = capped(1000, 0, 64).chunk(punctuated)
    assert_all(punctuated, spans, ws_count, 1000, 0)
    assert all(len(s.text) == 60 and s.text.endswith(",") for s in spans[:-1])
    assert "".join(s.text for s in spans) == punctuated


def test_lines_under_the_cap_stay_whole_and_overlap_respects_it() -> None:
    lines = [f"line {i:02d} " + "w" * 21 + "\n" for i in range(40)]  # 30 chars, 3 tokens
    content = "".join(lines)
    starts = {sum(len(x) for x in lines[:i]) for i in range(len(lines) + 1)}
    for overlap in (0, 3, 6):
        spans = capped(1000, overlap, 100).chunk(content)
        assert_all(content, spans, ws_count, 1000, overlap)
        assert_chars(spans, 100)
        for s in spans:
            assert s.start_char in starts and s.end_char in starts, s  # whole lines
        assert max(len(s.text) for s in spans) == 90  # three lines fit, four would not


def test_a_long_line_among_short_ones_is_cut_and_spans_stay_exact() -> None:
    long_line = "😀é中" * 700  # no whitespace, multi-byte: byte offsets must stay exact
    content = "def f():\n    return 1\n" + long_line + "\nprint(f())\n"
    spans = capped(40, 5, 256).chunk(content)
    assert_all(content, spans, ws_count, 40, 5)
    assert_chars(spans, 256)
    assert spans[0].text.startswith("def f():") and spans[-1].text.endswith("print(f())\n")
    assert sum(1 for s in spans if s.start_line == s.end_line == 3) >= 8


def test_the_default_cap_changes_nothing_in_ordinary_text() -> None:
    rng = random.Random(11)
    prose = "\n".join(" ".join(rng.choice(["retrieval", "of", "chunks", "über", "a", "vector",
                                             "index", "(x)"]) for _ in range(rng.randint(0, 30)))
                      for _ in range(400))
    for content in (SOURCE * 20, prose):
        default = WindowChunker(ws_count, ws_offsets, 222, 32).chunk(content)
        assert default == capped(222, 32, 10**9).chunk(content)
        assert len(default) > 3


@pytest.mark.parametrize("seed", range(200))
def test_random_text_properties_under_a_character_cap(seed: int) -> None:
    rng = random.Random(seed)
    content = "".join(rng.choice(_ALPHABET + "abcdefgh" * 3)
                      for _ in range(rng.choice([1, 40, 300, 900])))
    if rng.random() < 0.4:  # sometimes one long line without newlines or spaces
        content = re.sub(r"\s", "", content) or "x"
    budget = rng.randint(1, 40)
    overlap = rng.randint(0, budget - 1)
    max_chars = rng.randint(2, 80)
    spans = capped(budget, overlap, max_chars).chunk(content)
    assert_all(content, spans, ws_count, budget, overlap)
    assert_chars(spans, max_chars)


def test_chunker_set_picks_per_language_with_fallback() -> None:
    default = ws_chunker(10, 2)

    class Other:
        name = "other/v1"

        def chunk(self, content: str, *, path: str, language: str) -> list[ChunkSpan]:
            return []

    other = Other()
    chunkers = ChunkerSet(default, {"markdown": other})
    assert chunkers.chunker_for("markdown") is other
    assert chunkers.chunker_for("python") is default
    assert chunkers.names == ["other/v1", "windows/v1"]


# -- the embedder's own tokenizer (loads the model) --------------------------------------------
@pytest.fixture(scope="module")
def real(embedder):  # noqa: ANN001, ANN201
    def make(budget: int, overlap: int) -> WindowChunker:
        return WindowChunker(embedder.count_tokens, embedder.token_offsets, budget, overlap)

    return make


@pytest.mark.integration
@pytest.mark.parametrize(("budget", "overlap"), [(16, 4), (32, 8), (64, 16), (200, 32)])
def test_real_tokenizer_properties_on_source(real, embedder, budget: int,  # noqa: ANN001
                                             overlap: int) -> None:
    spans = real(budget, overlap).chunk(SOURCE, path="m.py", language="python")
    assert_all(SOURCE, spans, embedder.count_tokens, budget, overlap)


@pytest.mark.integration
def test_real_tokenizer_non_ascii(real, embedder) -> None:  # noqa: ANN001
    content = "\n".join(["Le café est très bon à Noël.", "😀 🎉 emoji 👍🏽 here",
                         "中文字符测试，这是一个句子。", "naïve façade über straße"] * 8)
    spans = real(12, 4).chunk(content)
    assert len(spans) > 4
    assert_all(content, spans, embedder.count_tokens, 12, 4)


@pytest.mark.integration
def test_real_tokenizer_long_prose_line(real, embedder) -> None:  # noqa: ANN001
    rng = random.Random(7)
    vocab = ["retrieval", "index", "the", "vector", "chunk", "tokenizer", "budget", "naïve",
             "über", "x=1;", "(a,b)", "中文", "😀"]
    line = " ".join(rng.choice(vocab) for _ in range(600))
    budget = 32
    assert embedder.count_tokens([line])[0] > 5 * budget
    spans = real(budget, 8).chunk(line)
    assert len(spans) >= 5
    assert_all(line, spans, embedder.count_tokens, budget, 8)
    assert_cuts_between_tokens(line, spans, embedder.token_offsets)


@pytest.mark.integration
def test_real_tokenizer_long_line_without_whitespace_stays_in_budget(real, embedder) -> None:  # noqa: ANN001
    # A base64 blob: no whitespace gap, so pieces are cut between word pieces of one word.
    line = base64.b64encode(random.Random(3).randbytes(3000)).decode()
    budget = 32
    spans = real(budget, 8).chunk(line)
    assert len(spans) > 5
    assert_exact(line, spans)
    assert_covers(line, spans)
    assert_progress(spans)
    assert_cuts_between_tokens(line, spans, embedder.token_offsets)
    assert_budget(line, spans, embedder.count_tokens, budget, 8)


@pytest.mark.integration
def test_real_tokenizer_huge_word_is_cut_at_the_character_cap(real, embedder) -> None:  # noqa: ANN001
    # Letters and digits only: the tokenizer folds each 4096-character piece into one [UNK].
    content = "".join(random.Random(9).choice("abcdef0123456789") for _ in range(100_000))
    assert embedder.count_tokens([content])[0] < 10
    spans = WindowChunker(embedder.count_tokens, embedder.token_offsets, 222, 32).chunk(content)
    assert_all(content, spans, embedder.count_tokens, 222, 32)
    assert_chars(spans, 4096)
    assert "".join(s.text for s in spans) == content


@pytest.mark.integration
@pytest.mark.parametrize("overlap", [0, 4])
def test_real_tokenizer_keeps_functions_whole(real, embedder, overlap: int) -> None:  # noqa: ANN001
    fa, fb = function("alpha", 5), function("beta", 5)
    content = fa + "\n" + fb
    na, nb, total = embedder.count_tokens([fa, fb, content])
    budget = max(na, nb) + overlap + 2
    assert total > budget
    spans = real(budget, overlap).chunk(content, path="m.py", language="python")
    assert_all(content, spans, embedder.count_tokens, budget, overlap)
    for text in (fa, fb):
        a = content.index(text)
        assert any(s.start_char <= a and a + len(text) <= s.end_char for s in spans)


@pytest.mark.integration
def test_real_tokenizer_random_text(real, embedder) -> None:  # noqa: ANN001
    # Exactness and coverage on arbitrary text (control and format characters, combining
    # marks, emoji...). The budget is checked where cuts fall between words, above.
    pool = _ALPHABET + "\x01\u200b\u0301\ufeff\U0001f600ß"
    for seed in range(100):
        rng = random.Random(seed)
        content = "".join(rng.choice(pool) for _ in range(rng.choice([1, 30, 300])))
        budget = rng.randint(2, 24)
        spans = real(budget, rng.randint(0, budget - 1)).chunk(content)
        assert_exact(content, spans)
        assert_covers(content, spans)
        assert_progress(spans)


def test_byte_offsets_of_non_ascii_text_in_any_order() -> None:
    """Byte offsets asked for out of order (overlapping windows go back): each answer is
    the UTF-8 length of the text before it, across block boundaries and for characters of
    every width (lone surrogates as Python's surrogatepass writes them)."""
    import random

    from retriever.ingest.chunking.windows import _ByteOffsets

    rng = random.Random(3)
    words = ["café", "naïve", "straße", "x", "日本語", "\U0001F600", "abc", "\ud800"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(3000))
    at = _ByteOffsets(text)
    picks = [0, 1, 4095, 4096, 4097, 8192, len(text)] + rng.sample(range(len(text)), 500)
    for c in picks + sorted(picks, reverse=True):
        assert at(c) == len(text[:c].encode("utf-8", "surrogatepass")), c
