"""The async twin of :mod:`retriever.client`, over ``grpc.aio``: the same methods with the
same parameters, awaitable (``document_ids`` is an async iterator).

    async with AsyncRetrieverClient("127.0.0.1:50051") as client:
        await client.upsert("docs", [Document(doc_id="a.md", content="# Hello")])
        resp = await client.search("docs", "hello", top_k=5, mode="lexical")
        for hit in resp.hits:
            print(hit.chunk.path, hit.chunk.start_line, hit.score)

Every call has a deadline: ``timeout`` of the call, else the client's (``None`` on the
client means no deadline). Unary calls are retried by :class:`retriever._retry.RetryPolicy`
(UNAVAILABLE, and RESOURCE_EXHAUSTED that carries RetryInfo), never past their deadline;
``retry=NO_RETRY`` turns that off (a load generator wants to see every refusal).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retriever._requests import DEFAULT as _DEFAULT
from retriever._requests import Feedback, SearchModeLike, Staleness, _Default, search_request
from retriever._requests import evaluate_request as _evaluate_request
from retriever._requests import record_feedback_request as _record_feedback_request
from retriever._requests import register_golden_set_request as _register_golden_set_request
from retriever._requests import sync_source_request as _sync_source_request
from retriever._retry import NO_RETRY, AsyncRetryInterceptor, OnRetry, RetryPolicy

# _batched: grpc.aio streams a plain iterator too
from retriever.client import _batched, _headers, _request_id
from retriever.v1 import retriever_pb2 as pb
from retriever.v1 import retriever_pb2_grpc as pb_grpc

__all__ = ["NO_RETRY", "AsyncRetrieverClient", "Document", "GoldenQuery", "RetryPolicy", "pb",
           "search_request"]

Document = pb.Document
GoldenQuery = pb.GoldenQuery
_SERVICE_PREFIX = "/retriever.v1."


class AsyncRetrieverClient:
    def __init__(self, address: str, *, timeout: float | None = 60.0,
                 upsert_timeout: float | None = 3600.0, token: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), on_retry: OnRetry | None = None,  # noqa: B008
                 max_message_bytes: int = 64 * 1024 * 1024,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        """``timeout``: default deadline of a unary call, seconds. ``upsert_timeout``: of an
        upsert stream (a bulk index can take long). ``token``: sent as ``authorization:
        Bearer <token>`` on retriever.v1 calls (health stays open). ``headers``: more
        (key, value) metadata sent on every retriever.v1 call (see
        :class:`retriever.client.RetrieverClient`). ``retry``: retry unary
        calls on UNAVAILABLE and on RESOURCE_EXHAUSTED that carries RetryInfo, never past
        their deadline (retriever/_retry.py); on by default here, upsert streams never.
        ``on_retry`` is told of every retry (method, code, failed attempt, delay)."""
        self.address = address
        self.timeout = timeout
        self.upsert_timeout = upsert_timeout
        interceptors: list[grpc.aio.ClientInterceptor] = []
        extra = _headers(token, headers)
        if extra:
            interceptors += [_HeadersUnary(extra), _HeadersStream(extra)]
        if retry.max_attempts > 1:
            interceptors.append(AsyncRetryInterceptor(retry, on_retry))
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ], interceptors=interceptors)
        self.stub = pb_grpc.RetrieverStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _t(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- lifecycle -------------------------------------------------------------------------
    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    async def __aenter__(self) -> AsyncRetrieverClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until health says SERVING (the model and indexes are loaded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(
                    service="retriever.v1.Retriever"), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout}s")
            await asyncio.sleep(0.2)

    async def health(self, timeout: float | None = None) -> int:
        resp = await self._health.Check(health_pb2.HealthCheckRequest(
            service="retriever.v1.Retriever"), timeout=self._t(timeout))
        return int(resp.status)

    # -- documents -------------------------------------------------------------------------
    async def upsert(self, namespace: str,
                     documents: Iterable[pb.Document] | AsyncIterable[pb.Document],
                     batch_size: int = 64, timeout: float | None = None
                     ) -> pb.UpsertDocumentsResponse:
        """Stream documents (an iterable, or an async iterable) in batches of ``batch_size``
        (one message each). Not retried: see :meth:`upsert_stream`."""
        if isinstance(documents, AsyncIterable):
            return await self.upsert_stream(_abatched(namespace, documents, batch_size),
                                            timeout=timeout)
        if not isinstance(documents, Iterable) or isinstance(documents, (str, bytes)):
            raise TypeError(f"documents is an iterable of Document, got {documents!r}")
        return await self.upsert_stream(_batched(namespace, documents, batch_size),
                                        timeout=timeout)

    async def upsert_stream(self, requests: AsyncIterable[pb.UpsertDocumentsRequest]
                            | Iterable[pb.UpsertDocumentsRequest],
                            timeout: float | None = None) -> pb.UpsertDocumentsResponse:
        """One client-streaming UpsertDocuments call. It is never retried transparently:
        the request stream is consumed as it is sent and cannot be replayed. Messages
        committed before a failure stay committed (each is a unit), and upserts are
        idempotent, so a caller may resend the whole stream. Deadline: ``timeout``, else
        the client's ``upsert_timeout``."""
        t = self.upsert_timeout if timeout is None else timeout
        return await self.stub.UpsertDocuments(requests, timeout=t)

    async def delete(self, namespace: str, doc_ids: Iterable[str],
                     timeout: float | None = None) -> pb.DeleteDocumentsResponse:
        return await self.stub.DeleteDocuments(
            pb.DeleteDocumentsRequest(namespace=namespace, doc_ids=list(doc_ids)),
            timeout=self._t(timeout))

    async def get_document(self, namespace: str, doc_id: str,
                           timeout: float | None = None) -> pb.GetDocumentResponse:
        return await self.stub.GetDocument(
            pb.GetDocumentRequest(namespace=namespace, doc_id=doc_id), timeout=self._t(timeout))

    async def list_documents(self, namespace: str, page_size: int = 0, page_token: str = "",
                             path_prefix: str = "", timeout: float | None = None
                             ) -> pb.ListDocumentsResponse:
        return await self.stub.ListDocuments(pb.ListDocumentsRequest(
            namespace=namespace, page_size=page_size, page_token=page_token,
            path_prefix=path_prefix), timeout=self._t(timeout))

    async def document_ids(self, namespace: str, path_prefix: str = "",
                           timeout: float | None = None) -> AsyncIterator[str]:
        """Every doc id of the namespace (under ``path_prefix``), page by page
        (ListDocuments; ``timeout`` is each page's deadline): ``async for``."""
        token = ""
        while True:
            page = await self.list_documents(namespace, page_size=1000, page_token=token,
                                             path_prefix=path_prefix, timeout=timeout)
            for d in page.documents:
                yield d.doc_id
            token = page.next_page_token
            if not token:
                return

    async def get_chunk(self, namespace: str, chunk_id: str,
                        timeout: float | None = None) -> pb.GetChunkResponse:
        return await self.stub.GetChunk(
            pb.GetChunkRequest(namespace=namespace, chunk_id=chunk_id), timeout=self._t(timeout))

    # -- search ----------------------------------------------------------------------------
    async def search(self, namespace: str, query: str, top_k: int = 10,
                     filter: pb.SearchFilter | None = None,  # noqa: A002
                     request_id: str | None = None, timeout: float | None = None, *,
                     mode: SearchModeLike = None, rerank: bool = False,
                     dense_weight: float | None = None, rerank_candidates: int = 0,
                     collapse: bool = False, min_score: float | None = None,
                     max_hits_per_path: int = 0, max_staleness: Staleness | None = None,
                     flag_stale: bool = False) -> pb.SearchResponse:
        """See :meth:`retriever.client.RetrieverClient.search`: the same options, each
        left unset at its default; ValueError for an unknown mode string, before any
        call."""
        req = search_request(namespace, query, top_k, filter, mode=mode, rerank=rerank,
                             dense_weight=dense_weight, rerank_candidates=rerank_candidates,
                             collapse=collapse, min_score=min_score,
                             max_hits_per_path=max_hits_per_path,
                             max_staleness=max_staleness, flag_stale=flag_stale)
        return await self.stub.Search(req, timeout=self._t(timeout),
                                      metadata=_request_id(request_id))

    async def batch_search(self, requests: Iterable[pb.SearchRequest],
                           timeout: float | None = None, *, request_id: str | None = None
                           ) -> pb.BatchSearchResponse:
        """Several searches in one call (build each with :func:`search_request`); answers
        in request order. ``request_id``: one id for the whole batch."""
        return await self.stub.BatchSearch(pb.BatchSearchRequest(requests=list(requests)),
                                           timeout=self._t(timeout),
                                           metadata=_request_id(request_id))

    # -- sources ---------------------------------------------------------------------------
    async def sync_source(self, namespace: str, repo: str = "", ref: str = "",
                          include: Iterable[str] = (), exclude: Iterable[str] = (),
                          max_file_bytes: int = 0, *, wait: bool = False,
                          timeout: float | None | _Default = _DEFAULT
                          ) -> pb.SyncSourceResponse:
        """See :meth:`retriever.client.RetrieverClient.sync_source`. ``timeout``: the
        call's deadline in seconds (None: none); by default none with ``wait`` (a sync may
        be long; cancelling the call stops it between batches), else the client's."""
        if isinstance(timeout, _Default):
            timeout = None if wait else self.timeout
        return await self.stub.SyncSource(_sync_source_request(
            namespace, repo, ref, include, exclude, max_file_bytes, wait), timeout=timeout)

    # -- feedback and evaluation -----------------------------------------------------------
    async def record_feedback(self, namespace: str, request_id: str, feedback: Feedback,
                              timeout: float | None = None) -> pb.RecordFeedbackResponse:
        """See :meth:`retriever.client.RetrieverClient.record_feedback`: ``feedback`` maps
        chunk id -> relevant for hits of the search ``request_id``."""
        return await self.stub.RecordFeedback(
            _record_feedback_request(namespace, request_id, feedback), timeout=self._t(timeout))

    async def register_golden_set(self, namespace: str, name: str,
                                  queries: Iterable[pb.GoldenQuery] = (), *,
                                  from_source_history: pb.GoldenSetFromHistory | None = None,
                                  timeout: float | None = None
                                  ) -> pb.RegisterGoldenSetResponse:
        """See :meth:`retriever.client.RetrieverClient.register_golden_set`: ``queries``
        or ``from_source_history``, not both."""
        return await self.stub.RegisterGoldenSet(
            _register_golden_set_request(namespace, name, queries, from_source_history),
            timeout=self._t(timeout))

    async def evaluate(self, namespace: str, golden_set: str, k: Iterable[int] = (), *,
                       mode: SearchModeLike = None, version: int = 0, rerank: bool = False,
                       timeout: float | None = None) -> pb.EvaluateResponse:
        """See :meth:`retriever.client.RetrieverClient.evaluate`: precision, recall, nDCG
        at each of ``k`` and MRR of a registered golden set, stored as a run."""
        return await self.stub.Evaluate(
            _evaluate_request(namespace, golden_set, k, mode, version, rerank),
            timeout=self._t(timeout))

    # -- namespaces and status -------------------------------------------------------------
    async def create_namespace(self, name: str, backend: str = "",
                               timeout: float | None = None) -> pb.Namespace:
        resp = await self.stub.CreateNamespace(
            pb.CreateNamespaceRequest(name=name, backend=backend), timeout=self._t(timeout))
        return resp.namespace

    async def get_namespace(self, name: str, timeout: float | None = None) -> pb.Namespace:
        resp = await self.stub.GetNamespace(pb.GetNamespaceRequest(name=name),
                                            timeout=self._t(timeout))
        return resp.namespace

    async def list_namespaces(self, page_size: int = 0, page_token: str = "",
                              timeout: float | None = None) -> pb.ListNamespacesResponse:
        return await self.stub.ListNamespaces(pb.ListNamespacesRequest(
            page_size=page_size, page_token=page_token), timeout=self._t(timeout))

    async def namespaces(self, timeout: float | None = None) -> list[pb.Namespace]:
        """Every namespace, all pages."""
        out: list[pb.Namespace] = []
        token = ""
        while True:
            page = await self.list_namespaces(page_token=token, timeout=timeout)
            out.extend(page.namespaces)
            token = page.next_page_token
            if not token:
                return out

    async def delete_namespace(self, name: str, timeout: float | None = None
                               ) -> pb.DeleteNamespaceResponse:
        return await self.stub.DeleteNamespace(pb.DeleteNamespaceRequest(name=name),
                                               timeout=self._t(timeout))

    async def status(self, namespace: str, timeout: float | None = None
                     ) -> pb.GetIndexStatusResponse:
        return await self.stub.GetIndexStatus(pb.GetIndexStatusRequest(namespace=namespace),
                                              timeout=self._t(timeout))


def _with_headers(details: grpc.aio.ClientCallDetails, headers: tuple[tuple[str, str], ...]
                  ) -> grpc.aio.ClientCallDetails:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    if not method.startswith(_SERVICE_PREFIX):  # health and reflection stay open
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *headers)
    return details._replace(metadata=metadata)


class _HeadersUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self._headers = headers

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_headers(client_call_details, self._headers), request)


class _HeadersStream(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self._headers = headers

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_headers(client_call_details, self._headers),
                                  request_iterator)


async def _abatched(namespace: str, documents: AsyncIterable[pb.Document], size: int
                    ) -> AsyncIterator[pb.UpsertDocumentsRequest]:
    batch: list[pb.Document] = []
    async for d in documents:
        batch.append(d)
        if len(batch) >= size:
            yield pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)
            batch = []
    if batch:
        yield pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)
