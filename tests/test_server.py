"""The real server on a loopback port, the real model and FAISS, through a real channel."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
from corpus import CORPUS, QUERIES
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from retriever.client import RetrieverClient
from retriever.server.app import ServerThread
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

NS = "mixed"


def _docs(corpus: dict[str, str] = CORPUS, revision: str = "r1") -> list[pb.Document]:
    out = []
    for doc_id, content in corpus.items():
        d = pb.Document(doc_id=doc_id, content=content, revision=revision,
                        metadata={"kind": doc_id.split("/")[0]})
        d.source_updated_at.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        out.append(d)
    return out


def _index(client: RetrieverClient) -> pb.UpsertDocumentsResponse:
    return client.upsert(NS, _docs(), batch_size=4)


def test_indexes_mixed_corpus_and_ranks_expected_document_first(client: RetrieverClient) -> None:
    resp = _index(client)
    assert resp.documents_received == len(CORPUS)
    assert resp.documents_created == len(CORPUS)
    assert resp.chunks_total >= len(CORPUS)
    assert resp.chunks_embedded == resp.chunks_total
    assert [r.doc_id for r in resp.results] == list(CORPUS)
    for query, expected in QUERIES.items():
        hits = client.search(NS, query, top_k=3).hits
        assert hits, query
        assert hits[0].chunk.doc_id == expected, (query, [h.chunk.doc_id for h in hits])
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(hits[i].score >= hits[i + 1].score for i in range(len(hits) - 1))


def test_every_hit_carries_identity_lineage_and_timings(client: RetrieverClient) -> None:
    _index(client)
    resp = client.search(NS, "knead the dough", top_k=5, request_id="req-123")
    assert resp.lineage.request_id == "req-123"
    lin = resp.lineage
    assert lin.embedder == "all-MiniLM-L6-v2"
    assert re.fullmatch(r"[0-9a-f]{12}(\+(fp16|bf16))?", lin.embedder_revision)
    assert lin.backend == "faiss"
    assert lin.index_generation == 1
    assert lin.index_version >= 1
    assert re.fullmatch(r"cpu|cuda:\d+", lin.device)  # cuda:0 where a GPU is present
    assert lin.namespace == NS
    assert lin.reranker == ""  # no re-ranking took place
    for field in ("embed", "ann", "fetch", "total"):
        assert resp.timings.HasField(field), field
    assert not resp.timings.HasField("rerank")
    assert resp.timings.total.ToNanoseconds() >= resp.timings.embed.ToNanoseconds()
    for h in resp.hits:
        c = h.chunk
        content = CORPUS[c.doc_id]
        assert len(c.chunk_id) == 32
        assert c.revision == "r1" and c.path == c.doc_id and c.namespace == NS
        assert 1 <= c.start_line <= c.end_line
        assert content.encode()[c.start_byte:c.end_byte].decode() == c.text
        lines = content.split("\n")
        assert c.text.rstrip("\n") == "\n".join(lines[c.start_line - 1:c.end_line]).rstrip("\n")
        import hashlib

        assert c.content_hash == hashlib.sha256(c.text.encode()).hexdigest()
        assert c.document_hash == hashlib.sha256(content.encode()).hexdigest()
        assert c.HasField("indexed_at") and c.indexed_at.seconds > 0
        assert c.source_updated_at.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5,
                                                                      tzinfo=UTC)
        assert h.HasField("staleness") and h.staleness.ToNanoseconds() == 0
        assert c.document_version == 1 and c.token_count > 0
        assert c.chunker in ("syntax/v7", "sections/v6", "windows/v1") and c.kind
        assert c.metadata["kind"] == c.doc_id.split("/")[0]
        # GetChunk is the lineage look-up of the same chunk.
        got = client.get_chunk(NS, c.chunk_id).chunk
        assert got == c


def test_staleness_is_unset_when_source_time_is_unknown(client: RetrieverClient) -> None:
    client.upsert(NS, [pb.Document(doc_id="n.txt", content="the moon and the tides")])
    hit = client.search(NS, "moon tides", top_k=1).hits[0]
    assert not hit.HasField("staleness")
    assert not hit.chunk.HasField("source_updated_at")


def test_unchanged_upsert_reembeds_nothing_and_changed_doc_reuses_chunks(
    client: RetrieverClient,
) -> None:
    _index(client)
    again = client.upsert(NS, _docs(revision="r2"), batch_size=4)
    assert again.documents_unchanged == len(CORPUS)
    assert again.chunks_embedded == 0
    # The refresh is visible: new revision, same version.
    doc = client.get_document(NS, "docs/bread.md")
    assert doc.document.revision == "r2" and doc.version == 1

    # A long document: editing its tail re-embeds only the chunks that changed.
    long_text = "\n\n".join(
        f"Section {i}. " + " ".join(f"word{i}_{j}" for j in range(60)) for i in range(12))
    first = client.upsert(NS, [pb.Document(doc_id="long.txt", content=long_text)])
    n = first.chunks_total
    assert n >= 4
    edited = long_text + "\n\nAn appended closing paragraph about something else."
    second = client.upsert(NS, [pb.Document(doc_id="long.txt", content=edited)])
    assert second.documents_updated == 1
    assert second.results[0].version == 2
    assert second.chunks_reused >= n - 2
    assert second.chunks_embedded <= 2
    assert second.chunks_reused + second.chunks_embedded == second.chunks_total
    doc = client.get_document(NS, "long.txt")
    assert doc.document.content == edited and len(doc.chunk_ids) == second.chunks_total
    status = client.status(NS)
    assert status.vector_count == status.chunk_count


def test_delete_removes_document_from_search_and_lookups(client: RetrieverClient) -> None:
    _index(client)
    hits = client.search(NS, "how to grow tomato plants", top_k=10).hits
    chunk_ids = [h.chunk.chunk_id for h in hits if h.chunk.doc_id == "notes/garden.txt"]
    assert chunk_ids
    resp = client.delete(NS, ["notes/garden.txt", "no/such/doc"])
    assert resp.documents_deleted == 1
    assert list(resp.not_found_doc_ids) == ["no/such/doc"]
    assert resp.chunks_deleted == len(chunk_ids)
    hits = client.search(NS, "how to grow tomato plants", top_k=10).hits
    assert all(h.chunk.doc_id != "notes/garden.txt" for h in hits)
    with pytest.raises(grpc.RpcError) as e:
        client.get_document(NS, "notes/garden.txt")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        client.get_chunk(NS, chunk_ids[0])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    status = client.status(NS)
    assert status.document_count == len(CORPUS) - 1
    assert status.vector_count == status.chunk_count


def test_restart_keeps_everything(settings, embedder) -> None:  # noqa: ANN001
    first = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(first.address) as c:
            _index(c)
            before = {q: [(h.chunk.chunk_id, round(h.score, 5)) for h in
                          c.search(NS, q, top_k=5).hits] for q in QUERIES}
            status_before = c.status(NS)
    finally:
        first.stop()
    second = ServerThread(settings, embedder).start()
    try:
        assert second.info["reconciled"][NS] == {
            "pending_rows_dropped": 0, "stray_vectors_removed": 0, "vectors_restored": 0,
            "lexical_rows_restored": 0, "lexical_rows_removed": 0,
            "lexical_entries_removed": 0, "lexical_entries_added": 0}
        with RetrieverClient(second.address) as c:
            after = {q: [(h.chunk.chunk_id, round(h.score, 5)) for h in
                         c.search(NS, q, top_k=5).hits] for q in QUERIES}
            status_after = c.status(NS)
    finally:
        second.stop()
    assert after == before
    for f in ("document_count", "chunk_count", "vector_count", "index_version"):
        assert getattr(status_after, f) == getattr(status_before, f), f


def test_health_serving_and_reflection(server, client: RetrieverClient) -> None:  # noqa: ANN001
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    channel = grpc.insecure_channel(server.address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"retriever.v1.Retriever", "grpc.health.v1.Health"} <= names
    # What grpcurl asks next: the file descriptor holding the service, with its methods.
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="retriever.v1.Retriever")]))
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for r in responses
             for raw in r.file_descriptor_response.file_descriptor_proto]
    proto = next(f for f in files if f.name == "retriever/v1/retriever.proto")
    methods = {m.name for m in proto.service[0].method}
    assert {"Search", "UpsertDocuments", "GetChunk", "GetIndexStatus"} <= methods
    channel.close()


def test_namespaces_lifecycle(client: RetrieverClient) -> None:
    ns = client.create_namespace("alpha")
    assert (ns.name, ns.backend, ns.dimension, ns.metric) == ("alpha", "faiss", 384, "cosine")
    with pytest.raises(grpc.RpcError) as e:
        client.create_namespace("alpha")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for name in ("beta", "gamma"):
        client.create_namespace(name)
    client.upsert("beta", [pb.Document(doc_id="x", content="hello world")])
    page1 = client.list_namespaces(page_size=2)
    assert [n.name for n in page1.namespaces] == ["alpha", "beta"]
    assert page1.next_page_token
    page2 = client.list_namespaces(page_size=2, page_token=page1.next_page_token)
    assert [n.name for n in page2.namespaces] == ["gamma"] and not page2.next_page_token
    assert client.get_namespace("beta").document_count == 1
    deleted = client.delete_namespace("beta")
    assert deleted.documents_deleted == 1 and deleted.chunks_deleted == 1
    with pytest.raises(grpc.RpcError) as e:
        client.search("beta", "hello", top_k=1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        client.get_namespace("beta")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_documents_pages_in_doc_id_order(client: RetrieverClient) -> None:
    _index(client)
    seen, token = [], ""
    while True:
        page = client.list_documents(NS, page_size=4, page_token=token)
        assert page.total_size == len(CORPUS)
        seen += [d.doc_id for d in page.documents]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(CORPUS)
    docs = client.list_documents(NS, path_prefix="docs/").documents
    assert [d.doc_id for d in docs] == ["docs/bread.md", "docs/deploy.md"]
    assert all(d.chunk_count >= 1 and d.size_bytes > 0 and d.version == 1 for d in docs)
    assert docs[0].language == "markdown"


def test_filters_restrict_candidates(client: RetrieverClient) -> None:
    _index(client)
    q = "how long should I knead and proof the dough"
    only_py = client.search(NS, q, top_k=10, filter=pb.SearchFilter(languages=["python"])).hits
    assert only_py and {h.chunk.language for h in only_py} == {"python"}
    notes = client.search(NS, q, top_k=10, filter=pb.SearchFilter(path_prefix="notes/")).hits
    assert notes and all(h.chunk.path.startswith("notes/") for h in notes)
    by_meta = client.search(NS, q, top_k=10, filter=pb.SearchFilter(metadata={"kind": "src"}))
    assert by_meta.hits and all(h.chunk.doc_id.startswith("src/") for h in by_meta.hits)
    by_id = client.search(NS, q, top_k=10, filter=pb.SearchFilter(doc_ids=["notes/garden.txt"]))
    assert {h.chunk.doc_id for h in by_id.hits} == {"notes/garden.txt"}
    none = client.search(NS, q, top_k=10, filter=pb.SearchFilter(doc_ids=["missing"]))
    assert len(none.hits) == 0


def test_batch_search_answers_in_request_order(client: RetrieverClient) -> None:
    _index(client)
    reqs = [pb.SearchRequest(namespace=NS, query=q, top_k=2) for q in QUERIES]
    resp = client.batch_search(reqs)
    assert [r.hits[0].chunk.doc_id for r in resp.responses] == list(QUERIES.values())
    assert len({r.lineage.request_id for r in resp.responses}) == 1


def test_batch_search_names_the_request_whose_namespace_fails(client: RetrieverClient) -> None:
    """A namespace that does not exist is reported as the other fields of a batch's request
    are: by the request's index."""
    _index(client)
    reqs = [pb.SearchRequest(namespace=NS, query="garden", top_k=2),
            pb.SearchRequest(namespace="gone", query="garden", top_k=2)]
    with pytest.raises(grpc.RpcError) as e:
        client.batch_search(reqs)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details().startswith("requests[1].namespace: namespace 'gone' does not exist")
    with pytest.raises(grpc.RpcError) as e:  # a plain Search names no index
        client.search("gone", "garden")
    assert e.value.details().startswith("namespace 'gone' does not exist")


def test_search_stays_responsive_during_bulk_upsert(client: RetrieverClient) -> None:
    _index(client)
    # The upsert runs for seconds (~10 s here beside the searches), a search for tens of ms.
    bulk = [pb.Document(doc_id=f"bulk/{i}.txt",
                        content=" ".join(f"token{i}_{j}" for j in range(200)))
            for i in range(16)]
    done = threading.Event()
    result: list[object] = []

    def upsert() -> None:
        try:
            result.append(client.upsert("bulk", bulk, batch_size=8))
        finally:
            done.set()

    t = threading.Thread(target=upsert)
    t.start()
    answered_during_upsert = 0
    deadline = time.monotonic() + 300
    while not done.is_set() and time.monotonic() < deadline:
        hits = client.search(NS, "retry a failed HTTP request", top_k=1).hits
        assert hits[0].chunk.doc_id == "src/http_client.py"
        if not done.is_set():
            answered_during_upsert += 1
    t.join()
    assert isinstance(result[0], pb.UpsertDocumentsResponse)
    assert result[0].documents_created == 16
    # Searches were answered while the upsert was still running, not queued behind it.
    assert answered_during_upsert >= 3


def test_replacing_a_document_is_atomic_for_concurrent_searches(client: RetrieverClient) -> None:
    def version(tag: str) -> str:
        return "\n\n".join(f"{tag} paragraph {i}: " + " ".join([tag] * 150) for i in range(5))

    a, b = version("alpha"), version("bravo")
    client.upsert(NS, [pb.Document(doc_id="atomic.txt", content=a)])
    counts = {a: client.get_document(NS, "atomic.txt").document and
              len(client.get_document(NS, "atomic.txt").chunk_ids)}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(12):
                client.upsert(NS, [pb.Document(doc_id="atomic.txt", content=(b, a)[i % 2])])
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    client.upsert(NS, [pb.Document(doc_id="atomic.txt", content=b)])
    counts[b] = len(client.get_document(NS, "atomic.txt").chunk_ids)
    t = threading.Thread(target=writer)
    t.start()
    flt = pb.SearchFilter(doc_ids=["atomic.txt"])
    observed = 0
    while not stop.is_set():
        hits = client.search(NS, "paragraph", top_k=50, filter=flt).hits
        versions = {h.chunk.document_version for h in hits}
        tags = {h.chunk.text.split()[0] for h in hits}
        assert len(versions) == 1, versions  # never two versions at once
        assert len(tags) == 1, tags
        text = a if tags == {"alpha"} else b
        assert len(hits) == counts[text]  # never part of a version, never none
        observed += 1
    t.join()
    assert not errors
    assert observed > 0


def test_metrics_count_rpcs_and_stages(server, client: RetrieverClient) -> None:  # noqa: ANN001
    url = f"http://127.0.0.1:{server.info['metrics_port']}/metrics"

    def scrape() -> dict[str, float]:
        out = {}
        for line in urllib.request.urlopen(url).read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    _index(client)
    before = scrape()
    client.search(NS, "bread", top_k=1)
    with pytest.raises(grpc.RpcError):
        client.search(NS, "", top_k=1)
    ok = 'retriever_requests_total{code="OK",rpc="Search"}'
    bad = 'retriever_requests_total{code="INVALID_ARGUMENT",rpc="Search"}'
    count = 'retriever_request_duration_seconds_count{rpc="Search"}'
    # The status of an aborted call can reach the client a moment before the interceptor
    # has counted it: wait (bounded) for both calls to be counted, then compare exactly.
    deadline = time.monotonic() + 5
    while True:
        after = scrape()
        if after.get(count, 0) >= before.get(count, 0) + 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert after[count] == before.get(count, 0) + 2
    assert after['retriever_stage_duration_seconds_count{stage="ann"}'] >= 1
    assert after['retriever_chunks_embedded_total{namespace="mixed"}'] >= len(CORPUS)
    assert after["retriever_model_loaded"] == 1
    e = server.embedder
    info = [k for k in after if k.startswith("retriever_embedder_info{")]
    assert len(info) == 1 and after[info[0]] == 1, info
    for part in (f'model="{e.name}"', f'revision="{e.revision}"', f'backend="{e.backend}"',
                 f'precision="{e.precision}"'):
        assert part in info[0], (part, info[0])


# -- bad input ---------------------------------------------------------------------------------
BIG = "x" * (1024 * 1024 + 1)
LONG_QUERY = "q" * 8193
CASES = [
    # (rpc, request, expected code, words the message must contain)
    ("Search", pb.SearchRequest(namespace="", query="q", top_k=1),
     grpc.StatusCode.INVALID_ARGUMENT, ["namespace", "required"]),
    ("Search", pb.SearchRequest(namespace=NS, query="   ", top_k=1),
     grpc.StatusCode.INVALID_ARGUMENT, ["query", "empty"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=0),
     grpc.StatusCode.INVALID_ARGUMENT, ["top_k", "1", "100"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=-5),
     grpc.StatusCode.INVALID_ARGUMENT, ["top_k"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=101),
     grpc.StatusCode.INVALID_ARGUMENT, ["top_k", "100", "max_top_k"]),
    ("Search", pb.SearchRequest(namespace=NS, query=LONG_QUERY, top_k=1),
     grpc.StatusCode.INVALID_ARGUMENT, ["query", "8192"]),
    ("Search", pb.SearchRequest(namespace="Bad Name!", query="q", top_k=1),
     grpc.StatusCode.INVALID_ARGUMENT, ["namespace", "lowercase"]),
    ("Search", pb.SearchRequest(namespace="missing", query="q", top_k=1),
     grpc.StatusCode.NOT_FOUND, ["missing"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=1, mode=pb.HYBRID,
                                dense_weight=-0.5),
     grpc.StatusCode.INVALID_ARGUMENT, ["dense_weight", "[0, 1]"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=1, rerank=True),
     grpc.StatusCode.FAILED_PRECONDITION, ["rerank", "reranker_model"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=1, mode=42),
     grpc.StatusCode.INVALID_ARGUMENT, ["mode", "42"]),
    ("Search", pb.SearchRequest(namespace=NS, query="q", top_k=1, filter=pb.SearchFilter(
        metadata={f"k{i}": "v" for i in range(65)})),
     grpc.StatusCode.INVALID_ARGUMENT, ["filter.metadata", "65", "64"]),
    ("BatchSearch", pb.BatchSearchRequest(),
     grpc.StatusCode.INVALID_ARGUMENT, ["requests", "empty"]),
    ("BatchSearch", pb.BatchSearchRequest(requests=[
        pb.SearchRequest(namespace=NS, query="ok", top_k=1),
        pb.SearchRequest(namespace=NS, query="q", top_k=0)]),
     grpc.StatusCode.INVALID_ARGUMENT, ["requests[1].top_k"]),
    ("GetChunk", pb.GetChunkRequest(namespace=NS, chunk_id="0" * 32),
     grpc.StatusCode.NOT_FOUND, ["chunk", "0" * 32]),
    ("GetChunk", pb.GetChunkRequest(namespace=NS, chunk_id=""),
     grpc.StatusCode.INVALID_ARGUMENT, ["chunk_id", "required"]),
    ("GetDocument", pb.GetDocumentRequest(namespace=NS, doc_id="nope"),
     grpc.StatusCode.NOT_FOUND, ["nope"]),
    ("GetIndexStatus", pb.GetIndexStatusRequest(namespace="ghost"),
     grpc.StatusCode.NOT_FOUND, ["ghost"]),
    ("DeleteDocuments", pb.DeleteDocumentsRequest(namespace=NS),
     grpc.StatusCode.INVALID_ARGUMENT, ["doc_ids", "empty"]),
    ("ListDocuments", pb.ListDocumentsRequest(namespace=NS, page_size=5000),
     grpc.StatusCode.INVALID_ARGUMENT, ["page_size", "1000"]),
    ("ListDocuments", pb.ListDocumentsRequest(namespace=NS, page_token="%%%"),
     grpc.StatusCode.INVALID_ARGUMENT, ["page_token"]),
    ("CreateNamespace", pb.CreateNamespaceRequest(name="UPPER"),
     grpc.StatusCode.INVALID_ARGUMENT, ["name"]),
    ("CreateNamespace", pb.CreateNamespaceRequest(name="ok-name", backend="nosuch"),
     grpc.StatusCode.INVALID_ARGUMENT, ["nosuch", "faiss"]),
    ("SyncSource", pb.SyncSourceRequest(namespace=NS, repo="."),
     grpc.StatusCode.PERMISSION_DENIED, ["RETRIEVER_SYNC_ROOTS", "RETRIEVER_SYNC_URL_PREFIXES"]),
    ("Evaluate", pb.EvaluateRequest(namespace=NS), grpc.StatusCode.INVALID_ARGUMENT,
     ["golden_set", "required"]),
    ("RecordFeedback", pb.RecordFeedbackRequest(namespace=NS),
     grpc.StatusCode.INVALID_ARGUMENT, ["request_id", "required"]),
    ("RegisterGoldenSet", pb.RegisterGoldenSetRequest(namespace=NS),
     grpc.StatusCode.INVALID_ARGUMENT, ["name", "required"]),
]
UPSERT_CASES = [
    (pb.UpsertDocumentsRequest(namespace="", documents=[pb.Document(doc_id="a", content="x")]),
     ["namespace", "required"]),
    (pb.UpsertDocumentsRequest(namespace="no spaces", documents=[pb.Document(doc_id="a")]),
     ["namespace"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[]), ["documents", "empty"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[pb.Document(content="x")]),
     ["documents[0].doc_id", "required"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[pb.Document(doc_id="a", content=BIG)]),
     ["documents[0].content", "1048576", "max_document_bytes"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[pb.Document(doc_id="a"),
                                                        pb.Document(doc_id="a")]),
     ["documents[1].doc_id", "twice"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[
        pb.Document(doc_id=f"d{i}") for i in range(257)]),
     ["257", "256", "max_batch_documents"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[
        pb.Document(doc_id="a", content="bin\x00ary")]), ["NUL"]),
    (pb.UpsertDocumentsRequest(namespace=NS, documents=[
        pb.Document(doc_id="ok", content="x"),
        pb.Document(doc_id="a", content="x", source_updated_at={"seconds": 253402300800})]),
     ["documents[1].source_updated_at", "Timestamp"]),
]


@pytest.mark.parametrize(("rpc", "request_msg", "code", "words"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_precise_status(client: RetrieverClient, rpc, request_msg, code,
                                       words) -> None:  # noqa: ANN001
    client.upsert(NS, [pb.Document(doc_id="seed.txt", content="seed")])
    with pytest.raises(grpc.RpcError) as e:
        getattr(client.stub, rpc)(request_msg, timeout=30)
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w in e.value.details(), (w, e.value.details())
    status = rpc_status.from_call(e.value)
    assert status is not None and status.details  # google.rpc details travel with it
    trailers = dict(e.value.trailing_metadata())
    assert len(trailers.get("x-request-id", "")) == 32  # errors carry the request id too
    assert client.health() == health_pb2.HealthCheckResponse.SERVING  # still up


@pytest.mark.parametrize(("request_msg", "words"), UPSERT_CASES,
                         ids=[f"upsert-{i}" for i in range(len(UPSERT_CASES))])
def test_bad_upserts_are_rejected_and_nothing_is_written(client: RetrieverClient, request_msg,
                                                         words) -> None:  # noqa: ANN001
    client.upsert(NS, [pb.Document(doc_id="seed.txt", content="seed")])
    with pytest.raises(grpc.RpcError) as e:
        client.upsert_stream(iter([request_msg]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for w in words:
        assert w in e.value.details(), (w, e.value.details())
    status = client.status(NS)
    assert status.document_count == 1 and status.vector_count == status.chunk_count


def test_non_utf8_content_is_invalid_argument(server, client: RetrieverClient) -> None:  # noqa: ANN001
    def field(num: int, payload: bytes) -> bytes:
        return bytes([num << 3 | 2, len(payload)]) + payload

    doc = field(1, b"bad.txt") + field(2, b"caf\xe9 \xff\xfe")
    raw = field(1, NS.encode()) + field(2, doc)
    channel = grpc.insecure_channel(server.address)
    call = channel.stream_unary("/retriever.v1.Retriever/UpsertDocuments",
                                request_serializer=lambda b: b,
                                response_deserializer=pb.UpsertDocumentsResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        call(iter([raw]), timeout=30)
    channel.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in e.value.details()
    with pytest.raises(grpc.RpcError) as e2:
        client.get_document(NS, "bad.txt")
    assert e2.value.code() in (grpc.StatusCode.NOT_FOUND,)


def test_an_undecodable_message_is_named_by_its_place_in_the_stream(server) -> None:  # noqa: ANN001
    """The caller must be able to tell which messages were committed: the error named no
    message (the check ran before the stream's own, which names it)."""
    def field(num: int, payload: bytes) -> bytes:
        return bytes([num << 3 | 2, len(payload)]) + payload

    good = [pb.UpsertDocumentsRequest(namespace="undecodable", documents=[
        pb.Document(doc_id=f"ok{i}.txt", content="fine")]).SerializeToString() for i in (0, 1)]
    bad = field(1, b"undecodable") + field(2, field(1, b"bad.txt") + field(2, b"caf\xe9"))
    channel = grpc.insecure_channel(server.address)
    call = channel.stream_unary("/retriever.v1.Retriever/UpsertDocuments",
                                request_serializer=lambda b: b,
                                response_deserializer=pb.UpsertDocumentsResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        call(iter([*good, bad]), timeout=60)
    channel.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("message 2 of the stream: ")
    assert "UTF-8" in e.value.details() and "messages before it were committed" in e.value.details()
    with RetrieverClient(server.address) as c:
        assert list(c.document_ids("undecodable")) == ["ok0.txt", "ok1.txt"]


def test_stream_with_two_namespaces_is_rejected(client: RetrieverClient) -> None:
    msgs = [pb.UpsertDocumentsRequest(namespace="one", documents=[pb.Document(doc_id="a")]),
            pb.UpsertDocumentsRequest(namespace="two", documents=[pb.Document(doc_id="b")])]
    with pytest.raises(grpc.RpcError) as e:
        client.upsert_stream(iter(msgs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one namespace per stream" in e.value.details()


@pytest.mark.parametrize("again", [False, True], ids=["deleted", "created-again"])
def test_stream_does_not_write_a_namespace_deleted_while_it_is_open(
        client: RetrieverClient, again: bool) -> None:
    """A stream's later messages write only the namespace its first message wrote: one
    deleted meanwhile is not created again by them (it was, with the server's default
    backend), and one created again under its name is not theirs."""
    ns = f"stream-bound-{int(again)}"
    release = threading.Event()

    def messages() -> Iterator[pb.UpsertDocumentsRequest]:
        yield pb.UpsertDocumentsRequest(namespace=ns, documents=[
            pb.Document(doc_id="first.txt", content="written before the delete")])
        assert release.wait(60)
        yield pb.UpsertDocumentsRequest(namespace=ns, documents=[
            pb.Document(doc_id="second.txt", content="written after the delete")])

    outcome: dict[str, object] = {}

    def stream() -> None:
        try:
            outcome["response"] = client.upsert_stream(messages(), timeout=120)
        except grpc.RpcError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=stream)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # the first message committed
            try:
                client.get_document(ns, "first.txt")
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client.delete_namespace(ns)
        if again:
            client.create_namespace(ns)
            client.upsert(ns, [pb.Document(doc_id="other.txt", content="the new one's own")])
    finally:
        release.set()
        t.join(120)
    err = outcome.get("error")
    assert isinstance(err, grpc.RpcError), outcome
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "was deleted while this upsert stream was open" in err.details()
    assert "message 1" in err.details()
    if again:
        assert list(client.document_ids(ns)) == ["other.txt"]
    else:
        assert ns not in [n.name for n in client.namespaces()]


def test_a_stream_whose_results_outgrow_the_message_limit_succeeds(tmp_path, embedder) -> None:  # noqa: ANN001
    """One DocumentResult per document: a long stream of many documents committed every
    message, then its response went over grpc_max_message_bytes and the caller was told
    RESOURCE_EXHAUSTED (a retry committed it all again, and failed the same way). The
    results list stops where it would not fit, says so, and the counts stay whole."""
    from conftest import make_settings

    limit = 1 << 20
    st = ServerThread(make_settings(tmp_path / "data", grpc_max_message_bytes=limit),
                      embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            ids = [f"{i:05d}-" + "x" * 1000 for i in range(1200)]
            resp = c.upsert_stream(iter(
                pb.UpsertDocumentsRequest(namespace="many", documents=[
                    pb.Document(doc_id=d, content="") for d in ids[i:i + 200]])
                for i in range(0, len(ids), 200)), timeout=300)
            assert resp.results_truncated
            assert resp.documents_received == resp.documents_created == len(ids)
            assert 0 < len(resp.results) < len(ids) and resp.ByteSize() < limit
            assert [r.doc_id for r in resp.results] == ids[:len(resp.results)]
            small = c.upsert("many", [pb.Document(doc_id="one", content="")])
            assert not small.results_truncated and len(small.results) == 1
    finally:
        st.stop()


def test_a_page_of_documents_ends_before_the_message_limit(tmp_path, embedder) -> None:  # noqa: ANN001
    """ListDocuments cut its pages by count only: documents with metadata at its limits
    made a page of 1,000 (what the client and the CLI ask for) a 76 MB response, refused by
    the transport. A page now also ends where the next entry would not fit, and the token
    goes on from there."""
    from conftest import make_settings

    limit = 1 << 20
    st = ServerThread(make_settings(tmp_path / "data", grpc_max_message_bytes=limit),
                      embedder).start()
    meta = {f"k{i:03d}" + "k" * 124: "v" * 1024 for i in range(64)}  # at the limits
    try:
        with RetrieverClient(st.address) as c:
            ids = [f"doc-{i:03d}" for i in range(60)]
            c.upsert_stream(iter(
                pb.UpsertDocumentsRequest(namespace="meta", documents=[
                    pb.Document(doc_id=d, content="", metadata=meta) for d in ids[i:i + 10]])
                for i in range(0, len(ids), 10)), timeout=300)
            first = c.list_documents("meta", page_size=100)
            assert first.next_page_token and 1 <= len(first.documents) < len(ids)
            assert first.ByteSize() < limit and first.total_size == len(ids)
            assert list(c.document_ids("meta")) == ids  # every page, each document once
    finally:
        st.stop()
