"""The service behaves the same on every index backend: the same filters (pushed down into
the engine) give the same hits, and a document's payload follows its metadata.

One real server per backend (FAISS, milvus-lite, embedded Chroma), real model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import (
    LOST_DOC,
    assert_engine_down_refuses,
    assert_rebuilt_from_catalog,
    engine_docs,
    make_settings,
    running_server,
    when_served,
)
from test_durability import ServerProcess, _free_port

from indexers import BACKENDS
from retriever.cancel import CallToken
from retriever.catalog import Catalog
from retriever.client import RetrieverClient
from retriever.models.embedder import Embedder
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

DOCS = [
    ("a", "src/app.py", "def parse_config(path):\n    return open(path).read()\n",
     {"team": "core", "tier": "1"}),
    ("b", "src/app/main.py", "def main():\n    print(parse_config('app.toml'))\n",
     {"team": "web"}),
    ("c", "src/apple.py", "class Apple:\n    colour = 'red'\n", {"team": "core"}),
    ("d", "docs/guide.md", "# Guide\n\nHow to parse the config file.\n", {"team": "docs"}),
    ("e", "docs/日本語.md", "# 設定\n\n設定ファイルを読む。\n", {"team": "docs", "tier": "2"}),
    ("f", "README.md", "# Project\n\nParses configuration files quickly.\n", {}),
]


def _seed(settings: object, embedder: Embedder,
          namespaces: dict[str, tuple[str, str, str]]) -> None:
    """Start a server, give each namespace (on its backend, "" for the default) one
    document (doc id, text), and stop it."""
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as c:  # type: ignore[arg-type]
        for ns, (backend, doc_id, text) in namespaces.items():
            if backend:
                c.create_namespace(ns, backend=backend)
            c.upsert(ns, [pb.Document(doc_id=doc_id, content=text)])


def _docs() -> list[pb.Document]:
    return [pb.Document(doc_id=d, path=p, content=c, metadata=m) for d, p, c, m in DOCS]


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   embedder: Embedder) -> Iterator[tuple[str, RetrieverClient]]:
    data = tmp_path_factory.mktemp(f"svc-{request.param}")
    # A top_k whose shaped over-fetch (8x + 8 = 16808) is past Milvus's 16384 cap.
    settings = make_settings(data, index_backend=request.param, max_top_k=2100)
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
        client.upsert("ns", _docs())
        yield request.param, client


FILTERS: list[tuple[pb.SearchFilter, set[str]]] = [
    (pb.SearchFilter(), {"a", "b", "c", "d", "e", "f"}),
    (pb.SearchFilter(doc_ids=["a", "d", "zz"]), {"a", "d"}),
    (pb.SearchFilter(path_prefix="src/app"), {"a", "b", "c"}),
    (pb.SearchFilter(path_prefix="src/app/"), {"b"}),
    (pb.SearchFilter(path_prefix="docs/日"), {"e"}),
    (pb.SearchFilter(path_prefix="%"), set()),
    (pb.SearchFilter(languages=["markdown"]), {"d", "e", "f"}),
    (pb.SearchFilter(metadata={"team": "core"}), {"a", "c"}),
    (pb.SearchFilter(metadata={"team": "docs", "tier": "2"}), {"e"}),
    (pb.SearchFilter(metadata={"tier": ""}), set()),
    (pb.SearchFilter(path_prefix="src/", metadata={"team": "core"}, doc_ids=["c", "b"]),
     {"c"}),
]


@pytest.mark.parametrize("flt,want", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_the_same_filter_gives_the_same_hits_on_every_backend(
        backend_client: tuple[str, RetrieverClient], flt: pb.SearchFilter,
        want: set[str]) -> None:
    name, client = backend_client
    resp = client.search("ns", "parse the config file", top_k=50, filter=flt)
    assert {h.chunk.doc_id for h in resp.hits} == want, name
    assert resp.lineage.backend == name


@pytest.mark.parametrize("mode", [pb.DENSE, pb.HYBRID])
def test_a_wide_shaped_search_asks_the_engine_for_no_more_than_it_answers(
        backend_client: tuple[str, RetrieverClient], mode: int) -> None:
    """Collapsing and min_score over-fetch candidates (top_k x 8, then x 4 while short):
    past an engine's limit (Milvus: 16384 per query) the ask is capped, never INTERNAL."""
    name, client = backend_client
    for shaping in ({"collapse": True}, {"min_score": -1.0}, {"collapse": True,
                                                               "min_score": -1.0}):
        resp = client.stub.Search(pb.SearchRequest(
            namespace="ns", query="parse the config file", top_k=2100, mode=mode,
            **shaping), timeout=60)  # type: ignore[arg-type]
        got = {h.chunk.doc_id for h in resp.hits}
        # Dense: every document's cosine is at least -1. Hybrid's fused scores are on a
        # standardized scale, which goes below -1.
        assert got == {"a", "b", "c", "d", "e", "f"} if mode == pb.DENSE else got, (
            name, shaping, got)


def test_a_metadata_change_moves_the_payload_and_keeps_chunk_identity(
        backend_client: tuple[str, RetrieverClient]) -> None:
    name, client = backend_client
    doc = pb.Document(doc_id="m", path="lib/m.py", content="def moved():\n    return 1\n",
                      metadata={"stage": "old"})
    client.upsert("meta", [doc])
    before = client.get_document("meta", "m")
    doc.metadata["stage"] = "new"
    resp = client.upsert("meta", [doc])
    assert resp.results[0].status == pb.DocumentResult.UNCHANGED
    after = client.get_document("meta", "m")
    assert list(after.chunk_ids) == list(before.chunk_ids)  # identity is the content's

    def hits(stage: str) -> set[str]:
        r = client.search("meta", "moved", top_k=5,
                          filter=pb.SearchFilter(metadata={"stage": stage}))
        return {h.chunk.chunk_id for h in r.hits}

    assert hits("new") == set(after.chunk_ids), name
    assert hits("old") == set()
    # Content and metadata change together: kept chunks follow the new metadata too.
    doc.content += "\n\ndef added():\n    return 2\n"
    doc.metadata["stage"] = "newer"
    client.upsert("meta", [doc])
    latest = client.get_document("meta", "m")
    assert hits("newer") == set(latest.chunk_ids)
    assert hits("new") == set()
    status = client.status("meta")
    assert status.chunk_count == status.vector_count == len(latest.chunk_ids)


def test_payloads_follow_metadata_through_a_sigkill(tmp_path: Path) -> None:
    """A metadata change lives only in the engine's memory (FAISS snapshots later) when the
    server is killed: the restart's reconcile gives the moved vectors their new payload."""
    data = tmp_path / "data"
    doc = pb.Document(doc_id="k", path="k.py", content="def killed():\n    return 1\n",
                      metadata={"v": "1"})
    first = ServerProcess(data)
    try:
        with RetrieverClient(first.address) as c:
            c.upsert("ns", [doc])
    finally:
        assert first.terminate() == 0  # a clean stop: the snapshot holds v=1
    second = ServerProcess(data)
    try:
        with RetrieverClient(second.address) as c:
            doc.metadata["v"] = "2"
            c.upsert("ns", [doc])
    finally:
        second.kill()
    third = ServerProcess(data)
    try:
        with RetrieverClient(third.address) as c:
            def n(v: str) -> int:
                return len(c.search("ns", "killed", top_k=5,
                                    filter=pb.SearchFilter(metadata={"v": v})).hits)
            assert n("2") >= 1
            assert n("1") == 0
    finally:
        third.terminate()


def test_reindex_into_another_backend_while_serving(tmp_path: Path,
                                                     embedder: Embedder) -> None:
    """FAISS -> Chroma -> Milvus -> FAISS under searches and upserts: no search fails or
    comes back empty, the writes made during each copy are in the new generation, and the
    old generation is dropped."""
    import threading

    settings = make_settings(tmp_path / "data")
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
        docs = [pb.Document(doc_id=f"d{i}", path=f"src/m{i}.py",
                            content=f"def handler_{i}(request):\n    return 'answer {i}'\n")
                for i in range(40)]
        client.upsert("re", docs)
        stop = threading.Event()
        failures: list[str] = []
        searches = [0]
        written: list[str] = []

        def search() -> None:
            while not stop.is_set():
                try:
                    r = client.search("re", "handler returns an answer", top_k=5)
                    if not r.hits:
                        failures.append("no hits")
                    searches[0] += 1
                except Exception as exc:  # noqa: BLE001 - reported below
                    failures.append(repr(exc))

        def write() -> None:
            i = 0
            while not stop.is_set():
                doc_id = f"w{i}"
                try:
                    client.upsert("re", [pb.Document(
                        doc_id=doc_id, path=f"new/{doc_id}.py",
                        content=f"def written_{i}():\n    return {i}\n")])
                    written.append(doc_id)
                except Exception as exc:  # noqa: BLE001
                    failures.append(repr(exc))
                i += 1

        threads = [threading.Thread(target=search), threading.Thread(target=write)]
        for t in threads:
            t.start()
        try:
            generations = []
            for target in ("chroma", "milvus", "faiss"):
                resp = client.stub.ReindexNamespace(
                    pb.ReindexNamespaceRequest(name="re", backend=target), timeout=120)
                generations.append(resp.namespace.index_generation)
                assert resp.namespace.backend == target
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert failures == []
        assert searches[0] > 0 and written
        assert generations == [2, 3, 4]
        status = client.status("re")
        assert status.backend == "faiss" and status.index_generation == 4
        assert status.vector_count == status.chunk_count
        # Everything acknowledged, during the copies too, is found through the new index.
        for doc_id in [*written[-3:], "d0", "d39"]:
            hits = client.search("re", "return", top_k=3,
                                 filter=pb.SearchFilter(doc_ids=[doc_id])).hits
            assert [h.chunk.doc_id for h in hits][:1] == [doc_id]
        # The old generations are gone from every engine's storage.
        leftovers = [p.name for p in (tmp_path / "data" / "indexes").rglob("*re.g[123]*")]
        assert leftovers == []
        with pytest.raises(Exception) as e:  # noqa: PT011
            client.stub.ReindexNamespace(pb.ReindexNamespaceRequest(name="re",
                                                                    backend="nope"))
        assert "unknown index backend" in str(e.value)


def _chroma_on(data: Path, port: int) -> subprocess.Popen[bytes]:
    """`chroma run` on ``port``, once it answers its heartbeat."""
    import httpx

    cli = Path(sys.executable).parent / "chroma"
    proc = subprocess.Popen([str(cli), "run", "--path", str(data), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "chroma run exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat",
                         timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("chroma run did not answer in 60 s")


def test_an_engine_server_that_dies_gives_unavailable_then_recovers(
        tmp_path: Path, embedder: Embedder) -> None:
    """The Chroma server is killed mid-traffic: searches and upserts answer UNAVAILABLE
    (with a retry delay), nothing acknowledged is lost, nothing refused is half-written, a
    delete still applies (the catalog decides; the engine's copy is skipped), and once the
    engine is back the service serves again and the refused upsert, retried as its status
    said, succeeds."""
    import grpc

    port = _free_port()
    engine_data = tmp_path / "chroma"
    engine = _chroma_on(engine_data, port)
    settings = make_settings(tmp_path / "data", index_backend="chroma",
                             chroma_url=f"http://127.0.0.1:{port}")
    try:
        with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
            client.upsert("eng", engine_docs("alpha"))
            client.upsert("gone", engine_docs("gamma"))
            engine.kill()
            engine.wait(10)
            assert_engine_down_refuses(client, "eng")
            assert client.delete("eng", ["alpha4"]).documents_deleted == 1
            # A namespace deleted while its engine is down is deleted (it answered
            # UNAVAILABLE, and its retry NOT_FOUND); its collection is dropped later.
            client.delete_namespace("gone")
            assert "gone" not in {n.name for n in client.list_namespaces().namespaces}
            engine = _chroma_on(engine_data, port)
            hits = client.search("eng", "alpha", top_k=10).hits
            assert {h.chunk.doc_id for h in hits} == {f"alpha{i}" for i in range(4)}
            with pytest.raises(grpc.RpcError) as e:  # refused, so never half-written
                client.get_document("eng", "lost")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            client.upsert("eng", [LOST_DOC])  # the retry of the refused upsert
            hits = client.search("eng", "lost", top_k=1).hits
            assert [h.chunk.doc_id for h in hits] == ["lost"]
            status = client.status("eng")
            assert status.document_count == 5
            assert status.chunk_count == 5
        catalog = Catalog(settings.data_dir / "catalog.sqlite3")
        catalog.open()
        assert catalog.pending_drops() == {"chroma": {"gone.g1"}}
        catalog.close()
        with running_server(settings, embedder):  # the next start drops it
            pass
        catalog = Catalog(settings.data_dir / "catalog.sqlite3")
        catalog.open()
        assert catalog.pending_drops() == {}
        catalog.close()
    finally:
        engine.kill()
        engine.wait(10)


def test_an_engine_server_back_without_its_data_is_rebuilt_from_the_catalog(
        tmp_path: Path, embedder: Embedder) -> None:
    """The Chroma server dies and a new one comes up on the same port with an empty volume:
    every namespace's collection is rebuilt from the catalog (vectors and payloads, never
    re-embedded) while the service runs, each into a new generation, and serves again."""
    port = _free_port()
    engine = _chroma_on(tmp_path / "chroma", port)
    settings = make_settings(tmp_path / "data", index_backend="chroma",
                             chroma_url=f"http://127.0.0.1:{port}")
    try:
        with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
            client.upsert("eng", engine_docs("alpha"))
            client.upsert("ops", engine_docs("beta", 3))
            engine.kill()
            engine.wait(10)
            engine = _chroma_on(tmp_path / "chroma-empty", port)
            assert_rebuilt_from_catalog(
                st, client, {"eng": {f"alpha{i}" for i in range(5)},
                             "ops": {f"beta{i}" for i in range(3)}}, "chroma")
    finally:
        engine.kill()
        engine.wait(10)


def test_a_sync_that_finds_its_collection_lost_starts_the_rebuild(
        tmp_path: Path, embedder: Embedder) -> None:
    """A namespace bound to a git repository whose collection vanished from the Chroma
    server: the next sync fails UNAVAILABLE and starts the rebuild (no search or upsert
    call is needed for that), and a sync after it applies the new commit on the rebuilt
    generation."""
    import chromadb
    import grpc
    from gitrepo import TimedRepo

    repo = TimedRepo(tmp_path / "src")
    repo.write("a.py", "def alpha():\n    return 1\n")
    repo.commit("one")
    port = _free_port()
    engine = _chroma_on(tmp_path / "chroma", port)
    settings = make_settings(tmp_path / "data", index_backend="chroma",
                             chroma_url=f"http://127.0.0.1:{port}", sync_roots=[tmp_path])
    try:
        with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
            client.sync_source("git", str(repo.root), wait=True, timeout=120)
            raw = chromadb.HttpClient(host="127.0.0.1", port=port,
                                      settings=chromadb.Settings(anonymized_telemetry=False))
            for collection in raw.list_collections():
                raw.delete_collection(collection.name)
            repo.write("b.py", "def beta():\n    return 2\n")
            repo.commit("two")
            with pytest.raises(grpc.RpcError) as e:
                client.sync_source("git", wait=True, timeout=120)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert "rebuilding it from the catalog" in e.value.details()
            when_served(lambda: client.sync_source("git", wait=True, timeout=120), 60)
            response = client.search("git", "def", top_k=5)
            assert {h.chunk.doc_id for h in response.hits} == {"a.py", "b.py"}
            assert response.lineage.index_generation == 2
    finally:
        engine.kill()
        engine.wait(10)


def test_one_reindex_of_a_namespace_at_a_time(tmp_path: Path, embedder: Embedder) -> None:
    """Two re-indexes of one namespace would build the same next generation (one could
    drop the other's collection): while one runs — here its lock, taken by hand — another
    ReindexNamespace, or the rebuild of a lost collection, is ABORTED with a message to
    retry, and the namespace keeps its generation."""
    from retriever.errors import Aborted
    from retriever.service import RetrieverService

    svc = RetrieverService(make_settings(tmp_path / "data"), embedder=embedder)
    svc.start()
    try:
        svc.create_namespace("ns")
        with svc.namespaces.get("ns").reindexing:
            with pytest.raises(Aborted, match="being re-indexed already"):
                svc.reindex_namespace("ns")
            assert svc.get_namespace("ns").index_generation == 1
        record, result = svc.reindex_namespace("ns")
        assert result.generation == record.index_generation == 2
    finally:
        svc.close()


def test_a_namespace_on_an_engine_not_installed_does_not_stop_the_others(tmp_path: Path,
                                                                          embedder) -> None:  # noqa: ANN001
    """A server started without chromadb (the extra not installed): its chroma namespace
    answers FAILED_PRECONDITION saying what to do and can be deleted; the others serve
    (the whole server used to exit at start)."""
    import grpc


    data = tmp_path / "data"
    _seed(make_settings(data), embedder, {"onchroma": ("chroma", "a", "rye bread on chroma"),
                                          "onfaiss": ("", "b", "rye bread on faiss")})
    blocked = tmp_path / "no-chroma" / "chromadb"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("chromadb is not installed")\n')
    path = os.pathsep.join([str(blocked.parent), os.environ.get("PYTHONPATH", "")])
    server = ServerProcess(data, PYTHONPATH=path)
    try:
        with RetrieverClient(server.address) as c:
            assert [h.chunk.doc_id for h in c.search("onfaiss", "rye bread").hits] == ["b"]
            _refused(c, "onchroma", "chroma", "install")
            with pytest.raises(grpc.RpcError) as upsert:
                c.upsert("onchroma", [pb.Document(doc_id="c", content="more")])
            assert upsert.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert c.delete_namespace("onchroma").documents_deleted == 1
            assert {n.name for n in c.list_namespaces().namespaces} == {"onfaiss"}
    finally:
        assert server.terminate() == 0


def _metric(st: object, line: str) -> float | None:
    import urllib.request

    url = f"http://127.0.0.1:{st.info['metrics_port']}/metrics"  # type: ignore[attr-defined]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = [float(x.split(" ")[1]) for x in text.splitlines() if x.startswith(line + " ")]
    return found[0] if found else None


def test_damaged_embedded_engine_files_are_moved_aside_and_rebuilt(
        tmp_path: Path, embedder: Embedder) -> None:
    """milvus-lite's and the embedded Chroma's files hold nothing the catalog lacks: bytes
    overwritten in them (a collection's schema and data, Chroma's sqlite file) no longer
    stop the server's start. The files are moved aside, counted, and every namespace on
    them is refilled from the catalog's vectors."""
    from retriever.server.app import ServerThread

    data = tmp_path / "data"
    _seed(make_settings(data), embedder, {
        **{f"on{b}": (b, b, f"rye bread kept on {b}") for b in ("milvus", "chroma")},
        "onfaiss": ("", "faiss", "rye bread on faiss")})
    indexes = data / "indexes"
    damaged = [p for p in indexes.rglob("*") if p.is_file() and (
        p.name in ("schema.json", "chroma.sqlite3") or p.suffix == ".parquet")]
    assert {p.name for p in damaged} >= {"schema.json", "chroma.sqlite3"}
    for p in damaged:
        with open(p, "r+b") as f:
            f.write(b"\xde\xad" * 2048)
    st = ServerThread(make_settings(data), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            for ns in ("onmilvus", "onchroma", "onfaiss"):
                hits = c.search(ns, "rye bread", top_k=5).hits
                assert [h.chunk.doc_id for h in hits] == [ns[2:]], ns
                status = c.status(ns)
                assert status.vector_count == status.chunk_count == 1
        for kind in ("milvus_store", "chroma_store"):
            assert _metric(st, f'retriever_derived_files_rebuilt_total{{kind="{kind}"}}') == 1
    finally:
        st.stop()
    moved = sorted(p.name.split(".damaged-")[0] for p in (indexes / "milvus").iterdir()
                   if ".damaged-" in p.name)
    moved += sorted(p.name.split(".damaged-")[0] for p in indexes.iterdir()
                    if ".damaged-" in p.name)
    assert moved == ["milvus.db", "chroma"]


def test_vectors_changed_in_place_are_found_and_rebuilt(tmp_path: Path,
                                                         embedder: Embedder) -> None:
    """Bytes overwritten inside milvus-lite's data file (it still parses, so nothing fails
    to load) changed stored vectors: start-up was clean and the documents could no longer
    be found by their own text. A sample of the catalog's vectors searched for at start
    finds it, and the collection is rebuilt from the catalog."""
    from retriever.server.app import ServerThread

    data = tmp_path / "data"
    texts = {f"d{i}": f"note {i}: " + " ".join(f"topic{i}x{j}" for j in range(30))
             for i in range(40)}
    with running_server(make_settings(data), embedder) as st, \
            RetrieverClient(st.address) as c:
        c.create_namespace("vec", backend="milvus")
        c.upsert("vec", [pb.Document(doc_id=d, content=t) for d, t in texts.items()])
    parquets = sorted((data / "indexes" / "milvus").rglob("*.parquet"))
    assert parquets
    for p in parquets:
        size = p.stat().st_size
        with open(p, "r+b") as fh:  # inside the vector column, short of the footer
            fh.seek(min(2000, size // 4))
            fh.write(np.random.default_rng(1).bytes(max(1, min(4000, size // 2))))
    for idx in (data / "indexes" / "milvus").rglob("*.idx"):
        idx.unlink()
    st = ServerThread(make_settings(data), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            deadline = time.monotonic() + 120
            while True:
                try:
                    found = sum(d in [h.chunk.doc_id for h in c.search(
                        "vec", t, top_k=3, mode=pb.DENSE).hits] for d, t in texts.items())
                    if found == len(texts):
                        break
                except grpc.RpcError as exc:  # UNAVAILABLE while it is rebuilt
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, found
                time.sleep(0.5)
        assert _metric(st, 'retriever_derived_files_rebuilt_total{kind="milvus_vectors"}') == 1
    finally:
        st.stop()


def _refused(c: RetrieverClient, ns: str, *words: str) -> None:
    """A search of ``ns`` answers FAILED_PRECONDITION saying each of ``words``."""
    with pytest.raises(grpc.RpcError) as e:
        c.search(ns, "rye bread")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for w in words:
        assert w in e.value.details(), (w, e.value.details())


def _once_open(c: RetrieverClient, ns: str) -> list[pb.Hit]:
    """The hits of "rye bread" in ``ns`` once it opens: until then (within a minute) its
    searches answer FAILED_PRECONDITION."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return list(c.search(ns, "rye bread").hits)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert time.monotonic() < deadline, exc.details()
            time.sleep(0.2)


def test_embedded_files_another_process_holds_are_left_alone(
        tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """milvus-lite's files held by another process (its lock taken) are in use, not
    damaged: they were moved aside (renamed under the other process) and refilled. Now the
    namespace answers FAILED_PRECONDITION while they are held, the others serve, and it
    opens once the other process lets go."""
    import subprocess
    import sys

    import retriever.namespaces
    from retriever.server.app import ServerThread

    monkeypatch.setattr(retriever.namespaces, "REOPEN_RETRY_S", 0.5)
    data = tmp_path / "data"
    _seed(make_settings(data), embedder, {"onmilvus": ("milvus", "m", "rye bread in milvus"),
                                          "onfaiss": ("", "f", "rye bread on faiss")})
    store = data / "indexes" / "milvus" / "milvus.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pymilvus import MilvusClient\n"
         f"MilvusClient(uri={str(store)!r}).list_collections()\nprint('held', flush=True)\n"
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        st = ServerThread(make_settings(data), embedder).start()
        try:
            with RetrieverClient(st.address) as c:
                assert [h.chunk.doc_id for h in c.search("onfaiss", "rye bread").hits] == ["f"]
                _refused(c, "onmilvus", "another process")
                assert store.is_dir() and not list(store.parent.glob("*.damaged-*"))
                assert _metric(
                    st, 'retriever_derived_files_rebuilt_total{kind="milvus_store"}') in (
                    None, 0)
                assert holder.stdin is not None
                holder.stdin.close()  # the other process lets go
                holder.wait(30)
                assert [h.chunk.doc_id for h in _once_open(c, "onmilvus")] == ["m"]
        finally:
            st.stop()
    finally:
        holder.kill()
        holder.wait(10)


def test_an_engine_server_down_at_start_leaves_the_other_namespaces_serving(
        tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespace's Chroma server is down when the service starts: the service starts,
    the namespaces on other engines serve, and that namespace answers FAILED_PRECONDITION
    saying what to do (the whole server used to exit). Once the engine is back, a look-up
    opens the namespace again in the background, and it serves without a restart."""

    import retriever.namespaces
    from retriever.server.app import ServerThread

    monkeypatch.setattr(retriever.namespaces, "REOPEN_RETRY_S", 0.5)

    port = _free_port()
    engine = _chroma_on(tmp_path / "chroma", port)
    settings = make_settings(tmp_path / "data", chroma_url=f"http://127.0.0.1:{port}")
    try:
        _seed(settings, embedder, {"remote": ("chroma", "r", "rye bread far away"),
                                   "local": ("", "l", "rye bread at home")})
    finally:
        engine.kill()
        engine.wait(10)
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            assert [h.chunk.doc_id for h in c.search("local", "rye bread").hits] == ["l"]
            _refused(c, "remote", "chroma", "bring")
            time.sleep(1.0)  # past the retry interval: the next look-up tries, and fails
            _refused(c, "remote")
            engine = _chroma_on(tmp_path / "chroma", port)
            assert [h.chunk.doc_id for h in _once_open(c, "remote")] == ["r"]
            c.upsert("remote", [pb.Document(doc_id="r2", content="more rye bread")])
            assert c.status("remote").document_count == 2
    finally:
        st.stop()
        engine.kill()
        engine.wait(10)


def test_deployments_sharing_a_chroma_server_keep_their_collections(
        tmp_path: Path, embedder: Embedder) -> None:
    """Two services (two catalogs) on one Chroma server: one starting never drops the
    other's collections as orphans, and with chroma_database each keeps its own."""
    port = _free_port()
    engine = _chroma_on(tmp_path / "chroma", port)
    url = f"http://127.0.0.1:{port}"

    def serve(name: str, **kw: object) -> object:
        return running_server(make_settings(tmp_path / name, index_backend="chroma",
                                            chroma_url=url, **kw), embedder)

    try:
        with serve("a") as st, RetrieverClient(st.address) as c:
            c.upsert("docs", [pb.Document(doc_id="a", content="rye bread of team a")])
        with serve("b") as st, RetrieverClient(st.address) as c:  # same database
            c.upsert("other", [pb.Document(doc_id="b", content="rye bread of team b")])
        with serve("e", chroma_database="team-e") as st, RetrieverClient(st.address) as c:
            c.upsert("docs", [pb.Document(doc_id="e", content="rye bread of team e")])
        # A generation of a's namespace that a crashed re-index left (a's to drop), and a
        # collection of nobody's namespace (left alone).
        from indexers import CollectionSpec, create_backend

        probe = create_backend("chroma", tmp_path / "probe", url=url)
        probe.open(CollectionSpec("docs.g7", 384, "cosine"))
        probe.open(CollectionSpec("stranger.g1", 384, "cosine"))
        restored = 'retriever_reconcile_repairs_total{kind="vectors_restored"}'
        # Each finds its collection as it left it: nothing to restore from its catalog.
        with serve("a") as st, RetrieverClient(st.address) as c:
            assert [h.chunk.doc_id for h in c.search("docs", "rye bread").hits] == ["a"]
            assert _metric(st, restored) == 0
        assert "docs.g7" not in probe.collections() and "stranger.g1" in probe.collections()
        with serve("b") as st, RetrieverClient(st.address) as c:
            assert [h.chunk.doc_id for h in c.search("other", "rye bread").hits] == ["b"]
            assert _metric(st, restored) == 0
        probe.close()
        with serve("e", chroma_database="team-e") as st, RetrieverClient(st.address) as c:
            assert [h.chunk.doc_id for h in c.search("docs", "rye bread").hits] == ["e"]
            assert _metric(st, restored) == 0
    finally:
        engine.kill()
        engine.wait(10)


def test_a_namespace_delete_that_crashed_before_the_engine_drop_is_finished_at_start(
        tmp_path: Path, embedder: Embedder) -> None:
    """On an engine server, collections of namespaces the catalog does not know are left
    alone (another deployment's); a DeleteNamespace records the collection it must drop in
    its own commit, so one that crashed before the engine's drop is finished at the next
    start — also when no namespace is left on that engine."""
    from indexers import CollectionSpec, create_backend
    from retriever.catalog import Catalog

    port = _free_port()
    engine = _chroma_on(tmp_path / "chroma", port)
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(tmp_path / "data", chroma_url=url)  # default backend: faiss
    probe = create_backend("chroma", tmp_path / "probe", url=url)

    def pending_drops() -> dict[str, set[str]]:
        cat = Catalog(settings.data_dir / "catalog.sqlite3")
        cat.open()
        try:
            return cat.pending_drops()
        finally:
            cat.close()

    try:
        _seed(settings, embedder, {"gone": ("chroma", "g", "rye bread to delete"),
                                   "kept": ("", "k", "rye bread to keep")})
        probe.open(CollectionSpec("stranger.g1", 384, "cosine"))
        # The delete's commit, and then the crash: the engine still has the collection.
        cat = Catalog(settings.data_dir / "catalog.sqlite3")
        cat.open()
        cat.delete_namespace("gone", drop=("chroma", "gone.g1"))
        cat.close()
        assert {"gone.g1", "stranger.g1"} <= set(probe.collections())
        # `retriever check` says so (it was silent: a collection left, nothing named it).
        from retriever.repair import check, render_check

        said = "\n".join(render_check(check(settings.data_dir)))
        assert "index chroma/gone.g1 (a deleted namespace's): not dropped yet" in said, said
        with running_server(settings, embedder) as st, RetrieverClient(st.address) as c:
            assert [h.chunk.doc_id for h in c.search("kept", "rye bread").hits] == ["k"]
            c.create_namespace("brief", backend="chroma")
            c.upsert("brief", [pb.Document(doc_id="b", content="rye bread, briefly")])
            c.delete_namespace("brief")  # a delete that finishes leaves no record
        left = set(probe.collections())
        assert "gone.g1" not in left and "brief.g1" not in left and "stranger.g1" in left
        assert pending_drops() == {}
    finally:
        probe.close()
        engine.kill()
        engine.wait(10)


class _PausedAt(CallToken):
    """A caller's token that holds its operation at its first check of ``at`` until
    ``release`` is set: an interleaving made on purpose, as a slow copy makes one."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at, self.reached, self.release = at, threading.Event(), threading.Event()

    def check(self, before: str) -> None:
        if before == self.at and not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(60)
        super().check(before)


def test_a_reindex_of_a_deleted_namespace_never_touches_the_one_created_again(
        tmp_path: Path, embedder: Embedder) -> None:
    """A re-index of a namespace that is deleted midway, and created again under its name
    and re-indexed itself: both built generation 2 under one collection name, so the old
    one's clean-up dropped the new namespace's live index (every call UNAVAILABLE until a
    restart). A namespace created again starts past the old one's generations, and the old
    re-index stops (NOT_FOUND) instead of copying the new namespace's rows."""
    from retriever.domain import Document, SearchQuery
    from retriever.errors import NotFound
    from retriever.service import RetrieverService

    svc = RetrieverService(make_settings(tmp_path / "data"), embedder=embedder)
    svc.start()
    try:
        svc.create_namespace("ns")
        svc.upsert("ns", [Document(doc_id="old.txt", content="old secret zebra text")])
        token = _PausedAt("the copy")
        failed: list[BaseException] = []

        def old_reindex() -> None:
            try:
                svc.reindex_namespace("ns", token=token)
            except BaseException as exc:  # noqa: BLE001 - examined below
                failed.append(exc)

        t = threading.Thread(target=old_reindex)
        t.start()
        assert token.reached.wait(60)
        svc.delete_namespace("ns")
        first = svc.create_namespace("ns")
        svc.upsert("ns", [Document(doc_id="new.txt", content="new kiwi fruit text")])
        _, again = svc.reindex_namespace("ns")
        token.release.set()
        t.join(60)
        assert len(failed) == 1 and isinstance(failed[0], NotFound), failed
        hits = svc.search(SearchQuery(namespace="ns", query="kiwi fruit", top_k=5), "r")
        assert [h.chunk.doc_id for h in hits.hits] == ["new.txt"]
        # It started past the old one's 1 and its re-index's 2.
        assert (first.index_generation, again.generation) == (3, 4)
        assert svc.get_namespace("ns").index_generation == 4
        svc.upsert("ns", [Document(doc_id="more.txt", content="more kiwi")])
    finally:
        svc.close()
    # After a restart too: the live collection is there, and no other is left.
    svc = RetrieverService(make_settings(tmp_path / "data"), embedder=embedder)
    svc.start()
    try:
        hits = svc.search(SearchQuery(namespace="ns", query="kiwi", top_k=5), "r")
        assert {h.chunk.doc_id for h in hits.hits} == {"new.txt", "more.txt"}
        assert svc.namespaces._backend("faiss").collections() == ["ns.g4"]  # noqa: SLF001
    finally:
        svc.close()


def test_a_sync_never_writes_into_a_namespace_created_again_under_its_name(
        tmp_path: Path, embedder: Embedder) -> None:
    """A sync whose namespace is deleted while it runs and created again under the same
    name: its later batches went into the new namespace (files of the old source in a
    namespace bound to none, which then refused to be bound). They are refused NOT_FOUND
    and the sync fails; the new namespace holds only its own documents."""
    from gitrepo import TimedRepo

    from retriever.domain import Document
    from retriever.freshness.sync import SyncRequest, SyncStatus
    from retriever.service import RetrieverService

    repo = TimedRepo(tmp_path / "src")
    for i in range(40):
        repo.write(f"f{i}.txt", f"repo secret lychee file {i}\n")
    repo.commit("files")
    settings = make_settings(tmp_path / "data", sync_roots=[tmp_path],
                             sync_batch_documents=10)
    svc = RetrieverService(settings, embedder=embedder)
    svc.start()
    try:
        svc.create_namespace("sy")
        gate = threading.Event()
        calls = []
        real = svc.syncer._upsert  # noqa: SLF001 - the sync's write path, held at batch 2

        def held(*args: object) -> object:
            calls.append(1)
            if len(calls) == 2:
                gate.wait(60)
            return real(*args)

        svc.syncer._upsert = held  # noqa: SLF001
        state = svc.sync_source("sy", SyncRequest(location=str(repo.root)), wait=False)
        deadline = time.monotonic() + 60
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        run = svc.syncer._runs["sy"]  # noqa: SLF001 - to wait for its end below
        svc.delete_namespace("sy")
        svc.create_namespace("sy")
        svc.upsert("sy", [Document(doc_id="new.txt", content="new kiwi")])
        gate.set()
        assert run.done.wait(60)
        assert run.status is SyncStatus.FAILED and "created again" in run.error, run.error
        assert not [s for s in svc.recent_syncs("sy") if s.sync_id == state.sync_id]
        docs, _ = svc.catalog.list_documents("sy", "", 100, "")
        assert [d.doc_id for d in docs] == ["new.txt"]
        assert svc.catalog.get_source("sy") is None  # not bound to the old sync's source
    finally:
        svc.close()


def test_a_sync_never_binds_a_namespace_created_again_as_it_starts(
        tmp_path: Path, embedder: Embedder) -> None:
    """The namespace deleted and created again between the sync making sure of it and
    binding it to the source (the narrowest window): the binding is refused NOT_FOUND, so
    the new namespace is not left bound to a source whose files it never got."""
    from gitrepo import TimedRepo

    from retriever.freshness.sync import SyncRequest, SyncStatus
    from retriever.service import RetrieverService

    repo = TimedRepo(tmp_path / "src")
    repo.write("a.txt", "repo secret lychee\n")
    repo.commit("a")
    svc = RetrieverService(make_settings(tmp_path / "data", sync_roots=[tmp_path]),
                           embedder=embedder)
    svc.start()
    try:
        svc.create_namespace("sy")
        real = svc.syncer._ensure_namespace  # noqa: SLF001 - the race, made on purpose

        def then_swapped(ns: str) -> object:
            found = real(ns)
            svc.delete_namespace(ns)
            svc.create_namespace(ns)
            return found

        svc.syncer._ensure_namespace = then_swapped  # noqa: SLF001
        svc.sync_source("sy", SyncRequest(location=str(repo.root)), wait=False)
        run = svc.syncer._runs.get("sy")  # noqa: SLF001
        assert run is None or run.done.wait(60)
        assert run is None or run.status is SyncStatus.FAILED, run.status
        assert svc.catalog.get_source("sy") is None
        docs, _ = svc.catalog.list_documents("sy", "", 100, "")
        assert docs == []
    finally:
        svc.close()
