"""Prometheus metrics of one service instance, on a registry of its own.

Label sets are bounded: rpc, code, stage, namespace, status. Never a query or a doc id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from retriever.config import Settings
    from retriever.freshness.staleness import SourceLag

# Latency buckets for an embedding service: sub-ms catalog look-ups to multi-second bulk
# upserts.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0)
# Settings check the Search latency objective against them: it must be a boundary.
LATENCY_BUCKETS = _LATENCY
_STALENESS = (0, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
# Commit to searchable: a poller or CI job syncing within seconds to a day behind.
_FRESHNESS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "retriever_requests", "RPCs handled, by final status code.", ["rpc", "code"],
            registry=r)
        self.request_duration = Histogram(
            "retriever_request_duration_seconds", "RPC wall time.", ["rpc"], buckets=_LATENCY,
            registry=r)
        self.inflight = Gauge(
            "retriever_inflight_requests", "RPCs being handled now.", ["rpc"], registry=r)
        self.stage_duration = Histogram(
            "retriever_stage_duration_seconds",
            "Wall time of one pipeline stage (chunk, embed, ann, fetch, index_write, commit).",
            ["stage"], buckets=_LATENCY, registry=r)
        self.result_staleness = Histogram(
            "retriever_result_staleness_seconds",
            "Staleness of returned hits whose source time is known.", buckets=_STALENESS,
            registry=r)
        self.zero_results = Counter(
            "retriever_search_zero_results", "Searches that returned no hit.", ["namespace"],
            registry=r)
        self.documents = Counter(
            "retriever_documents_upserted", "Documents upserted, by outcome.",
            ["namespace", "status"], registry=r)
        self.chunks_embedded = Counter(
            "retriever_chunks_embedded", "Chunks embedded by upserts.", ["namespace"],
            registry=r)
        self.chunks_reused = Counter(
            "retriever_chunks_reused",
            "Chunks carried over from a previous document version without re-embedding.",
            ["namespace"], registry=r)
        self.embed_queue = Gauge(
            "retriever_embed_queue_depth", "Queries waiting for the query embedder.",
            registry=r)
        self.query_batch_size = Histogram(
            "retriever_query_batch_size", "Queries embedded together in one micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.model_wait = Histogram(
            "retriever_model_wait_seconds",
            "How long work waited for the model thread, by class (query: a query batch "
            "from its first query's arrival; document: a document slice since the model "
            "last worked on documents).", ["class"], buckets=_LATENCY, registry=r)
        self.rerank_candidates = Histogram(
            "retriever_rerank_candidates", "Candidates re-scored by the cross-encoder per "
            "search.", buckets=(1, 5, 10, 20, 30, 50, 100, 200, 500, 1000), registry=r)
        self.model_loaded = Gauge(
            "retriever_model_loaded", "1 once the embedder is loaded and indexes are open.",
            registry=r)
        self.reconcile_repairs = Counter(
            "retriever_reconcile_repairs",
            "Start-up repairs of index/catalog disagreement, by kind.", ["kind"], registry=r)
        self.derived_files_rebuilt = Counter(
            "retriever_derived_files_rebuilt",
            "Damaged index files moved aside at start and rebuilt from the catalog, by kind "
            "of file (faiss_snapshot, faiss_meta).", ["kind"], registry=r)
        self.storage_full = Gauge(
            "retriever_storage_full",
            "1 while the data directory's disk is full: writes are refused (deletes still "
            "run) until space is freed.", registry=r)

        self.commit_to_searchable = Histogram(
            "retriever_commit_to_searchable_seconds",
            "Per commit a sync made searchable: from the commit's time to the end of that "
            "sync.", ["namespace"], buckets=_FRESHNESS, registry=r)
        self._objectives: dict[str, float] = {}
        self.registry.register(_ObjectiveCollector(self._objectives))

    def set_objectives(self, settings: Settings) -> None:
        """Export the declared SLOs (settings ``slo_*``) as ``retriever_slo_objective``, so
        alerting rules and dashboards read the targets instead of repeating them."""
        self._objectives.update({
            "availability": settings.slo_availability,
            "search_latency_seconds": settings.slo_search_latency_seconds,
            "search_latency_target": settings.slo_search_latency_target,
            "recall_at_10": settings.slo_recall_at_10,
            "precision_at_10": settings.slo_precision_at_10,
            "staleness_seconds": settings.slo_staleness_seconds,
        })

    def watch_sources(self, lags: Callable[[], Iterable[SourceLag]]) -> None:
        """Export each bound namespace's lag behind its git source, computed at scrape time
        from ``lags()`` (the last read of each source)."""
        self.registry.register(_SourceCollector(lags))

    @contextmanager
    def stage(self, name: str) -> Iterator[list[float]]:
        """Times the block into the stage histogram; the yielded list receives the seconds."""
        out: list[float] = []
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            dt = time.perf_counter() - t0
            out.append(dt)
            self.stage_duration.labels(name).observe(dt)


class _SourceCollector:
    def __init__(self, lags: Callable[[], Iterable[SourceLag]]) -> None:
        self._lags = lags

    def describe(self) -> list[object]:
        return []  # no collect() at registration: the service may not be up yet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = datetime.now(UTC)
        stale = GaugeMetricFamily(
            "retriever_namespace_staleness_seconds",
            "Age of the oldest change of the namespace's git source not yet indexed (0 when "
            "caught up; growing while the source cannot be read).", labels=["namespace"])
        behind = GaugeMetricFamily(
            "retriever_namespace_commits_behind",
            "Commits of the source's ref after the one the namespace was synced to, as of "
            "the last read.", labels=["namespace"])
        readable = GaugeMetricFamily(
            "retriever_source_readable",
            "1 when the last read of the namespace's git source succeeded.",
            labels=["namespace"])
        for lag in self._lags():
            stale.add_metric([lag.namespace], lag.staleness_s(now))
            behind.add_metric([lag.namespace], lag.commits_behind)
            readable.add_metric([lag.namespace], 0 if lag.error else 1)
        yield stale
        yield behind
        yield readable


class _ObjectiveCollector:
    def __init__(self, objectives: dict[str, float]) -> None:
        self._objectives = objectives

    def describe(self) -> list[object]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "retriever_slo_objective",
            "Declared SLO targets (settings slo_*), by slo. search_latency_seconds also carries "
            "le: the retriever_request_duration_seconds bucket equal to it, as that histogram "
            "spells it, so rules select the bucket by label instead of hard-coding it.",
            labels=["slo"])
        for slo, value in self._objectives.items():
            labels = {"slo": slo}
            if slo == "search_latency_seconds":
                labels["le"] = floatToGoString(value)
            family.add_sample("retriever_slo_objective", labels, value)
        yield family
