"""The typed clients' surface: the sync and the async client offer the same methods with the
same parameters, every SearchRequest field has an option, and each option, RecordFeedback,
RegisterGoldenSet, Evaluate and SyncSource reach the real server through both clients (one
test body run against each, the async client driven on an event loop of its own)."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings, running_server
from gitrepo import TimedRepo
from google.protobuf.duration_pb2 import Duration

from retriever import aio_client, client
from retriever._requests import chunk_feedback, search_mode
from retriever.aio_client import AsyncRetrieverClient
from retriever.client import RetrieverClient, search_request
from retriever.v1 import retriever_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- the two surfaces, without a server -----------------------------------------------------
def _public(cls: type) -> dict[str, Callable[..., Any]]:
    return {n: f for n, f in vars(cls).items() if callable(f) and not n.startswith("_")}


# Where the two may differ, and why.
_LIFECYCLE = {"close"}  # grpc's sync channel.close() takes no grace period
_ANNOTATION_DIFFS = {
    ("upsert_stream", "requests"),  # the async one also takes an async iterable
    ("upsert", "documents"),        # the async one also takes an async iterable
    ("document_ids", "return"),     # Iterator[str] / AsyncIterator[str]
}


def test_both_clients_offer_the_same_methods() -> None:
    sync, aio = _public(RetrieverClient), _public(AsyncRetrieverClient)
    assert sorted(sync) == sorted(aio)
    for name in sorted(sync):
        s, a = sync[name], aio[name]
        assert not inspect.iscoroutinefunction(s), name
        if inspect.isgeneratorfunction(s):
            assert inspect.isasyncgenfunction(a), name
        else:
            assert inspect.iscoroutinefunction(a), f"{name} is not awaitable"
        if name in _LIFECYCLE:
            continue
        sp, ap = inspect.signature(s).parameters, inspect.signature(a).parameters
        assert list(sp) == list(ap), name
        for p in sp:
            assert (sp[p].kind, sp[p].default) == (ap[p].kind, ap[p].default), (name, p)
            if (name, p) not in _ANNOTATION_DIFFS:
                assert sp[p].annotation == ap[p].annotation, (name, p)
        if (name, "return") not in _ANNOTATION_DIFFS:
            assert (inspect.signature(s).return_annotation
                    == inspect.signature(a).return_annotation), name


def test_both_constructors_take_the_same_options() -> None:
    sp = inspect.signature(RetrieverClient.__init__).parameters
    ap = inspect.signature(AsyncRetrieverClient.__init__).parameters
    assert list(sp) == list(ap)
    for p in sp:
        assert sp[p].kind == ap[p].kind, p
        # The sync client retries only when asked (a CLI reports refusals as they come).
        if p != "retry":
            assert sp[p].default == ap[p].default, p


def test_every_call_takes_a_deadline() -> None:
    for name, f in _public(RetrieverClient).items():
        if name not in _LIFECYCLE:
            assert "timeout" in inspect.signature(f).parameters, name


def test_both_modules_export_the_same_helpers() -> None:
    assert client.search_request is aio_client.search_request
    assert set(client.__all__) - {"RetrieverClient"} == (
        set(aio_client.__all__) - {"AsyncRetrieverClient"})


def _keyword_only(f: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(f).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_every_search_request_field_has_an_option() -> None:
    options = _keyword_only(search_request)
    fields = set(pb.SearchRequest.DESCRIPTOR.fields_by_name)
    assert fields == {"namespace", "query", "top_k", "filter"} | set(options)
    for method in (RetrieverClient.search, AsyncRetrieverClient.search):
        got = _keyword_only(method)
        assert {n: (p.default, p.annotation) for n, p in got.items()} == {
            n: (p.default, p.annotation) for n, p in options.items()}


def test_unset_options_leave_the_fields_unset() -> None:
    req = search_request("ns", "q")
    assert req == pb.SearchRequest(namespace="ns", query="q", top_k=10)
    for optional in ("dense_weight", "min_score", "max_staleness", "filter"):
        assert not req.HasField(optional), optional
    # A configured 0 is sent as 0, not swallowed.
    req = search_request("ns", "q", dense_weight=0.0, min_score=0.0, max_staleness=0)
    assert req.HasField("dense_weight") and req.dense_weight == 0.0
    assert req.HasField("min_score") and req.HasField("max_staleness")


def test_every_option_sets_its_field() -> None:
    flt = pb.SearchFilter(path_prefix="src/")
    req = search_request("ns", "q", 3, flt, mode="lexical", rerank=True, dense_weight=0.25,
                         rerank_candidates=40, collapse=True, min_score=0.5,
                         max_hits_per_path=2, max_staleness=timedelta(minutes=1, seconds=1.5),
                         flag_stale=True)
    assert req == pb.SearchRequest(
        namespace="ns", query="q", top_k=3, filter=flt, mode=pb.LEXICAL, rerank=True,
        dense_weight=0.25, rerank_candidates=40, collapse=True, min_score=0.5,
        max_hits_per_path=2, max_staleness=Duration(seconds=61, nanos=500_000_000),
        flag_stale=True)


@pytest.mark.parametrize(("given", "expected"), [
    (None, pb.SEARCH_MODE_UNSPECIFIED), ("dense", pb.DENSE), ("LEXICAL", pb.LEXICAL),
    ("Hybrid", pb.HYBRID), (pb.DENSE, pb.DENSE), (pb.HYBRID, pb.HYBRID),
])
def test_mode_is_an_enum_value_or_its_name(given: object, expected: int) -> None:
    assert search_mode(given) == expected  # type: ignore[arg-type]
    assert search_request("ns", "q", mode=given).mode == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["bm25", "", "SEARCH_MODE_UNSPECIFIED", "dense "])
def test_an_unknown_mode_string_is_a_value_error_naming_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="'dense', 'lexical', 'hybrid'"):
        search_request("ns", "q", mode=bad)


@pytest.mark.parametrize("given", [90.25, timedelta(seconds=90.25),
                                   Duration(seconds=90, nanos=250_000_000)])
def test_max_staleness_takes_seconds_a_timedelta_or_a_duration(given: object) -> None:
    req = search_request("ns", "q", max_staleness=given)  # type: ignore[arg-type]
    assert req.max_staleness == Duration(seconds=90, nanos=250_000_000)


def test_feedback_as_a_mapping_pairs_or_messages() -> None:
    want = [pb.ChunkFeedback(chunk_id="a", relevant=True),
            pb.ChunkFeedback(chunk_id="b", relevant=False)]
    assert chunk_feedback({"a": True, "b": False}) == want
    assert chunk_feedback([("a", True), ("b", False)]) == want
    assert chunk_feedback(iter(want)) == want


# -- the real server, through both clients --------------------------------------------------
NS = "surface"
DOCS = {
    "guide/bread.md": (
        "# Baking bread\n\nBread needs flour, water, salt and yeast.\n\n"
        "## Kneading the dough\n\nKnead the dough for ten minutes until it is smooth and "
        "springs back when pressed.\n\n"
        "## Proving\n\nLet the dough rise in a warm place until it doubles in size.\n\n"
        "## Baking in the oven\n\nBake the loaf in a hot oven at 230 degrees for forty "
        "minutes, until the crust is deep brown.\n"),
    "guide/garden.md": (
        "# Growing tomatoes\n\nTomato plants want full sun and rich soil.\n\n"
        "## Watering\n\nWater the tomato plants deeply twice a week, at the roots.\n\n"
        "## Pruning\n\nPinch out the side shoots of the tomato plants as they grow.\n"),
    "src/retry.py": (
        '"""Retries with exponential backoff."""\n\nimport random\nimport time\n\n\n'
        "def backoff_delay(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:\n"
        '    """Exponential backoff with full jitter."""\n'
        "    return random.uniform(0, min(cap, base * 2 ** attempt))\n\n\n"
        "def retry(call, attempts: int = 4):\n"
        '    """Call until it succeeds, sleeping the backoff delay between attempts."""\n'
        "    for attempt in range(attempts):\n        try:\n            return call()\n"
        "        except ConnectionError:\n            time.sleep(backoff_delay(attempt))\n"
        "    return call()\n\n\n"
        "class RetryBudget:\n"
        '    """At most one retry for every ten requests."""\n\n'
        "    def __init__(self) -> None:\n        self.requests = 0\n        self.retries = 0\n"),
    "notes/moon.txt": ("The moon orbits the earth once every 27 days; its phases run from new "
                       "moon to full moon and back.\n"),
}


class _Blocking:
    """An AsyncRetrieverClient driven from test code: every awaitable method runs on the
    client's own event loop (a thread), so one test body serves both clients."""

    def __init__(self, address: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = self._run(self._make(address))

    @staticmethod
    async def _make(address: str) -> AsyncRetrieverClient:
        return AsyncRetrieverClient(address, timeout=60)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **kw: self._run(attr(*a, **kw))
        if inspect.isasyncgenfunction(attr):
            return lambda *a, **kw: iter(self._run(_collect(attr(*a, **kw))))
        return attr

    def close(self) -> None:
        self._run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _collect(items: Any) -> list[Any]:
    return [x async for x in items]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repos")


@pytest.fixture(scope="module")
def server(roots: Path, embedder, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
           ) -> Iterator[object]:
    # No re-ranker: rerank=True must reach the server and be refused there. Small chunks:
    # each section of the guides is a chunk of its own.
    settings = make_settings(tmp_path_factory.mktemp("data") / "d", sync_roots=[roots],
                             staleness_refresh_s=3600, chunk_tokens=72, overlap_tokens=0)
    with running_server(settings, embedder) as st:
        with RetrieverClient(st.address, timeout=120) as c:
            c.upsert(NS, [pb.Document(doc_id=p, path=p, content=t) for p, t in DOCS.items()])
        yield st


@pytest.fixture(scope="module", params=["sync", "async"])
def c(request: pytest.FixtureRequest, server) -> Iterator[Any]:  # noqa: ANN001
    if request.param == "sync":
        with RetrieverClient(server.address, timeout=60) as sync:
            yield sync
    else:
        aio = _Blocking(server.address)
        try:
            yield aio
        finally:
            aio.close()


def _kind(c: Any) -> str:
    return "sync" if isinstance(c, RetrieverClient) else "async"


def _docs(resp: pb.SearchResponse) -> list[str]:
    return [h.chunk.doc_id for h in resp.hits]


@pytest.mark.integration
def test_the_corpus_has_documents_of_several_chunks(c: Any) -> None:
    assert len(c.get_document(NS, "guide/bread.md").chunk_ids) >= 3
    assert sorted(c.document_ids(NS)) == sorted(DOCS)
    assert list(c.document_ids(NS, path_prefix="guide/")) == ["guide/bread.md",
                                                              "guide/garden.md"]


@pytest.mark.integration
def test_mode_reaches_the_server(c: Any) -> None:
    lexical = c.search(NS, "knead dough oven", top_k=5, mode="lexical")
    assert lexical.lineage.mode == pb.LEXICAL and lexical.lineage.analyzer
    assert lexical.hits and lexical.hits[0].chunk.doc_id == "guide/bread.md"
    assert all(h.HasField("lexical_score") and not h.HasField("dense_score")
               for h in lexical.hits)
    assert lexical.timings.HasField("lexical") and not lexical.timings.HasField("embed")

    dense = c.search(NS, "knead dough oven", top_k=5, mode="DENSE")
    assert dense.lineage.mode == pb.DENSE and dense.lineage.analyzer == ""
    assert all(h.HasField("dense_score") and not h.HasField("lexical_score")
               for h in dense.hits)
    assert dense.timings.HasField("ann") and not dense.timings.HasField("lexical")

    hybrid = c.search(NS, "knead dough oven", top_k=5, mode=pb.HYBRID)
    assert hybrid.lineage.mode == pb.HYBRID and hybrid.timings.HasField("fuse")
    assert all(h.HasField("fused_score") for h in hybrid.hits)
    # A value outside SearchMode is the server's to refuse.
    with pytest.raises(grpc.RpcError) as e:
        c.search(NS, "dough", mode=9)
    assert e.value.code() == INVALID and "mode" in e.value.details()


@pytest.mark.parametrize("method", ["search", "evaluate"])
def test_a_bad_mode_string_raises_before_any_call(method: str) -> None:
    # Nothing listens on this address: a call that went out would fail with UNAVAILABLE.
    with (RetrieverClient("127.0.0.1:1", timeout=5) as sync,
          pytest.raises(ValueError, match="'dense', 'lexical', 'hybrid'")):
        getattr(sync, method)(NS, "q", mode="semantic")
    aio = _Blocking("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="'dense', 'lexical', 'hybrid'"):
            getattr(aio, method)(NS, "q", mode="semantic")
    finally:
        aio.close()


@pytest.mark.integration
def test_collapse_gives_one_hit_per_document(c: Any) -> None:
    plain = c.search(NS, "bread dough tomato", top_k=100, mode="dense")  # every chunk
    assert len(set(_docs(plain))) < len(plain.hits)  # several chunks of one document
    collapsed = c.search(NS, "bread dough tomato", top_k=100, mode="dense", collapse=True)
    assert _docs(collapsed) == list(dict.fromkeys(_docs(plain))) and len(collapsed.hits) == 4
    # Each document's hit is its best chunk.
    best: dict[str, float] = {}
    for h in plain.hits:
        best.setdefault(h.chunk.doc_id, h.score)
    assert all(h.score == pytest.approx(best[h.chunk.doc_id]) for h in collapsed.hits)


@pytest.mark.integration
def test_min_score_drops_hits(c: Any) -> None:
    plain = c.search(NS, "how long to bake bread", top_k=20, mode="dense")
    cut = plain.hits[len(plain.hits) // 2].score
    above = c.search(NS, "how long to bake bread", top_k=20, mode="dense", min_score=cut)
    assert above.hits and all(h.score >= cut for h in above.hits)
    assert len(above.hits) < len(plain.hits)
    assert _docs(above) == _docs(plain)[:len(above.hits)]


@pytest.mark.integration
def test_max_hits_per_path_caps(c: Any) -> None:
    plain = c.search(NS, "bread dough tomato", top_k=100, mode="dense")  # every chunk
    per_path: dict[str, int] = {}
    for h in plain.hits:
        per_path[h.chunk.path] = per_path.get(h.chunk.path, 0) + 1
    assert max(per_path.values()) > 2
    for cap in (1, 2):
        capped = c.search(NS, "bread dough tomato", top_k=100, mode="dense",
                          max_hits_per_path=cap)
        counts: dict[str, int] = {}
        for h in capped.hits:
            counts[h.chunk.path] = counts.get(h.chunk.path, 0) + 1
        assert counts == {p: min(n, cap) for p, n in per_path.items()}


@pytest.mark.integration
def test_dense_weight_rerank_and_candidates_reach_the_server(c: Any) -> None:
    q = "exponential backoff between attempts"
    only_dense = c.search(NS, q, top_k=3, mode="hybrid", dense_weight=1.0)
    dense = c.search(NS, q, top_k=3, mode="dense")
    assert [h.chunk.chunk_id for h in only_dense.hits] == [h.chunk.chunk_id for h in dense.hits]
    for options, field in [({"dense_weight": 1.5}, "dense_weight"),
                           ({"rerank_candidates": 1_000_000}, "rerank_candidates"),
                           ({"max_hits_per_path": -1}, "max_hits_per_path"),
                           ({"max_staleness": -1.0}, "max_staleness")]:
        with pytest.raises(grpc.RpcError) as e:
            c.search(NS, q, mode="hybrid", **options)
        assert e.value.code() == INVALID and field in e.value.details(), options
    with pytest.raises(grpc.RpcError) as e:
        c.search(NS, q, rerank=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reranker_model" in e.value.details()


@pytest.mark.integration
def test_batch_search_with_built_requests(c: Any) -> None:
    rid = f"batch-{_kind(c)}"
    resp = c.batch_search([search_request(NS, "tomato plants", 2, mode="lexical"),
                           search_request(NS, "phases of the moon", 3, mode="dense",
                                          collapse=True)], request_id=rid)
    first, second = resp.responses
    assert first.lineage.mode == pb.LEXICAL and second.lineage.mode == pb.DENSE
    assert {first.lineage.request_id, second.lineage.request_id} == {rid}
    assert first.hits[0].chunk.doc_id == "guide/garden.md" and len(first.hits) == 2
    assert second.hits[0].chunk.doc_id == "notes/moon.txt"
    assert len(set(_docs(second))) == len(second.hits)
    # One verdict on the batch's first search.
    fb = c.record_feedback(NS, rid, {first.hits[0].chunk.chunk_id: True})
    assert (fb.recorded, fb.relevant) == (1, 1)


@pytest.mark.integration
def test_record_feedback_round_trip(c: Any) -> None:
    rid = f"judged-{_kind(c)}"
    resp = c.search(NS, "water the tomato plants", top_k=4, request_id=rid)
    assert resp.lineage.request_id == rid and len(resp.hits) == 4
    ids = [h.chunk.chunk_id for h in resp.hits]
    fb = c.record_feedback(NS, rid, {ids[0]: True, ids[1]: False, ids[2]: True})
    assert (fb.recorded, fb.relevant) == (3, 2)
    # Pairs, and the namespace left to the server (the one the request searched).
    fb = c.record_feedback("", rid, [(ids[3], False)], timeout=10)
    assert (fb.recorded, fb.relevant) == (1, 0)
    with pytest.raises(grpc.RpcError) as e:
        c.record_feedback(NS, f"never-{_kind(c)}", {ids[0]: True})
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        c.record_feedback(NS, rid, {"f" * 32: True})
    assert e.value.code() == INVALID


GOLDEN = [
    pb.GoldenQuery(id="moon", query="how long does the moon take to orbit the earth",
                   relevant_doc_ids=["notes/moon.txt"]),
    pb.GoldenQuery(id="backoff", query="retry with exponential backoff and jitter",
                   relevant_paths=["src/retry.py"]),
    pb.GoldenQuery(id="tomato", query="watering and pruning tomato plants",
                   doc_grades={"guide/garden.md": 2}),
]


@pytest.mark.integration
def test_register_golden_set_and_evaluate_round_trip(c: Any) -> None:
    name = f"surface/{_kind(c)}"
    reg = c.register_golden_set(NS, name, GOLDEN)
    assert (reg.name, reg.version, reg.query_count, reg.origin) == (name, 1, 3, "request")
    assert [q.id for q in reg.queries] == ["moon", "backoff", "tomato"]
    assert reg.queries[1].path_grades == {"src/retry.py": 1}
    again = c.register_golden_set(NS, name, GOLDEN[:2], timeout=30)
    assert (again.version, again.query_count) == (2, 2)

    e = c.evaluate(NS, name, [1, 3], mode="dense").evaluation
    assert (e.golden_set, e.version, e.query_count, e.mode, e.rerank, e.trigger) == (
        name, 2, 2, pb.DENSE, False, "request")
    metrics = {(m.name, m.k): m.value for m in e.metrics}
    assert list(metrics) == [("precision", 1), ("recall", 1), ("ndcg", 1), ("precision", 3),
                             ("recall", 3), ("ndcg", 3), ("mrr", 3)]
    assert metrics[("precision", 1)] == metrics[("mrr", 3)] == 1.0
    assert c.status(NS).last_evaluation.evaluation_id == e.evaluation_id

    first = c.evaluate(NS, name, mode="lexical", version=1).evaluation
    assert (first.version, first.query_count, first.mode) == (1, 3, pb.LEXICAL)
    assert [m.k for m in first.metrics] == [1, 1, 1, 5, 5, 5, 10, 10, 10, 10]

    with pytest.raises(grpc.RpcError) as err:
        c.evaluate(NS, "no-such-set")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        c.register_golden_set("no-such-namespace", name, GOLDEN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # neither queries nor a history
        c.register_golden_set(NS, name)
    assert err.value.code() == INVALID


@pytest.mark.integration
def test_sync_source_staleness_options_and_a_golden_set_from_history(c: Any,
                                                                     roots: Path) -> None:
    ns = f"git-{_kind(c)}"
    repo = TimedRepo(roots / ns)
    repo.write("README.md", "# Values\n")
    repo.commit("Start")  # a root commit: no golden query (no parent to diff against)
    repo.write("src/alpha.py", "def alpha(values):\n    return [2 * v for v in values]\n")
    repo.write("src/beta.py", "def beta(values):\n    return sum(values)  # compute the values\n")
    repo.commit("Add the alpha and beta modules")
    first = c.sync_source(ns, str(repo.root), include=["src/**"], wait=True, timeout=120)
    assert first.state == pb.SYNC_STATE_SUCCEEDED and first.files_added == 2

    # A commit (dated 2024) touching alpha only: its hits lag the source by over a year.
    repo.write("src/alpha.py", "def alpha(values):\n    return [3 * v for v in values]\n")
    repo.commit("Triple the values")
    assert c.status(ns).source.commits_behind == 1  # reads the source afresh

    def paths(**options: Any) -> dict[str, pb.Hit]:
        resp = c.search(ns, "compute the values", top_k=10, mode="lexical", **options)
        return {h.chunk.path: h for h in resp.hits}

    assert set(paths()) == {"src/alpha.py", "src/beta.py"}
    assert set(paths(max_staleness=timedelta(hours=1))) == {"src/beta.py"}
    flagged = paths(max_staleness=3600.0, flag_stale=True)
    assert flagged["src/alpha.py"].stale and not flagged["src/beta.py"].stale
    assert set(paths(max_staleness=timedelta(days=365 * 100))) == {"src/alpha.py",
                                                                   "src/beta.py"}

    # The indexed commit's message becomes a query whose relevant files are the two it added.
    hist = c.register_golden_set(ns, "history",
                                 from_source_history=pb.GoldenSetFromHistory(commits=5))
    assert (hist.origin, hist.corpus_revision, hist.query_count) == (
        "git-history", first.commit, 1)
    assert hist.queries[0].query == "Add the alpha and beta modules"
    assert hist.queries[0].doc_grades == {"src/alpha.py": 1, "src/beta.py": 1}
    assert c.evaluate(ns, "history", [2]).evaluation.query_count == 1

    # Without wait: RUNNING at once, then searchable and caught up.
    started = c.sync_source(ns)
    assert started.sync_id and started.state in (pb.SYNC_STATE_RUNNING,
                                                 pb.SYNC_STATE_SUCCEEDED)
    deadline = time.monotonic() + 60
    while (status := c.status(ns)).last_sync.sync_id != started.sync_id:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status.last_sync.state == pb.SYNC_STATE_SUCCEEDED
    assert status.source.commits_behind == 0
    assert set(paths(max_staleness=timedelta(hours=1))) == {"src/alpha.py", "src/beta.py"}
