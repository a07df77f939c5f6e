"""A LangChain retriever over a running retriever service.

    from retriever.integrations.langchain import RetrieverServiceRetriever

    retriever = RetrieverServiceRetriever(address="127.0.0.1:50051", namespace="code",
                                          top_k=5, mode="hybrid", path_prefix="src/")
    docs = retriever.invoke("where are retries configured?")
    docs = await retriever.ainvoke("where are retries configured?")

Each hit is a ``Document`` whose ``page_content`` is the chunk's text, whose ``id`` is the
chunk id, and whose ``metadata`` carries the chunk's identity and the response's lineage
(see :func:`retriever.integrations._common.hit_record`): chunk_id, doc_id, path,
start_line, end_line, revision, score, rank, staleness_seconds, request_id, embedder,
embedder_revision, index_generation, backend... Sync calls go through
:class:`retriever.client.RetrieverClient`, async ones through
:class:`retriever.aio_client.AsyncRetrieverClient`; gRPC errors propagate as
``grpc.RpcError``.
"""

from __future__ import annotations

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("the LangChain retriever needs the langchain extra: "
                      "pip install 'retriever[langchain]'") from exc
from pydantic import Field, PrivateAttr, SecretStr

from retriever.integrations._common import Mode, Searcher, SearchOptions, hit_record
from retriever.v1 import retriever_pb2 as pb

__all__ = ["RetrieverServiceRetriever", "to_documents"]


def to_documents(resp: pb.SearchResponse) -> list[Document]:
    """The hits of a SearchResponse as LangChain documents, in rank order."""
    return [Document(page_content=h.chunk.text, id=h.chunk.chunk_id,
                     metadata=hit_record(h, resp.lineage)) for h in resp.hits]


class RetrieverServiceRetriever(BaseRetriever):
    """Search one namespace of a retriever service (``retriever.v1.Retriever/Search``)."""

    address: str = Field(description="host:port of the service")
    namespace: str
    top_k: int = 10
    mode: Mode | None = Field(default=None, description="None: the service's default")
    path_prefix: str = ""
    languages: list[str] = Field(default_factory=list)
    kinds: list[str] = Field(default_factory=list)
    doc_ids: list[str] = Field(default_factory=list)
    metadata_filter: dict[str, str] = Field(
        default_factory=dict, description="only documents with all these metadata labels")
    rerank: bool = False
    collapse: bool = False
    min_score: float | None = None
    token: SecretStr | None = Field(default=None, description="RETRIEVER_AUTH_TOKEN of the service")
    timeout: float = Field(default=60.0, description="deadline of each search, seconds")

    _searcher: Searcher | None = PrivateAttr(default=None)

    def _options(self) -> SearchOptions:
        return SearchOptions(
            namespace=self.namespace, top_k=self.top_k, mode=self.mode,
            path_prefix=self.path_prefix, languages=self.languages, kinds=self.kinds,
            doc_ids=self.doc_ids, metadata=self.metadata_filter, rerank=self.rerank,
            collapse=self.collapse, min_score=self.min_score)

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            self._searcher = Searcher(
                self.address, timeout=self.timeout,
                token=self.token.get_secret_value() if self.token is not None else None)
        return self._searcher

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return to_documents(self.searcher.search(self._options().request(query)))

    async def _aget_relevant_documents(
            self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
    ) -> list[Document]:
        return to_documents(await self.searcher.asearch(self._options().request(query)))

    def close(self) -> None:
        """Close the sync client's channel (the next call opens a new one)."""
        if self._searcher is not None:
            self._searcher.close()

    async def aclose(self) -> None:
        """Close the async client's channel of the running event loop."""
        if self._searcher is not None:
            await self._searcher.aclose()
