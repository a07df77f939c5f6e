"""Crash safety with a real server process: SIGKILL during a large upsert, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from retriever.client import RetrieverClient
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration
NS = "crash"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`retriever serve` as a child process with its own data dir and ports."""

    def __init__(self, data_dir: Path, **extra_env: str) -> None:
        """``extra_env``: more RETRIEVER_* settings for this server."""
        self.data_dir = data_dir
        self.port = _free_port()
        env = dict(os.environ, RETRIEVER_DATA_DIR=str(data_dir),
                   RETRIEVER_GRPC_PORT=str(self.port), RETRIEVER_METRICS_PORT="0",
                   RETRIEVER_INDEX_FLUSH_INTERVAL_S="3600", HF_HUB_OFFLINE="1", **extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retriever.cli", "serve", "--log-level", "WARNING"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the JSON "serving" line
        if not line:
            raise RuntimeError(f"server died: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        assert self.info["grpc_port"] == self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _doc(i: int, version: int) -> pb.Document:
    words = " ".join(f"w{i}v{version}x{j}" for j in range(350))
    return pb.Document(doc_id=f"doc-{i:04d}.txt", content=f"document {i} version {version}\n"
                       + words, revision=f"v{version}")


def _assert_consistent(client: RetrieverClient) -> dict[str, pb.GetDocumentResponse]:
    """Catalog and index agree and every listed document is whole."""
    status = client.status(NS)
    assert status.vector_count == status.chunk_count
    docs: dict[str, pb.GetDocumentResponse] = {}
    token = ""
    while True:
        page = client.list_documents(NS, page_size=200, page_token=token)
        for info in page.documents:
            docs[info.doc_id] = client.get_document(NS, info.doc_id)
        token = page.next_page_token
        if not token:
            break
    for doc_id, doc in docs.items():
        hits = client.search(NS, doc.document.content[:200], top_k=100,
                             filter=pb.SearchFilter(doc_ids=[doc_id])).hits
        assert {h.chunk.chunk_id for h in hits} == set(doc.chunk_ids), doc_id
        assert {h.chunk.document_version for h in hits} == {doc.version}
    return docs


def test_sigkill_during_large_upsert_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    acked: dict[str, int] = {}  # doc_id -> version acknowledged
    in_flight: dict[str, int] = {}
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        with RetrieverClient(server.address, timeout=120) as c:
            batch = 0
            while not stop.is_set():
                # New documents, and new versions of already acknowledged ones.
                docs = [_doc(batch * 4 + k, 1) for k in range(4)]
                if batch >= 2:
                    docs.append(_doc((batch - 2) * 4, 2))
                in_flight.clear()
                in_flight.update({d.doc_id: int(d.revision[1:]) for d in docs})
                try:
                    c.upsert(NS, docs, batch_size=len(docs))
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        failures.append(exc)
                    return
                for d in docs:
                    acked[d.doc_id] = int(d.revision[1:])
                batch += 1

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 240
    while len(acked) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # in the middle of the next upsert
    stop.set()
    t.join(60)
    assert not failures
    assert len(acked) >= 12

    restarted = ServerProcess(tmp_path / "data")
    try:
        report = restarted.info["reconciled"][NS]
        # The snapshot was never flushed (interval 3600 s): every acknowledged vector came back
        # from the catalog.
        assert report["vectors_restored"] > 0
        with RetrieverClient(restarted.address) as c:
            docs = _assert_consistent(c)
            for doc_id, version in acked.items():
                assert doc_id in docs, doc_id
                if doc_id not in in_flight:
                    assert docs[doc_id].version == version, doc_id
                else:  # the interrupted upsert: old or new version, whole
                    assert docs[doc_id].version in (version, in_flight[doc_id])
            for doc_id in docs:
                assert doc_id in acked or doc_id in in_flight, doc_id
            # The service goes on normally after the repair.
            c.upsert(NS, [_doc(9999, 1)])
            _assert_consistent(c)
    finally:
        assert restarted.terminate() == 0


def test_sigterm_drains_and_exits_zero_and_data_persists(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    with RetrieverClient(server.address) as c:
        c.upsert(NS, [_doc(i, 1) for i in range(3)])
    assert server.terminate() == 0
    assert (tmp_path / "data" / "indexes" / "faiss" / f"{NS}.g1" / "index.faiss").exists()
    again = ServerProcess(tmp_path / "data")
    try:
        # Shutdown flushed the index: nothing to repair.
        assert again.info["reconciled"][NS]["vectors_restored"] == 0
        with RetrieverClient(again.address) as c:
            docs = _assert_consistent(c)
            assert len(docs) == 3
    finally:
        assert again.terminate() == 0


def test_taken_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for env_name in ("RETRIEVER_GRPC_PORT", "RETRIEVER_METRICS_PORT"):
            env = dict(os.environ, RETRIEVER_DATA_DIR=str(tmp_path / "data"),
                       RETRIEVER_GRPC_PORT="0", RETRIEVER_METRICS_PORT="0")
            env[env_name] = str(port)
            proc = subprocess.run([sys.executable, "-m", "retriever.cli", "serve"], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 1, proc.stderr
            assert env_name in proc.stderr and str(port) in proc.stderr
            assert "Traceback" not in proc.stderr


def test_sigkill_during_a_sync_then_the_next_sync_finishes_the_job(tmp_path: Path) -> None:
    from gitrepo import TimedRepo

    root = tmp_path / "repos"
    repo = TimedRepo(root / "big")
    for i in range(48):
        repo.write(f"pkg/mod_{i:02d}.py",
                   f"def handler_{i}(request):\n    return 'response number {i}'\n")
    head = repo.commit("many modules")
    env = {"RETRIEVER_SYNC_ROOTS": json.dumps([str(root)]),
           "RETRIEVER_SYNC_BATCH_DOCUMENTS": "2"}
    server = ServerProcess(tmp_path / "data", **env)
    with RetrieverClient(server.address, timeout=120) as c:
        started = c.sync_source("synced", str(repo.root), wait=False)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill it once part of the tree is applied
            run = c.status("synced").running_sync if c.list_namespaces().namespaces else None
            if run is not None and run.files_added >= 8:
                break
            time.sleep(0.05)
        assert run is not None and 8 <= run.files_added < 48, run
    server.kill()

    restarted = ServerProcess(tmp_path / "data", **env)
    try:
        with RetrieverClient(restarted.address, timeout=120) as c:
            status = c.status("synced")
            assert status.last_sync.sync_id == started.sync_id
            assert status.last_sync.state == pb.SYNC_STATE_FAILED
            assert "interrupted" in status.last_sync.error
            assert status.source.never_synced and not status.source.indexed_commit
            partial = status.document_count
            assert partial >= 8
            done = c.sync_source("synced", wait=True, timeout=240)
            assert done.state == pb.SYNC_STATE_SUCCEEDED and done.commit == head
            # What the killed sync had applied was kept, not embedded again.
            assert done.chunks_reused >= partial or done.documents_unchanged >= partial
            docs = {d.doc_id: d for d in c.list_documents("synced", page_size=100).documents}
            assert set(docs) == {f"pkg/mod_{i:02d}.py" for i in range(48)}
            chunk_ids: set[str] = set()
            for doc_id in docs:
                got = c.get_document("synced", doc_id)
                assert got.document.content == repo.show(head, doc_id)
                assert got.document.revision == head
                assert not chunk_ids & set(got.chunk_ids)
                chunk_ids |= set(got.chunk_ids)
            final = c.status("synced")
            assert final.chunk_count == final.vector_count == len(chunk_ids)
            assert final.source.indexed_commit == head and final.source.commits_behind == 0
    finally:
        assert restarted.terminate() == 0


def test_a_stop_during_start_up_says_it_waits_for_the_load_then_exits(tmp_path: Path) -> None:
    """SIGTERM while the models load: the process said nothing (at its default log level)
    and seemed to ignore the signal until the load was done. It now says it stops once
    loaded, then drains and exits 0 without ever serving."""
    port = _free_port()
    env = dict(os.environ, RETRIEVER_DATA_DIR=str(tmp_path / "data"),
               RETRIEVER_GRPC_PORT=str(port), RETRIEVER_METRICS_PORT="0", HF_HUB_OFFLINE="1",
               RETRIEVER_EMBEDDER_BACKEND="torch")  # a real load, no model build
    proc = subprocess.Popen(
        [sys.executable, "-m", "retriever.cli", "serve", "--log-level", "INFO"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        assert proc.stderr is not None
        for line in proc.stderr:  # until the port is bound: the load starts then
            seen.append(line)
            if "gRPC bound" in line:
                break
        else:
            raise AssertionError("the server never bound its port: " + "".join(seen))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err
    assert "stop requested during start-up" in err
    assert '"event": "serving"' not in out  # it never let callers in
