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


def test_upserts_are_shed_while_one_waits_too_long_for_the_model(tmp_path: Path,
                                                                  embedder) -> None:  # noqa: ANN001
    """A new upsert stream is refused (RESOURCE_EXHAUSTED, RetryInfo) while an upsert has
    waited longer than upsert_shed_after_s for its first pass; those admitted finish."""
    import grpc
    from grpc_status import rpc_status

    from retriever.server.app import ServerThread

    settings = make_settings(tmp_path, upsert_shed_after_s=0.1, embed_doc_order="least_left")
    st = ServerThread(settings, embedder).start()
    text = "The starter ferments overnight; fold the dough and proof it cold. " * 12

    def docs(tag: str, n: int) -> list[pb.Document]:
        return [pb.Document(doc_id=f"{tag}{i}", content=f"{tag} {i}. {text}") for i in range(n)]

    done: dict[str, object] = {}

    def upsert(tag: str, n: int) -> None:
        with RetrieverClient(st.address) as c:
            try:
                done[tag] = c.upsert("shed", docs(tag, n), batch_size=n).documents_created
            except grpc.RpcError as exc:
                done[tag] = exc

    try:
        with RetrieverClient(st.address) as c:
            c.upsert("shed", docs("warm", 1))
            bulk = threading.Thread(target=upsert, args=("a", 40))
            bulk.start()
            time.sleep(0.3)
            # Shortest first: this larger job waits for the first one (about 1 s, when the
            # starvation guard gives it a slice), past the 0.1 s shedding bound.
            later = threading.Thread(target=upsert, args=("b", 60))
            later.start()
            refused = None
            deadline = time.monotonic() + 30
            i = 0
            while refused is None and time.monotonic() < deadline and later.is_alive():
                try:
                    c.upsert("shed", docs(f"c{i}-", 1))
                except grpc.RpcError as exc:
                    refused = exc
                i += 1
                time.sleep(0.03)
            bulk.join(120)
            later.join(120)
            assert refused is not None, "no upsert was shed"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "upsert_shed_after_s" in refused.details()
            status = rpc_status.from_call(refused)
            assert status is not None and any(
                d.type_url.endswith("google.rpc.RetryInfo") for d in status.details)
            assert done == {"a": 40, "b": 60}  # the streams already admitted finished
            c.upsert("shed", docs("after", 1))  # the backlog gone, upserts are admitted
    finally:
        st.stop()
