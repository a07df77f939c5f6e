"""Service behaviour that needs special settings: backpressure, batching, model mismatch."""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import make_settings

from retriever.client import RetrieverClient
from retriever.errors import NotReady
from retriever.server.app import ServerThread
from retriever.service import RetrieverService
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration


def _concurrently(n: int, fn) -> list:  # noqa: ANN001
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _metrics(st: ServerThread) -> str:
    url = f"http://127.0.0.1:{st.info['metrics_port']}/metrics"
    return urllib.request.urlopen(url).read().decode()


def test_concurrent_queries_share_micro_batches(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    st = ServerThread(make_settings(tmp_path, query_batch_wait_ms=150), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("b", [pb.Document(doc_id="a", content="bread and butter")])
            results = _concurrently(12, lambda i: c.search("b", f"query number {i}", top_k=1))
        assert all(isinstance(r, pb.SearchResponse) for r in results), results
        text = _metrics(st)
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("retriever_query_batch_size_")}
        batches, queries = values["retriever_query_batch_size_count"], values[
            "retriever_query_batch_size_sum"]
        assert queries == 12
        assert batches < 12  # some queries were embedded together
        # SQLite's heap (the catalog connections' page caches), bounded by catalog_cache_bytes
        held = [float(line.split(" ")[1]) for line in text.splitlines()
                if line.startswith("retriever_catalog_memory_bytes ")]
        assert len(held) == 1 and 0 < held[0] < 64 << 20
    finally:
        st.stop()


# Limit 20 is above the 16 threads of the read pool: the limit must hold before work queues.
@pytest.mark.parametrize(("limit", "callers"), [(1, 6), (20, 60)])
def test_searches_beyond_the_limit_are_resource_exhausted(tmp_path: Path, embedder, limit: int,
                                                          callers: int) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path, max_inflight_searches=limit, query_batch_wait_ms=400)
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("b", [pb.Document(doc_id="a", content="bread and butter")])
            results = _concurrently(callers, lambda i: c.search("b", "bread", top_k=1))
            refused = [r for r in results if isinstance(r, grpc.RpcError)]
            served = [r for r in results if isinstance(r, pb.SearchResponse)]
            assert len(served) >= limit and refused
            assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert f"limit {limit}" in refused[0].details()
            # Each refusal's server-side time is in the refusal histogram, by rpc.
            sample = {line.split(" ")[0]: float(line.split(" ")[1])
                      for line in _metrics(st).splitlines() if line.startswith(
                          'retriever_refusal_duration_seconds_count{rpc="Search"}')}
            assert sample == {'retriever_refusal_duration_seconds_count{rpc="Search"}':
                              float(len(refused))}
            # Once the burst is over the server answers again.
            assert c.search("b", "bread", top_k=1).hits
    finally:
        st.stop()


def test_namespace_built_by_another_embedder_is_refused(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path)
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("old", [pb.Document(doc_id="a", content="bread and butter")])
    finally:
        st.stop()
    # As if another model had built it: its recorded revision differs from the loaded one.
    db = sqlite3.connect(settings.data_dir / "catalog.sqlite3")
    db.execute("UPDATE namespaces SET embedder_revision = 'feedfacecafe' WHERE name = 'old'")
    db.commit()
    db.close()
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            for call in (lambda: c.search("old", "bread", top_k=1),
                         lambda: c.upsert("old", [pb.Document(doc_id="b", content="x")])):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "feedfacecafe" in e.value.details()
                assert embedder.revision in e.value.details()
            # Reads that need no model still work.
            assert c.get_document("old", "a").document.content == "bread and butter"
    finally:
        st.stop()


def test_core_refuses_work_before_start_and_after_close(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    svc = RetrieverService(make_settings(tmp_path), embedder=embedder)
    with pytest.raises(NotReady):
        svc.get_namespace("x")
    svc.start()
    svc.create_namespace("x")
    assert svc.get_namespace("x").name == "x"
    svc.close()
    with pytest.raises(NotReady):
        svc.get_namespace("x")


def test_auth_token_guards_the_api_but_not_health(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    st = ServerThread(make_settings(tmp_path, auth_token="s3cret"), embedder).start()
    try:
        with RetrieverClient(st.address) as anonymous:
            with pytest.raises(grpc.RpcError) as e:
                anonymous.search("b", "bread", top_k=1)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                anonymous.upsert("b", [pb.Document(doc_id="a", content="x")])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == 1  # SERVING: probes need no token
        with RetrieverClient(st.address, token="wrong") as wrong:
            with pytest.raises(grpc.RpcError) as e:
                wrong.list_namespaces()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RetrieverClient(st.address, token="s3cret") as authorized:
            authorized.upsert("b", [pb.Document(doc_id="a", content="bread and butter")])
            assert authorized.search("b", "bread", top_k=1).hits[0].chunk.doc_id == "a"
        text = _metrics(st)
        assert 'retriever_requests_total{code="UNAUTHENTICATED",rpc="Search"} 1.0' in text
    finally:
        st.stop()


def test_deleted_then_recreated_namespace_starts_empty(client: RetrieverClient) -> None:
    client.upsert("again", [pb.Document(doc_id=f"d{i}", content=f"text {i}") for i in range(5)])
    client.delete_namespace("again")
    client.create_namespace("again")
    status = client.status("again")
    assert (status.document_count, status.chunk_count, status.vector_count) == (0, 0, 0)
    client.upsert("again", [pb.Document(doc_id="new", content="bread and butter")])
    assert [h.chunk.doc_id for h in client.search("again", "bread", top_k=5).hits] == ["new"]


def test_collection_left_by_a_crashed_namespace_delete_is_removed(tmp_path: Path,
                                                                  embedder) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path)
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("gone", [pb.Document(doc_id=f"d{i}", content=f"text {i}") for i in range(4)])
    finally:
        st.stop()
    # As a crash right after DeleteNamespace's catalog commit leaves it: rows gone, files not.
    db = sqlite3.connect(settings.data_dir / "catalog.sqlite3")
    for table, col in (("chunks", "namespace"), ("documents", "namespace"),
                       ("namespaces", "name")):
        db.execute(f"DELETE FROM {table} WHERE {col} = 'gone'")
    db.commit()
    db.close()
    collection = settings.data_dir / "indexes" / "faiss" / "gone.g1"
    assert collection.is_dir()
    st = ServerThread(settings, embedder).start()
    try:
        assert not collection.exists()
        with RetrieverClient(st.address) as c:
            c.create_namespace("gone")
            assert c.status("gone").vector_count == 0
    finally:
        st.stop()


def test_deadline_exceeded_is_not_counted_as_a_server_error(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    st = ServerThread(make_settings(tmp_path, query_batch_wait_ms=300), embedder).start()
    try:
        with RetrieverClient(st.address, timeout=0.05) as c:
            c.stub.UpsertDocuments(iter([pb.UpsertDocumentsRequest(
                namespace="b", documents=[pb.Document(doc_id="a", content="bread")])]))
            with pytest.raises(grpc.RpcError) as e:
                c.search("b", "bread", top_k=1)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)  # the server notices the cancelled call
        text = _metrics(st)
        search_codes = [line for line in text.splitlines()
                        if line.startswith('retriever_requests_total{') and 'rpc="Search"' in line]
        assert search_codes and not any('code="INTERNAL"' in line for line in search_codes)
        assert any('code="DEADLINE_EXCEEDED"' in line or 'code="CANCELLED"' in line
                   for line in search_codes)
    finally:
        st.stop()
