"""Fault injection at each step of the upsert path, with a real server process killed by
SIGKILL there: nothing acknowledged is lost and nothing half-written is visible."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from test_durability import NS, ServerProcess, _assert_consistent, _doc

from retriever.client import RetrieverClient
from retriever.ingest.pipeline import FAULT_POINTS
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration


def _versions(client: RetrieverClient) -> dict[str, int]:
    """Document versions, after checking that every listed document is whole on the dense
    side (_assert_consistent) and on the lexical side: each document's chunks are exactly
    what a lexical search restricted to it finds for its own first words (the terms are
    written with the staged rows, before the commit)."""
    docs = _assert_consistent(client)
    for doc_id, doc in docs.items():
        hits = client.stub.Search(pb.SearchRequest(
            namespace=NS, query=doc.document.content[:200], top_k=100, mode=pb.LEXICAL,
            filter=pb.SearchFilter(doc_ids=[doc_id])), timeout=60).hits
        assert {h.chunk.chunk_id for h in hits} <= set(doc.chunk_ids), doc_id
        assert {h.chunk.document_version for h in hits} == {doc.version}, doc_id
    return {d: r.version for d, r in docs.items()}


def test_a_crash_at_every_step_of_an_upsert_loses_nothing_and_shows_nothing_half_written(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed = ServerProcess(data)
    try:
        with RetrieverClient(seed.address) as c:
            c.upsert(NS, [_doc(i, 1) for i in range(3)])
            expected = _versions(c)
    finally:
        assert seed.terminate() == 0
    assert expected == {"doc-0000.txt": 1, "doc-0001.txt": 1, "doc-0002.txt": 1}

    for step, point in enumerate(FAULT_POINTS):
        server = ServerProcess(data, RETRIEVER_FAULT_POINTS=json.dumps([point]))
        with RetrieverClient(server.address, timeout=120) as c:
            # What the previous crash left is exactly what was acknowledged (or committed).
            assert _versions(c) == expected, f"after a crash at {FAULT_POINTS[step - 1]}"
            # A new version of doc 0 (its chunks change) and a new document, in one message.
            new_version = expected["doc-0000.txt"] + 1
            docs = [_doc(0, new_version), _doc(100 + step, 1)]
            with pytest.raises(grpc.RpcError) as info:
                c.upsert(NS, docs, batch_size=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the process died
        assert server.proc.wait(30) == -9, f"{point}: the server did not die at the point"
        if point == "upsert.after_commit":
            # Committed but never acknowledged: the new versions are whole and visible.
            expected = {**expected, "doc-0000.txt": new_version, docs[1].doc_id: 1}

    final = ServerProcess(data)
    try:
        with RetrieverClient(final.address) as c:
            assert _versions(c) == expected
            hits = c.search(NS, "document 0 version", top_k=50).hits
            assert {h.chunk.document_version for h in hits
                    if h.chunk.doc_id == "doc-0000.txt"} == {expected["doc-0000.txt"]}
            c.upsert(NS, [pb.Document(doc_id="after.txt", content="the service goes on")])
            assert "after.txt" in _versions(c)
    finally:
        assert final.terminate() == 0
