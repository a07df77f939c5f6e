"""UpsertDocumentsResponse.timings: where the server spent an upsert, stage by stage."""

from __future__ import annotations

import contextvars
import threading
import time
from pathlib import Path

from conftest import make_settings

from retriever.client import RetrieverClient
from retriever.domain import Document
from retriever.service import RetrieverService
from retriever.slo.metrics import collect_stages
from retriever.v1 import retriever_pb2 as pb

DOCS = [pb.Document(doc_id=f"d{i}", path=f"notes/d{i}.md",
                    content=f"Note {i}. Sourdough bread needs a starter fed daily. " * 20)
        for i in range(4)]


def _s(d) -> float:  # noqa: ANN001
    return d.ToNanoseconds() / 1e9


def test_an_upsert_says_where_its_time_went(client: RetrieverClient) -> None:
    resp = client.upsert("timings", DOCS, batch_size=2)  # two messages, summed
    t = resp.timings
    assert resp.chunks_embedded > 0
    for stage in (t.chunk, t.embed, t.embed_model, t.commit, t.index_write, t.lexical_write):
        assert _s(stage) > 0, t
    assert _s(t.embed_model) <= _s(t.embed)
    stages = sum(_s(d) for d in (t.queued, t.chunk, t.embed, t.lock_wait, t.index_write,
                                 t.lexical_write, t.commit))
    assert stages <= _s(resp.elapsed), (t, resp.elapsed)

    again = client.upsert("timings", DOCS, batch_size=2)
    assert again.documents_unchanged == len(DOCS)
    assert _s(again.timings.embed) == 0 and _s(again.timings.embed_model) == 0
    assert _s(again.timings.chunk) > 0  # still chunked to find them unchanged


def test_the_wait_for_the_namespace_lock_is_its_own_stage(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    svc = RetrieverService(make_settings(tmp_path), embedder=embedder)
    svc.start()
    try:
        svc.create_namespace("locked")
        lock = svc.namespaces.get("locked").write_lock
        docs = [Document(doc_id="a", content="rye bread with caraway seeds")]
        out: dict[str, float] = {}

        def sample(name: str, stage: str) -> float:
            value = svc.metrics.registry.get_sample_value(
                f"retriever_stage_duration_seconds_{name}", {"stage": stage})
            return value or 0.0

        def upsert() -> None:
            stages = collect_stages()
            svc.upsert("locked", docs)
            out.update(stages)

        lock.acquire()
        worker = threading.Thread(target=contextvars.Context().run, args=(upsert,))
        try:
            worker.start()
            deadline = time.monotonic() + 60
            while sample("count", "embed") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # chunked and embedded: next it waits for the lock
            time.sleep(0.3)
        finally:
            lock.release()
        worker.join(60)
        assert out["lock_wait"] >= 0.3, out
        assert out["embed"] > 0 and out["commit"] > 0, out
        assert sample("sum", "lock_wait") >= 0.3  # exported too
    finally:
        svc.close()
