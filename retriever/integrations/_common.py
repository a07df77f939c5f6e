"""What the integrations share: one SearchRequest from plain options, one flat record per hit
and per lineage, and a searcher that holds the typed clients (sync and async)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Literal

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from retriever._retry import RetryPolicy
from retriever.aio_client import AsyncRetrieverClient
from retriever.client import RetrieverClient
from retriever.v1 import retriever_pb2 as pb

__all__ = ["MODES", "Mode", "SearchOptions", "Searcher", "hit_record", "lineage_record",
           "search_request"]

Mode = Literal["dense", "lexical", "hybrid"]
MODES: dict[str, pb.SearchMode] = {"dense": pb.DENSE, "lexical": pb.LEXICAL, "hybrid": pb.HYBRID}


def search_request(namespace: str, query: str, *, top_k: int = 10, mode: str | None = None,
                   path_prefix: str = "", languages: Iterable[str] = (),
                   kinds: Iterable[str] = (), doc_ids: Iterable[str] = (),
                   metadata: Mapping[str, str] | None = None, rerank: bool = False,
                   collapse: bool = False, min_score: float | None = None) -> pb.SearchRequest:
    """A SearchRequest; ``mode`` None or "" leaves the server's default. The server validates
    the rest (limits, names) and answers INVALID_ARGUMENT with the field at fault."""
    if mode and mode.lower() not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    flt = pb.SearchFilter(path_prefix=path_prefix, languages=list(languages),
                          kinds=list(kinds), doc_ids=list(doc_ids), metadata=dict(metadata or {}))
    req = pb.SearchRequest(namespace=namespace, query=query, top_k=top_k, filter=flt,
                           mode=MODES[mode.lower()] if mode else pb.SEARCH_MODE_UNSPECIFIED,
                           rerank=rerank, collapse=collapse)
    if min_score is not None:
        req.min_score = min_score
    return req


def timestamp_iso(message: Any, name: str) -> str | None:
    """The Timestamp field ``name`` of ``message`` in RFC 3339 (UTC), None when unset."""
    if not message.HasField(name):
        return None
    ts: Timestamp = getattr(message, name)
    return ts.ToDatetime(tzinfo=UTC).isoformat()


def seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def lineage_record(lineage: pb.Lineage) -> dict[str, Any]:
    """Which request, models and index produced a response (SearchResponse.lineage)."""
    return {
        "request_id": lineage.request_id,
        "namespace": lineage.namespace,
        "embedder": lineage.embedder,
        "embedder_revision": lineage.embedder_revision,
        "reranker": lineage.reranker,
        "reranker_revision": lineage.reranker_revision,
        "backend": lineage.backend,
        "index_generation": int(lineage.index_generation),
        "index_version": int(lineage.index_version),
        "mode": pb.SearchMode.Name(lineage.mode).lower() if lineage.mode else "",
        "device": lineage.device,
    }


def chunk_record(chunk: pb.Chunk) -> dict[str, Any]:
    """A chunk's identity, span and provenance (text excluded)."""
    return {
        "chunk_id": chunk.chunk_id,
        "doc_id": chunk.doc_id,
        "path": chunk.path,
        "start_line": int(chunk.start_line),
        "end_line": int(chunk.end_line),
        "revision": chunk.revision,
        "document_version": int(chunk.document_version),
        "content_hash": chunk.content_hash,
        "language": chunk.language,
        "kind": chunk.kind,
        "symbol": chunk.symbol,
        "indexed_at": timestamp_iso(chunk, "indexed_at"),
        "source_updated_at": timestamp_iso(chunk, "source_updated_at"),
    }


def hit_record(hit: pb.Hit, lineage: pb.Lineage) -> dict[str, Any]:
    """One hit as flat metadata: chunk identity, score, staleness and the response's lineage.
    ``staleness_seconds`` is None when the document's source time is unknown."""
    return {
        **chunk_record(hit.chunk),
        "score": float(hit.score),
        "rank": int(hit.rank),
        "staleness_seconds": seconds(hit.staleness) if hit.HasField("staleness") else None,
        **{k: v for k, v in lineage_record(lineage).items() if k != "device"},
        "document_metadata": dict(hit.chunk.metadata),
    }


@dataclass
class SearchOptions:
    """What every search of a framework retriever sends besides the query."""

    namespace: str
    top_k: int = 10
    mode: str | None = None
    path_prefix: str = ""
    languages: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    rerank: bool = False
    collapse: bool = False
    min_score: float | None = None

    def request(self, query: str) -> pb.SearchRequest:
        return search_request(
            self.namespace, query, top_k=self.top_k, mode=self.mode,
            path_prefix=self.path_prefix, languages=self.languages, kinds=self.kinds,
            doc_ids=self.doc_ids, metadata=self.metadata, rerank=self.rerank,
            collapse=self.collapse, min_score=self.min_score)


class Searcher:
    """Searches over the typed clients, made on first use: one sync client, and one async
    client per event loop (a ``grpc.aio`` channel belongs to the loop it was made on).
    Both retry UNAVAILABLE and RESOURCE_EXHAUSTED-with-RetryInfo (retriever/_retry.py)."""

    def __init__(self, address: str, *, token: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = None) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout
        self.retry = RetryPolicy() if retry is None else retry
        self._client: RetrieverClient | None = None
        self._aio: tuple[asyncio.AbstractEventLoop, AsyncRetrieverClient] | None = None

    @property
    def client(self) -> RetrieverClient:
        if self._client is None:
            self._client = RetrieverClient(self.address, timeout=self.timeout, token=self.token,
                                           retry=self.retry)
        return self._client

    def aio_client(self) -> AsyncRetrieverClient:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            self._aio = (loop, AsyncRetrieverClient(self.address, timeout=self.timeout,
                                                    token=self.token, retry=self.retry))
        return self._aio[1]

    def search(self, request: pb.SearchRequest) -> pb.SearchResponse:
        # Through the client's stub: same channel, token and retries as client.search(),
        # with the fields (mode, rerank, collapse) that its convenience signature lacks.
        client = self.client
        return client.stub.Search(request, timeout=client.timeout)

    async def asearch(self, request: pb.SearchRequest) -> pb.SearchResponse:
        client = self.aio_client()
        return await client.stub.Search(request, timeout=client.timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        if self._aio is not None and self._aio[0] is asyncio.get_running_loop():
            await self._aio[1].close()
        self._aio = None
