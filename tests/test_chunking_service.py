"""Structure-aware chunking through the real server: what a chunk says it is, which chunker
cut it and why, stable identity under unrelated edits, re-chunking when the chunking
changes, the kind filter, and the token budget in the embedder's own tokens."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import make_settings, running_server

from retriever.catalog import SCHEMA_VERSION, Catalog
from retriever.client import RetrieverClient, pb
from retriever.config import Settings
from retriever.models.embedder import Embedder

pytestmark = pytest.mark.integration
NS = "chunks"

PY = '''"""Sessions: a small HTTP client."""
import json
import socket


class Session:
    """Keeps connections and cookies across requests."""

    def __init__(self, base_url):
        self.base_url = base_url
        self.cookies = {}

    def request(self, method, url, body=None):
        """Send one request and parse the JSON answer."""
        sock = socket.create_connection((self.base_url, 80))
        sock.sendall(f"{method} {url} HTTP/1.1\\r\\n\\r\\n".encode())
        return json.loads(sock.recv(65536))


def parse_config(path):
    """Read the TOML configuration at path into a dict."""
    with open(path) as f:
        return dict(line.split("=", 1) for line in f if "=" in line)


def retry(times, fn):
    for _ in range(times):
        try:
            return fn()
        except OSError:
            continue
    raise TimeoutError("gave up")
'''

MD = """# Baking bread

Bread needs flour, water, salt and yeast.

## Kneading

Knead the dough for ten minutes until it is smooth and elastic.

```python
# not a heading
knead(dough, minutes=10)
```

## Proofing

Let it rise in a warm place for an hour, covered with a damp cloth.
"""


def doc(doc_id: str, content: str, **kw: str) -> pb.Document:
    return pb.Document(doc_id=doc_id, content=content, path=kw.pop("path", doc_id), **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chunking") / "data"


@pytest.fixture(scope="module")
def client(data_dir: Path, embedder: Embedder) -> Iterator[RetrieverClient]:
    with running_server(make_settings(data_dir), embedder) as st, \
            RetrieverClient(st.address) as c:
        c.upsert(NS, [doc("src/session.py", PY), doc("docs/bread.md", MD)])
        yield c


def chunks_of(client: RetrieverClient, doc_id: str) -> list[pb.Chunk]:
    ids = client.get_document(NS, doc_id).chunk_ids
    return [client.get_chunk(NS, cid).chunk for cid in ids]


def test_code_chunks_are_whole_definitions_with_symbols(client: RetrieverClient) -> None:
    chunks = chunks_of(client, "src/session.py")
    assert {c.chunker for c in chunks} == {"syntax/v7"}
    assert all(c.fallback_reason == "" for c in chunks)
    by_symbol = {c.symbol: c for c in chunks}
    # The docstring and two imports are too small to stand alone: they lead the first chunk.
    assert chunks[0].text.startswith('"""Sessions: a small HTTP client."""\nimport json\n')
    # Each definition that fits lies whole in one chunk, and the chunk names it.
    for name in ("class Session", "def parse_config", "def retry"):
        holder = [c for c in chunks if name in c.symbol]
        assert holder, (name, list(by_symbol))
        assert any(name.split()[1] in c.text for c in holder)
    session = next(c for c in chunks if "class Session" in c.symbol)
    assert "def request" in session.text and "return json.loads" in session.text
    # Returned text is the original text at its exact span.
    for c in chunks:
        assert PY.encode()[c.start_byte:c.end_byte].decode() == c.text
        assert PY.split("\n")[c.start_line - 1].strip() == c.text.split("\n")[0].strip()


def test_docs_chunk_by_heading_with_the_heading_path(client: RetrieverClient) -> None:
    chunks = chunks_of(client, "docs/bread.md")
    assert {c.chunker for c in chunks} == {"sections/v6"}
    assert all(c.symbol.startswith("Baking bread") for c in chunks)
    fence = [c for c in chunks if "knead(dough" in c.text]
    assert len(fence) == 1 and "```python" in fence[0].text and fence[0].text.count("```") == 2


def test_kind_filter_selects_chunks(client: RetrieverClient) -> None:
    hits = client.search(NS, "send a request", top_k=20,
                         filter=pb.SearchFilter(kinds=["function", "class"])).hits
    assert hits and {h.chunk.kind for h in hits} <= {"function", "class"}
    assert {h.chunk.path for h in hits} == {"src/session.py"}
    sections = client.search(NS, "bread", top_k=20,
                             filter=pb.SearchFilter(kinds=["section"])).hits
    assert sections and all(h.chunk.path == "docs/bread.md" for h in sections)
    with pytest.raises(grpc.RpcError) as err:
        client.search(NS, "x", filter=pb.SearchFilter(kinds=[f"k{i}" for i in range(65)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter.kinds" in err.value.details()


def test_an_edit_re_embeds_only_the_edited_definition(client: RetrieverClient) -> None:
    before = {c.chunk_id: c for c in chunks_of(client, "src/session.py")}
    edited = PY.replace('raise TimeoutError("gave up")', 'raise TimeoutError("no luck")')
    r = client.upsert(NS, [doc("src/session.py", edited)]).results[0]
    assert r.status == pb.DocumentResult.UPDATED
    after = {c.chunk_id: c for c in chunks_of(client, "src/session.py")}
    changed = set(after) - set(before)
    assert r.chunks_embedded == len(changed) == 1, r
    assert r.chunks_reused == len(after) - 1
    assert "no luck" in after[changed.pop()].text
    # An edit that moves lines (a comment added on top) keeps every id: spans move.
    moved = "# header comment\n" + edited
    r = client.upsert(NS, [doc("src/session.py", moved)]).results[0]
    assert r.chunks_embedded <= 1  # the first chunk takes the comment; the rest keep ids
    client.upsert(NS, [doc("src/session.py", PY)])


def test_fallbacks_are_recorded_on_the_chunk(client: RetrieverClient) -> None:
    broken = "def broken(:\n    return ]\n" + "x = 1\n" * 3
    minified = "var a=" + ",".join(f"b{i}={i}" for i in range(3000)) + ";\n"
    generated = ("// Code generated by applyconfiguration-gen. DO NOT EDIT.\n\npackage v1\n\n"
                 "func (b *Spec) WithName(v string) *Spec {\n\tb.Name = &v\n\treturn b\n}\n")
    client.upsert(NS, [doc("bad.py", broken), doc("app.min.js", minified),
                       doc("init.lua", "local x = 1\nreturn x\n"),
                       doc("notes.xyz", "plain words in an unknown format\n"),
                       doc("spec.go", generated),
                       doc("logo.svg", '<svg><image href="data:image/png;base64,'
                           + "QUJD" * 400 + '"/></svg>\n'),
                       doc("README.md", "# Logo\n\n![x](data:image/png;base64,"
                           + "QUJD" * 400 + ")\n")])
    for doc_id, reason in (("bad.py", "parse-error"), ("app.min.js", "minified"),
                           ("init.lua", "unsupported-language"), ("spec.go", "generated"),
                           ("logo.svg", "unsupported-language"),
                           ("README.md", "embedded-data")):
        chunks = chunks_of(client, doc_id)
        assert chunks and {c.chunker for c in chunks} == {"windows/v1"}, doc_id
        assert {c.fallback_reason for c in chunks} == {reason}, doc_id
        assert {c.kind for c in chunks} == {"window"}
    # A file of no known format is prose: paragraphs and sentences.
    notes = chunks_of(client, "notes.xyz")
    assert [(c.chunker, c.kind, c.fallback_reason) for c in notes] == [
        ("sections/v6", "paragraph", "")]


def test_inputs_that_break_a_grammar_get_windows_and_the_server_lives_on(
        client: RetrieverClient) -> None:
    """YAML nested past the yaml scanner's fixed state (it killed the process: SIGSEGV), and
    broken code whose parse grows superlinearly (it held the server for minutes)."""
    deep = "".join(" " * i + f"k{i}:\n" for i in range(260)) + " " * 260 + "v\n"
    dashes = "- " * 300 + "x\n"
    slow = "fun f() = g<A<\n" * 16000  # 240 KB: 15 s of tree-sitter-kotlin in one parse
    client.upsert(NS, [doc("deep.yaml", deep), doc("dashes.yml", dashes),
                       doc("slow.kt", slow)])
    for doc_id, reason in (("deep.yaml", "too-deep"), ("dashes.yml", "too-deep"),
                           ("slow.kt", "parse-timeout")):
        chunks = chunks_of(client, doc_id)
        assert chunks and {c.fallback_reason for c in chunks} == {reason}, doc_id
    assert client.search(NS, "k259", top_k=1, mode="lexical").hits


def test_code_is_cut_between_lines_even_where_siblings_share_them(
        client: RetrieverClient) -> None:
    """Elements of a big literal share lines ("[1, 2], [3, 4],"): a cut between them fell
    inside a line. Every line fits the budget here, so every chunk is whole lines."""
    rows = "".join(f"    [{i}, {i} + 1, {i} + 2], [-{i}, -{i} - 1], [{i} * 7, {i} * 11],\n"
                   for i in range(60))
    for doc_id, content in (("rows.py", f"DATA = [\n{rows}]\n"),
                            ("rows.js", f"const DATA = [\n{rows}];\n"),
                            ("rows.json", "[\n" + "".join(
                                f"    [{i}, {i + 1}], [{-i}, {i * 7}], [{i * 11}, 0],\n"
                                for i in range(90)).rstrip(",\n") + "\n]\n")):
        client.upsert(NS, [doc(doc_id, content)])
        chunks = chunks_of(client, doc_id)
        assert len(chunks) > 1 and all(c.fallback_reason == "" for c in chunks), doc_id
        data = content.encode()
        for c in chunks:
            assert c.start_byte == 0 or data[c.start_byte - 1:c.start_byte] == b"\n", doc_id
            assert data[c.end_byte - 1:c.end_byte] == b"\n" or c.end_byte == len(data), doc_id


def test_language_override_picks_the_chunker(client: RetrieverClient) -> None:
    client.upsert(NS, [doc("bin/tool", "def main():\n    return 0\n", language="python")])
    chunks = chunks_of(client, "bin/tool")
    assert [c.chunker for c in chunks] == ["syntax/v7"] and chunks[0].language == "python"
    assert chunks[0].symbol == "def main" and chunks[0].kind == "function"
    # Named as people write it: the chunker and the stored language are the same, and a
    # filter written either way finds it.
    client.upsert(NS, [doc("bin/tool2", "def other():\n    return 1\n", language=" Python ")])
    chunks = chunks_of(client, "bin/tool2")
    assert [c.chunker for c in chunks] == ["syntax/v7"] and chunks[0].language == "python"
    for name in ("python", "PY"):
        hits = client.search(NS, "def other", top_k=5, mode="lexical",
                             filter=pb.SearchFilter(languages=[name])).hits
        assert "bin/tool2" in {h.chunk.doc_id for h in hits}, name


def test_no_embedded_text_exceeds_the_model_budget(client: RetrieverClient,
                                                    embedder: Embedder) -> None:
    long_fn = "def long():\n" + "".join(f"    value_{i} = compute({i}, 'x' * {i})\n"
                                         for i in range(400))
    client.upsert(NS, [doc("long.py", long_fn)])
    chunks = chunks_of(client, "long.py")
    assert len(chunks) > 3
    limit = min(Settings().chunk_tokens, embedder.max_tokens) - embedder.special_tokens
    assert max(c.token_count for c in chunks) <= limit
    assert all(c.symbol == "def long" and c.kind == "function" for c in chunks)
    # Pieces split at statements: each starts on a whole line.
    for c in chunks:
        assert long_fn[: long_fn.encode().index(c.text.encode())].endswith("\n") or \
            c.start_byte == 0


def test_chunks_counted_from_one_tokenisation_are_the_chunks_counted_alone(
        embedder: Embedder) -> None:
    """The service's chunkers read token counts from each document's one tokenisation
    (the packaged tokenizer splits at whitespace); the same chunkers counting every piece
    alone cut this project's own sources and docs into exactly the same chunks, each within
    the budget in the embedder's own tokens."""
    from retriever.ingest.chunking import build_chunkers, detect_language
    from retriever.ingest.pipeline import service_chunkers, text_budget

    s = Settings()
    assert embedder.whitespace_split
    budget = text_budget(s, embedder)
    fast = service_chunkers(s, embedder)
    def wrapper_counts(texts: list[str]) -> list[int]:  # the transformers tokenizer's own
        return [len(x) for x in embedder._tokenizer()(
            list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    alone = build_chunkers(wrapper_counts, embedder.token_offsets, budget,
                           s.overlap_tokens, s.chunk_max_chars)
    root = Path(__file__).resolve().parent.parent
    files = [*sorted(root.glob("retriever/**/*.py")), *sorted(root.glob("docs/*.md")),
             root / "README.md", root / "Makefile", root / "pyproject.toml"]
    made = 0
    for f in files:
        rel, text = str(f.relative_to(root)), f.read_text(encoding="utf-8")
        lang = detect_language(rel, text)
        got = fast.chunker_for(lang).chunk(text, path=rel, language=lang)
        assert got == alone.chunker_for(lang).chunk(text, path=rel, language=lang), rel
        assert max(wrapper_counts([c.text for c in got]), default=0) <= budget, rel
        made += len(got)
    assert made > 500


def test_only_a_tokenizer_that_splits_at_whitespace_is_read_so() -> None:
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from retriever.models.embedder import _AsciiWords, _splits_at_whitespace

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    conf = json.loads(byte_level.to_str())
    assert not _splits_at_whitespace(conf) and _AsciiWords.of(byte_level, conf) is None
    bert = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    conf = json.loads(bert.to_str())
    assert _splits_at_whitespace(conf) and _AsciiWords.of(bert, conf) is not None
    assert not _splits_at_whitespace({})


def test_a_chunking_change_re_chunks_instead_of_unchanged(tmp_path: Path,
                                                          embedder: Embedder) -> None:
    data = tmp_path / "data"
    with running_server(make_settings(data, chunking="windows"), embedder) as st, \
            RetrieverClient(st.address) as c:
        c.upsert(NS, [doc("src/session.py", PY)])
        assert {x.chunker for x in chunks_of(c, "src/session.py")} == {"windows/v1"}
        again = c.upsert(NS, [doc("src/session.py", PY)]).results[0]
        assert again.status == pb.DocumentResult.UNCHANGED
    with running_server(make_settings(data), embedder) as st, \
            RetrieverClient(st.address) as c:
        r = c.upsert(NS, [doc("src/session.py", PY)]).results[0]
        assert r.status == pb.DocumentResult.UPDATED and r.chunks_embedded > 0
        assert {x.chunker for x in chunks_of(c, "src/session.py")} == {"syntax/v7"}
        assert c.upsert(NS, [doc("src/session.py", PY)]).results[0].status == \
            pb.DocumentResult.UNCHANGED


def test_an_older_catalog_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    Catalog(path).open()
    with sqlite3.connect(path) as db:  # as the release before chunk symbols wrote it
        for col in ("symbol", "kind", "fallback", "header"):
            db.execute(f"ALTER TABLE chunks DROP COLUMN {col}")
        db.execute("PRAGMA user_version = 2")
    cat = Catalog(path)
    cat.open()
    with sqlite3.connect(path) as db:
        cols = {r[1] for r in db.execute("PRAGMA table_info(chunks)")}
        assert {"symbol", "kind", "fallback", "header"} <= cols
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    cat.close()


def test_a_chunk_budget_no_larger_than_the_overlap_is_refused(embedder: Embedder) -> None:
    from retriever.ingest.pipeline import HEADER_TOKENS, text_budget

    budget = text_budget(Settings(), embedder)
    assert budget == min(Settings().chunk_tokens, embedder.max_tokens) - (
        embedder.special_tokens + HEADER_TOKENS)
    with pytest.raises(ValueError, match=f"must exceed overlap_tokens {budget}"):
        text_budget(Settings(overlap_tokens=budget), embedder)


def test_a_split_piece_keeps_its_signature_in_the_header(embedder: Embedder) -> None:
    """A piece of a split definition carries its enclosing signature: a long one (20 % of
    the stdlib's split pieces) was dropped whole for the symbol; now the symbol's outer
    levels and the symbol give way first, then the signature's end. Plain symbols still
    lose their outer levels only. Every header fits HEADER_TOKENS in the model's tokens."""
    from retriever.ingest.pipeline import HEADER_TOKENS, chunk_headers

    sig = ("def request(self, method, url, params=None, data=None, headers=None, "
           "cookies=None, files=None, auth=None, timeout=None, allow_redirects=True, "
           "proxies=None, hooks=None, stream=None, verify=None, cert=None, json=None):")
    short = "def get(self, url, **kwargs):"
    items = [("class Session > def request", sig), ("class Session > def get", short),
             ("class Session", ""), ("", sig)]
    out = chunk_headers("src/requests/sessions.py", "python", items, embedder.count_tokens)
    for text, n in out:
        assert embedder.count_tokens([text])[0] == n <= HEADER_TOKENS, text
    long_piece, short_piece, plain, bare = (t for t, _ in out)
    assert "def request(self, method, url, params=None" in long_piece
    assert sig not in long_piece  # cut at a word to fit
    assert short_piece.endswith("class Session > def get\n" + short + "\n")
    assert plain.endswith("class Session\n")
    assert "def request(self, method" in bare


def test_a_lone_surrogate_never_makes_a_chunker_raise(embedder: Embedder) -> None:
    """The server refuses lone surrogates at validation, but a chunker is also a library:
    no tokenizer takes one (TypeError out of the windows fallback too). Chunks are cut as
    if each were U+FFFD (same offsets, same UTF-8 length) and hold the original text."""
    from retriever.ingest.pipeline import service_chunkers

    chunkers = service_chunkers(Settings(), embedder)
    for language, content in (("python", "s = '\ud800'\n\ndef f():\n    return 1\n"),
                              ("markdown", "# T\n\nbad \udfff text.\n"),
                              ("text", "plain \ud83d words\n" * 3)):
        spans = chunkers.chunker_for(language).chunk(content, path="x", language=language)
        assert spans
        data = content.encode("utf-8", "surrogatepass")
        for s in spans:
            assert s.text == content[s.start_char:s.end_char]
            assert data[s.start_byte:s.end_byte] == s.text.encode("utf-8", "surrogatepass")
        assert "".join(s.text for s in spans).replace("\n", "") == content.replace("\n", "")
