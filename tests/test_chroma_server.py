"""The Chroma backend against a real Chroma server (`chroma run`), through HttpClient.

One server per module (it is ready in about a second); a representative part of the
VectorIndex contract runs through it: writes, searches, pushed-down filters, deletes,
reopening from a second backend object, dropping, and a server that goes away.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("chromadb")

import httpx  # noqa: E402
from test_indexers import FILTERS, check_hits, exact_top_k, payload_of, unit_vectors  # noqa: E402

from indexers import (  # noqa: E402
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    Filter,
    Payload,
    create_backend,
)
from indexers.chroma_index import ChromaBackend  # noqa: E402

pytestmark = pytest.mark.integration

CHROMA = Path(sys.executable).parent / "chroma"
DIM = 16


@dataclass
class ChromaServer:
    proc: subprocess.Popen[bytes]
    url: str
    path: Path
    log: Path
    start_s: float  # from spawn to the first heartbeat answered

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_chroma(data: Path, timeout_s: float = 60.0) -> ChromaServer:
    """`chroma run` on a free loopback port, returned once it answers its heartbeat."""
    if not CHROMA.exists():
        pytest.skip(f"no chroma CLI at {CHROMA}")
    data.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = data.parent / f"{data.name}.log"
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}  # the child's env only
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(CHROMA), "run", "--path", str(data), "--host",
                                 "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    server = ChromaServer(proc, url, data, log, 0.0)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"chroma run exited with {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{url}/api/v2/heartbeat", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            server.stop()
            raise RuntimeError(f"chroma run did not answer in {timeout_s} s")
        time.sleep(0.05)
    server.start_s = time.monotonic() - started
    return server


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = start_chroma(tmp_path_factory.mktemp("chroma-server") / "data")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def remote(chroma_server: ChromaServer, tmp_path: Path) -> Iterator[ChromaBackend]:
    backend = create_backend("chroma", tmp_path, url=chroma_server.url, timeout_s=5.0)
    assert isinstance(backend, ChromaBackend)
    yield backend
    backend.close()


@pytest.fixture
def spec(request: pytest.FixtureRequest) -> CollectionSpec:
    """A collection name of its own per test: the server outlives each test."""
    return CollectionSpec(f"ns/{request.node.name}.g1", DIM, "cosine")


def test_the_server_started_and_answers(chroma_server: ChromaServer,
                                        record_property: pytest.RecordProperty) -> None:
    record_property("chroma_start_s", round(chroma_server.start_s, 2))
    print(f"chroma run answered its heartbeat {chroma_server.start_s:.2f} s after spawn")
    assert chroma_server.start_s < 60


def test_upsert_search_delete_through_http(remote: ChromaBackend, spec: CollectionSpec) -> None:
    index = remote.open(spec)
    # chromadb's HTTP session has no timeout of its own: the backend sets one.
    session = remote._client._server._session
    assert session.timeout.connect == 5.0 and session.timeout.read == 120.0
    v = unit_vectors(300, seed=1)
    ids = np.arange(300, dtype=np.int64) * 1000 + 2**40
    index.upsert(ids, v)
    assert index.count() == 300 and set(index.ids().tolist()) == set(ids.tolist())
    hits = index.search(v[[4, 9]], 5)
    for h, own in zip(hits, ids[[4, 9]], strict=True):
        check_hits(h, 5)
        assert h.ids[0] == own and h.scores[0] == pytest.approx(1.0, abs=1e-4)
    assert index.delete([int(ids[0]), int(ids[1]), 7]) == 2
    assert index.count() == 298
    assert int(ids[0]) not in index.search(v[:1], 10)[0].ids.tolist()
    (everything,) = index.search(v[:1], 1000)
    assert len(everything.ids) == 298
    allowed = ids[::10]
    for h in index.search(v[:3], 4, allowed_ids=allowed):
        check_hits(h, 4, set(allowed.tolist()) - {int(ids[0])})
        assert len(h.ids) == 4
    with pytest.raises(DimensionMismatch):
        index.upsert([1], unit_vectors(1, DIM + 1))
    with pytest.raises(ValueError):
        index.upsert([1, 1], unit_vectors(2))


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_scores_match_numpy_through_http(remote: ChromaBackend, metric: str) -> None:
    n = 80
    data = unit_vectors(n, seed=3)
    ids = np.arange(n, dtype=np.int64)
    queries = unit_vectors(3, seed=4)
    index = remote.open(CollectionSpec(f"scores-{metric}", DIM, metric))  # type: ignore[arg-type]
    index.upsert(ids, data)
    want_ids, want_scores = exact_top_k(data, ids, queries, 10, metric)
    for got, w_ids, w_scores in zip(index.search(queries, 10), want_ids, want_scores,
                                    strict=True):
        assert got.ids.tolist() == w_ids.tolist()
        np.testing.assert_allclose(got.scores, w_scores, rtol=1e-4, atol=1e-4)


def test_filters_through_http(remote: ChromaBackend, spec: CollectionSpec) -> None:
    n = 400
    index = remote.open(spec)
    vectors = unit_vectors(n, seed=7)
    payloads = [payload_of(i) for i in range(n)]
    index.upsert(range(n), vectors, payloads)
    queries = unit_vectors(2, seed=8)
    for flt in FILTERS:
        passing = {i for i in range(n) if flt.matches(payloads[i])}
        for hits in index.search(queries, 10, where=flt):
            check_hits(hits, 10, passing)
            assert len(hits.ids) == min(10, len(passing)), flt
        (every,) = index.search(queries[:1], n, where=flt)
        assert set(every.ids.tolist()) == passing, flt
    # A replaced record sheds its old payload on the server too.
    index.upsert([3], vectors[3:4], [Payload("moved", "elsewhere/x.py", "go")])
    assert 3 not in index.search(queries[:1], n, where=Filter(doc_ids=("doc-3",)))[0].ids
    assert index.search(queries[:1], 5, where=Filter(path_prefix="elsewhere/"))[0].ids.tolist() \
        == [3]


def test_reopen_from_another_backend_keeps_content_and_payloads(
        chroma_server: ChromaServer, tmp_path: Path, spec: CollectionSpec) -> None:
    first = ChromaBackend(tmp_path, url=chroma_server.url)
    index = first.open(spec)
    v = unit_vectors(60, seed=2)
    index.upsert(range(60), v, [payload_of(i) for i in range(60)])
    index.delete(range(0, 60, 5))
    index.flush()
    before = index.search(v[:3], 10)
    first.close()

    second = ChromaBackend(tmp_path, url=chroma_server.url)
    try:
        again = second.open(spec)
        assert again.count() == 48
        for b, a in zip(before, again.search(v[:3], 10), strict=True):
            assert a.ids.tolist() == b.ids.tolist()
        flt = Filter(kinds=("class",), metadata=(("team", "web"),))
        want = {i for i in range(60) if i % 5 and flt.matches(payload_of(i))}
        assert set(again.search(v[:1], 60, where=flt)[0].ids.tolist()) == want
        with pytest.raises(DimensionMismatch):
            second.open(CollectionSpec(spec.name, DIM * 2, "cosine"))
        second.close()
        third = ChromaBackend(tmp_path, url=chroma_server.url)
        with pytest.raises(DimensionMismatch):
            third.open(CollectionSpec(spec.name, DIM, "l2"))
        assert spec.name in third.collections()
        third.drop(spec.name)
        third.drop(spec.name)  # a missing one is not an error
        assert spec.name not in third.collections()
        assert third.open(CollectionSpec(spec.name, DIM * 2, "l2")).count() == 0
        third.drop(spec.name)
        third.close()
    finally:
        second.close()


def test_searches_during_writes_through_http(remote: ChromaBackend, spec: CollectionSpec) -> None:
    index = remote.open(spec)
    index.upsert(range(200), unit_vectors(200, seed=4))
    extra = unit_vectors(100, seed=5)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for r in range(10):
                index.upsert(range(200 + 10 * r, 210 + 10 * r), extra[10 * r:10 * r + 10])
                index.delete(range(5 * r, 5 * r + 5))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            while not done.is_set():
                for h in index.search(unit_vectors(2, seed=9), 10):
                    check_hits(h, 10)
                    assert len(h.ids) == 10
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader)
                                                   for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert index.count() == 250
    assert set(index.ids().tolist()) == set(range(50, 300))


def test_a_server_that_goes_away_is_engine_unavailable(tmp_path: Path) -> None:
    server = start_chroma(tmp_path / "short-lived")
    backend = ChromaBackend(tmp_path, url=server.url, timeout_s=2.0)
    try:
        index = backend.open(CollectionSpec("x.g1", 4, "cosine"))
        index.upsert([1], unit_vectors(1, 4))
        server.stop()
        with pytest.raises(EngineUnavailable, match="127.0.0.1"):
            index.search(unit_vectors(1, 4), 1)
        with pytest.raises(EngineUnavailable):
            index.upsert([2], unit_vectors(1, 4))
    finally:
        server.stop()
        backend.close()
