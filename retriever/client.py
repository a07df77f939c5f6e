"""A small typed client over the generated stubs.

    with RetrieverClient("127.0.0.1:50051") as client:
        client.upsert("docs", [Document(doc_id="a.md", content="# Hello")])
        for hit in client.search("docs", "hello", top_k=5).hits:
            print(hit.chunk.path, hit.chunk.start_line, hit.score)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retriever._retry import NO_RETRY, OnRetry, RetryPolicy, SyncRetryInterceptor
from retriever.v1 import retriever_pb2 as pb
from retriever.v1 import retriever_pb2_grpc as pb_grpc

__all__ = ["NO_RETRY", "Document", "RetrieverClient", "RetryPolicy", "pb"]

Document = pb.Document


class _Default:
    """The type of a default that differs by call (see ``sync_source``)."""


_DEFAULT = _Default()


class RetrieverClient:
    def __init__(self, address: str, *, timeout: float | None = 60.0, token: str | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024,
                 retry: RetryPolicy = NO_RETRY, on_retry: OnRetry | None = None) -> None:
        """``token``: sent as ``authorization: Bearer <token>`` on every retriever.v1 call
        (for servers started with RETRIEVER_AUTH_TOKEN). ``retry``, e.g. ``RetryPolicy()``: retry
        unary calls on UNAVAILABLE and on RESOURCE_EXHAUSTED that carries RetryInfo, never
        past their deadline (retriever/_retry.py); off by default here, upsert streams never."""
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        api_channel = self._channel
        if token:
            api_channel = grpc.intercept_channel(self._channel, _BearerToken(token))
        if retry.max_attempts > 1:
            api_channel = grpc.intercept_channel(api_channel,
                                                 SyncRetryInterceptor(retry, on_retry))
        self.stub = pb_grpc.RetrieverStub(api_channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

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
        import time

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

    def health(self) -> int:
        return self._health.Check(health_pb2.HealthCheckRequest(
            service="retriever.v1.Retriever"), timeout=self.timeout).status

    # -- documents -------------------------------------------------------------------------
    def upsert(self, namespace: str, documents: Iterable[pb.Document],
               batch_size: int = 64) -> pb.UpsertDocumentsResponse:
        """Stream documents in batches of ``batch_size`` (one message each)."""
        return self.upsert_stream(_batched(namespace, documents, batch_size))

    def upsert_stream(self, requests: Iterator[pb.UpsertDocumentsRequest]
                      ) -> pb.UpsertDocumentsResponse:
        return self.stub.UpsertDocuments(requests, timeout=None)

    def delete(self, namespace: str, doc_ids: Iterable[str]) -> pb.DeleteDocumentsResponse:
        return self.stub.DeleteDocuments(
            pb.DeleteDocumentsRequest(namespace=namespace, doc_ids=list(doc_ids)),
            timeout=self.timeout)

    def get_document(self, namespace: str, doc_id: str) -> pb.GetDocumentResponse:
        return self.stub.GetDocument(pb.GetDocumentRequest(namespace=namespace, doc_id=doc_id),
                                     timeout=self.timeout)

    def list_documents(self, namespace: str, page_size: int = 0, page_token: str = "",
                       path_prefix: str = "") -> pb.ListDocumentsResponse:
        return self.stub.ListDocuments(pb.ListDocumentsRequest(
            namespace=namespace, page_size=page_size, page_token=page_token,
            path_prefix=path_prefix), timeout=self.timeout)

    def document_ids(self, namespace: str) -> Iterator[str]:
        """Every doc id of the namespace, page by page (ListDocuments)."""
        token = ""
        while True:
            page = self.list_documents(namespace, page_size=1000, page_token=token)
            yield from (d.doc_id for d in page.documents)
            token = page.next_page_token
            if not token:
                return

    def get_chunk(self, namespace: str, chunk_id: str) -> pb.GetChunkResponse:
        return self.stub.GetChunk(pb.GetChunkRequest(namespace=namespace, chunk_id=chunk_id),
                                  timeout=self.timeout)

    # -- search ----------------------------------------------------------------------------
    def search(self, namespace: str, query: str, top_k: int = 10,
               filter: pb.SearchFilter | None = None,  # noqa: A002
               request_id: str | None = None) -> pb.SearchResponse:
        md = (("x-request-id", request_id),) if request_id else None
        return self.stub.Search(pb.SearchRequest(namespace=namespace, query=query, top_k=top_k,
                                                 filter=filter), timeout=self.timeout,
                                metadata=md)

    def batch_search(self, requests: Iterable[pb.SearchRequest]) -> pb.BatchSearchResponse:
        return self.stub.BatchSearch(pb.BatchSearchRequest(requests=list(requests)),
                                     timeout=self.timeout)

    # -- sources ---------------------------------------------------------------------------
    def sync_source(self, namespace: str, repo: str = "", ref: str = "",
                    include: Iterable[str] = (), exclude: Iterable[str] = (),
                    max_file_bytes: int = 0, *, wait: bool = False,
                    timeout: float | None | _Default = _DEFAULT) -> pb.SyncSourceResponse:
        """Sync ``namespace`` with a git repository (local path under the server's
        RETRIEVER_SYNC_ROOTS, or a URL under RETRIEVER_SYNC_URL_PREFIXES); ``repo`` empty:
        the source it is bound to. Without ``wait`` it returns at once (state RUNNING);
        with it, when the sync has finished. ``timeout``: the call's deadline in seconds;
        by default none with ``wait`` (a sync may be long), else the client's."""
        if isinstance(timeout, _Default):
            timeout = None if wait else self.timeout
        return self.stub.SyncSource(pb.SyncSourceRequest(
            namespace=namespace, repo=repo, ref=ref, include=list(include),
            exclude=list(exclude), max_file_bytes=max_file_bytes, wait=wait), timeout=timeout)

    # -- namespaces and status -------------------------------------------------------------
    def create_namespace(self, name: str, backend: str = "") -> pb.Namespace:
        return self.stub.CreateNamespace(pb.CreateNamespaceRequest(name=name, backend=backend),
                                         timeout=self.timeout).namespace

    def get_namespace(self, name: str) -> pb.Namespace:
        return self.stub.GetNamespace(pb.GetNamespaceRequest(name=name),
                                      timeout=self.timeout).namespace

    def list_namespaces(self, page_size: int = 0, page_token: str = ""
                        ) -> pb.ListNamespacesResponse:
        return self.stub.ListNamespaces(pb.ListNamespacesRequest(
            page_size=page_size, page_token=page_token), timeout=self.timeout)

    def delete_namespace(self, name: str) -> pb.DeleteNamespaceResponse:
        return self.stub.DeleteNamespace(pb.DeleteNamespaceRequest(name=name),
                                         timeout=self.timeout)

    def status(self, namespace: str) -> pb.GetIndexStatusResponse:
        return self.stub.GetIndexStatus(pb.GetIndexStatusRequest(namespace=namespace),
                                        timeout=self.timeout)


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


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._header], details.credentials,
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
