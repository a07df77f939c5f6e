"""The milvus backend against a real Milvus standalone server.

The server is PyPI ``milvus==2.3.5`` (``milvus-server``) installed in its own venv,
``.venv-milvus-server`` at the repository root, started once for this module in a temporary
directory and stopped after it (SIGTERM to its process group, then SIGKILL). Without that
venv these tests are skipped, unless ``RETRIEVER_TEST_MILVUS_URI`` names a running server
(``http://host:port``) to use instead.

A representative part of the contract runs by default; ``RETRIEVER_TEST_MILVUS_CONFORMANCE=1``
adds the whole shared suite of tests/test_indexers.py against the server (about 4 minutes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")

import test_indexers as conformance  # noqa: E402

from indexers import (  # noqa: E402
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    Filter,
    Payload,
)
from indexers.milvus_index import MilvusBackend, filter_expression  # noqa: E402
from retriever.models.embedder import Embedder  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SERVER_BIN = ROOT / ".venv-milvus-server" / "bin" / "milvus-server"
URI_ENV = "RETRIEVER_TEST_MILVUS_URI"
CONFORMANCE_ENV = "RETRIEVER_TEST_MILVUS_CONFORMANCE"
READY_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


_TERM_THEN_KILL = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0))


def _stop(proc: subprocess.Popen[bytes],
          steps: tuple[tuple[signal.Signals, float], ...] = _TERM_THEN_KILL) -> None:
    """SIGTERM to the server's process group (the wrapper and the milvus binary it runs:
    the wrapper dies at once, the binary shuts down in its own time), SIGKILL to what is
    left of the group after a grace period; ``steps``: other signals and graces (a crash:
    SIGKILL alone)."""
    for sig, grace in steps:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)  # reap the wrapper, or the group never empties
            if not _group_alive(proc.pid):
                return


def _wait_ready(uri: str, proc: subprocess.Popen[bytes], base: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    logs = [base / "server.log", base / "data" / "logs" / "milvus-stderr.log"]

    def tail() -> str:
        return "\n".join(f"-- {p}:\n{p.read_text(errors='replace')[-3000:]}"
                         for p in logs if p.exists())

    while True:
        # The wrapper outlives a milvus binary that crashed (e.g. a port taken): look for it.
        crashed = logs[1].exists() and "panic:" in logs[1].read_text(errors="replace")
        if proc.poll() is not None or crashed:
            pytest.fail(f"milvus-server failed to start:\n{tail()}")
        probe = MilvusBackend(base, uri=uri, timeout=2.0)
        try:
            probe.collections()
            return
        except EngineUnavailable:
            if time.monotonic() > deadline:
                pytest.fail(f"milvus-server not ready after {READY_TIMEOUT_S} s:\n{tail()}")
            time.sleep(1)
        finally:
            probe.close()


def _start_server(base: Path, port: int, etcd_client: int,
                  etcd_peer: int) -> subprocess.Popen[bytes]:
    """A standalone server with its data in ``base``/data on these ports (the same ones
    again restart it on its data)."""
    # The embedded etcd listens on 2379/2380 whatever --etcd-port says, unless told by a
    # config file of its own: without one, a second server on the machine cannot start.
    etcd_config = base / "etcd.yaml"
    etcd_config.write_text(
        "name: retriever-test\n"
        f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-cluster: retriever-test=http://127.0.0.1:{etcd_peer}\n")
    with open(base / "server.log", "ab") as out:
        return subprocess.Popen(
            [str(SERVER_BIN), "--data", str(base / "data"), "--proxy-port", str(port),
             "--etcd-port", str(etcd_client)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)})


def _restart_on_its_data(base: Path) -> subprocess.Popen[bytes]:
    """The standalone of ``base`` started again on its data, at the same addresses: the
    milvus binary the wrapper unpacked, run as the wrapper runs it, on the configuration it
    wrote. Not the wrapper again: it probes each port with a bind without SO_REUSEADDR,
    which fails for the 60 s the dead server's connections stay in TIME_WAIT, and then
    silently moves the proxy to the next free port (a restart "on the same port" then
    answers nowhere, or with stale sessions "node not match")."""
    data = base / "data"
    env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(_free_port()),
           "MILVUS_RUN_DIR": str(data / "run"), "ETCD_CONFIG_PATH": str(base / "etcd.yaml"),
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [
               str(data / "bin"), os.environ.get("LD_LIBRARY_PATH", "")]))}
    with open(base / "server.log", "ab") as out:
        return subprocess.Popen([str(data / "bin" / "milvus"), "run", "standalone"], cwd=data,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of a server for this module: its own, or the one RETRIEVER_TEST_MILVUS_URI
    names."""
    external = os.environ.get(URI_ENV, "")
    if external:
        yield external
        return
    if not SERVER_BIN.exists():
        pytest.skip(f"no Milvus server: install one with `python3 -m venv .venv-milvus-server "
                    f"&& .venv-milvus-server/bin/pip install milvus==2.3.5`, or set {URI_ENV}")
    base = tmp_path_factory.mktemp("milvus-server")
    port = _free_port()
    proc = _start_server(base, port, _free_port(), _free_port())
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc, base)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        shutil.rmtree(base / "data", ignore_errors=True)  # ~560 MB of unpacked binaries


BackendFactory = Callable[[], MilvusBackend]


@pytest.fixture
def backend_factory(milvus_uri: str, tmp_path: Path) -> Iterator[BackendFactory]:
    """Backends on the server, under a prefix of this test's own: tests share the server,
    not collections. On a server named by RETRIEVER_TEST_MILVUS_URI what the test made is
    dropped after it (this module's own server goes, with all of it, at the end)."""
    prefix = "t" + uuid.uuid4().hex[:12]
    made: list[MilvusBackend] = []

    def make() -> MilvusBackend:
        backend = MilvusBackend(tmp_path / "indexes" / "milvus", uri=milvus_uri, prefix=prefix)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with suppress(Exception):
            backend.close()
    if not os.environ.get(URI_ENV):
        return
    cleanup = MilvusBackend(tmp_path, uri=milvus_uri, prefix=prefix)
    try:
        for name in cleanup.collections():
            cleanup.drop(name)
    finally:
        cleanup.close()


@pytest.fixture
def backend(backend_factory: BackendFactory) -> MilvusBackend:
    return backend_factory()


if os.environ.get(CONFORMANCE_ENV):
    # The whole shared contract, collected here: its tests then take this module's
    # backend_factory (the server) instead of their own (every registered backend).
    globals().update({name: obj for name, obj in vars(conformance).items()
                      if name.startswith("test_") and "faiss" not in name})
    index = conformance.index  # fixture: a cosine collection of DIM on `backend`


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return conformance.unit_vectors(n, dim, seed)


def test_hnsw_index_upsert_search_count_ids(backend: MilvusBackend) -> None:
    index = backend.open(CollectionSpec("docs.g1", 16, "cosine"))
    assert index.index_type == "HNSW"
    desc = backend._connect().describe_index(index.collection, "vector")
    assert (desc["index_type"], desc["metric_type"], str(desc["M"])) == ("HNSW", "COSINE", "16")
    v = unit_vectors(500)
    index.upsert(range(500), v)
    index.flush()  # sealed: searched through HNSW
    assert index.count() == 500
    assert set(index.ids().tolist()) == set(range(500))
    for own, hits in zip([3, 250, 499], index.search(v[[3, 250, 499]], 5), strict=True):
        assert hits.ids[0] == own and hits.scores[0] == pytest.approx(1.0, abs=1e-4)
        assert len(hits.ids) == 5 and np.all(np.diff(hits.scores) <= 1e-6)


def test_writes_are_seen_by_the_next_search(backend: MilvusBackend) -> None:
    """Session reads, and a Strong one after each write: deletes too (a 2.3 server does not
    report a delete's timestamp, so pymilvus's own session tracking misses them)."""
    index = backend.open(CollectionSpec("fresh.g1", 16, "l2"))
    v = unit_vectors(40, seed=1)
    index.upsert(range(30), v[:30])
    for i in range(3):
        index.upsert([100 + i], v[30 + i : 31 + i])
        hits = index.search(v[30 + i : 31 + i], 1)[0]
        assert hits.ids.tolist() == [100 + i] and hits.scores[0] == pytest.approx(0, abs=1e-5)
        assert index.delete([100 + i, 10**12]) == 1
        assert 100 + i not in index.search(v[30 + i : 31 + i], 3)[0].ids.tolist()
    index.upsert([7], v[39:40])  # replaces 7's vector
    assert index.search(v[39:40], 1)[0].ids.tolist() == [7]
    assert 7 not in index.search(v[7:8], 1)[0].ids.tolist()
    assert index.count() == 30


def test_filters_match_the_reference(backend: MilvusBackend) -> None:
    index = backend.open(CollectionSpec("filters.g1", 16, "cosine"))
    n = 240
    payloads = [conformance.payload_of(i) for i in range(n)]
    hostile = ['"', "\\", "%", "_", "a][b", "", "\n", "日本", "\U0010ffff"]
    payloads += [Payload(s, f"{s}/x", s, s, ((s, s),)) for s in hostile]
    vectors = unit_vectors(len(payloads), seed=7)
    index.upsert(range(len(payloads)), vectors, payloads)
    index.upsert([10_000], unit_vectors(1, seed=8))  # no payload
    filters = [*conformance.FILTERS, Filter(path_prefix="\\"), Filter(path_prefix="%"),
               Filter(metadata=(("a][b", "a][b"),)), Filter(metadata=(("", ""),)),
               Filter(doc_ids=('"', "\n")), Filter(languages=("\U0010ffff",)),
               Filter(path_prefix="\U0010ffff")]
    q = unit_vectors(2, seed=9)
    for flt in filters:
        want = {i for i, p in enumerate(payloads) if flt.matches(p)}
        for hits in index.search(q, 400, where=flt):
            assert set(hits.ids.tolist()) == want, filter_expression(flt)


def test_a_selective_filter_still_returns_k(backend: MilvusBackend) -> None:
    """HNSW on a 2.3 server comes back short when ~0.1% pass: the backend scans them."""
    n, dim, k = 6000, 32, 10
    index = backend.open(CollectionSpec("wide.g1", dim, "ip"))
    data = unit_vectors(n, dim, seed=11)
    payloads = [Payload(f"d{i // 6}", f"p/{i % 500:03d}/f.py") for i in range(n)]
    for lo in range(0, n, 2000):
        index.upsert(range(lo, lo + 2000), data[lo : lo + 2000], payloads[lo : lo + 2000])
    index.flush()
    queries = unit_vectors(3, dim, seed=12)
    for flt in (Filter(path_prefix="p/007/"), Filter(doc_ids=("d5", "d700"))):
        passing = np.array([i for i in range(n) if flt.matches(payloads[i])])
        for q, hits in zip(queries, index.search(queries, k, where=flt), strict=True):
            want = passing[np.argsort(-(data[passing] @ q))[:k]]
            assert hits.ids.tolist() == want.tolist()
    allowed = np.arange(3, n, 997, dtype=np.int64)  # 7 ids
    for hits in index.search(queries, k, allowed_ids=allowed):
        assert set(hits.ids.tolist()) == set(allowed.tolist())


def test_reopen_drop_and_collections(backend_factory: BackendFactory) -> None:
    spec = CollectionSpec("ns-1.x.g2", 16, "cosine")
    first = backend_factory()
    index = first.open(spec)
    v = unit_vectors(50, seed=3)
    index.upsert(range(50), v, [Payload(f"d{i}", f"src/{i % 5}.py") for i in range(50)])
    index.delete([0, 1])
    first.open(CollectionSpec("other.g1", 4, "l2"))
    first.close()  # flushes

    second = backend_factory()
    assert second.collections() == ["ns-1.x.g2", "other.g1"]
    with pytest.raises(DimensionMismatch):
        second.open(CollectionSpec("ns-1.x.g2", 32, "cosine"))
    again = second.open(spec)
    assert again.count() == 48
    hits = again.search(v[:1], 50, where=Filter(path_prefix="src/0"))[0]
    assert set(hits.ids.tolist()) == set(range(5, 50, 5))
    second.drop("ns-1.x.g2")
    second.drop("never-existed.g1")
    assert second.collections() == ["other.g1"]
    assert second.open(CollectionSpec("ns-1.x.g2", 8, "ip")).count() == 0


def test_a_collection_that_cannot_be_loaded_is_unavailable(backend: MilvusBackend) -> None:
    """Released (as on a restarted server), the collection is loaded again on first use;
    when the server cannot load it — a restarted 2.3 server answers "index not found" until
    it has read its metadata; here the index is gone — the call is EngineUnavailable
    (retry later), never a bare engine error (INTERNAL)."""
    index = backend.open(CollectionSpec("released.g1", 16, "cosine"))
    v = unit_vectors(20, seed=31)
    index.upsert(range(20), v)
    index.flush()
    client = backend._connect()
    client.release_collection(index.collection)
    assert index.search(v[3:4], 1)[0].ids.tolist() == [3]
    client.release_collection(index.collection)
    client.drop_index(index.collection, "vector")
    with pytest.raises(EngineUnavailable, match="could not load it yet"):
        index.search(v[3:4], 1)


# -- the service on a Milvus server that dies ----------------------------------------------------
def test_a_milvus_server_that_dies_gives_unavailable_then_serves_again(
        tmp_path: Path, embedder: Embedder) -> None:
    """The Milvus server is killed mid-traffic (SIGKILL to its process group): searches
    and upserts answer UNAVAILABLE with a retry delay, and nothing refused is half-written
    (the catalog, which answers without the engine, has no trace of it). Restarted on its
    data at the same address, it serves every acknowledged document again from the same
    generation and takes writes. Then its collections vanish behind the service's back (as
    they would from a server back on an empty volume): the service rebuilds each from the
    catalog while running and serves again."""
    from conftest import (
        assert_engine_down_refuses,
        assert_rebuilt_from_catalog,
        engine_docs,
        make_settings,
        running_server,
        when_served,
    )
    from pymilvus import MilvusClient

    from retriever.client import RetrieverClient
    from retriever.v1 import retriever_pb2 as pb

    if not SERVER_BIN.exists():
        pytest.skip("no Milvus server venv (.venv-milvus-server): `make milvus-server`")
    base = tmp_path / "milvus"
    base.mkdir()
    ports = (_free_port(), _free_port(), _free_port())
    uri = f"http://127.0.0.1:{ports[0]}"
    alpha = {f"alpha{i}" for i in range(5)}
    proc = _start_server(base, *ports)
    try:
        _wait_ready(uri, proc, base)
        settings = make_settings(tmp_path / "data", index_backend="milvus", milvus_uri=uri)
        with running_server(settings, embedder) as st, RetrieverClient(st.address) as client:
            client.upsert("eng", engine_docs("alpha"))
            client.upsert("ops", engine_docs("beta", 3))
            assert len(client.search("eng", "alpha", top_k=10).hits) == 5
            _stop(proc, ((signal.SIGKILL, 30.0),))  # a crash
            assert_engine_down_refuses(client, "eng")
            assert client.get_document("eng", "alpha0").document.doc_id == "alpha0"  # kept

            proc = _restart_on_its_data(base)
            _wait_ready(uri, proc, base)
            # The service's connection finds the server again, which loads the collection.
            response = when_served(lambda: client.search("eng", "return", top_k=20), 60)
            assert {h.chunk.doc_id for h in response.hits} == alpha
            assert response.lineage.index_generation == 1  # its own data, not a rebuild
            client.upsert("eng", [pb.Document(doc_id="gamma", path="gamma.py",
                                              content="def gamma():\n    return 3\n")])

            raw = MilvusClient(uri=uri)
            try:
                for name in raw.list_collections():
                    raw.drop_collection(name)
            finally:
                raw.close()
            assert_rebuilt_from_catalog(
                st, client, {"eng": alpha | {"gamma"}, "ops": {f"beta{i}" for i in range(3)}},
                "milvus")
    finally:
        _stop(proc)
        shutil.rmtree(base / "data", ignore_errors=True)  # ~560 MB of unpacked binaries
