"""Input checks: each bad input raises InvalidArgument naming its field and its limit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from retriever import validation as v
from retriever.config import Settings
from retriever.domain import Document, SearchFilter, SearchQuery
from retriever.errors import InvalidArgument

SETTINGS = Settings(max_document_bytes=100, max_batch_documents=3, max_query_bytes=50,
                    max_top_k=10, max_page_size=20)


def doc(**kw: object) -> Document:
    values: dict[str, object] = {"doc_id": "a.py", "content": "print(1)\n"}
    values.update(kw)
    return Document(**values)  # type: ignore[arg-type]


def query(**kw: object) -> SearchQuery:
    values: dict[str, object] = {"namespace": "ns", "query": "find me", "top_k": 5}
    values.update(kw)
    return SearchQuery(**values)  # type: ignore[arg-type]


def expect_invalid(call: Callable[[], object], field: str, needle: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call()
    err = info.value
    assert err.field == field, f"field {err.field!r}, message {err.message!r}"
    assert needle in err.message, f"{needle!r} not in {err.message!r}"
    assert str(err) == err.message
    return err


# -- documents ---------------------------------------------------------------------------------
BAD_DOCUMENTS: list[tuple[str, list[Document], str, str]] = [
    ("none", [], "documents", "at least one"),
    ("too many", [doc(doc_id=f"d{i}") for i in range(4)], "documents", "3"),
    ("empty doc_id", [doc(doc_id="")], "documents[0].doc_id", "required"),
    ("long doc_id", [doc(doc_id="x" * 1025)], "documents[0].doc_id", "1024"),
    ("long doc_id in bytes", [doc(doc_id="é" * 513)], "documents[0].doc_id", "1024"),
    ("NUL in doc_id", [doc(doc_id="a\x00b")], "documents[0].doc_id", "NUL"),
    ("surrogate doc_id", [doc(doc_id="a\ud800")], "documents[0].doc_id", "UTF-8"),
    ("duplicate doc_id", [doc(doc_id="a"), doc(doc_id="b"), doc(doc_id="a")],
     "documents[2].doc_id", "twice"),
    ("large content", [doc(content="x" * 101)], "documents[0].content", "100"),
    ("large content in bytes", [doc(content="é" * 51)], "documents[0].content", "100"),
    ("NUL in content", [doc(content="a\x00b")], "documents[0].content", "NUL"),
    ("surrogate content", [doc(content="\udfff")], "documents[0].content", "UTF-8"),
    ("long path", [doc(path="p" * 1025)], "documents[0].path", "1024"),
    ("NUL in path", [doc(path="a\x00")], "documents[0].path", "NUL"),
    ("long revision", [doc(revision="r" * 257)], "documents[0].revision", "256"),
    ("too much metadata", [doc(metadata={f"k{i}": "v" for i in range(65)})],
     "documents[0].metadata", "64"),
    ("empty metadata key", [doc(metadata={"": "v"})], "documents[0].metadata", "128"),
    ("long metadata key", [doc(metadata={"k" * 129: "v"})], "documents[0].metadata", "128"),
    ("long metadata value", [doc(metadata={"k": "v" * 1025})], "documents[0].metadata",
     "1024"),
    ("long language", [doc(language="l" * 33)], "documents[0].language", "32"),
    # A filter refuses NUL, so a document holding one could never be selected by it.
    ("NUL in a metadata key", [doc(metadata={"k\x00": "v"})], "documents[0].metadata", "NUL"),
    ("NUL in a metadata value", [doc(metadata={"k": "v\x00"})], "documents[0].metadata",
     "NUL"),
    ("NUL in language", [doc(language="python\x00")], "documents[0].language", "control"),
    ("newline in language", [doc(language="py\nthon")], "documents[0].language", "control"),
    ("error in a later document", [doc(doc_id="ok"), doc(doc_id="bad", revision="r" * 300)],
     "documents[1].revision", "256"),
    # The largest Timestamp: as a float epoch it rounds to year 10000 and cannot be read back.
    ("source time at the end of time",
     [doc(source_updated_at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))],
     "documents[0].source_updated_at", "before 2200-01-01T00:00:00Z"),
    ("source time in year 2200", [doc(source_updated_at=datetime(2200, 1, 1, tzinfo=UTC))],
     "documents[0].source_updated_at", "2200-01-01T00:00:00Z"),
    ("source time before 1970",
     [doc(source_updated_at=datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))],
     "documents[0].source_updated_at", "at or after 1970-01-01T00:00:00Z"),
    ("naive source time", [doc(source_updated_at=datetime(2024, 1, 1))],
     "documents[0].source_updated_at", "time zone"),
]


@pytest.mark.parametrize(("docs", "field", "needle"),
                         [c[1:] for c in BAD_DOCUMENTS], ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_documents(docs: list[Document], field: str, needle: str) -> None:
    expect_invalid(lambda: v.documents(docs, SETTINGS), field, needle)


def test_a_document_must_fit_half_the_message_limit() -> None:
    """A document is read back whole in one message with its chunk ids: one accepted at
    max_document_bytes = grpc_max_message_bytes = 1 MiB could not be read by GetDocument."""
    tight = Settings(max_document_bytes=1 << 20, grpc_max_message_bytes=1 << 20)
    assert v.document_limit(tight) == (1 << 19, "half of grpc_max_message_bytes")
    expect_invalid(lambda: v.documents([doc(content="x" * ((1 << 19) + 1))], tight),
                   "documents[0].content", "half of grpc_max_message_bytes")
    v.documents([doc(content="x" * (1 << 19))], tight)
    assert v.document_limit(Settings()) == (Settings().max_document_bytes, "max_document_bytes")


def test_documents_field_prefix_is_used() -> None:
    expect_invalid(lambda: v.documents([doc(doc_id="")], SETTINGS, field="batch"),
                   "batch[0].doc_id", "required")


def test_documents_at_the_limits_pass() -> None:
    at_limits = doc(
        doc_id="d" * 1024, content="é" * 50, path="p" * 1024, revision="r" * 256,
        metadata={f"{i:03d}" + "k" * 125: "v" * 1024 for i in range(64)}, language="l" * 32,
    )
    assert v.documents([at_limits, doc(doc_id="b", content=""), doc(doc_id="c")],
                       SETTINGS) is None


@pytest.mark.parametrize("when", [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2199, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-7))),
])
def test_source_times_at_the_ends_of_the_range_pass(when: datetime) -> None:
    v.documents([doc(source_updated_at=when)], SETTINGS)
    # ... and survive the catalog's float epoch exactly.
    assert datetime.fromtimestamp(when.timestamp(), tz=UTC) == when


# -- ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ids", "field", "needle"),
    [
        ([], "doc_ids", "at least one"),
        (["a", "b", "c", "d"], "doc_ids", "3"),
        (["a", ""], "doc_ids[1]", "required"),
        (["x" * 1025], "doc_ids[0]", "1024"),
        (["\ud800"], "doc_ids[0]", "UTF-8"),
        (["a", "b\x00"], "doc_ids[1]", "NUL"),
    ],
)
def test_bad_doc_ids(ids: list[str], field: str, needle: str) -> None:
    expect_invalid(lambda: v.doc_ids(ids, SETTINGS), field, needle)


def test_doc_id_and_chunk_id() -> None:
    expect_invalid(lambda: v.doc_id(""), "doc_id", "required")
    expect_invalid(lambda: v.doc_id("é" * 513), "doc_id", "1024")
    expect_invalid(lambda: v.chunk_id(""), "chunk_id", "required")
    expect_invalid(lambda: v.chunk_id("c" * 129), "chunk_id", "128")
    expect_invalid(lambda: v.chunk_id("c" * 129, "ids[2]"), "ids[2]", "128")
    # The same checks wherever an id comes in: a NUL is invalid, not merely not found.
    expect_invalid(lambda: v.doc_id("a\x00b"), "doc_id", "NUL")
    expect_invalid(lambda: v.chunk_id("\x00" * 32), "chunk_id", "NUL")
    expect_invalid(lambda: v.path("src/\x00", "path_prefix"), "path_prefix", "NUL")
    expect_invalid(lambda: v.path("p" * 1025, "path_prefix"), "path_prefix", "1024")
    v.path("")
    v.doc_id("d" * 1024)
    v.chunk_id("c" * 128)
    v.doc_ids(["a", "b", "c"], SETTINGS)


# -- namespaces --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "0", "ns", "my_ns-2", "a" * 63, "0abc"])
def test_good_namespace_names(name: str) -> None:
    assert v.namespace_name(name) == name


@pytest.mark.parametrize("name", ["A", "Ns", "-ns", "_ns", "a" * 64, "has space", "ns/x", "ns.x",
                                  "é", "ns\n"])
def test_bad_namespace_names(name: str) -> None:
    expect_invalid(lambda: v.namespace_name(name), "namespace", "1-63")
    expect_invalid(lambda: v.namespace_name(name, "name"), "name", "1-63")


def test_empty_namespace_name() -> None:
    expect_invalid(lambda: v.namespace_name(""), "namespace", "required")


# -- search ------------------------------------------------------------------------------------
BAD_QUERIES: list[tuple[str, SearchQuery, str, str]] = [
    ("bad namespace", query(namespace="Bad"), "namespace", "1-63"),
    ("no namespace", query(namespace=""), "namespace", "required"),
    ("empty query", query(query=""), "query", "empty"),
    ("blank query", query(query=" \n\t"), "query", "empty"),
    ("long query", query(query="q" * 51), "query", "50"),
    ("long query in bytes", query(query="é" * 26), "query", "50"),
    ("surrogate query", query(query="\ud800"), "query", "UTF-8"),
    ("top_k 0", query(top_k=0), "top_k", "10"),
    ("top_k negative", query(top_k=-3), "top_k", "10"),
    ("top_k too large", query(top_k=11), "top_k", "10"),
    ("too many filter doc_ids",
     query(filter=SearchFilter(doc_ids=tuple(f"d{i}" for i in range(1025)))),
     "filter.doc_ids", "1024"),
    ("NUL in a filter doc_id", query(filter=SearchFilter(doc_ids=("a", "b\x00"))),
     "filter.doc_ids[1]", "NUL"),
    ("empty filter doc_id", query(filter=SearchFilter(doc_ids=("",))),
     "filter.doc_ids[0]", "required"),
    ("NUL in the filter path_prefix", query(filter=SearchFilter(path_prefix="src\x00")),
     "filter.path_prefix", "NUL"),
    ("long filter path_prefix", query(filter=SearchFilter(path_prefix="p" * 1025)),
     "filter.path_prefix", "1024"),
    ("NUL in the query", query(query="\x00"), "query", "NUL"),
    ("NUL inside the query", query(query="where\x00is it"), "query", "NUL"),
    ("NUL in a filter language", query(filter=SearchFilter(languages=("py\x00",))),
     "filter.languages", "NUL"),
    ("NUL in a filter kind", query(filter=SearchFilter(kinds=("\x00",))),
     "filter.kinds", "NUL"),
    ("NUL in a filter metadata key", query(filter=SearchFilter(metadata=(("k\x00", "v"),))),
     "filter.metadata", "NUL"),
]


@pytest.mark.parametrize(("q", "field", "needle"), [c[1:] for c in BAD_QUERIES],
                         ids=[c[0] for c in BAD_QUERIES])
def test_bad_queries(q: SearchQuery, field: str, needle: str) -> None:
    expect_invalid(lambda: v.search(q, SETTINGS), field, needle)
    # In a batch, the field names the query's place.
    expect_invalid(lambda: v.search(q, SETTINGS, "queries[2]."), f"queries[2].{field}", needle)


@pytest.mark.parametrize(
    "q",
    [
        query(),
        query(top_k=1),
        query(top_k=10),
        query(query="q" * 50),
        query(query="é" * 25),
        query(filter=SearchFilter(doc_ids=tuple(f"d{i}" for i in range(1024)),
                                  path_prefix="src/", languages=("python",),
                                  metadata=(("k", "v"),))),
    ],
)
def test_good_queries(q: SearchQuery) -> None:
    assert v.search(q, SETTINGS) is None
    assert v.search(replace(q, namespace="other-ns"), SETTINGS, "queries[0].") is None


# -- paging ------------------------------------------------------------------------------------
def test_page_size() -> None:
    assert v.page_size(0, SETTINGS) == 100
    assert v.page_size(0, SETTINGS, default=7) == 7
    assert v.page_size(1, SETTINGS) == 1
    assert v.page_size(20, SETTINGS) == 20
    expect_invalid(lambda: v.page_size(21, SETTINGS), "page_size", "20")
    expect_invalid(lambda: v.page_size(-1, SETTINGS), "page_size", "positive")
