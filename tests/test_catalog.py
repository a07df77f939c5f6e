"""Catalog on a real SQLite file: namespaces, two-step chunk writes, filters, paging."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from retriever.catalog import (
    Catalog,
    ChunkPlacement,
    DocumentRefresh,
    DocumentWrite,
    NewChunk,
    sqlite_memory_used,
)
from retriever.domain import NamespaceRecord, SearchFilter
from retriever.errors import FailedPrecondition, NotReady

DIM = 4
CREATED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def ns_record(name: str = "ns", dimension: int = DIM) -> NamespaceRecord:
    return NamespaceRecord(
        name=name, backend="faiss", embedder="mini", embedder_revision="abc123",
        dimension=dimension, metric="cosine", index_generation=3, index_version=0,
        created_at=CREATED,
    )


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def new_chunk(doc_id: str, i: int, *, tag: str = "v1", vector: np.ndarray | None = None,
              text: str | None = None) -> NewChunk:
    return NewChunk(
        chunk_id=f"{doc_id}#{tag}#{i}", doc_id=doc_id, ordinal=i,
        text=text if text is not None else f"text {doc_id} {tag} {i}",
        content_hash=f"h-{doc_id}-{tag}-{i}", start_line=10 * i + 1, end_line=10 * i + 5,
        start_byte=100 * i, end_byte=100 * i + 50, token_count=7 + i, chunker="windows/v1",
        vector=vector if vector is not None else vec(hash((doc_id, tag, i)) % 10_000),
    )


def doc_write(doc_id: str, activate: Sequence[int], *, path: str | None = None,
              version: int = 1, language: str = "python", content: str = "print('hi')\n",
              metadata: dict[str, str] | None = None, keep: Sequence[ChunkPlacement] = (),
              drop: Sequence[int] = (), source_updated_at: datetime | None = None,
              revision: str = "rev1") -> DocumentWrite:
    return DocumentWrite(
        doc_id=doc_id, path=path if path is not None else doc_id, revision=revision,
        content_hash=f"doc-{doc_id}-{version}", language=language, version=version,
        content=content, chunk_count=len(activate) + len(keep),
        source_updated_at=source_updated_at, metadata=dict(metadata or {}),
        chunker="windows/v1", keep=tuple(keep), activate=tuple(activate), drop=tuple(drop),
    )


def add_doc(cat: Catalog, doc_id: str, n: int = 2, *, ns: str = "ns", **kw: object) -> list[int]:
    """Stage and commit ``n`` chunks of a new document; returns their vector ids."""
    ids = cat.stage_chunks(ns, [new_chunk(doc_id, i) for i in range(n)])
    cat.commit_documents(ns, [doc_write(doc_id, ids, **kw)], [])  # type: ignore[arg-type]
    return ids


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog" / "catalog.sqlite3")
    c.open()
    assert c.create_namespace(ns_record("ns"))
    yield c
    c.close()


def id_set(arr: np.ndarray) -> set[int]:
    assert arr.dtype == np.int64
    return {int(x) for x in arr}


# -- namespaces --------------------------------------------------------------------------------
def test_namespaces_create_get_list(cat: Catalog) -> None:
    assert cat.create_namespace(ns_record("ns")) is False  # taken (by the fixture)
    assert cat.create_namespace(ns_record("b-ns", dimension=8)) is True
    assert cat.create_namespace(ns_record("a-ns")) is True

    got = cat.get_namespace("b-ns")
    assert got == ns_record("b-ns", dimension=8)  # every field round-trips, counts are 0
    assert got is not None and got.created_at == CREATED and got.last_indexed_at is None
    assert cat.get_namespace("missing") is None

    assert [n.name for n in cat.list_namespaces("", 10)] == ["a-ns", "b-ns", "ns"]
    assert [n.name for n in cat.list_namespaces("", 2)] == ["a-ns", "b-ns"]
    assert [n.name for n in cat.list_namespaces("b-ns", 2)] == ["ns"]
    assert cat.namespace_names() == ["a-ns", "b-ns", "ns"]


def test_namespace_counts_and_delete(cat: Catalog) -> None:
    add_doc(cat, "a.py", 2, content="héllo\n")  # 7 bytes
    add_doc(cat, "b.py", 3, content="abc")
    ns = cat.get_namespace("ns")
    assert ns is not None
    assert (ns.document_count, ns.chunk_count, ns.content_bytes) == (2, 5, 10)
    assert ns.index_version == 2 and ns.last_indexed_at is not None
    bare = cat.get_namespace("ns", with_counts=False)
    assert bare is not None and bare.document_count == 0
    (listed,) = cat.list_namespaces("", 10)
    assert listed.chunk_count == 5

    assert cat.delete_namespace("ns") == (2, 5)
    assert cat.get_namespace("ns") is None
    assert cat.namespace_names() == []


# -- two-step writes ---------------------------------------------------------------------------
def version_of(catalog: Catalog) -> int:
    ns = catalog.get_namespace("ns")
    assert ns is not None
    return ns.index_version


def test_staged_chunks_are_invisible_until_commit(cat: Catalog) -> None:
    chunks = [new_chunk("a.py", 0), new_chunk("a.py", 1)]
    ids = cat.stage_chunks("ns", chunks)
    assert len(ids) == 2 and ids[0] < ids[1]

    assert cat.get_chunk("ns", chunks[0].chunk_id) is None
    assert cat.chunks_by_vector_ids("ns", ids) == ({}, 0)
    assert id_set(cat.active_vector_ids("ns")) == set()
    assert id_set(cat.filter_vector_ids("ns", SearchFilter())) == set()
    assert cat.active_chunks("ns", ["a.py"]) == {}
    got_ids, got_vecs = cat.vectors("ns", ids, DIM)
    assert len(got_ids) == 0 and got_vecs.shape == (0, DIM)
    assert version_of(cat) == 0

    version = cat.commit_documents("ns", [doc_write("a.py", ids, metadata={"k": "v"})], [])
    assert version == 1 == version_of(cat)
    assert id_set(cat.active_vector_ids("ns")) == set(ids)
    rec = cat.get_chunk("ns", chunks[1].chunk_id)
    assert rec is not None
    c = chunks[1]
    assert (rec.vector_id, rec.chunk_id, rec.doc_id, rec.ordinal, rec.text, rec.content_hash) == (
        ids[1], c.chunk_id, "a.py", 1, c.text, c.content_hash)
    assert (rec.start_line, rec.end_line, rec.start_byte, rec.end_byte, rec.token_count) == (
        c.start_line, c.end_line, c.start_byte, c.end_byte, c.token_count)
    assert (rec.language, rec.chunker, rec.path, rec.revision) == (
        "python", "windows/v1", "a.py", "rev1")
    assert (rec.document_version, rec.document_hash, rec.metadata) == (1, "doc-a.py-1", {"k": "v"})
    found, seen_version = cat.chunks_by_vector_ids("ns", [*ids, 999_999])
    assert set(found) == set(ids) and seen_version == 1
    assert {k: v.vector_id for k, v in cat.active_chunks("ns", ["a.py"]).items()} == {
        chunks[0].chunk_id: ids[0], chunks[1].chunk_id: ids[1]}


def test_commit_new_version_keeps_drops_and_activates(cat: Catalog) -> None:
    a, b, c = add_doc(cat, "doc", 3)
    new = cat.stage_chunks("ns", [new_chunk("doc", 0, tag="v2")])
    # v2: the new chunk first, then old chunk b moved to ordinal 1; a and c dropped.
    moved = ChunkPlacement(vector_id=b, ordinal=1, start_line=40, end_line=44, start_byte=400,
                           end_byte=480)
    version = cat.commit_documents(
        "ns", [doc_write("doc", new, version=2, keep=[moved], drop=[a, c])], [])
    assert version == 2

    assert id_set(cat.active_vector_ids("ns")) == {b, new[0]}
    assert cat.get_chunk("ns", "doc#v1#0") is None
    assert cat.get_chunk("ns", "doc#v1#2") is None
    kept = cat.get_chunk("ns", "doc#v1#1")
    assert kept is not None and kept.vector_id == b
    assert (kept.ordinal, kept.start_line, kept.end_line, kept.start_byte, kept.end_byte) == (
        1, 40, 44, 400, 480)
    assert kept.document_version == 2 and kept.text == "text doc v1 1"
    doc = cat.get_document("ns", "doc")
    assert doc is not None
    assert doc.chunk_ids == ("doc#v2#0", "doc#v1#1")  # by ordinal
    assert (doc.version, doc.chunk_count, doc.content_hash) == (2, 2, "doc-doc-2")
    heads = cat.document_heads("ns", ["doc", "missing"])
    assert set(heads) == {"doc"} and heads["doc"].version == 2


def test_document_row_round_trips(cat: Catalog) -> None:
    updated = datetime(2023, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    content = "naïve café 😀\n中文\n"
    meta = {"team": "search", "ключ": "значение", 'quote"d': "a\"b", "empty": ""}
    before = datetime.now(UTC)
    ids = cat.stage_chunks("ns", [new_chunk("d", 0)])
    cat.commit_documents("ns", [doc_write("d", ids, path="src/d.py", language="go",
                                          content=content, metadata=meta, revision="sha1",
                                          source_updated_at=updated)], [])
    doc = cat.get_document("ns", "d")
    assert doc is not None
    assert (doc.namespace, doc.doc_id, doc.path, doc.revision, doc.language) == (
        "ns", "d", "src/d.py", "sha1", "go")
    assert doc.metadata == meta
    assert doc.source_updated_at == updated
    assert doc.content == content
    assert doc.size_bytes == len(content.encode("utf-8"))
    assert doc.indexed_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= doc.indexed_at <= datetime.now(UTC)
    assert cat.get_document("ns", "other") is None
    assert cat.get_document("other-ns", "d") is None


def test_refresh_updates_an_unchanged_document(cat: Catalog) -> None:
    ids = add_doc(cat, "d", 2, metadata={"a": "1"})
    when = datetime(2022, 2, 2, tzinfo=UTC)
    version = cat.commit_documents(
        "ns", [], [DocumentRefresh("d", revision="rev2", source_updated_at=when,
                                   metadata={"b": "2"})])
    assert version == 2
    doc = cat.get_document("ns", "d")
    assert doc is not None
    assert (doc.revision, doc.source_updated_at, doc.metadata) == ("rev2", when, {"b": "2"})
    assert (doc.version, doc.content_hash, doc.chunk_count) == (1, "doc-d-1", 2)
    assert id_set(cat.active_vector_ids("ns")) == set(ids)
    assert id_set(cat.filter_vector_ids("ns", SearchFilter(metadata=(("b", "2"),)))) == set(ids)
    assert id_set(cat.filter_vector_ids("ns", SearchFilter(metadata=(("a", "1"),)))) == set()


def test_delete_documents_returns_their_vector_ids(cat: Catalog) -> None:
    a_ids = add_doc(cat, "a", 2)
    b_ids = add_doc(cat, "b", 3)
    pending = cat.stage_chunks("ns", [new_chunk("a", 5, tag="v2")])
    assert version_of(cat) == 2

    deleted, vector_ids, version = cat.delete_documents("ns", ["a", "nope"])
    assert deleted == ["a"]
    assert set(vector_ids) == {*a_ids, *pending}
    assert version == 3
    assert cat.get_document("ns", "a") is None
    assert id_set(cat.active_vector_ids("ns")) == set(b_ids)

    # Nothing deleted: the version does not move.
    assert cat.delete_documents("ns", ["nope"]) == ([], [], 3)


def test_drop_pending_and_discard(cat: Catalog) -> None:
    cat.create_namespace(ns_record("other"))
    active = add_doc(cat, "a", 2)
    p1 = cat.stage_chunks("ns", [new_chunk("b", 0), new_chunk("b", 1)])
    p2 = cat.stage_chunks("other", [new_chunk("c", 0)])
    p3 = cat.stage_chunks("ns", [new_chunk("d", 0)])

    cat.discard([p3[0], active[0]])  # only pending rows are discarded
    assert id_set(cat.active_vector_ids("ns")) == set(active)

    dropped = cat.drop_pending()
    assert {k: sorted(v) for k, v in dropped.items()} == {"ns": sorted(p1), "other": p2}
    assert cat.drop_pending() == {}
    assert id_set(cat.active_vector_ids("ns")) == set(active)
    # The dropped rows are gone: committing them now activates nothing.
    cat.commit_documents("ns", [doc_write("b", p1)], [])
    assert id_set(cat.active_vector_ids("ns")) == set(active)


def test_vectors_are_stored_exactly(cat: Catalog) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, DIM)).astype(np.float32)
    vectors[0] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -0.0, 1e-45]
    chunks = [new_chunk("v", i, vector=vectors[i]) for i in range(20)]
    ids = cat.stage_chunks("ns", chunks)
    cat.commit_documents("ns", [doc_write("v", ids)], [])

    got_ids, got = cat.vectors("ns", reversed(ids), DIM)
    assert got.dtype == np.float32 and got.shape == (20, DIM)
    by_id = dict(zip(ids, vectors, strict=True))
    for i, row in zip(got_ids.tolist(), got, strict=True):
        assert row.tobytes() == by_id[i].tobytes()

    # float64 input is stored as float32
    ids64 = cat.stage_chunks("ns", [new_chunk("w", 0, vector=np.arange(DIM, dtype=np.float64))])
    cat.commit_documents("ns", [doc_write("w", ids64)], [])
    _, got64 = cat.vectors("ns", ids64, DIM)
    np.testing.assert_array_equal(got64, [np.arange(DIM, dtype=np.float32)])
    # only the ids asked for, only active ones
    sub_ids, sub = cat.vectors("ns", [ids[3], ids[5], 12345], DIM)
    assert set(sub_ids.tolist()) == {ids[3], ids[5]} and sub.shape == (2, DIM)


# -- filters -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Catalog, dict]]:
    """A catalog shared by the (read-only) filter tests, and doc_id -> its vector ids, across
    paths, languages and metadata."""
    cat = Catalog(tmp_path_factory.mktemp("corpus") / "catalog.sqlite3")
    cat.open()
    cat.create_namespace(ns_record("ns"))
    cat.create_namespace(ns_record("other"))
    docs = {
        "a": dict(path="src/a.py", language="python",
                  metadata={"team": "search", "tier": "1"}),
        "b": dict(path="src/sub/b.go", language="go", metadata={"team": "infra"}),
        "c": dict(path="docs/readme.md", language="markdown",
                  metadata={"team": "search", 'we"ird': "yes", "a.b": "dot",
                            "back\\slash": "bs"}),
        "d": dict(path="src_old/d.py", language="python", metadata={"tier": "1"}),
        "e": dict(path="srcXold/e.py", language="python", metadata={}),
    }
    chunks = [new_chunk(doc_id, i) for doc_id in docs for i in range(2)]
    staged = cat.stage_chunks("ns", chunks)
    by_doc: dict[str, list[int]] = {}
    for c, vid in zip(chunks, staged, strict=True):
        by_doc.setdefault(c.doc_id, []).append(vid)
    cat.commit_documents("ns", [doc_write(d, by_doc[d], **kw) for d, kw in docs.items()], [])
    add_doc(cat, "a", 2, ns="other", path="src/a.py", metadata={"team": "search"})
    cat.stage_chunks("ns", [new_chunk("a", 9, tag="pending")])  # never visible
    yield cat, {d: set(v) for d, v in by_doc.items()}
    cat.close()


def ids_of(corpus: dict[str, set[int]], *doc_ids: str) -> set[int]:
    return set().union(*(corpus[d] for d in doc_ids))


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (SearchFilter(), "abcde"),
        (SearchFilter(doc_ids=("a", "c", "zzz")), "ac"),
        (SearchFilter(path_prefix="src/"), "ab"),
        (SearchFilter(path_prefix="src"), "abde"),
        (SearchFilter(path_prefix="src_"), "d"),  # '_' is no wildcard
        (SearchFilter(path_prefix="src%"), ""),  # nor is '%'
        (SearchFilter(path_prefix="docs/readme.md"), "c"),
        (SearchFilter(path_prefix="nowhere/"), ""),
        (SearchFilter(languages=("python",)), "ade"),
        (SearchFilter(languages=("go", "markdown")), "bc"),
        (SearchFilter(languages=("cobol",)), ""),
        (SearchFilter(metadata=(("team", "search"),)), "ac"),
        (SearchFilter(metadata=(("team", "search"), ("tier", "1"))), "a"),
        (SearchFilter(metadata=(("team", "nobody"),)), ""),
        (SearchFilter(metadata=(("missing", ""),)), ""),
        (SearchFilter(metadata=(("a.b", "dot"),)), "c"),
        (SearchFilter(metadata=(('we"ird', "yes"),)), "c"),
        (SearchFilter(metadata=(("back\\slash", "bs"),)), "c"),
        (SearchFilter(doc_ids=("a", "b", "d"), languages=("python",)), "ad"),
        (SearchFilter(path_prefix="src", metadata=(("tier", "1"),)), "ad"),
        (SearchFilter(path_prefix="src/", languages=("python",),
                      metadata=(("team", "search"),), doc_ids=("a", "b")), "a"),
        (SearchFilter(path_prefix="docs/", languages=("python",)), ""),
    ],
)
def test_filter_vector_ids(corpus: tuple[Catalog, dict[str, set[int]]], flt: SearchFilter,
                           expected: str) -> None:
    cat, by_doc = corpus
    got = cat.filter_vector_ids("ns", flt)
    assert id_set(got) == ids_of(by_doc, *expected)
    assert len(got) == len(set(got.tolist()))


def test_filter_leaves_out_other_namespaces_and_pending_rows(
    corpus: tuple[Catalog, dict[str, set[int]]],
) -> None:
    cat, by_doc = corpus
    everything = id_set(cat.filter_vector_ids("ns", SearchFilter()))
    assert everything == ids_of(by_doc, *"abcde") == id_set(cat.active_vector_ids("ns"))
    other = id_set(cat.filter_vector_ids("other", SearchFilter(doc_ids=("a",))))
    assert len(other) == 2 and not other & everything


# -- listing -----------------------------------------------------------------------------------
def test_list_documents_pages_with_prefix_and_total(cat: Catalog) -> None:
    for i in range(7):
        add_doc(cat, f"d{i}", 1, path=f"{'lib' if i % 2 else 'app'}/f{i}.py",
                content="x" * (i + 1))
    docs, total = cat.list_documents("ns", "", 3, "")
    assert [d.doc_id for d in docs] == ["d0", "d1", "d2"] and total == 7
    assert all(d.content is None for d in docs)
    assert docs[2].size_bytes == 3 and docs[2].path == "app/f2.py"
    docs, total = cat.list_documents("ns", "d2", 3, "")
    assert [d.doc_id for d in docs] == ["d3", "d4", "d5"] and total == 7
    docs, total = cat.list_documents("ns", "d5", 3, "")
    assert [d.doc_id for d in docs] == ["d6"] and total == 7
    assert cat.list_documents("ns", "d6", 3, "") == ([], 7)

    docs, total = cat.list_documents("ns", "", 2, "lib/")
    assert [d.doc_id for d in docs] == ["d1", "d3"] and total == 3
    docs, total = cat.list_documents("ns", "d3", 2, "lib/")
    assert [d.doc_id for d in docs] == ["d5"] and total == 3
    assert cat.list_documents("ns", "", 5, "li_/") == ([], 0)
    assert cat.list_documents("other", "", 5, "") == ([], 0)


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    first = Catalog(path)
    first.open()
    first.create_namespace(ns_record())
    ids = add_doc(first, "a", 3, metadata={"k": "v"})
    first.close()
    with pytest.raises(NotReady, match="closed"):  # unusable once closed, retryable
        first.get_namespace("ns")

    second = Catalog(path)
    second.open()
    try:
        assert version_of(second) == 1
        assert id_set(second.active_vector_ids("ns")) == set(ids)
        doc = second.get_document("ns", "a")
        assert doc is not None and doc.metadata == {"k": "v"}
    finally:
        second.close()


# -- concurrency -------------------------------------------------------------------------------
def test_readers_see_whole_versions_while_a_writer_commits(cat: Catalog) -> None:
    """Each version v of "doc" has v % 3 + 1 chunks tagged with v; a reader must never see a
    document row of one version with chunks of another, nor counts that disagree."""
    ids = add_doc(cat, "doc", 2)
    rounds = 30
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        nonlocal ids
        try:
            for v in range(2, rounds + 2):
                tag = f"v{v}"
                new = cat.stage_chunks("ns", [new_chunk("doc", i, tag=tag)
                                              for i in range(v % 3 + 1)])
                cat.commit_documents("ns", [doc_write("doc", new, version=v, drop=ids)], [])
                ids = new
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def read() -> None:
        try:
            seen = 0
            while not stop.is_set() or seen == 0:
                doc = cat.get_document("ns", "doc")
                assert doc is not None
                assert len(doc.chunk_ids) == doc.chunk_count == doc.version % 3 + 1, doc
                assert all(c.startswith(f"doc#v{doc.version}#") for c in doc.chunk_ids), doc
                ns = cat.get_namespace("ns")
                assert ns is not None and ns.document_count == 1
                assert ns.chunk_count in (1, 2, 3)
                seen += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, daemon=True)] + [
        threading.Thread(target=read, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []
    doc = cat.get_document("ns", "doc")
    assert doc is not None and doc.version == rounds + 1
    assert len(cat.active_vector_ids("ns")) == doc.chunk_count


def test_catalog_records_its_schema_version_and_refuses_a_newer_one(tmp_path: Path) -> None:
    import sqlite3

    from retriever.catalog import SCHEMA_VERSION

    path = tmp_path / "c.sqlite3"
    cat = Catalog(path)
    cat.open()
    cat.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(FailedPrecondition, match="newer"):
        Catalog(path).open()


def test_a_sources_table_of_an_older_release_gains_its_new_columns(tmp_path: Path) -> None:
    """Release 4's sources table had no outside-write count or divergence record: opening
    its catalog adds them, and the binding reads (and is updated) as before."""
    from retriever.catalog import SCHEMA_VERSION, SourceRecord

    path = tmp_path / "c.sqlite3"
    cat = Catalog(path)
    cat.open()
    cat.create_namespace(ns_record("ns"))
    cat.put_source(SourceRecord("ns", "/srv/repo", "main", (), (), 1000, last_commit="a" * 40))
    cat.close()
    db = sqlite3.connect(path)
    for column in ("outside_writes", "diverged_commit", "diverged_since"):
        db.execute(f"ALTER TABLE sources DROP COLUMN {column}")
    db.execute("ALTER TABLE evaluations DROP COLUMN slo")
    db.execute("INSERT INTO evaluations (evaluation_id, namespace, golden_set, version,"
               " started_at, seconds, mode, rerank, query_count, trigger, metrics) VALUES"
               " ('e1', 'ns', 'smoke', 1, 1.0, 0.1, 'dense', 1, 3, 'request', '[]')")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()
    cat = Catalog(path)
    cat.open()
    src = cat.get_source("ns")
    assert src is not None and src.last_commit == "a" * 40
    assert (src.outside_writes, src.diverged_commit, src.diverged_since) == (0, "", None)
    # A run an older release kept may have been ad hoc: it does not feed the gauges.
    assert [e.slo for e in cat.list_evaluations("ns", 10)] == [False]
    assert cat.slo_evaluations() == []
    assert cat.note_outside_write("ns") and not cat.note_outside_write("unbound")
    src = cat.get_source("ns")
    assert src is not None and src.outside_writes == 1
    assert (src.pending_commit, src.pending_full) == ("a" * 40, True)
    # A sync that began before that write leaves a full compare pending; one after, not.
    cat.source_synced("ns", "b" * 40, outside_writes=0)
    src = cat.get_source("ns")
    assert src is not None and (src.pending_commit, src.pending_full) == ("b" * 40, True)
    cat.source_synced("ns", "b" * 40, outside_writes=1)
    src = cat.get_source("ns")
    assert src is not None and (src.pending_commit, src.pending_full) == ("", False)
    cat.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


@pytest.mark.parametrize("stored", [253402300800.0, -1e12, 1e300, float("inf"), "soon"])
def test_unreadable_stored_times_read_as_unknown(cat: Catalog, stored: object,
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A time written before input was range-checked (9999-12-31T23:59:59.999999Z rounds to
    year 10000 as a float) or edited by hand must not make its rows unreadable."""
    import retriever.catalog

    monkeypatch.setattr(retriever.catalog, "_bad_time_logged", False)
    add_doc(cat, "d", 2, source_updated_at=CREATED)
    db = sqlite3.connect(cat._path)  # noqa: SLF001 - writing what the catalog never would
    db.execute("UPDATE documents SET source_updated_at = ?, indexed_at = ?", (stored, stored))
    db.execute("UPDATE namespaces SET created_at = ?, last_indexed_at = ?", (stored, stored))
    db.commit()
    db.close()
    doc = cat.get_document("ns", "d")
    assert doc is not None and doc.source_updated_at is None and doc.indexed_at is None
    listed, total = cat.list_documents("ns", "", 10, "")
    assert total == 1 and listed[0].source_updated_at is None
    chunk = cat.get_chunk("ns", doc.chunk_ids[0])
    assert chunk is not None and chunk.source_updated_at is None and chunk.indexed_at is None
    found, _ = cat.chunks_by_vector_ids("ns", cat.active_vector_ids("ns").tolist())
    assert len(found) == 2
    ns = cat.get_namespace("ns")
    assert ns is not None and ns.created_at is None and ns.last_indexed_at is None
    assert [n.name for n in cat.list_namespaces("", 10)] == ["ns"]
    # Logged once, not once per read.
    assert sum("out of range" in r.getMessage() for r in caplog.records) == 1


def test_connections_of_finished_threads_are_closed(cat: Catalog, tmp_path: Path) -> None:
    """Each thread reads through a connection of its own; one whose thread has ended is
    closed when the next connection opens, so short-lived threads leak no descriptors
    (a soak once grew 143 -> 237 open files)."""
    import os

    def catalog_fds() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir()
                   if str(tmp_path / "catalog") in os.path.realpath(fd))

    cat.get_namespace("ns")  # this thread's connection
    before = catalog_fds()
    for _ in range(20):
        t = threading.Thread(target=lambda: cat.get_namespace("ns"))
        t.start()
        t.join()
    # The last thread's connection stays until another opens; none of the 19 before it.
    assert catalog_fds() <= before + 3


def test_a_memory_mapped_catalog_reads_what_other_connections_commit(tmp_path: Path) -> None:
    """catalog_mmap_bytes: reads go through the map; a reader still sees each commit of
    another thread's connection, before and after it is checkpointed into the mapped file,
    never a stale page."""
    mapped = 1 << 16
    c = Catalog(tmp_path / "catalog.sqlite3", mmap_bytes=mapped)
    c.open()
    try:
        assert c.create_namespace(ns_record("ns"))
        assert c._conn().execute("PRAGMA mmap_size").fetchone()[0] == mapped
        seen: list[int] = []
        for round_ in range(30):
            writer = threading.Thread(
                target=add_doc, args=(c, f"d{round_}.py", 20), daemon=True)
            writer.start()
            writer.join(10)
            seen.append(len(c.active_vector_ids("ns")))
            if round_ % 3 == 2:  # into the database file, pages the map already holds
                c._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        assert seen == [20 * (r + 1) for r in range(30)]
        assert (tmp_path / "catalog.sqlite3").stat().st_size > mapped  # grew past the map
        found, _ = c.chunks_by_vector_ids("ns", c.active_vector_ids("ns").tolist())
        assert len(found) == 600
        assert sorted({r.doc_id for r in found.values()}) == sorted(
            f"d{r}.py" for r in range(30))
    finally:
        c.close()


def test_candidate_heads_are_read_from_the_narrow_covering_indexes(cat: Catalog) -> None:
    """A search reads (doc_id, path) of ~200 candidates: from two small indexes, never the
    wide chunk and document rows (a page each)."""
    ids = add_doc(cat, "a.py", 3, path="src/a.py")
    staged = cat.stage_chunks("ns", [new_chunk("b.py", 0)])
    db = cat._conn()
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        assert cat.chunk_heads("ns", [*ids, *staged, 999]) == {
            v: ("a.py", "src/a.py") for v in ids}  # the staged chunk is not visible yet
    finally:
        db.set_trace_callback(None)
    (select,) = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {select}")]
    # Candidates first, by id (the id list, one bound JSON array, read by json_each), then
    # each one's document: never a scan of the namespace.
    assert [p for p in plan if p.startswith("SEARCH")] == [
        "SEARCH c USING COVERING INDEX chunks_heads (vector_id=? AND namespace=? AND state=?)",
        "SEARCH d USING COVERING INDEX documents_paths (namespace=? AND doc_id=?)"]
    assert [p for p in plan if p.startswith("SCAN")] == ["SCAN json_each VIRTUAL TABLE INDEX 1:"]
    # One statement, one row: no BEGIN/COMMIT around it, no row per candidate.
    assert len(statements) == 1


def test_a_search_fetches_its_hits_by_id_in_one_statement_and_row(cat: Catalog) -> None:
    """The final hits are read by vector id (never by walking the namespace's documents),
    with the index version, in one statement that returns one row, timestamps exact."""
    # A source time whose microseconds a 15-digit rendering of its epoch would lose.
    updated = datetime(2026, 11, 27, 8, 1, 2, 345679, tzinfo=UTC)
    ids = add_doc(cat, "a.py", 3, path="src/a.py", source_updated_at=updated)
    add_doc(cat, "b.py", 2, path="src/b.py")
    staged = cat.stage_chunks("ns", [new_chunk("c.py", 0)])
    db = cat._conn()
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        got, version = cat.chunks_by_vector_ids("ns", [ids[2], ids[0], *staged, 999])
    finally:
        db.set_trace_callback(None)
    assert sorted(got) == sorted([ids[0], ids[2]])  # the staged chunk is not visible yet
    assert version > 0 and version == cat._version(db, "ns")
    for vid, chunk in got.items():
        assert chunk == cat.get_chunk("ns", chunk.chunk_id)  # same record as a plain read
        assert chunk.vector_id == vid and chunk.path == "src/a.py"
        assert chunk.source_updated_at == updated
    (select,) = statements
    plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {select}")]
    assert "SEARCH c USING INTEGER PRIMARY KEY (rowid=?)" in plan
    assert not [p for p in plan if p.startswith("SCAN") and "json_each" not in p
                and p != "SCAN CONSTANT ROW"], plan
    assert not [p for p in plan if p.startswith("SEARCH d") and "doc_id=?" not in p], plan


def test_page_caches_of_all_connections_stay_within_catalog_cache_bytes(tmp_path: Path) -> None:
    """Every thread has its own connection and page cache: without a bound, 16 threads that
    read the whole catalog hold ~2 MB each; with cache_bytes (SQLite's soft heap limit,
    set at open) they hold about that much together, and read the same rows."""
    used = sqlite_memory_used()
    if used is None:
        pytest.skip("SQLite is not a shared library of this process")

    def held_by_readers(name: str, cache_bytes: int) -> int:
        c = Catalog(tmp_path / name / "catalog.sqlite3", cache_bytes=cache_bytes)
        c.open()
        try:
            if cache_bytes:
                assert c._conn().execute("PRAGMA soft_heap_limit").fetchone()[0] == cache_bytes
            else:
                c._conn().execute("PRAGMA soft_heap_limit=0").fetchall()  # unbounded
            assert c.create_namespace(ns_record("ns"))
            ids: list[int] = []
            # ~4 MB of chunks, short enough to sit in their rows' pages (SQLite reads
            # overflow pages of long values around its page cache)
            for d in range(60):
                doc = f"d{d}.py"
                got = c.stage_chunks("ns", [new_chunk(doc, i, text=f"{doc} {i} " + "x" * 900)
                                            for i in range(70)])
                c.commit_documents("ns", [doc_write(doc, got)], [])
                ids += got
            base = used()
            rows: list[int] = []

            def read(seed: int) -> None:
                found, _ = c.chunks_by_vector_ids(
                    "ns", np.random.default_rng(seed).permutation(ids).tolist())
                rows.append(len(found))

            threads = [threading.Thread(target=read, args=(s,)) for s in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert rows == [len(ids)] * 16
            return used() - base
        finally:
            c.close()

    with sqlite3.connect(":memory:") as probe:
        before = probe.execute("PRAGMA soft_heap_limit").fetchone()[0]
    try:
        unbounded = held_by_readers("unbounded", 0)
        bounded = held_by_readers("bounded", 4 << 20)
    finally:
        with sqlite3.connect(":memory:") as probe:
            probe.execute(f"PRAGMA soft_heap_limit={before}").fetchall()
    assert unbounded > 16 << 20, unbounded
    assert bounded < 10 << 20, bounded


def test_the_latest_run_is_the_last_recorded_whatever_its_clock_said(cat: Catalog) -> None:
    """A run made while the clock was a day ahead, then the clock corrected and a failing
    run: the failing one is the latest (for GetIndexStatus and for the gauges after a
    restart); by start time the older, passing one was, until real time caught up."""
    from retriever.domain import EvalMetric, EvaluationRecord, SearchMode

    def run(eid: str, at: datetime, recall: float) -> EvaluationRecord:
        return EvaluationRecord(
            evaluation_id=eid, namespace="ns", golden_set="g", version=1, started_at=at,
            seconds=0.1, mode=SearchMode.DEFAULT, rerank=False, query_count=1,
            trigger="request", metrics=(EvalMetric("recall", 10, recall),))

    now = datetime.now(UTC)
    cat.add_evaluation(run("ahead", now + timedelta(days=1), 1.0), keep=10)
    cat.add_evaluation(run("fixed-clock", now, 0.0), keep=10)
    assert [e.evaluation_id for e in cat.list_evaluations("ns", 10)] == ["fixed-clock", "ahead"]
    assert [e.evaluation_id for e in cat.slo_evaluations()] == ["fixed-clock"]
    cat.add_evaluation(run("third", now - timedelta(days=2), 0.5), keep=2)
    assert [e.evaluation_id for e in cat.list_evaluations("ns", 10)] == ["third", "fixed-clock"]
