"""Declared SLOs: settings -> retriever_slo_objective on /metrics of a running server."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from conftest import make_settings, running_server
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from retriever.config import Settings
from retriever.models.embedder import Embedder
from retriever.slo.metrics import LATENCY_BUCKETS, OTHER, Metrics
from retriever.v1 import retriever_pb2 as pb
from retriever.validation import NAMESPACE_RE

DEFAULTS = {"availability": 0.999, "search_latency_seconds": 0.15,
            "search_latency_target": 0.99, "recall_at_10": 0.8, "precision_at_10": 0.08,
            "staleness_seconds": 600.0}


def _objectives(text: str) -> dict[str, tuple[float, dict[str, str]]]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "retriever_slo_objective":
            for s in family.samples:
                out[s.labels["slo"]] = (s.value, s.labels)
    return out


def test_objectives_follow_the_settings() -> None:
    m = Metrics()
    assert _objectives(generate_latest(m.registry).decode()) == {}  # none before start
    m.set_objectives(Settings(slo_availability=0.995, slo_search_latency_seconds=1.0))
    got = _objectives(generate_latest(m.registry).decode())
    assert {k: v for k, (v, _) in got.items()} == {
        **DEFAULTS, "availability": 0.995, "search_latency_seconds": 1.0}
    # le spells the bucket exactly as the latency histogram does ("1.0", not "1").
    assert got["search_latency_seconds"][1] == {"slo": "search_latency_seconds", "le": "1.0"}
    m.request_duration.labels("Search").observe(0.5)
    assert 'retriever_request_duration_seconds_bucket{le="1.0",rpc="Search"} 1.0' in \
        generate_latest(m.registry).decode()
    assert set(got["availability"][1]) == {"slo"}


def test_latency_objective_must_be_a_histogram_bucket() -> None:
    assert Settings().slo_search_latency_seconds in LATENCY_BUCKETS
    Settings(slo_search_latency_seconds=0.25)
    with pytest.raises(ValidationError, match="bucket boundaries"):
        Settings(slo_search_latency_seconds=0.2)
    with pytest.raises(ValidationError):
        Settings(slo_availability=1.0)  # no budget at all: the burn-rate rules divide by it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[object]:
    settings = make_settings(tmp_path_factory.mktemp("slo") / "data", slo_recall_at_10=0.65,
                             slo_search_latency_seconds=0.25, slo_staleness_seconds=1200.0)
    with running_server(settings, embedder) as st:
        yield st


def _scrape(server: object) -> str:
    url = f"http://127.0.0.1:{server.info['metrics_port']}/metrics"  # type: ignore[attr-defined]
    return urllib.request.urlopen(url, timeout=30).read().decode()


@pytest.mark.integration
def test_running_server_exports_configured_objectives(server: object) -> None:
    got = _objectives(_scrape(server))
    assert {k: v for k, (v, _) in got.items()} == {
        **DEFAULTS, "recall_at_10": 0.65, "search_latency_seconds": 0.25,
        "staleness_seconds": 1200.0}
    assert got["search_latency_seconds"][1]["le"] == "0.25"


@pytest.mark.integration
def test_objective_bucket_is_a_search_latency_bucket(server: object) -> None:
    """The rules join the objective's le to the Search histogram's: after a Search the
    bucket it names is one of the series the server exports."""
    from retriever.client import RetrieverClient

    with RetrieverClient(server.address) as client:  # type: ignore[attr-defined]
        client.upsert("docs", [pb.Document(doc_id="bread.md", revision="r1",
                                           content="Knead the dough and let it rise.")])
        before = _search_count(_scrape(server))
        client.search("docs", "dough", top_k=1)
    text = _scrape(server)
    assert _search_count(text) == before + 1
    le = _objectives(text)["search_latency_seconds"][1]["le"]
    assert f'retriever_request_duration_seconds_bucket{{le="{le}",rpc="Search"}}' in text


def _search_count(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "retriever_request_duration_seconds_count" and \
                    s.labels.get("rpc") == "Search":
                return s.value
    return 0.0


def _eval_series(m: Metrics) -> dict[tuple[str, str, str], float]:
    return {(f.name, s.labels["namespace"], s.labels["k"]): s.value
            for f in text_string_to_metric_families(generate_latest(m.registry).decode())
            if f.name in ("retriever_eval_recall_at_k", "retriever_eval_precision_at_k",
                          "retriever_eval_ndcg_at_k")
            for s in f.samples}


def _rec(namespace: str, golden_set: str, ks: tuple[int, ...], value: float):  # noqa: ANN202
    from datetime import UTC, datetime

    from retriever.domain import EvalMetric, EvaluationRecord, SearchMode

    return EvaluationRecord(
        evaluation_id="e", namespace=namespace, golden_set=golden_set, version=1,
        started_at=datetime.now(UTC), seconds=0.1, mode=SearchMode.DEFAULT, rerank=False,
        query_count=3, trigger="request",
        metrics=tuple(EvalMetric(n, k, value) for k in ks
                      for n in ("precision", "recall", "ndcg")))


def test_an_evaluation_replaces_the_cutoffs_of_the_previous_one() -> None:
    """recall@10 of an earlier run must not outlive a later run without k=10 (the recall
    alert reads k="10"), and asking for many k values must not pile up series."""
    def rec(ks: tuple[int, ...], value: float):  # noqa: ANN202
        return _rec("ns", "gs", ks, value)

    m = Metrics()
    m.set_evaluation(rec((1, 5, 10), 1.0))
    m.set_evaluation(rec((1, 5), 0.0))
    got = _eval_series(m)
    assert ("retriever_eval_recall_at_k", "ns", "10") not in got
    assert got[("retriever_eval_recall_at_k", "ns", "5")] == 0.0
    for start in range(1, 100, 10):
        m.set_evaluation(rec(tuple(range(start, start + 10)), 0.5))
    assert len(_eval_series(m)) == 3 * 10


def test_a_label_shows_the_worst_of_the_latest_runs_it_covers() -> None:
    """Past metrics_max_namespaces namespaces share "_other", and a namespace may have
    several golden sets: the last run written must not hide a failing one from the alert."""
    m = Metrics()
    m.cap_namespaces(1)
    m.set_evaluation(_rec("first", "smoke", (10,), 0.2))
    m.set_evaluation(_rec("first", "regress", (10,), 0.9))  # a later, better set
    m.set_evaluation(_rec("bad", "smoke", (10,), 0.0))  # past the cap: "_other"
    m.set_evaluation(_rec("good", "smoke", (10,), 1.0))
    got = _eval_series(m)
    assert got[("retriever_eval_recall_at_k", "first", "10")] == 0.2
    assert got[("retriever_eval_recall_at_k", "_other", "10")] == 0.0
    m.set_evaluation(_rec("bad", "smoke", (10,), 0.7))  # fixed: its latest run counts
    assert _eval_series(m)[("retriever_eval_recall_at_k", "_other", "10")] == 0.7
    m.forget_evaluations("bad")  # deleted: "_other" is what is left in it
    assert _eval_series(m)[("retriever_eval_recall_at_k", "_other", "10")] == 1.0
    m.forget_evaluations("first")
    assert ("retriever_eval_recall_at_k", "first", "10") not in _eval_series(m)


def test_a_namespace_named_other_keeps_series_apart_from_the_overflow() -> None:
    """The overflow label is not a name a namespace can have: a namespace called "other"
    with a label of its own is not mixed with the namespaces past the cap (it was: both
    were "other", and the worst of them showed for both)."""
    m = Metrics()
    m.cap_namespaces(1)
    m.set_evaluation(_rec("other", "smoke", (10,), 1.0))
    m.set_evaluation(_rec("late", "smoke", (10,), 0.0))  # past the cap
    got = _eval_series(m)
    assert got[("retriever_eval_recall_at_k", "other", "10")] == 1.0
    assert got[("retriever_eval_recall_at_k", OTHER, "10")] == 0.0
    assert not NAMESPACE_RE.fullmatch(OTHER)


def test_a_namespace_that_leaves_the_overflow_takes_its_runs_with_it() -> None:
    """Past the cap a namespace's runs count under "_other"; once a label is given back it
    takes that label at its next run, and its old runs must leave "_other" (they stayed:
    a recall of 0 no namespace stood behind fired the alert until a restart)."""
    m = Metrics()
    m.cap_namespaces(1)
    m.set_evaluation(_rec("first", "smoke", (10,), 1.0))
    m.set_evaluation(_rec("late", "smoke", (10,), 0.0))  # past the cap: "_other"
    assert _eval_series(m)[("retriever_eval_recall_at_k", OTHER, "10")] == 0.0
    m.forget_evaluations("first")  # deleted: its label is free
    m.set_evaluation(_rec("late", "smoke", (10,), 1.0))  # fixed, and now "late"
    got = _eval_series(m)
    assert got[("retriever_eval_recall_at_k", "late", "10")] == 1.0
    assert not [k for k in got if k[1] == OTHER]
    m.set_evaluation(_rec("later", "smoke", (10,), 0.0))  # past the cap again
    m.forget_evaluations("later")
    m.forget_evaluations("late")
    assert _eval_series(m) == {}
