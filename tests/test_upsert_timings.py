"""UpsertDocumentsResponse.timings: where the server spent an upsert, stage by stage."""

from __future__ import annotations

import contextvars
import threading
import time
import urllib.request
from pathlib import Path

import pytest
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

    settings = make_settings(tmp_path, upsert_shed_after_s=0.1, embed_doc_order="least_left",
                             upsert_shed_delay_s=0)  # the other shedding rule: below
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


def _document_slices_begun(st) -> float:  # noqa: ANN001
    url = f"http://127.0.0.1:{st.info['metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    line = 'retriever_model_wait_seconds_count{class="document"}'
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))


def test_a_new_upsert_the_queued_ones_would_delay_too_long_is_refused(tmp_path: Path,
                                                                        embedder) -> None:  # noqa: ANN001
    """upsert_shed_delay_s: a new stream's first message is refused, before any embedding,
    when the upserts queued for the model would delay it by more than the limit and more
    than its own work. Two bulk upserts side by side are both admitted (each delays the
    other by at most its own size); with both in progress, a third upsert smaller than
    their work left is delayed by about twice its own work: refused (the rule's arithmetic
    is tests/test_batcher.py's). A stream's later messages are never refused; what is
    refused commits nothing and is admitted once the backlog is gone."""
    import grpc
    from grpc_status import rpc_status

    from retriever.server.app import ServerThread

    st = ServerThread(make_settings(tmp_path, upsert_shed_delay_s=0.02), embedder).start()
    text = "The starter ferments overnight; fold the dough and proof it cold. " * 3

    def docs(tag: str, n: int) -> list[pb.Document]:
        return [pb.Document(doc_id=f"{tag}{i}", content=f"{tag} {i}. {text}") for i in range(n)]

    done: dict[str, object] = {}

    def bulk(tag: str) -> None:
        with RetrieverClient(st.address) as c:
            done[tag] = c.upsert("delay", docs(tag, 160), batch_size=160).documents_created

    def begun() -> float:
        return _document_slices_begun(st)

    try:
        with RetrieverClient(st.address) as c:
            c.upsert("delay", docs("warm", 1))
            workers = []
            for tag in ("a", "b"):  # one after the other: both in the model's queue
                before = begun()
                workers.append(threading.Thread(target=bulk, args=(tag,)))
                workers[-1].start()
                deadline = time.monotonic() + 60
                while begun() <= before and time.monotonic() < deadline:
                    time.sleep(0.005)
            # Smaller than either bulk upsert's work left: each delays it by its own size.
            with pytest.raises(grpc.RpcError) as refused:
                c.upsert("delay", docs("c", 80), batch_size=80)
            # A stream whose first message needs no embedding (a document unchanged) goes
            # on with a big second message (which, were it the first, would be refused).
            second = c.upsert_stream([
                pb.UpsertDocumentsRequest(namespace="delay", documents=docs("warm", 1)),
                pb.UpsertDocumentsRequest(namespace="delay", documents=docs("f", 20))])
            still_running = all(w.is_alive() for w in workers)
            for w in workers:
                w.join(120)
        assert still_running, "a bulk upsert finished before the probes"
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "upsert_shed_delay_s" in refused.value.details()
        status = rpc_status.from_call(refused.value)
        assert status is not None and any(
            d.type_url.endswith("google.rpc.RetryInfo") for d in status.details)
        assert second.documents_unchanged == 1 and second.documents_created == 20
        assert done == {"a": 160, "b": 160}  # bulk upserts side by side were both admitted
        with RetrieverClient(st.address) as c:
            with pytest.raises(grpc.RpcError) as missing:
                c.get_document("delay", "c0")
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing committed
            assert c.upsert("delay", docs("c", 80), batch_size=80).documents_created == 80
    finally:
        st.stop()
