"""Shaping (collapse, max_hits_per_path, max_staleness) must not lose matching hits: a
document whose chunks fill the first candidate pool, or stale hits ranked first, must not
leave a search with fewer than top_k hits while other matching chunks exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings, running_server
from gitrepo import TimedRepo

from retriever.client import RetrieverClient
from retriever.v1 import retriever_pb2 as pb

QUERY = "parse the configuration file settings"


def big_module(n: int) -> str:
    return "import os\n\n" + "".join(
        f'\ndef parse_config_{i}(path):\n    """Parse the configuration file number {i} and '
        'return its settings as a dict."""\n    settings = {}\n    with open(path) as handle:\n'
        '        for line in handle:\n            key, _, value = line.partition("=")\n'
        '            settings[key.strip()] = value.strip()\n    return settings\n\n'
        for i in range(n))


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repos")


@pytest.fixture(scope="module")
def client(roots: Path, embedder, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
           ) -> Iterator[RetrieverClient]:
    # A small hybrid pool, so that one document can fill it with few chunks.
    settings = make_settings(tmp_path_factory.mktemp("data") / "d", sync_roots=[roots],
                             staleness_refresh_s=3600, hybrid_candidates=20)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=300) as c:
        yield c


@pytest.mark.parametrize("shape", [{"collapse": True}, {"max_hits_per_path": 1}])
def test_one_document_filling_the_pool_does_not_hide_the_others(
        client: RetrieverClient, shape: dict) -> None:
    ns = "fill-" + next(iter(shape)).replace("_", "-")
    small = [pb.Document(doc_id=f"s{i}", path=f"lib/s{i}.py", content=(
        f'def read_settings_{i}(p):\n    """Parse the configuration file and return its '
        'settings."""\n    return open(p).read()\n')) for i in range(4)]
    r = client.upsert(ns, [pb.Document(doc_id="big", path="src/big.py",
                                       content=big_module(80)), *small])
    assert r.results[0].chunk_count > 3 * 8 + 8  # more than the first pool of top_k=3
    for mode in ("dense", "lexical", "hybrid"):
        hits = client.search(ns, QUERY, top_k=3, mode=mode, **shape).hits
        assert len(hits) == 3, (mode, [h.chunk.doc_id for h in hits])
        assert len({h.chunk.doc_id for h in hits}) == 3


def test_stale_hits_do_not_take_the_places_of_fresh_ones(client: RetrieverClient,
                                                         roots: Path) -> None:
    repo = TimedRepo(roots / "stale")
    for i in range(4):
        repo.write(f"hot/h{i}.py", f"def compute_invoice_total_{i}(invoice):\n"
                   "    '''Compute the invoice total.'''\n    return sum(invoice.lines)\n")
        repo.write(f"cold/c{i}.py", f"def total_{i}(items):\n"
                   "    '''Compute the invoice total of items.'''\n    return len(items)\n")
    repo.commit("initial")
    assert client.sync_source("stale", str(repo.root), wait=True).state == \
        pb.SYNC_STATE_SUCCEEDED
    for i in range(4):  # a pending commit: the hot files' hits are now stale
        repo.write(f"hot/h{i}.py", f"def compute_invoice_total_{i}(invoice):\n"
                   "    '''Compute the invoice total.'''\n    return sum(invoice.lines) + 0\n")
    repo.commit("touch the hot files")
    client.status("stale")  # reads the source afresh
    for mode in ("dense", "lexical", "hybrid"):
        hits = client.search("stale", "compute the invoice total", top_k=3, mode=mode,
                             max_staleness=3600).hits
        assert [h.chunk.path.split("/")[0] for h in hits] == ["cold"] * 3, (
            mode, [h.chunk.path for h in hits])
        assert [h.rank for h in hits] == [1, 2, 3]
