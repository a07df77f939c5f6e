"""Reliability regressions through the real server: source times checked on the way in and
unreadable stored ones harmless on the way out, page tokens bound to their listing, one
validation for every id, and chunks capped in characters so answers fit one message."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import grpc
import pytest
from conftest import make_settings
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from retriever.client import RetrieverClient
from retriever.domain import ChunkRecord, Hit, Lineage, SearchResult, StageTimings
from retriever.server import convert
from retriever.server.app import ServerThread
from retriever.service import _response_bytes
from retriever.v1 import retriever_pb2 as pb

CAP = 4096  # the default chunk_max_chars


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[ServerThread]:  # noqa: ANN001
    """One server for the module; each test works in namespaces of its own."""
    settings = make_settings(tmp_path_factory.mktemp("hardening") / "data")
    st = ServerThread(settings, embedder).start()
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def api(module_server: ServerThread) -> Iterator[RetrieverClient]:
    with RetrieverClient(module_server.address) as c:
        yield c


def expect_invalid(call: Callable[[], object], field: str, *words: str) -> None:
    """INVALID_ARGUMENT, whose BadRequest detail names exactly ``field``."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for w in words:
        assert w in e.value.details(), (w, e.value.details())
    status = rpc_status.from_call(e.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad), status.details
    assert [v.field for v in bad.field_violations] == [field]


def ts(value: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


# -- source times ------------------------------------------------------------------------------
@pytest.mark.integration
def test_source_time_out_of_range_is_refused_on_the_way_in(api: RetrieverClient) -> None:
    ns = "times"
    api.upsert(ns, [pb.Document(doc_id="seed.md", content="# Seed\nbread and butter\n")])
    end_of_time = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    for bad in (ts(end_of_time), ts(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))):
        expect_invalid(
            lambda bad=bad: api.upsert(ns, [
                pb.Document(doc_id="ok.md", content="fine"),
                pb.Document(doc_id="far.md", content="far", source_updated_at=bad)]),
            "documents[1].source_updated_at", "1970-01-01T00:00:00Z", "2200-01-01T00:00:00Z")
    with pytest.raises(grpc.RpcError) as e:  # nothing of the refused message was written
        api.get_document(ns, "ok.md")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    latest = datetime(2199, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    api.upsert(ns, [pb.Document(doc_id="late.md", content="# Late\nsourdough starter\n",
                                source_updated_at=ts(latest))])
    got = api.get_document(ns, "late.md").document.source_updated_at
    assert got.ToDatetime(tzinfo=UTC) == latest  # round-trips exactly
    hit = api.search(ns, "sourdough starter", top_k=1).hits[0]
    assert hit.chunk.doc_id == "late.md" and hit.HasField("staleness")


@pytest.mark.integration
def test_a_stored_time_out_of_range_does_not_poison_reads(module_server: ServerThread,
                                                          api: RetrieverClient) -> None:
    """A row written before the check (or by hand) with a time that cannot be read back:
    every read touching it still answers, with that time unset (unknown)."""
    ns = "poison"
    when = ts(datetime(2024, 1, 2, tzinfo=UTC))
    api.upsert(ns, [
        pb.Document(doc_id="bad.md", content="# Kneading\nKnead the dough for ten minutes.\n",
                    source_updated_at=when),
        pb.Document(doc_id="good.md", content="# Proofing\nLet the dough rise overnight.\n",
                    source_updated_at=when)])
    db = sqlite3.connect(module_server.settings.data_dir / "catalog.sqlite3")
    with db:  # 9999-12-31T23:59:59.999999Z as a float epoch: year 10000 when read back
        db.execute("UPDATE documents SET source_updated_at = 253402300800.0, indexed_at = 1e300"
                   " WHERE namespace = ? AND doc_id = 'bad.md'", (ns,))
        db.execute("UPDATE namespaces SET created_at = -1e15 WHERE name = ?", (ns,))
    db.close()

    doc = api.get_document(ns, "bad.md")
    assert doc.document.content.startswith("# Kneading")
    assert not doc.document.HasField("source_updated_at") and not doc.HasField("indexed_at")
    chunk = api.get_chunk(ns, doc.chunk_ids[0])
    assert chunk.chunk.doc_id == "bad.md" and not chunk.chunk.HasField("source_updated_at")
    assert not chunk.HasField("staleness")
    listed = {d.doc_id: d for d in api.list_documents(ns).documents}
    assert set(listed) == {"bad.md", "good.md"}
    assert not listed["bad.md"].HasField("source_updated_at")
    assert listed["good.md"].source_updated_at == when

    hits = {h.chunk.doc_id: h for h in api.search(ns, "dough", top_k=10).hits}
    assert set(hits) == {"bad.md", "good.md"}
    assert not hits["bad.md"].HasField("staleness") and hits["good.md"].HasField("staleness")
    batch = api.batch_search([pb.SearchRequest(namespace=ns, query="knead", top_k=5)] * 2)
    assert all(len(r.hits) == 2 for r in batch.responses)
    assert not api.get_namespace(ns).HasField("create_time")
    assert ns in [n.name for n in api.list_namespaces().namespaces]
    assert api.status(ns).document_count == 2


# -- page tokens -------------------------------------------------------------------------------
@pytest.mark.integration
def test_page_tokens_only_page_the_listing_they_came_from(api: RetrieverClient) -> None:
    for ns in ("pages-a", "pages-b"):
        api.upsert(ns, [pb.Document(doc_id=f"{d}/{i}.txt", content=f"{d} {i}")
                        for d in ("doc", "src") for i in range(3)])
    token = api.list_documents("pages-a", page_size=1).next_page_token
    assert token
    expect_invalid(lambda: api.list_documents("pages-b", page_size=1, page_token=token),
                   "page_token", "another listing")
    expect_invalid(lambda: api.list_documents("pages-a", page_size=1, page_token=token,
                                              path_prefix="src/"), "page_token")
    ns_token = api.list_namespaces(page_size=1).next_page_token
    expect_invalid(lambda: api.list_documents("pages-a", page_token=ns_token), "page_token")
    expect_invalid(lambda: api.list_namespaces(page_token=token), "page_token")

    def walk(ns: str, prefix: str = "") -> list[str]:
        ids, tok = [], ""
        while True:
            page = api.list_documents(ns, page_size=2, page_token=tok, path_prefix=prefix)
            ids += [d.doc_id for d in page.documents]
            tok = page.next_page_token
            if not tok:
                return ids

    assert walk("pages-a") == [f"{d}/{i}.txt" for d in ("doc", "src") for i in range(3)]
    assert walk("pages-b", "src/") == [f"src/{i}.txt" for i in range(3)]


# -- ids ---------------------------------------------------------------------------------------
ID_CASES: list[tuple[str, Callable[[RetrieverClient], object], str]] = [
    ("upsert", lambda c: c.upsert("ids", [pb.Document(doc_id="a\x00b", content="x")]),
     "documents[0].doc_id"),
    ("get-document", lambda c: c.get_document("ids", "a\x00b"), "doc_id"),
    ("get-document-long", lambda c: c.get_document("ids", "x" * 1025), "doc_id"),
    ("get-document-no-namespace", lambda c: c.get_document("nowhere", "a\x00b"), "doc_id"),
    ("get-chunk-no-namespace", lambda c: c.get_chunk("nowhere", ""), "chunk_id"),
    ("delete", lambda c: c.delete("ids", ["seed.txt", "a\x00"]), "doc_ids[1]"),
    ("get-chunk", lambda c: c.get_chunk("ids", "\x00" * 32), "chunk_id"),
    ("list-prefix", lambda c: c.list_documents("ids", path_prefix="src\x00"), "path_prefix"),
    ("search-doc-ids", lambda c: c.search("ids", "q", filter=pb.SearchFilter(
        doc_ids=["seed.txt", "a\x00b"])), "filter.doc_ids[1]"),
    ("search-path-prefix", lambda c: c.search("ids", "q", filter=pb.SearchFilter(
        path_prefix="\x00")), "filter.path_prefix"),
    ("batch-search", lambda c: c.batch_search([
        pb.SearchRequest(namespace="ids", query="q", top_k=1),
        pb.SearchRequest(namespace="ids", query="q", top_k=1,
                         filter=pb.SearchFilter(doc_ids=["a\x00b"]))]),
     "requests[1].filter.doc_ids[0]"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("call", "field"), [c[1:] for c in ID_CASES],
                         ids=[c[0] for c in ID_CASES])
def test_every_id_input_is_validated_alike(api: RetrieverClient,
                                           call: Callable[[RetrieverClient], object],
                                           field: str) -> None:
    api.upsert("ids", [pb.Document(doc_id="seed.txt", content="seed")])
    expect_invalid(lambda: call(api), field)
    assert api.status("ids").document_count == 1  # nothing deleted or written


# -- chunk size --------------------------------------------------------------------------------
def no_whitespace(n: int, seed: int) -> str:
    """Letters and digits only: the tokenizer folds any long run into one [UNK]."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdef0123456789") for _ in range(n))


@pytest.mark.integration
def test_a_megabyte_without_whitespace_comes_back_in_capped_chunks(api: RetrieverClient) -> None:
    ns = "blob"
    content = no_whitespace(1024 * 1024, 1)  # exactly max_document_bytes
    resp = api.upsert(ns, [pb.Document(doc_id="blob.txt", content=content)])
    assert resp.chunks_total == len(content) // CAP  # was one chunk holding all of it
    doc = api.get_document(ns, "blob.txt")
    assert doc.document.content == content
    data = content.encode()
    hits = api.search(ns, "abc123", top_k=100).hits
    assert len(hits) == 100
    for h in hits:
        assert len(h.chunk.text) <= CAP
        assert data[h.chunk.start_byte : h.chunk.end_byte].decode() == h.chunk.text
    # The largest BatchSearch (max_batch_queries x max_top_k) of such hits fits one message:
    # 64 x 100 x 4096 characters ~ 26 MB (it was 64 x 1 MiB, over the 64 MiB limit).
    batch = api.batch_search([pb.SearchRequest(namespace=ns, query=f"{i:x}", top_k=100)
                              for i in range(64)])
    assert [len(r.hits) for r in batch.responses] == [100] * 64
    assert max(len(h.chunk.text) for r in batch.responses for h in r.hits) <= CAP


@pytest.mark.integration
def test_an_answer_too_big_for_one_message_is_refused_by_name(tmp_path, embedder) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path / "data", grpc_max_message_bytes=1024 * 1024)
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("big", [pb.Document(doc_id="blob.txt", content=no_whitespace(400_000, 2))])
            assert len(c.search("big", "abc", top_k=100).hits) == 98  # ~0.4 MB: fits
            expect_invalid(lambda: c.batch_search(
                [pb.SearchRequest(namespace="big", query="abc", top_k=100)] * 4),
                "requests", "grpc_max_message_bytes", "top_k")
    finally:
        st.stop()


def test_response_size_estimate_is_an_upper_bound() -> None:
    """The guard's estimate never undercounts what the servicer will encode."""
    rng = random.Random(4)
    alphabet = "ab c\u00e9\u4e2d\U0001f600\n"
    now = datetime(2024, 1, 1, tzinfo=UTC)
    results = []
    for _ in range(3):
        hits = []
        for r in range(rng.randint(0, 40)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3000)))
            chunk = ChunkRecord(
                chunk_id="f" * 32, vector_id=2**40, namespace="n" * 63, doc_id="d" * 1024,
                ordinal=2**30, text=text, content_hash="h" * 64, start_line=2**30,
                end_line=2**30, start_byte=2**40, end_byte=2**40, token_count=512,
                language="python", chunker="windows/v1", path="p\u00e9" * 300,
                revision="r" * 256, document_version=2**40, document_hash="h" * 64,
                indexed_at=now, source_updated_at=now,
                metadata={f"k{i}" * 20: "v\U0001f600" * 200 for i in range(rng.randint(0, 64))})
            hits.append(Hit(chunk=chunk, score=0.5, rank=r + 1, staleness_s=1e6))
        lineage = Lineage(request_id="r" * 32, namespace="n" * 63, embedder="e" * 40,
                          embedder_revision="x" * 16, reranker="", backend="faiss",
                          index_generation=2**30, index_version=2**40, device="cuda:0")
        timings = StageTimings(embed=1.0, ann=1.0, fetch=1.0, total=3.0)
        results.append(SearchResult(hits=tuple(hits), lineage=lineage, timings=timings))
    encoded = pb.BatchSearchResponse(
        responses=[convert.search_result_to_pb(r) for r in results]).ByteSize()
    assert encoded <= _response_bytes(results)
