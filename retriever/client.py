"""A small typed client over the generated stubs.

    with RetrieverClient("127.0.0.1:50051") as client:
        client.upsert("docs", [Document(doc_id="a.md", content="# Hello")])
        for hit in client.search("docs", "hello", top_k=5, mode="hybrid", collapse=True).hits:
            print(hit.chunk.path, hit.chunk.start_line, hit.score)

Every call has a deadline: ``timeout`` of the call, else the client's (``None`` on the
client means no deadline). :class:`retriever.aio_client.AsyncRetrieverClient` has the same
methods with the same parameters, awaitable (tests/test_client_surface.py keeps them so).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retriever._requests import DEFAULT as _DEFAULT
from retriever._requests import Feedback, SearchModeLike, Staleness, _Default, search_request
from retriever._requests import evaluate_request as _evaluate_request
from retriever._requests import record_feedback_request as _record_feedback_request
from retriever._requests import register_golden_set_request as _register_golden_set_request
from retriever._requests import sync_source_request as _sync_source_request
from retriever._retry import NO_RETRY, OnRetry, RetryPolicy, SyncRetryInterceptor
from retriever.v1 import retriever_pb2 as pb
from retriever.v1 import retriever_pb2_grpc as pb_grpc

__all__ = ["NO_RETRY", "Document", "GoldenQuery", "RetrieverClient", "RetryPolicy", "pb",
           "search_request"]

Document = pb.Document
GoldenQuery = pb.GoldenQuery


class RetrieverClient:
    def __init__(self, address: str, *, timeout: float | None = 60.0,
                 upsert_timeout: float | None = 3600.0, token: str | None = None,
                 retry: RetryPolicy = NO_RETRY, on_retry: OnRetry | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        """``timeout``: default deadline of a unary call, seconds. ``upsert_timeout``: of an
        upsert stream (a bulk index can take long). ``token``: sent as ``authorization:
        Bearer <token>`` on every retriever.v1 call (for servers started with
        RETRIEVER_AUTH_TOKEN). ``headers``: more (key, value) metadata sent on every
        retriever.v1 call, e.g. who the caller is for a server whose
        ``upsert_peer_header`` names that key (keys lower-case). ``retry``, e.g.
        ``RetryPolicy()``: retry unary calls on UNAVAILABLE and on RESOURCE_EXHAUSTED that
        carries RetryInfo, never past their deadline (retriever/_retry.py); off by default
        here, upsert streams never.
        ``on_retry`` is told of every retry (method, code, failed attempt, delay)."""
        self.address = address
        self.timeout = timeout
        self.upsert_timeout = upsert_timeout
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        api_channel = self._channel
        extra = _headers(token, headers)
        if extra:
            api_channel = grpc.intercept_channel(self._channel, _Headers(extra))
        if retry.max_attempts > 1:
            api_channel = grpc.intercept_channel(api_channel,
                                                 SyncRetryInterceptor(retry, on_retry))
        self.stub = pb_grpc.RetrieverStub(api_channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _t(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RetrieverClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until health says SERVING (the model and indexes are loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = self._health.Check(health_pb2.HealthCheckRequest(
                    service="retriever.v1.Retriever"), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout}s")
            time.sleep(0.2)

    def health(self, timeout: float | None = None) -> int:
        resp = self._health.Check(health_pb2.HealthCheckRequest(
            service="retriever.v1.Retriever"), timeout=self._t(timeout))
        return int(resp.status)

    # -- documents -------------------------------------------------------------------------
    def upsert(self, namespace: str, documents: Iterable[pb.Document],
               batch_size: int = 64, timeout: float | None = None
               ) -> pb.UpsertDocumentsResponse:
        """Stream documents in batches of ``batch_size`` (one message each). Not retried:
        see :meth:`upsert_stream`."""
        return self.upsert_stream(_batched(namespace, documents, batch_size), timeout=timeout)

    def upsert_stream(self, requests: Iterable[pb.UpsertDocumentsRequest],
                      timeout: float | None = None) -> pb.UpsertDocumentsResponse:
        """One client-streaming UpsertDocuments call. It is never retried transparently:
        the request stream is consumed as it is sent and cannot be replayed. Messages
        committed before a failure stay committed (each is a unit), and upserts are
        idempotent, so a caller may resend the whole stream. Deadline: ``timeout``, else
        the client's ``upsert_timeout``."""
        t = self.upsert_timeout if timeout is None else timeout
        return self.stub.UpsertDocuments(iter(requests), timeout=t)

    def delete(self, namespace: str, doc_ids: Iterable[str],
               timeout: float | None = None) -> pb.DeleteDocumentsResponse:
        return self.stub.DeleteDocuments(
            pb.DeleteDocumentsRequest(namespace=namespace, doc_ids=list(doc_ids)),
            timeout=self._t(timeout))

    def get_document(self, namespace: str, doc_id: str,
                     timeout: float | None = None) -> pb.GetDocumentResponse:
        return self.stub.GetDocument(pb.GetDocumentRequest(namespace=namespace, doc_id=doc_id),
                                     timeout=self._t(timeout))

    def list_documents(self, namespace: str, page_size: int = 0, page_token: str = "",
                       path_prefix: str = "", timeout: float | None = None
                       ) -> pb.ListDocumentsResponse:
        return self.stub.ListDocuments(pb.ListDocumentsRequest(
            namespace=namespace, page_size=page_size, page_token=page_token,
            path_prefix=path_prefix), timeout=self._t(timeout))

    def document_ids(self, namespace: str, path_prefix: str = "",
                     timeout: float | None = None) -> Iterator[str]:
        """Every doc id of the namespace (under ``path_prefix``), page by page
        (ListDocuments; ``timeout`` is each page's deadline)."""
        token = ""
        while True:
            page = self.list_documents(namespace, page_size=1000, page_token=token,
                                       path_prefix=path_prefix, timeout=timeout)
            yield from (d.doc_id for d in page.documents)
            token = page.next_page_token
            if not token:
                return

    def get_chunk(self, namespace: str, chunk_id: str,
                  timeout: float | None = None) -> pb.GetChunkResponse:
        return self.stub.GetChunk(pb.GetChunkRequest(namespace=namespace, chunk_id=chunk_id),
                                  timeout=self._t(timeout))

    # -- search ----------------------------------------------------------------------------
    def search(self, namespace: str, query: str, top_k: int = 10,
               filter: pb.SearchFilter | None = None,  # noqa: A002
               request_id: str | None = None, timeout: float | None = None, *,
               mode: SearchModeLike = None, rerank: bool = False,
               dense_weight: float | None = None, rerank_candidates: int = 0,
               collapse: bool = False, min_score: float | None = None,
               max_hits_per_path: int = 0, max_staleness: Staleness | None = None,
               flag_stale: bool = False) -> pb.SearchResponse:
        """Ranked chunks for ``query``. ``request_id`` is sent as ``x-request-id`` (the
        response's ``lineage.request_id``, what :meth:`record_feedback` takes). The options
        are those of :func:`retriever._requests.search_request`: ``mode`` ("dense",
        "lexical", "hybrid" or a SearchMode; unset: the server's default), ``rerank``,
        ``dense_weight``, ``rerank_candidates``, ``collapse`` (one hit per document),
        ``min_score``, ``max_hits_per_path``, ``max_staleness`` (seconds or timedelta) and
        ``flag_stale``; left at their defaults they leave the field unset. ValueError for an
        unknown mode string, before any call."""
        req = search_request(namespace, query, top_k, filter, mode=mode, rerank=rerank,
                             dense_weight=dense_weight, rerank_candidates=rerank_candidates,
                             collapse=collapse, min_score=min_score,
                             max_hits_per_path=max_hits_per_path,
                             max_staleness=max_staleness, flag_stale=flag_stale)
        return self.stub.Search(req, timeout=self._t(timeout), metadata=_request_id(request_id))

    def batch_search(self, requests: Iterable[pb.SearchRequest], timeout: float | None = None,
                     *, request_id: str | None = None) -> pb.BatchSearchResponse:
        """Several searches in one call (build each with :func:`search_request`); answers
        in request order. ``request_id``: one id for the whole batch."""
        return self.stub.BatchSearch(pb.BatchSearchRequest(requests=list(requests)),
                                     timeout=self._t(timeout), metadata=_request_id(request_id))

    # -- sources ---------------------------------------------------------------------------
    def sync_source(self, namespace: str, repo: str = "", ref: str = "",
                    include: Iterable[str] = (), exclude: Iterable[str] = (),
                    max_file_bytes: int = 0, *, wait: bool = False,
                    timeout: float | None | _Default = _DEFAULT) -> pb.SyncSourceResponse:
        """Sync ``namespace`` with a git repository (local path under the server's
        RETRIEVER_SYNC_ROOTS, or a URL under RETRIEVER_SYNC_URL_PREFIXES); ``repo`` empty:
        the source it is bound to. Without ``wait`` it returns at once (state RUNNING);
        with it, when the sync has finished. ``timeout``: the call's deadline in seconds
        (None: none); by default none with ``wait`` (a sync may be long), else the
        client's."""
        if isinstance(timeout, _Default):
            timeout = None if wait else self.timeout
        return self.stub.SyncSource(_sync_source_request(
            namespace, repo, ref, include, exclude, max_file_bytes, wait), timeout=timeout)

    # -- feedback and evaluation -----------------------------------------------------------
    def record_feedback(self, namespace: str, request_id: str, feedback: Feedback,
                        timeout: float | None = None) -> pb.RecordFeedbackResponse:
        """Judge chunks that the search ``request_id`` (its ``lineage.request_id``)
        returned: ``feedback`` maps chunk id -> relevant (or is (chunk id, relevant) pairs
        or ChunkFeedback messages), 1..1000 of them; judging a chunk again replaces its
        verdict. ``namespace`` empty: the one that request searched. NOT_FOUND once the
        server no longer holds the request (it keeps the last feedback_log_size, default
        10000), INVALID_ARGUMENT for a chunk the request did not return."""
        return self.stub.RecordFeedback(
            _record_feedback_request(namespace, request_id, feedback), timeout=self._t(timeout))

    def register_golden_set(self, namespace: str, name: str,
                            queries: Iterable[pb.GoldenQuery] = (), *,
                            from_source_history: pb.GoldenSetFromHistory | None = None,
                            timeout: float | None = None) -> pb.RegisterGoldenSetResponse:
        """Store a golden query set of ``namespace`` under ``name`` (a new version when the
        name exists): either ``queries`` (each with at least one relevant doc id or path),
        or ``from_source_history`` (queries built from the commits of its git source;
        FAILED_PRECONDITION when it has none or was never synced), not both. NOT_FOUND for
        an unknown namespace."""
        return self.stub.RegisterGoldenSet(
            _register_golden_set_request(namespace, name, queries, from_source_history),
            timeout=self._t(timeout))

    def evaluate(self, namespace: str, golden_set: str, k: Iterable[int] = (), *,
                 mode: SearchModeLike = None, version: int = 0, rerank: bool = False,
                 timeout: float | None = None) -> pb.EvaluateResponse:
        """Run a registered golden set (``version`` 0: the latest) through the search path
        in ``mode`` and report precision, recall and nDCG at each of ``k`` (empty: 1, 5,
        10) and MRR, over documents; the run is stored and shown by :meth:`status`. A large
        set may want a ``timeout`` above the client's default."""
        return self.stub.Evaluate(
            _evaluate_request(namespace, golden_set, k, mode, version, rerank),
            timeout=self._t(timeout))

    # -- namespaces and status -------------------------------------------------------------
    def create_namespace(self, name: str, backend: str = "",
                         timeout: float | None = None) -> pb.Namespace:
        return self.stub.CreateNamespace(pb.CreateNamespaceRequest(name=name, backend=backend),
                                         timeout=self._t(timeout)).namespace

    def get_namespace(self, name: str, timeout: float | None = None) -> pb.Namespace:
        return self.stub.GetNamespace(pb.GetNamespaceRequest(name=name),
                                      timeout=self._t(timeout)).namespace

    def list_namespaces(self, page_size: int = 0, page_token: str = "",
                        timeout: float | None = None) -> pb.ListNamespacesResponse:
        return self.stub.ListNamespaces(pb.ListNamespacesRequest(
            page_size=page_size, page_token=page_token), timeout=self._t(timeout))

    def namespaces(self, timeout: float | None = None) -> list[pb.Namespace]:
        """Every namespace, all pages."""
        out: list[pb.Namespace] = []
        token = ""
        while True:
            page = self.list_namespaces(page_token=token, timeout=timeout)
            out.extend(page.namespaces)
            token = page.next_page_token
            if not token:
                return out

    def delete_namespace(self, name: str, timeout: float | None = None
                         ) -> pb.DeleteNamespaceResponse:
        return self.stub.DeleteNamespace(pb.DeleteNamespaceRequest(name=name),
                                         timeout=self._t(timeout))

    def status(self, namespace: str, timeout: float | None = None
               ) -> pb.GetIndexStatusResponse:
        return self.stub.GetIndexStatus(pb.GetIndexStatusRequest(namespace=namespace),
                                        timeout=self._t(timeout))


def _request_id(request_id: str | None) -> tuple[tuple[str, str], ...] | None:
    if not request_id:
        return None
    return (("x-request-id", _header_value("request_id", request_id)),)


def _header_value(name: str, value: str) -> str:
    """``value`` if gRPC can send it as a header value (printable ASCII); else ValueError
    naming ``name`` (gRPC refused it as INTERNAL "Invalid metadata")."""
    if not (value.isascii() and value.isprintable()):
        raise ValueError(f"{name} must be printable ASCII (it is sent as a gRPC header), "
                         f"got {value!r}")
    return value


def _batched(namespace: str, documents: Iterable[pb.Document], size: int
             ) -> Iterator[pb.UpsertDocumentsRequest]:
    batch: list[pb.Document] = []
    for d in documents:
        batch.append(d)
        if len(batch) >= size:
            yield pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)
            batch = []
    if batch:
        yield pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)


def _headers(token: str | None, headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The metadata a client adds to every retriever.v1 call: its bearer token and
    ``headers``; ValueError for a key gRPC would refuse on every call."""
    out = [("authorization", f"Bearer {_header_value('token', token)}")] if token else []
    for key, value in headers:
        if not key or key != key.lower() or key.startswith("grpc-") or key.endswith("-bin"):
            raise ValueError(f"header {key!r}: keys are lower-case, not 'grpc-' reserved and "
                             "not binary ('-bin')")
        out.append((key, _header_value(f"header {key!r}", str(value))))
    return tuple(out)


class _Headers(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self._headers = headers

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), *self._headers], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details,  # noqa: ANN001, ANN201
                               request_iterator):  # noqa: ANN001
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready,  # noqa: ANN001
                 compression) -> None:  # noqa: ANN001
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
