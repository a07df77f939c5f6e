"""Moves: an upsert whose document names ``moved_from`` replaces that document in one commit.

What a git rename becomes in a sync (test_sync drives it through a repository): the moved
document's versions continue under its new id, its chunks go in the same commit, and the
vectors of embedded texts that did not change are reused instead of embedded again. Real
model, real FAISS, real lexical index, real SQLite catalog."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import make_settings

from retriever.client import RetrieverClient
from retriever.domain import DocStatus, Document, SearchMode, SearchQuery
from retriever.errors import InvalidArgument, NotFound
from retriever.server.app import ServerThread
from retriever.service import RetrieverService
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

def _function(name: str, doc: str) -> str:
    steps = "".join(f"    step_{i} = {name}_stage({i}, dough)  # {doc} stage {i}\n"
                    for i in range(14))
    return f'def {name}(dough):\n    """{doc}"""\n{steps}    return dough\n\n\n'


# Three definitions, each too big to share a chunk with another (each its own chunk)
_CODE = (_function("knead_dough", "Mix flour and water into a dough; knead it until smooth.")
         + _function("proof_overnight", "Leave the dough to rise in a cold place overnight.")
         + _function("bake_loaf", "Bake the loaf in a hot oven until the crust is brown."))


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[RetrieverService]:  # noqa: ANN001
    service = RetrieverService(make_settings(tmp_path_factory.mktemp("moves")),
                               embedder=embedder)
    service.start()
    try:
        yield service
    finally:
        service.close()


def _ids(svc: RetrieverService, ns: str, query: str, mode: SearchMode) -> set[str]:
    hits = svc.search(SearchQuery(namespace=ns, query=query, top_k=20, mode=mode), "t").hits
    return {h.chunk.doc_id for h in hits}


def _consistent(svc: RetrieverService, ns: str) -> None:
    status = svc.index_status(ns)
    assert status.vector_count == status.namespace.chunk_count


def test_a_move_continues_the_document_under_its_new_id(svc: RetrieverService) -> None:
    ns = "move-new"
    svc.upsert(ns, [Document(doc_id="src/bake.py", path="src/bake.py", content=_CODE)])
    edited = _CODE.replace("flour and water", "flour and warm water")
    svc.upsert(ns, [Document(doc_id="src/bake.py", path="src/bake.py", content=edited)])
    before = svc.get_document(ns, "src/bake.py")
    assert before.version == 2

    result = svc.upsert(ns, [Document(doc_id="lib/bake.py", path="lib/bake.py", content=edited,
                                      moved_from="src/bake.py")])
    r = result.results[0]
    assert (r.doc_id, r.status, r.moved_from) == ("lib/bake.py", DocStatus.UPDATED,
                                                  "src/bake.py")
    assert r.version == 3  # its history goes on
    assert result.chunks_deleted == before.chunk_count
    # The path is in every embedded header: every chunk's embedded text changed.
    assert r.chunks_embedded == r.chunk_count and r.chunks_reused == 0
    with pytest.raises(NotFound):
        svc.get_document(ns, "src/bake.py")
    after = svc.get_document(ns, "lib/bake.py")
    assert (after.path, after.content, after.version) == ("lib/bake.py", edited, 3)
    for mode in (SearchMode.DENSE, SearchMode.LEXICAL):
        assert _ids(svc, ns, "knead the dough until smooth", mode) == {"lib/bake.py"}, mode
    assert svc.index_status(ns).namespace.document_count == 1
    _consistent(svc, ns)


def test_embedded_texts_that_stay_the_same_are_not_embedded_again(
        svc: RetrieverService) -> None:
    """A long path is cut from the left in the header: a move that changes only its leading
    directories leaves every embedded text as it was, and nothing is embedded."""
    ns = "move-reuse"
    deep = "/".join(f"level{i}" for i in range(16)) + "/bake.py"
    old, new = f"old/{deep}", f"new/{deep}"
    first = svc.upsert(ns, [Document(doc_id=old, path=old, content=_CODE)]).results[0]
    assert first.chunks_embedded == first.chunk_count >= 2
    moved = svc.upsert(ns, [Document(doc_id=new, path=new, content=_CODE, moved_from=old)])
    r = moved.results[0]
    assert (r.moved_from, r.version, r.chunk_count) == (old, 2, first.chunk_count)
    assert (r.chunks_embedded, r.chunks_reused) == (0, r.chunk_count)
    # ... and the vectors it carried over find it as before.
    assert _ids(svc, ns, "leave the dough to rise overnight", SearchMode.DENSE) == {new}
    _consistent(svc, ns)

    # An edit in the same move re-embeds only the chunks next to the edit (the edited
    # statement's piece of bake_loaf, and at most its neighbour when a content-defined cut
    # moved): the other functions' chunks are reused.
    edited = _CODE.replace("step_13 = bake_loaf_stage(13", "step_13 = bake_loaf_stage(99")
    back = svc.upsert(ns, [Document(doc_id=old, path=old, content=edited, moved_from=new)])
    b = back.results[0]
    assert b.version == 3 and 1 <= b.chunks_embedded <= 2, (b.chunks_embedded, r.chunk_count)
    assert b.chunks_reused == b.chunk_count - b.chunks_embedded >= r.chunk_count - 2
    _consistent(svc, ns)


def test_a_move_onto_an_existing_document_keeps_that_ones_history(
        svc: RetrieverService) -> None:
    ns = "move-onto"
    svc.upsert(ns, [Document(doc_id="a.py", content=_CODE)])
    for i in range(3):
        svc.upsert(ns, [Document(doc_id="b.py", content=f"VALUE = {i}\n")])
    r = svc.upsert(ns, [Document(doc_id="b.py", content=_CODE, moved_from="a.py")]).results[0]
    assert (r.status, r.version, r.moved_from) == (DocStatus.UPDATED, 4, "a.py")
    with pytest.raises(NotFound):
        svc.get_document(ns, "a.py")
    # Unchanged target: the source still goes.
    svc.upsert(ns, [Document(doc_id="c.py", content="OTHER = 1\n")])
    r = svc.upsert(ns, [Document(doc_id="b.py", content=_CODE, moved_from="c.py")]).results[0]
    assert (r.status, r.moved_from, r.chunks_embedded) == (DocStatus.UNCHANGED, "c.py", 0)
    with pytest.raises(NotFound):
        svc.get_document(ns, "c.py")
    assert svc.index_status(ns).namespace.document_count == 1
    _consistent(svc, ns)


def test_a_move_from_a_missing_document_is_a_plain_upsert(svc: RetrieverService) -> None:
    ns = "move-missing"
    r = svc.upsert(ns, [Document(doc_id="x.py", content=_CODE, moved_from="nowhere.py")]
                   ).results[0]
    assert (r.status, r.version, r.moved_from) == (DocStatus.CREATED, 1, "")


@pytest.mark.parametrize(("docs", "field", "says"), [
    ([Document(doc_id="a", content="x", moved_from="a")], "documents[0].moved_from",
     "itself a document of this message"),
    ([Document(doc_id="a", content="x"), Document(doc_id="b", content="y", moved_from="a")],
     "documents[1].moved_from", "itself a document of this message"),
    ([Document(doc_id="a", content="x", moved_from="z"),
      Document(doc_id="b", content="y", moved_from="z")], "documents[1].moved_from",
     "appears twice"),
    ([Document(doc_id="a", content="x", moved_from="bad\x00id")], "documents[0].moved_from",
     "without NUL"),
])
def test_bad_moves_are_invalid(svc: RetrieverService, docs: list[Document], field: str,
                               says: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        svc.upsert("move-bad", docs)
    assert e.value.field == field and says in str(e.value)


def test_a_move_that_fails_in_its_commit_changes_nothing(svc: RetrieverService,
                                                          tmp_path: Path) -> None:
    """The removal of the old document and the write of the new one are one transaction:
    the catalog refusing the write (here a trigger raising in SQLite) leaves the old one
    whole and searchable, and nothing of the new one behind."""
    ns = "move-fault"
    svc.upsert(ns, [Document(doc_id="old.py", content=_CODE)])
    db = sqlite3.connect(svc.settings.data_dir / "catalog.sqlite3")
    db.execute("CREATE TRIGGER refuse_new BEFORE INSERT ON documents WHEN new.doc_id = 'new.py'"
               " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    db.commit()
    try:
        with pytest.raises(Exception, match="refused by the test"):
            svc.upsert(ns, [Document(doc_id="new.py", content=_CODE, moved_from="old.py")])
    finally:
        db.execute("DROP TRIGGER refuse_new")
        db.commit()
        db.close()
    assert svc.get_document(ns, "old.py").content == _CODE
    with pytest.raises(NotFound):
        svc.get_document(ns, "new.py")
    assert _ids(svc, ns, "knead the dough", SearchMode.LEXICAL) == {"old.py"}
    _consistent(svc, ns)
    # Once the catalog takes it, the same move goes through.
    r = svc.upsert(ns, [Document(doc_id="new.py", content=_CODE, moved_from="old.py")])
    assert r.results[0].moved_from == "old.py"
    assert _ids(svc, ns, "knead the dough", SearchMode.LEXICAL) == {"new.py"}
    _consistent(svc, ns)


def test_a_move_through_the_api(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    st = ServerThread(make_settings(tmp_path), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("api", [pb.Document(doc_id="docs/a.md", content="# Bread\n\nKnead it.\n")])
            resp = c.upsert("api", [pb.Document(doc_id="docs/b.md",
                                                content="# Bread\n\nKnead it.\n",
                                                moved_from="docs/a.md")])
            assert (resp.documents_updated, resp.documents_created) == (1, 0)
            r = resp.results[0]
            assert (r.moved_from, r.version, r.status) == ("docs/a.md", 2,
                                                           pb.DocumentResult.UPDATED)
            assert [d.doc_id for d in c.list_documents("api").documents] == ["docs/b.md"]
            with pytest.raises(grpc.RpcError) as e:
                c.upsert("api", [pb.Document(doc_id="x", content="y", moved_from="x")])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "moved_from" in e.value.details()
    finally:
        st.stop()
