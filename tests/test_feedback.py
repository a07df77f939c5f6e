"""RecordFeedback and online precision@k: joined to what a recent Search or BatchSearch
returned, exported over a sliding window on /metrics. The real server, and the log itself
with a clock of its own."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import make_settings, running_server

from retriever.client import RetrieverClient
from retriever.errors import InvalidArgument, NotFound
from retriever.slo.feedback import FeedbackLog, WindowStats
from retriever.v1 import retriever_pb2 as pb

NS = "fb"
TEXTS = ["Apples are crisp red fruit picked from orchard trees.",
         "A car engine burns petrol to turn the wheels.",
         "The moon orbits the earth every month.",
         "Knead the dough and bake the bread in a hot oven.",
         "Rust borrows references without a garbage collector.",
         "Chess openings: the Sicilian Defence answers e4 with c5."]


@pytest.fixture(scope="module")
def server(embedder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:  # noqa: ANN001
    settings = make_settings(tmp_path_factory.mktemp("data") / "d", feedback_log_size=3)
    with running_server(settings, embedder) as st:
        yield st


@pytest.fixture(scope="module")
def client(server) -> Iterator[RetrieverClient]:  # noqa: ANN001
    with RetrieverClient(server.address, timeout=120) as c:
        c.upsert(NS, [pb.Document(doc_id=f"doc{i}", content=t) for i, t in enumerate(TEXTS)])
        c.create_namespace("fb-other")
        yield c


def online(server, k: int, name: str = "retriever_online_precision_at_k") -> float | None:  # noqa: ANN001
    port = server.info["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for labels, value in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M):
        if set(labels.split(",")) == {f'namespace="{NS}"', f'k="{k}"'}:
            return float(value)
    return None


def search(client: RetrieverClient, rid: str, query: str = "fruit and bread") -> list[str]:
    resp = client.search(NS, query, top_k=6, request_id=rid)
    assert resp.lineage.request_id == rid
    return [h.chunk.chunk_id for h in resp.hits]


def judge(client: RetrieverClient, rid: str, *verdicts: tuple[str, bool],
          ns: str = NS) -> pb.RecordFeedbackResponse:
    return client.stub.RecordFeedback(pb.RecordFeedbackRequest(
        namespace=ns, request_id=rid,
        feedback=[pb.ChunkFeedback(chunk_id=c, relevant=r) for c, r in verdicts]), timeout=30)


@pytest.mark.integration
def test_feedback_moves_online_precision(client: RetrieverClient, server) -> None:  # noqa: ANN001
    assert online(server, 5) is None  # nothing judged yet: no series
    ids = search(client, "req-a")
    assert len(ids) == 6
    # One relevant and one not, both in the top 5: precision@5 = 1/2.
    resp = judge(client, "req-a", (ids[0], True), (ids[3], False))
    assert (resp.recorded, resp.relevant) == (2, 1)
    assert online(server, 5) == 0.5 and online(server, 10) == 0.5
    assert online(server, 1) == 1.0  # only rank 1 is judged within the top 1
    assert online(server, 5, "retriever_online_judged_at_k") == 2
    # Judging rank 6 counts at k=10 only; judging a chunk again replaces its verdict.
    judge(client, "req-a", (ids[5], True), (ids[3], True))
    assert online(server, 5) == 1.0 and online(server, 10) == 1.0
    assert online(server, 10, "retriever_online_judged_at_k") == 3
    # Another request: its judgements add to the window.
    ids_b = search(client, "req-b", "the moon")
    judge(client, "req-b", (ids_b[0], False), (ids_b[1], False))
    assert online(server, 5) == pytest.approx(2 / 4)


@pytest.mark.integration
def test_feedback_errors(client: RetrieverClient) -> None:
    ids = search(client, "req-err")
    with pytest.raises(grpc.RpcError) as err:
        judge(client, "never-seen", (ids[0], True))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-seen" in err.value.details() and "feedback_log_size" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        judge(client, "req-err", ("f" * 32, True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not returned by request 'req-err'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        judge(client, "req-err", (ids[0], True), ns="fb-other")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fb-other" in (
        err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        judge(client, "req-err", (ids[0], True), (ids[0], False))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        judge(client, "req-err")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in (
        err.value.details())
    # The log holds 3 responses (feedback_log_size): older ones are evicted.
    for rid in ("req-1", "req-2", "req-3"):
        search(client, rid)
    with pytest.raises(grpc.RpcError) as err:
        judge(client, "req-err", (ids[0], True))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.integration
def test_batch_search_is_judged_per_search(client: RetrieverClient) -> None:
    resp = client.stub.BatchSearch(pb.BatchSearchRequest(requests=[
        pb.SearchRequest(namespace=NS, query="the moon", top_k=2),
        pb.SearchRequest(namespace=NS, query="bread in the oven", top_k=2)]), timeout=60,
        metadata=[("x-request-id", "batch-1")])
    second = resp.responses[1].hits[0].chunk.chunk_id
    assert judge(client, "batch-1", (second, True), ns="").recorded == 1


def test_the_window_slides_and_the_log_is_bounded() -> None:
    now = [1000.0]
    log = FeedbackLog(size=2, window_s=60, ks=(1, 5), clock=lambda: now[0])
    log.record("r1", [("ns", ["a", "b", "c"])])
    assert log.judge("ns", "r1", [("a", True), ("c", False)]) == (2, 1, {"ns": (2, 1)})
    assert log.window() == [WindowStats("ns", 1, 1, 1), WindowStats("ns", 5, 1, 2)]
    now[0] += 61
    assert log.window() == []
    log.record("r2", [("ns", ["x"])])
    log.record("r3", [("ns", ["y"])])
    with pytest.raises(NotFound):
        log.judge("ns", "r1", [("a", True)])  # evicted by r2 and r3
    with pytest.raises(InvalidArgument):
        log.judge("ns", "r2", [("y", True)])
    with pytest.raises(InvalidArgument):
        log.judge("ns", "", [("x", True)])


def test_feedback_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feedback_log_size"):
        make_settings(tmp_path, feedback_log_size=0)


def test_judgements_count_for_the_namespace_that_returned_them() -> None:
    """A BatchSearch over two namespaces judged without a namespace: each judgement is
    booked to its own chunk's namespace, not to the first one searched."""
    log = FeedbackLog(size=4, window_s=60.0)
    log.record("r1", [("nsa", ["a1", "a2"]), ("nsb", ["b1", "b2"])], trace_id="")
    assert log.judge("", "r1", [("b1", True), ("b2", False), ("a2", True)]) == (
        3, 2, {"nsb": (2, 1), "nsa": (1, 1)})


@pytest.mark.integration
def test_feedback_on_a_deleted_namespace_is_not_found(client: RetrieverClient) -> None:
    """A search of a namespace deleted since was still judged: its series came back (and
    took a label), and once re-created, the old namespace's hits counted for the new one."""
    client.upsert("fb-gone", [pb.Document(doc_id="d", content=TEXTS[0])])
    resp = client.search("fb-gone", "fruit", top_k=1, request_id="req-gone")
    chunk = resp.hits[0].chunk.chunk_id
    client.delete_namespace("fb-gone")
    client.upsert("fb-gone", [pb.Document(doc_id="d", content=TEXTS[0])])  # the same name
    with pytest.raises(grpc.RpcError) as e:
        judge(client, "req-gone", (chunk, True), ns="fb-gone")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "deleted" in e.value.details()
    client.delete_namespace("fb-gone")


def test_forgetting_a_namespace_keeps_the_other_searches_of_a_batch() -> None:
    log = FeedbackLog(10, 60)
    log.record("batch", [("a", ["ca"]), ("b", ["cb"])], trace_id="t")
    log.forget("a")
    with pytest.raises(InvalidArgument):
        log.judge("", "batch", [("ca", True)])
    assert log.judge("", "batch", [("cb", True)])[:2] == (1, 1)
    log.forget("b")
    with pytest.raises(NotFound):
        log.judge("", "batch", [("cb", True)])
