"""The LangChain and LlamaIndex retrievers against a real server (real model, real index,
a token), sync and async."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from conftest import make_settings, running_server

from retriever.client import RetrieverClient
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

TOKEN = "fw-s3cret"
NS = "frameworks"
CORPUS = {
    "src/retry.py": ('"""Retry helpers."""\nimport random\n\n\n'
                     "def backoff_delay(attempt: int, base: float = 0.1) -> float:\n"
                     '    """Exponential backoff with full jitter before retry number attempt."""\n'
                     "    return random.uniform(0, base * 2 ** attempt)\n"),
    "docs/oven.md": ("# Baking bread\n\nPreheat the oven to 230 degrees. Bake the sourdough "
                     "loaf for 40 minutes until the crust is dark and hollow-sounding.\n"),
    "notes/soup.txt": "Tomato soup: simmer tomatoes with garlic and basil, then blend.\n",
}
QUERY = "exponential backoff with jitter"
LINEAGE_KEYS = {"chunk_id", "doc_id", "path", "start_line", "end_line", "revision", "score",
                "embedder", "embedder_revision", "index_generation", "request_id",
                "staleness_seconds"}


@pytest.fixture(scope="module")
def service(embedder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # noqa: ANN001
    settings = make_settings(tmp_path_factory.mktemp("data"), auth_token=TOKEN)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, token=TOKEN) as client:
        docs = []
        for path, content in CORPUS.items():
            doc = pb.Document(doc_id=path, path=path, content=content, revision="rev-1",
                              metadata={"team": "core" if path.startswith("src") else "docs"})
            doc.source_updated_at.FromDatetime(datetime(2024, 1, 1, tzinfo=UTC))
            docs.append(doc)
        assert client.upsert(NS, docs).documents_created == 3
        expected = client.search(NS, QUERY, top_k=3)
        yield {"address": st.address, "client": client, "expected": expected}


def _check_top(meta: dict[str, Any], text: str, expected: pb.SearchResponse) -> None:
    """The first hit is the chunk the service itself ranks first, with its lineage."""
    want = expected.hits[0].chunk
    assert set(meta) >= LINEAGE_KEYS
    assert meta["chunk_id"] == want.chunk_id and meta["doc_id"] == "src/retry.py"
    assert meta["path"] == "src/retry.py" and meta["revision"] == "rev-1"
    assert (meta["start_line"], meta["end_line"]) == (want.start_line, want.end_line)
    assert text == want.text and "def backoff_delay" in text
    assert meta["score"] > 0 and meta["rank"] == 1
    assert meta["staleness_seconds"] == 0.0
    assert meta["embedder"] == expected.lineage.embedder and "MiniLM" in meta["embedder"]
    assert meta["embedder_revision"] == expected.lineage.embedder_revision
    assert meta["index_generation"] == expected.lineage.index_generation >= 1
    assert meta["request_id"] and meta["request_id"] != expected.lineage.request_id
    assert meta["namespace"] == NS and meta["document_metadata"] == {"team": "core"}


# -- LangChain --------------------------------------------------------------------------------
def test_langchain_invoke_and_ainvoke(service: dict[str, Any]) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from retriever.integrations.langchain import RetrieverServiceRetriever

    retriever = RetrieverServiceRetriever(address=service["address"], namespace=NS, top_k=3,
                                          token=TOKEN)
    docs = retriever.invoke(QUERY)
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    _check_top(docs[0].metadata, docs[0].page_content, service["expected"])
    assert docs[0].id == docs[0].metadata["chunk_id"]
    assert [d.metadata["rank"] for d in docs] == [1, 2, 3]
    assert len({d.metadata["request_id"] for d in docs}) == 1  # one search, one lineage

    async def twice() -> list[list[Document]]:
        try:
            return [await retriever.ainvoke(QUERY), await retriever.ainvoke("sourdough crust")]
        finally:
            await retriever.aclose()

    first, second = asyncio.run(twice())
    _check_top(first[0].metadata, first[0].page_content, service["expected"])
    assert first[0].metadata["request_id"] != docs[0].metadata["request_id"]
    assert second[0].metadata["path"] == "docs/oven.md"
    # A second event loop gets its own channel (a grpc.aio channel is bound to its loop).
    again = asyncio.run(retriever.ainvoke(QUERY))
    assert again[0].metadata["chunk_id"] == docs[0].metadata["chunk_id"]

    # Options travel with the request: filters, mode, collapse.
    narrowed = RetrieverServiceRetriever(
        address=service["address"], namespace=NS, top_k=5, token=TOKEN, mode="lexical",
        path_prefix="docs/", collapse=True)
    found = narrowed.invoke("bake bread in the oven")
    assert [d.metadata["path"] for d in found] == ["docs/oven.md"]
    assert found[0].metadata["mode"] == "lexical"
    by_label = RetrieverServiceRetriever(address=service["address"], namespace=NS, top_k=5,
                                         token=TOKEN, metadata_filter={"team": "core"})
    assert {d.metadata["path"] for d in by_label.invoke("soup")} == {"src/retry.py"}
    retriever.close()


def test_langchain_errors_are_the_services(service: dict[str, Any]) -> None:
    pytest.importorskip("langchain_core")
    from retriever.integrations.langchain import RetrieverServiceRetriever

    missing = RetrieverServiceRetriever(address=service["address"], namespace="nope",
                                        token=TOKEN)
    with pytest.raises(grpc.RpcError) as e:
        missing.invoke("bread")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    anonymous = RetrieverServiceRetriever(address=service["address"], namespace=NS)
    with pytest.raises(grpc.aio.AioRpcError) as ae:
        asyncio.run(anonymous.ainvoke("bread"))
    assert ae.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError):
        RetrieverServiceRetriever(address=service["address"], namespace=NS,
                                  mode="fuzzy")  # type: ignore[arg-type]


# -- LlamaIndex -------------------------------------------------------------------------------
def test_llamaindex_retrieve_and_aretrieve(service: dict[str, Any]) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    from retriever.integrations.llamaindex import RetrieverServiceRetriever

    retriever = RetrieverServiceRetriever(service["address"], NS, top_k=3, token=TOKEN)
    nodes = retriever.retrieve(QUERY)
    assert len(nodes) == 3 and all(isinstance(n, NodeWithScore) for n in nodes)
    top = nodes[0]
    assert isinstance(top.node, TextNode)
    _check_top(top.node.metadata, top.node.get_content(), service["expected"])
    assert top.node.node_id == top.node.metadata["chunk_id"]
    assert top.score == pytest.approx(service["expected"].hits[0].score)
    assert top.node.ref_doc_id == "src/retry.py"  # SOURCE relationship: the document
    # The LLM sees the text with path and lines, not the lineage.
    shown = top.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "path: src/retry.py" in shown and "def backoff_delay" in shown
    assert "request_id" not in shown and "embedder" not in shown

    async def aretrieve() -> list[NodeWithScore]:
        try:
            return await retriever.aretrieve("sourdough crust")
        finally:
            await retriever.aclose()

    anodes = asyncio.run(aretrieve())
    assert anodes[0].node.metadata["path"] == "docs/oven.md"
    assert "sourdough" in anodes[0].node.get_content()
    assert anodes[0].node.metadata["request_id"] != top.node.metadata["request_id"]
    assert anodes[0].node.metadata["staleness_seconds"] == 0.0

    narrowed = RetrieverServiceRetriever(service["address"], NS, top_k=5, token=TOKEN,
                                         languages=["python"], mode="dense")
    assert {n.node.metadata["path"] for n in narrowed.retrieve("tomato")} == {"src/retry.py"}
    with pytest.raises(grpc.RpcError) as e:
        RetrieverServiceRetriever(service["address"], "nope", token=TOKEN).retrieve("bread")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    retriever.close()
