"""A LlamaIndex retriever over a running retriever service.

    from retriever.integrations.llamaindex import RetrieverServiceRetriever

    retriever = RetrieverServiceRetriever("127.0.0.1:50051", "code", top_k=5, mode="hybrid")
    nodes = retriever.retrieve("where are retries configured?")
    nodes = await retriever.aretrieve("where are retries configured?")
    # or as the retriever of a query engine:
    # RetrieverQueryEngine.from_args(retriever, llm=...)

Each hit is a ``NodeWithScore`` (score = the hit's score) around a ``TextNode`` whose
``id_`` is the chunk id, whose text is the chunk's text, whose SOURCE relationship is the
document (doc_id), and whose ``metadata`` carries the chunk's identity and the response's
lineage (see :func:`retriever.integrations._common.hit_record`). Only path and lines are
shown to the LLM and to embedders (``excluded_*_metadata_keys``): the rest is for tracing
and citing. Sync calls go through :class:`retriever.client.RetrieverClient`, async ones
through :class:`retriever.aio_client.AsyncRetrieverClient`; gRPC errors propagate as
``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.schema import (
        NodeRelationship,
        NodeWithScore,
        QueryBundle,
        RelatedNodeInfo,
        TextNode,
    )
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("the LlamaIndex retriever needs the llamaindex extra: "
                      "pip install 'retriever[llamaindex]'") from exc

from retriever.integrations._common import Mode, Searcher, SearchOptions, hit_record
from retriever.v1 import retriever_pb2 as pb

__all__ = ["RetrieverServiceRetriever", "to_nodes"]

# Shown to an LLM with the text; everything else stays in metadata only.
_SHOWN = ("path", "start_line", "end_line")


def to_nodes(resp: pb.SearchResponse) -> list[NodeWithScore]:
    """The hits of a SearchResponse as scored LlamaIndex nodes, in rank order."""
    out = []
    for h in resp.hits:
        meta = hit_record(h, resp.lineage)
        hidden = [k for k in meta if k not in _SHOWN]
        node = TextNode(
            id_=h.chunk.chunk_id, text=h.chunk.text, metadata=meta,
            excluded_llm_metadata_keys=hidden, excluded_embed_metadata_keys=hidden,
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(
                node_id=h.chunk.doc_id, hash=h.chunk.document_hash or None,
                metadata={"path": h.chunk.path, "revision": h.chunk.revision})})
        out.append(NodeWithScore(node=node, score=float(h.score)))
    return out


class RetrieverServiceRetriever(BaseRetriever):
    """Search one namespace of a retriever service (``retriever.v1.Retriever/Search``)."""

    def __init__(self, address: str, namespace: str, *, top_k: int = 10,
                 mode: Mode | None = None, path_prefix: str = "",
                 languages: Iterable[str] = (), kinds: Iterable[str] = (),
                 doc_ids: Iterable[str] = (), metadata_filter: Mapping[str, str] | None = None,
                 rerank: bool = False, collapse: bool = False, min_score: float | None = None,
                 token: str | None = None, timeout: float = 60.0,
                 callback_manager: CallbackManager | None = None, verbose: bool = False,
                 **kwargs: Any) -> None:
        """``mode``: "dense", "lexical" or "hybrid" (None: the service's default).
        ``metadata_filter``: only documents with all these metadata labels. ``token``: the
        service's RETRIEVER_AUTH_TOKEN. ``timeout``: deadline of each search, seconds."""
        self.options = SearchOptions(
            namespace=namespace, top_k=top_k, mode=mode, path_prefix=path_prefix,
            languages=list(languages), kinds=list(kinds), doc_ids=list(doc_ids),
            metadata=dict(metadata_filter or {}), rerank=rerank, collapse=collapse,
            min_score=min_score)
        self.options.request("")  # a bad mode fails here, not at the first search
        self.searcher = Searcher(address, token=token, timeout=timeout)
        super().__init__(callback_manager=callback_manager, verbose=verbose, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return to_nodes(self.searcher.search(self.options.request(query_bundle.query_str)))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return to_nodes(
            await self.searcher.asearch(self.options.request(query_bundle.query_str)))

    def close(self) -> None:
        """Close the sync client's channel (the next call opens a new one)."""
        self.searcher.close()

    async def aclose(self) -> None:
        """Close the async client's channel of the running event loop."""
        await self.searcher.aclose()
