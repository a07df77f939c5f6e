"""Mixed load and abusive clients against a real server: searches cannot starve ingestion,
a call nobody waits for never commits, idle streams cannot hold ingestion hostage."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import make_settings, running_server
from grpc_status import rpc_status

from retriever.client import RetrieverClient
from retriever.models.embedder import Embedder
from retriever.server.app import ServerThread
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration
IDLE_S = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[ServerThread]:
    settings = make_settings(Path(tmp_path_factory.mktemp("mixed")) / "data",
                             upsert_stream_idle_timeout_s=IDLE_S, max_upsert_streams_per_peer=2,
                             max_inflight_searches=16, max_batch_queries=64)
    with running_server(settings, embedder) as st:
        yield st


@pytest.fixture
def client(server: ServerThread) -> Iterator[RetrieverClient]:
    with RetrieverClient(server.address, timeout=60) as c:
        yield c


def _small(i: int, tag: str) -> pb.Document:
    return pb.Document(doc_id=f"{tag}-{i}.md", content=f"# Note {i}\nA small note about {tag}.")


def _big(i: int, tag: str) -> pb.Document:
    words = " ".join(f"{tag}{i}w{j}" for j in range(1000))  # ~25 chunks
    return pb.Document(doc_id=f"{tag}-{i}.txt", content=words)


def _exists(client: RetrieverClient, ns: str, doc_id: str) -> bool:
    try:
        client.get_document(ns, doc_id)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False


def _settle(client: RetrieverClient, ns: str) -> None:
    """Wait until the namespace's writers are done: an upsert takes its write lock last."""
    client.upsert(ns, [pb.Document(doc_id="settle.md", content="settle")])


def test_searches_in_a_loop_do_not_starve_upserts(client: RetrieverClient,
                                                  server: ServerThread) -> None:
    client.upsert("load-a", [_small(i, "seed") for i in range(4)])
    stop = threading.Event()
    searches = [0, 0]
    errors: list[BaseException] = []

    def searcher(k: int) -> None:
        with RetrieverClient(server.address, timeout=30) as c:
            while not stop.is_set():
                try:
                    c.search("load-a", "a small note", top_k=5)
                    searches[k] += 1
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=searcher, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        # Four tiny documents into another namespace, and into the searched one, each under
        # a deadline that the spine missed by 10-20 s (it never ran them while searches came).
        for ns in ("load-b", "load-a"):
            resp = client.stub.UpsertDocuments(
                iter([pb.UpsertDocumentsRequest(namespace=ns,
                                                documents=[_small(i, ns) for i in range(4)])]),
                timeout=10)
            assert resp.documents_created == 4
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert min(searches) > 0  # the searches kept going meanwhile


def test_a_timed_out_upsert_never_commits(client: RetrieverClient) -> None:
    docs = [_big(i, "late") for i in range(6)]  # seconds of embedding on a CPU
    with pytest.raises(grpc.RpcError) as info:
        client.stub.UpsertDocuments(
            iter([pb.UpsertDocumentsRequest(namespace="cancel", documents=docs)]), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _settle(client, "cancel")
    time.sleep(0.5)
    assert not any(_exists(client, "cancel", d.doc_id) for d in docs)


def test_a_cancelled_upsert_never_commits(client: RetrieverClient) -> None:
    docs = [_big(i, "gone") for i in range(6)]
    call = client.stub.UpsertDocuments.future(
        iter([pb.UpsertDocumentsRequest(namespace="cancel", documents=docs)]), timeout=60)
    time.sleep(0.5)  # the server is embedding
    assert call.cancel()
    _settle(client, "cancel")
    time.sleep(0.5)
    assert not any(_exists(client, "cancel", d.doc_id) for d in docs)


def test_a_small_upsert_overtakes_a_bulk_one_in_the_same_namespace(
        client: RetrieverClient, server: ServerThread) -> None:
    """Upserts chunk and embed before taking the namespace's write lock, so a small one is
    not queued behind the whole embedding of a bulk one (their slices take turns)."""
    client.upsert("shared", [_small(0, "seed")])
    finished: dict[str, float] = {}

    def bulk() -> None:
        with RetrieverClient(server.address, timeout=120) as c:
            c.upsert("shared", [_big(i, "bulk") for i in range(6)], batch_size=6)
        finished["bulk"] = time.monotonic()

    t = threading.Thread(target=bulk)
    t.start()
    time.sleep(0.5)  # the bulk upsert is embedding (seconds of it on a CPU)
    t0 = time.monotonic()
    client.upsert("shared", [_small(1, "late")])
    finished["small"] = time.monotonic()
    t.join(120)
    assert finished["small"] < finished["bulk"], (
        f"the small upsert ({finished['small'] - t0:.2f} s) waited for the bulk one")
    assert _exists(client, "shared", "late-1.md") and _exists(client, "shared", "bulk-5.txt")


def test_a_delete_namespace_that_timed_out_behind_an_upsert_is_not_applied_later(
        tmp_path: Path, embedder: Embedder) -> None:
    # Without prefetching, an upsert holds the namespace's write lock while it embeds: a
    # long wait for the lock, the case where a timed-out delete could be applied late.
    settings = make_settings(tmp_path / "data", upsert_prefetch=False)
    with running_server(settings, embedder) as server, \
            RetrieverClient(server.address, timeout=60) as client:
        _delete_behind_upsert(client, server)


def _delete_behind_upsert(client: RetrieverClient, server: ServerThread) -> None:
    client.upsert("doomed", [_small(0, "x")])
    done = threading.Event()
    failed: list[BaseException] = []

    def bulk() -> None:
        try:
            with RetrieverClient(server.address, timeout=120) as c:
                c.upsert("doomed", [_big(i, "bulk") for i in range(4)], batch_size=4)
            done.set()
        except BaseException as exc:  # noqa: BLE001
            failed.append(exc)

    t = threading.Thread(target=bulk)
    t.start()
    time.sleep(0.5)  # the bulk upsert holds the namespace's write lock
    with pytest.raises(grpc.RpcError) as info:
        client.stub.DeleteNamespace(pb.DeleteNamespaceRequest(name="doomed"), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    t.join(120)
    assert done.is_set(), failed
    time.sleep(0.5)
    assert client.status("doomed").document_count == 5  # still there, with the bulk docs


def _idle_stream(first: pb.UpsertDocumentsRequest, release: threading.Event
                 ) -> Iterator[pb.UpsertDocumentsRequest]:
    yield first
    release.wait(30)


def test_an_idle_upsert_stream_is_closed_and_its_first_messages_kept(
        client: RetrieverClient) -> None:
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.stub.UpsertDocuments(_idle_stream(pb.UpsertDocumentsRequest(
            namespace="idle", documents=[_small(0, "idle")]), release), timeout=30)
    release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "upsert_stream_idle_timeout_s" in info.value.details()
    assert time.monotonic() - t0 < 20
    assert _exists(client, "idle", "idle-0.md")


def test_one_client_cannot_hold_every_upsert_slot(client: RetrieverClient) -> None:
    release = threading.Event()
    held = [client.stub.UpsertDocuments.future(_idle_stream(pb.UpsertDocumentsRequest(
        namespace="peer", documents=[_small(k, "held")]), release), timeout=30)
        for k in range(2)]
    try:
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as info:
            client.upsert("peer", [_small(9, "third")])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_upsert_streams_per_peer" in info.value.details()
    finally:
        release.set()
    for call in held:
        assert call.result(30).documents_created == 1
    client.upsert("peer", [_small(9, "third")])  # the slots are free again


def test_a_refused_stream_reaches_the_async_client_with_its_status(
        tmp_path: Path, embedder: Embedder) -> None:
    """Ending a client stream while the client is still writing made grpc's asyncio client
    report INTERNAL "Internal error from Core" in place of the status sent (grpc/grpc#36066;
    here ~4 % of refused 50-message streams, and once under overload in the load report).
    The server reads what the client sends before it answers: every caller gets the
    status, whether the stream is refused at admission or at its first message."""
    import asyncio

    from retriever.aio_client import AsyncRetrieverClient

    async def streams(first_namespace: str) -> dict[str, int]:
        async def stream():  # noqa: ANN202
            yield pb.UpsertDocumentsRequest(namespace=first_namespace,
                                            documents=[_small(0, "race")])
            for k in range(1, 50):
                yield pb.UpsertDocumentsRequest(namespace="race", documents=[_small(k, "race")])

        async def one(ac: AsyncRetrieverClient) -> str:
            try:
                await ac.upsert_stream(stream(), timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        async with AsyncRetrieverClient(st.address) as ac:
            codes = await asyncio.gather(*[one(ac) for _ in range(300)])
        return {c: codes.count(c) for c in set(codes)}

    settings = make_settings(tmp_path, max_upsert_streams_per_peer=2,
                             upsert_stream_idle_timeout_s=120)
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
        release = threading.Event()
        held = [client.stub.UpsertDocuments.future(_idle_stream(pb.UpsertDocumentsRequest(
            namespace="race", documents=[_small(k, "held")]), release), timeout=120)
            for k in range(2)]  # this client's two slots: every stream below is refused
        try:
            time.sleep(0.5)
            assert asyncio.run(streams("race")) == {"RESOURCE_EXHAUSTED": 300}
        finally:
            release.set()
        for call in held:
            assert call.result(60).documents_created == 1
        # The first message names no namespace (refused there) or the slots are taken:
        # either way the status, never INTERNAL.
        codes = asyncio.run(streams("not a namespace!"))
        assert set(codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
        assert codes.get("INVALID_ARGUMENT", 0) >= 2


def test_batch_search_larger_than_any_limit_is_invalid_not_retryable(
        client: RetrieverClient) -> None:
    client.upsert("batch", [_small(0, "b")])
    requests = [pb.SearchRequest(namespace="batch", query=f"q{i}", top_k=1) for i in range(17)]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.BatchSearch(pb.BatchSearchRequest(requests=requests), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_inflight_searches" in info.value.details()
    status = rpc_status.from_call(info.value)
    assert status is not None
    assert not any(d.type_url.endswith("RetryInfo") for d in status.details)


def test_beyond_saturation_searches_are_shed_at_once_and_admission_resumes(
        tmp_path: Path, embedder: Embedder) -> None:
    st = ServerThread(make_settings(tmp_path / "data", search_shed_after_s=0.2),
                      embedder).start()
    codes: list[grpc.StatusCode] = []
    refusal_s: list[float] = []
    lock = threading.Lock()
    try:
        with RetrieverClient(st.address, timeout=60) as c:
            c.upsert("shed", [_small(i, "shed") for i in range(8)])

            def burst() -> None:
                with RetrieverClient(st.address, timeout=60) as mine:
                    for i in range(6):
                        t0 = time.monotonic()
                        try:
                            # long queries: each forward pass is slow, the backlog builds
                            mine.search("shed", f"note {i} " + "words " * 200, top_k=5)
                            code = grpc.StatusCode.OK
                        except grpc.RpcError as exc:
                            code = exc.code()
                            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                                assert "search_shed_after_s" in exc.details()
                                with lock:
                                    refusal_s.append(time.monotonic() - t0)
                        with lock:
                            codes.append(code)

            threads = [threading.Thread(target=burst) for _ in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
            assert codes.count(grpc.StatusCode.OK) > 0
            assert max(refusal_s) < 1.0  # refused on arrival, not after queueing
            time.sleep(0.5)
            assert c.search("shed", "a small note", top_k=1).hits  # admission resumed
    finally:
        st.stop()


def test_concurrent_upserts_of_one_document_leave_one_consistent_version(
        tmp_path: Path, embedder: Embedder) -> None:
    """Each upsert plans and embeds before the lock from what it saw; the ones that find
    the document changed under the lock plan again: the last commit wins whole, versions
    count every change, and no vector or chunk of a losing plan is left behind."""
    contents = {i: "\n\n".join(f"Paragraph {j} of draft {i}: " + " ".join(
        f"d{i}p{j}w{w}" for w in range(60)) for j in range(4)) for i in range(6)}
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            with RetrieverClient(server.address, timeout=120) as c:
                c.upsert("race", [pb.Document(doc_id="same.md", content=contents[i])])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with running_server(make_settings(tmp_path / "data"), embedder) as server, \
            RetrieverClient(server.address, timeout=60) as client:
        threads = [threading.Thread(target=write, args=(i,)) for i in contents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        _check_one_version(client, contents)


def _check_one_version(client: RetrieverClient, contents: dict[int, str]) -> None:
    doc = client.get_document("race", "same.md")
    assert doc.document.content in contents.values()
    assert doc.version == len(contents)  # every upsert changed the content once
    status = client.status("race")
    assert status.document_count == 1
    assert status.chunk_count == status.vector_count == len(doc.chunk_ids)
    winner = next(i for i, c in contents.items() if c == doc.document.content)
    hits = client.search("race", f"d{winner}p2w7 d{winner}p2w8", top_k=10).hits
    assert hits and all(f"draft {winner}" in h.chunk.text or f"d{winner}p" in h.chunk.text
                        for h in hits)


def test_behind_a_proxy_the_stream_cap_counts_per_forwarded_caller(
        tmp_path: Path, embedder: Embedder) -> None:
    """With upsert_peer_header, callers behind one proxy host each get their own allowance
    (keyed on the header the proxy sets), and one of them still cannot take every slot."""
    settings = make_settings(tmp_path / "data", max_upsert_streams_per_peer=2,
                             upsert_peer_header="x-forwarded-for")

    def open_stream(caller: str | None, k: int, release: threading.Event):  # noqa: ANN202
        metadata = [("x-forwarded-for", caller)] if caller else None
        return client.stub.UpsertDocuments.future(_idle_stream(pb.UpsertDocumentsRequest(
            namespace="fwd", documents=[_small(k, "fwd")]), release), timeout=30,
            metadata=metadata)

    with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
        release = threading.Event()
        held = [open_stream("10.0.0.1", k, release) for k in range(2)]
        try:
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as info:  # the same caller, through a 2nd proxy
                open_stream("10.0.0.1, 192.168.0.7", 2, threading.Event()).result(30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "x-forwarded-for 10.0.0.1" in info.value.details()
            # another caller behind the same proxy host, and a call without the header
            # (counted by its connection's host), are not refused
            others = [open_stream("10.0.0.2", 3, release), open_stream(None, 4, release)]
            time.sleep(0.5)
            assert not any(c.done() for c in others)
        finally:
            release.set()
        for call in held + others:
            assert call.result(30).documents_created == 1


def test_the_peer_header_setting_takes_a_metadata_key() -> None:
    from pydantic import ValidationError

    from retriever.config import Settings

    for bad in ("X-Forwarded-For", "client id", "a" * 65):  # gRPC keys are lowercase
        with pytest.raises(ValidationError):
            Settings(upsert_peer_header=bad)
    assert Settings(upsert_peer_header="x-client-id").upsert_peer_header == "x-client-id"


def test_clients_name_their_caller_with_headers_for_the_stream_cap(
        tmp_path: Path, embedder: Embedder) -> None:
    """Both clients send their ``headers`` on every call: a server keyed on that header
    counts each named caller's streams apart (one caller at its cap is refused, naming
    itself; another caller on the same host is served)."""
    import asyncio

    from retriever.aio_client import AsyncRetrieverClient

    settings = make_settings(tmp_path / "data", max_upsert_streams_per_peer=1,
                             upsert_peer_header="x-retriever-caller")
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, headers=[("x-retriever-caller", "a")]) as a, \
            RetrieverClient(st.address, headers=[("x-retriever-caller", "a")]) as a2:
        release = threading.Event()
        held = a.stub.UpsertDocuments.future(_idle_stream(pb.UpsertDocumentsRequest(
            namespace="callers", documents=[_small(0, "callers")]), release), timeout=30)
        try:
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as info:  # caller a, another channel
                a2.upsert("callers", [_small(1, "callers")], timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "x-retriever-caller a" in info.value.details()

            async def as_b() -> pb.UpsertDocumentsResponse:
                async with AsyncRetrieverClient(
                        st.address, headers=[("x-retriever-caller", "b")]) as b:
                    return await b.upsert("callers", [_small(2, "callers")], timeout=30)

            assert asyncio.run(as_b()).documents_created == 1
        finally:
            release.set()
        assert held.result(30).documents_created == 1
    for bad in ("X-Caller", "grpc-timeout", "trace-bin", ""):
        with pytest.raises(ValueError, match="header"):
            RetrieverClient("127.0.0.1:1", headers=[(bad, "x")])
