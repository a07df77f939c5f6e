"""The async twin of :mod:`retriever.client`, over ``grpc.aio``.

    async with AsyncRetrieverClient("127.0.0.1:50051") as client:
        await client.upsert("docs", [Document(doc_id="a.md", content="# Hello")])
        for hit in (await client.search("docs", "hello", top_k=5)).hits:
            print(hit.chunk.path, hit.chunk.start_line, hit.score)

Every call has a deadline: ``timeout`` of the call, else the client's (``None`` on the
client means no deadline). Unary calls are retried by :class:`retriever._retry.RetryPolicy`
(UNAVAILABLE, and RESOURCE_EXHAUSTED that carries RetryInfo), never past their deadline;
``retry=NO_RETRY`` turns that off (a load generator wants to see every refusal).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Iterable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retriever._retry import NO_RETRY, AsyncRetryInterceptor, OnRetry, RetryPolicy
from retriever.client import _batched  # grpc.aio streams a plain iterator too
from retriever.v1 import retriever_pb2 as pb
from retriever.v1 import retriever_pb2_grpc as pb_grpc

__all__ = ["NO_RETRY", "AsyncRetrieverClient", "Document", "RetryPolicy", "pb"]

Document = pb.Document
_SERVICE_PREFIX = "/retriever.v1."


class AsyncRetrieverClient:
    def __init__(self, address: str, *, timeout: float | None = 60.0,
                 upsert_timeout: float | None = 3600.0, token: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), on_retry: OnRetry | None = None,  # noqa: B008
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        """``timeout``: default deadline of a unary call, seconds. ``upsert_timeout``: of an
        upsert stream (a bulk index can take long). ``token``: sent as ``authorization:
        Bearer <token>`` on retriever.v1 calls (health stays open). ``on_retry`` is told of
        every retry (method, code, failed attempt, delay)."""
        self.address = address
        self.timeout = timeout
        self.upsert_timeout = upsert_timeout
        interceptors: list[grpc.aio.ClientInterceptor] = []
        if token:
            interceptors += [_BearerUnary(token), _BearerStream(token)]
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
    async def upsert(self, namespace: str, documents: Iterable[pb.Document],
                     batch_size: int = 64, timeout: float | None = None
                     ) -> pb.UpsertDocumentsResponse:
        """Stream documents in batches of ``batch_size`` (one message each). Not retried:
        see :meth:`upsert_stream`."""
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

    async def get_chunk(self, namespace: str, chunk_id: str,
                        timeout: float | None = None) -> pb.GetChunkResponse:
        return await self.stub.GetChunk(
            pb.GetChunkRequest(namespace=namespace, chunk_id=chunk_id), timeout=self._t(timeout))

    # -- search ----------------------------------------------------------------------------
    async def search(self, namespace: str, query: str, top_k: int = 10,
                     filter: pb.SearchFilter | None = None,  # noqa: A002
                     request_id: str | None = None, timeout: float | None = None
                     ) -> pb.SearchResponse:
        md = (("x-request-id", request_id),) if request_id else None
        return await self.stub.Search(
            pb.SearchRequest(namespace=namespace, query=query, top_k=top_k, filter=filter),
            timeout=self._t(timeout), metadata=md)

    async def batch_search(self, requests: Iterable[pb.SearchRequest],
                           timeout: float | None = None) -> pb.BatchSearchResponse:
        return await self.stub.BatchSearch(pb.BatchSearchRequest(requests=list(requests)),
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


def _with_token(details: grpc.aio.ClientCallDetails, header: tuple[str, str]
                ) -> grpc.aio.ClientCallDetails:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    if not method.startswith(_SERVICE_PREFIX):  # health and reflection stay open
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return details._replace(metadata=metadata)


class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self._header), request)


class _BearerStream(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_token(client_call_details, self._header),
                                  request_iterator)
