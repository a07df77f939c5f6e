"""The async client against the real server, and the retry policy both clients share."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from retriever._retry import RetryPolicy, retry_delay, retry_info_delay
from retriever.aio_client import NO_RETRY, AsyncRetrieverClient
from retriever.client import RetrieverClient
from retriever.server.app import ServerThread
from retriever.v1 import retriever_pb2 as pb
from retriever.v1 import retriever_pb2_grpc as pb_grpc

RE = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _status(code: grpc.StatusCode, retry_ms: int | None = None,
            error_info: bool = False) -> status_pb2.Status:
    details = []
    if retry_ms is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(retry_ms)
        details.append(_pack(info))
    if error_info:
        details.append(_pack(error_details_pb2.ErrorInfo(reason=code.name)))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=code.name.lower(),
                             details=details)


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


# -- the policy, on constructed statuses ---------------------------------------------------
def test_retry_info_delay_is_read_from_the_details() -> None:
    assert retry_info_delay(_status(RE, retry_ms=500, error_info=True)) == 0.5
    assert retry_info_delay(_status(RE, error_info=True)) is None
    assert retry_info_delay(None) is None


@pytest.mark.parametrize(("code", "retry_ms", "retried"), [
    (RE, 500, True),            # the server says a retry can cure it
    (RE, None, False),          # e.g. a full disk: no RetryInfo, no retry
    (UNAVAILABLE, None, True),  # loading, draining, not reachable yet
    (UNAVAILABLE, 200, True),
    (INVALID, 500, False),      # never, whatever the details say
    (grpc.StatusCode.INTERNAL, None, False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None, False),
])
def test_which_codes_are_retried(code: grpc.StatusCode, retry_ms: int | None,
                                 retried: bool) -> None:
    delay = retry_delay(RetryPolicy(), code, _status(code, retry_ms), 1, None)
    assert (delay is not None) == retried


def test_backoff_honours_retry_info_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=1.0, jitter=0.2)
    rng = random.Random(0)
    hinted = _status(RE, retry_ms=300)
    for attempt, base in [(1, 0.3), (2, 0.6), (3, 1.0), (4, 1.0)]:
        d = retry_delay(policy, RE, hinted, attempt, None, rng)
        assert d is not None and base <= d <= base * 1.2 + 1e-9, (attempt, d)
    d = retry_delay(policy, UNAVAILABLE, None, 1, None, rng)
    assert d is not None and 0.1 <= d <= 0.12 + 1e-9
    # A server delay above the cap is still honoured.
    d = retry_delay(policy, RE, _status(RE, retry_ms=3000), 1, None, rng)
    assert d is not None and d >= 3.0


def test_no_retry_past_max_attempts_or_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    hinted = _status(RE, retry_ms=500)
    assert retry_delay(policy, RE, hinted, 2, None) is not None
    assert retry_delay(policy, RE, hinted, 3, None) is None
    assert retry_delay(policy, RE, hinted, 1, 0.4) is None  # would wake after the deadline
    assert retry_delay(policy, RE, hinted, 1, 0.6) == 0.5
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# -- both interceptors, against a scripted server -------------------------------------------
class _Scripted(pb_grpc.RetrieverServicer):
    """Search and CreateNamespace answer the scripted statuses in turn, then OK."""

    def __init__(self) -> None:
        self.script: list[status_pb2.Status] = []
        self.calls = 0
        self.lock = threading.Lock()

    def _answer(self, context: grpc.ServicerContext) -> None:
        """Count the call; end it with the next scripted status, if any."""
        with self.lock:
            self.calls += 1
            status = self.script.pop(0) if self.script else None
        if status is not None:
            context.abort_with_status(rpc_status.to_status(status))

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext):  # noqa: N802
        self._answer(context)
        return pb.SearchResponse()

    def CreateNamespace(self, request: pb.CreateNamespaceRequest,  # noqa: N802
                        context: grpc.ServicerContext):
        self._answer(context)
        return pb.CreateNamespaceResponse()


@pytest.fixture
def scripted() -> Iterator[tuple[_Scripted, str]]:
    servicer = _Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RetrieverServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, jitter=0.1)


def _sync_search(address: str, policy: RetryPolicy, timeout: float = 10.0,
                 seen: list | None = None) -> grpc.StatusCode:
    on_retry = (lambda *a: seen.append(a)) if seen is not None else None
    with RetrieverClient(address, timeout=timeout, retry=policy, on_retry=on_retry) as c:
        try:
            c.search("ns", "q")
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _async_search(address: str, policy: RetryPolicy, timeout: float = 10.0,
                  seen: list | None = None) -> grpc.StatusCode:
    on_retry = (lambda *a: seen.append(a)) if seen is not None else None

    async def main() -> grpc.StatusCode:
        async with AsyncRetrieverClient(address, timeout=timeout, retry=policy,
                                        on_retry=on_retry) as c:
            try:
                await c.search("ns", "q")
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    return asyncio.run(main())


CLIENTS = pytest.mark.parametrize("search", [_sync_search, _async_search],
                                  ids=["sync", "async"])


@pytest.mark.integration
@CLIENTS
@pytest.mark.parametrize(("script", "final", "calls"), [
    ([_status(RE, retry_ms=20)], grpc.StatusCode.OK, 2),
    ([_status(UNAVAILABLE), _status(UNAVAILABLE)], grpc.StatusCode.OK, 3),
    ([_status(RE, error_info=True)], RE, 1),
    ([_status(INVALID, retry_ms=20)], INVALID, 1),
    ([_status(RE, retry_ms=10)] * 5, RE, 4),  # max_attempts
], ids=["re-retryinfo", "unavailable", "re-no-retryinfo", "invalid", "max-attempts"])
def test_interceptor_retries_what_the_policy_says(scripted, search, script, final,  # noqa: ANN001
                                                  calls: int) -> None:
    servicer, address = scripted
    servicer.script = list(script)
    seen: list = []
    assert search(address, FAST, seen=seen) == final
    assert servicer.calls == calls
    assert len(seen) == calls - 1
    assert all(method == "/retriever.v1.Retriever/Search" for method, *_ in seen)


def _create(address: str, policy: RetryPolicy, asynchronous: bool) -> grpc.StatusCode:
    if not asynchronous:
        with RetrieverClient(address, timeout=10, retry=policy) as c:
            try:
                c.create_namespace("ns")
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    async def main() -> grpc.StatusCode:
        async with AsyncRetrieverClient(address, timeout=10, retry=policy) as c:
            try:
                await c.create_namespace("ns")
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    return asyncio.run(main())


@pytest.mark.integration
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("script", "final", "calls"), [
    ([_status(UNAVAILABLE)], UNAVAILABLE, 1),  # the transport's: it may have been applied
    ([_status(UNAVAILABLE, retry_ms=10)], grpc.StatusCode.OK, 2),  # the server refused it
    ([_status(RE, retry_ms=10)], grpc.StatusCode.OK, 2),
], ids=["unavailable", "unavailable-retryinfo", "re-retryinfo"])
def test_a_state_change_is_retried_only_when_the_server_refused_it(
        scripted, asynchronous: bool, script, final, calls: int) -> None:  # noqa: ANN001
    """A connection reset after the server applied a CreateNamespace (or a golden set, a
    delete...) also reads UNAVAILABLE: repeating it answered ALREADY_EXISTS for the
    namespace the lost attempt made, or made a second golden-set version."""
    servicer, address = scripted
    servicer.script = list(script)
    assert _create(address, FAST, asynchronous) == final
    assert servicer.calls == calls


@pytest.mark.integration
@CLIENTS
def test_interceptor_never_waits_past_the_deadline(scripted, search) -> None:  # noqa: ANN001
    servicer, address = scripted
    servicer.script = [_status(RE, retry_ms=5000)]
    t0 = time.monotonic()
    assert search(address, FAST, timeout=1.0) == RE
    assert time.monotonic() - t0 < 1.0
    assert servicer.calls == 1


@pytest.mark.integration
@CLIENTS
def test_no_retry_policy_sends_once(scripted, search) -> None:  # noqa: ANN001
    servicer, address = scripted
    servicer.script = [_status(UNAVAILABLE)]
    assert search(address, NO_RETRY) == UNAVAILABLE
    assert servicer.calls == 1


# -- the real server -----------------------------------------------------------------------
@pytest.mark.integration
def test_every_method_against_the_real_server(server) -> None:  # noqa: ANN001
    async def main() -> None:
        async with AsyncRetrieverClient(server.address, timeout=30) as c:
            await c.wait_ready(timeout=10)
            assert await c.health() == 1  # SERVING
            ns = await c.create_namespace("aio")
            assert ns.name == "aio"
            assert (await c.get_namespace("aio")).name == "aio"
            docs = [pb.Document(doc_id=f"d{i}.md", path=f"d{i}.md",
                                content=f"# Note {i}\nBread number {i} needs an oven.")
                    for i in range(5)]
            resp = await c.upsert("aio", docs, batch_size=2)
            assert resp.namespace == "aio" and resp.documents_created == 5

            async def stream():  # noqa: ANN202
                yield pb.UpsertDocumentsRequest(namespace="aio", documents=[pb.Document(
                    doc_id="s.md", content="streamed soup recipe")])
            assert (await c.upsert_stream(stream())).documents_created == 1

            got = await c.get_document("aio", "d1.md")
            assert got.document.content.startswith("# Note 1") and got.chunk_ids
            page = await c.list_documents("aio", page_size=4)
            assert len(page.documents) == 4 and page.next_page_token and page.total_size == 6
            hits = (await c.search("aio", "oven bread", top_k=3)).hits
            assert len(hits) == 3 and hits[0].chunk.doc_id.startswith("d")
            chunk = (await c.get_chunk("aio", hits[0].chunk.chunk_id)).chunk
            assert chunk.chunk_id == hits[0].chunk.chunk_id
            batch = await c.batch_search([pb.SearchRequest(namespace="aio", query=q, top_k=2)
                                          for q in ("soup", "bread")])
            assert [r.hits[0].chunk.doc_id for r in batch.responses][0] == "s.md"
            assert "aio" in [n.name for n in await c.namespaces()]
            assert (await c.list_namespaces()).namespaces
            assert (await c.status("aio")).document_count == 6
            assert (await c.delete("aio", ["s.md"])).documents_deleted == 1
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.get_document("aio", "s.md")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.search("aio", "x", top_k=0, timeout=5)
            assert e.value.code() == INVALID
            assert (await c.delete_namespace("aio")).documents_deleted == 5

    asyncio.run(main())


@pytest.mark.integration
def test_bearer_token_and_deadlines(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    st = ServerThread(make_settings(tmp_path, auth_token="s3cret",
                                    query_batch_wait_ms=300), embedder).start()

    async def main() -> None:
        async with AsyncRetrieverClient(st.address) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await anonymous.search("b", "bread")
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await anonymous.health() == 1  # probes need no token
        async with AsyncRetrieverClient(st.address, token="s3cret", timeout=0.05) as c:
            await c.upsert("b", [pb.Document(doc_id="a", content="bread")])
            # The client's default deadline applies to every unary call...
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.search("b", "bread")
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # ...unless the call names its own.
            assert (await c.search("b", "bread", timeout=10)).hits

    try:
        asyncio.run(main())
    finally:
        st.stop()


@pytest.mark.integration
def test_searches_refused_with_retry_info_are_retried(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path, max_inflight_searches=1, query_batch_wait_ms=100)
    st = ServerThread(settings, embedder).start()
    retries: list[tuple] = []

    async def burst(client: AsyncRetrieverClient, n: int) -> list[object]:
        return await asyncio.gather(*(client.search("b", f"bread {i}", top_k=1)
                                      for i in range(n)), return_exceptions=True)

    async def main() -> None:
        async with AsyncRetrieverClient(st.address, retry=NO_RETRY) as once:
            await once.upsert("b", [pb.Document(doc_id="a", content="bread and butter")])
            results = await burst(once, 6)
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert refused and {r.code() for r in refused} == {RE}
        policy = RetryPolicy(max_attempts=10, max_backoff=2.0)
        async with AsyncRetrieverClient(st.address, retry=policy,
                                        on_retry=lambda *a: retries.append(a)) as patient:
            results = await burst(patient, 6)
            assert all(isinstance(r, pb.SearchResponse) for r in results), results

    try:
        asyncio.run(main())
    finally:
        st.stop()
    assert retries and {code for _, code, _, _ in retries} == {RE}
    # RetryInfo asks for 500 ms: no retry came sooner.
    assert min(delay for *_, delay in retries) >= 0.5


def test_async_upsert_takes_an_async_iterable_of_documents(server) -> None:  # noqa: ANN001
    """An async generator of documents cancelled the calling task (CancelledError); it is
    streamed. A non-iterable is a TypeError before any call."""
    async def docs():  # noqa: ANN202
        for i in range(5):
            await asyncio.sleep(0)
            yield pb.Document(doc_id=f"a{i}.md", content=f"async note {i} about rye bread")

    async def main() -> None:
        async with AsyncRetrieverClient(server.address, timeout=30) as c:
            resp = await c.upsert("aio-gen", docs(), batch_size=2)
            assert resp.documents_created == 5
            with pytest.raises(TypeError):
                await c.upsert("aio-gen", 42)  # type: ignore[arg-type]

    asyncio.run(main())


def test_client_side_values_no_field_or_header_can_hold_are_value_errors() -> None:
    """Each reached gRPC or protobuf and came back as a raw ValueError ("Value out of
    range", "cannot convert NaN"), an unpacking error, or INTERNAL "Invalid metadata"."""
    from retriever._requests import chunk_feedback, duration, search_request
    from retriever.client import _headers, _request_id

    with pytest.raises(ValueError, match="32-bit"):
        search_request("ns", "q", top_k=99_999_999_999)
    for bad in (float("nan"), float("inf"), 1e20):
        with pytest.raises(ValueError, match="finite number of seconds"):
            duration(bad)
    with pytest.raises(TypeError, match="not a string"):
        chunk_feedback("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pairs"):
        chunk_feedback([("c", True, "extra")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="request_id must be printable ASCII"):
        _request_id("é")
    with pytest.raises(ValueError, match="token must be printable ASCII"):
        _headers("to\nken", ())
    assert _request_id("req-1") == (("x-request-id", "req-1"),)
