"""Prometheus metrics of one service instance, on a registry of its own.

Label sets are bounded: rpc, code, stage, namespace, status, k, trigger, verdict. Never a
query or a doc id. Quality metrics cap namespace (NamespaceLabels, "_other").
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.utils import floatToGoString

from indexers import BACKENDS
from retriever import tracing

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from retriever.config import Settings
    from retriever.domain import EvaluationRecord
    from retriever.freshness.staleness import SourceLag
    from retriever.slo.feedback import WindowStats

# The stage times of the call being handled (an upsert stream: its messages' stages added
# up), when the call collects them (``collect_stages``); the worker threads that run its work
# see it through the copied context (retriever.server.servicer).
_CALL_STAGES: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "call_stages", default=None)


def collect_stages() -> dict[str, float]:
    """Start collecting the stage times (seconds, per stage name, summed) of the current
    call, in the dict returned."""
    stages: dict[str, float] = {}
    _CALL_STAGES.set(stages)
    return stages


def stage_adder(name: str) -> Callable[[float], None] | None:
    """A function that adds to stage ``name`` of the current call from any thread (the model
    thread reports a job's slices), or None when the call collects no stage times."""
    stages = _CALL_STAGES.get()
    if stages is None:
        return None

    def add(seconds: float) -> None:
        stages[name] = stages.get(name, 0.0) + seconds
    return add


def add_stage(name: str, seconds: float) -> None:
    """Add to the current call's stage times, if it collects them."""
    add = stage_adder(name)
    if add is not None:
        add(seconds)


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
        # label -> (namespace, golden set) -> its latest evaluation (set_evaluation)
        self._latest_runs: dict[str, dict[tuple[str, str], EvaluationRecord]] = {}
        self._eval_lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "retriever_requests", "RPCs handled, by final status code.", ["rpc", "code"],
            registry=r)
        self.request_duration = Histogram(
            "retriever_request_duration_seconds", "RPC wall time.", ["rpc"], buckets=_LATENCY,
            registry=r)
        self.refusal_duration = Histogram(
            "retriever_refusal_duration_seconds",
            "Wall time of RPCs answered RESOURCE_EXHAUSTED (shed or over a limit), from the "
            "handler's start: how fast load is shed in the server (a client also sees the "
            "transport and the event loop's lag, retriever_event_loop_lag_seconds).",
            ["rpc"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0), registry=r)
        self.inflight = Gauge(
            "retriever_inflight_requests", "RPCs being handled now.", ["rpc"], registry=r)
        self.gc_pause = Histogram(
            "retriever_gc_pause_seconds",
            "Python's garbage collections, by generation: each stops every thread of the "
            "server for its length (a full collection, generation 2, is the long one).",
            ["generation"], buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                     0.1, 0.25, 0.5, 1.0), registry=r)
        self.gc_frozen = Gauge(
            "retriever_gc_frozen_objects",
            "Objects in Python's permanent GC generation (gc.freeze at start, "
            "gc_freeze_at_start): full collections do not walk them.", registry=r)
        self.loop_lag = Histogram(
            "retriever_event_loop_lag_seconds",
            "How late the server's event loop ran a timer callback (sampled every 100 ms): "
            "the wait any call has before it is admitted or refused.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5), registry=r)
        self.stage_duration = Histogram(
            "retriever_stage_duration_seconds",
            "Wall time of one pipeline stage (upsert: queued, chunk, embed, lock_wait, "
            "index_write, lexical_write, commit; search: embed, ann, lexical, fuse, rerank, "
            "fetch).",
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
        self.embedder_info = Gauge(
            "retriever_embedder_info", "1 for the embedder this server runs: its model, "
            "revision (as hit lineage names it), backend, precision and device.",
            ["model", "revision", "backend", "precision", "device"], registry=r)
        self.reconcile_repairs = Counter(
            "retriever_reconcile_repairs",
            "Start-up repairs of index/catalog disagreement, by kind.", ["kind"], registry=r)
        self.derived_files_rebuilt = Counter(
            "retriever_derived_files_rebuilt",
            "Damaged index files moved aside at start and rebuilt from the catalog, by kind "
            "of file (faiss_snapshot, faiss_meta; milvus_store, chroma_store: an embedded "
            "engine's whole directory).", ["kind"], registry=r)
        self.lost_collections_rebuilt = Counter(
            "retriever_lost_collections_rebuilt",
            "Collections an index engine no longer had (dropped outside the service, or a "
            "server back without its data), rebuilt from the catalog while serving, by "
            "backend.", ["backend"], registry=r)
        for backend in BACKENDS:  # at 0 from the start, so that the first rebuild is an
            self.lost_collections_rebuilt.labels(backend)  # increase() can see
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

        # Retrieval quality. namespace is capped (namespace_label): the first
        # metrics_max_namespaces namespaces seen have their own label, the rest "_other".
        self._ns_labels = NamespaceLabels(50)
        self.eval_precision = Gauge(
            "retriever_eval_precision_at_k",
            "precision@k of the namespace's latest golden set evaluation (over documents: "
            "relevant in the top k / k).", ["namespace", "k"], registry=r)
        self.eval_recall = Gauge(
            "retriever_eval_recall_at_k",
            "recall@k of the namespace's latest golden set evaluation (relevant in the top k "
            "/ relevant).", ["namespace", "k"], registry=r)
        self.eval_ndcg = Gauge(
            "retriever_eval_ndcg_at_k",
            "nDCG@k of the namespace's latest golden set evaluation.", ["namespace", "k"],
            registry=r)
        self.eval_mrr = Gauge(
            "retriever_eval_mrr",
            "MRR (cut at the evaluation's largest k) of the namespace's latest golden set "
            "evaluation.", ["namespace"], registry=r)
        self.eval_queries = Gauge(
            "retriever_eval_queries",
            "Queries the namespace's latest golden set evaluation scored.", ["namespace"],
            registry=r)
        self.eval_timestamp = Gauge(
            "retriever_eval_last_run_timestamp_seconds",
            "When the namespace's latest golden set evaluation started (Unix time).",
            ["namespace"], registry=r)
        self.evaluations = Counter(
            "retriever_evaluations", "Golden set evaluations run, by trigger (request, "
            "schedule) and outcome (ok, error, cancelled: its caller went away and nothing "
            "was recorded).", ["trigger", "outcome"], registry=r)
        self.feedback = Counter(
            "retriever_feedback_judgements",
            "RecordFeedback judgements recorded, by verdict (relevant, not_relevant).",
            ["namespace", "verdict"], registry=r)

    def cap_namespaces(self, limit: int) -> None:
        """Give at most ``limit`` namespaces a label of their own (setting
        metrics_max_namespaces); call before any quality metric is written."""
        self._ns_labels = NamespaceLabels(limit)

    def namespace_label(self, namespace: str) -> str:
        return self._ns_labels.label(namespace)

    def set_evaluation(self, rec: EvaluationRecord) -> None:
        """Export one evaluation. A label's quality figures are the worst, per cut-off, over
        the latest run of each golden set it covers: a namespace's several sets, and every
        namespace past metrics_max_namespaces (label "_other"). The last run written would
        otherwise hide a failing set or namespace from its alert (a recall of 0 showed as
        1.0 once another one past the cap had run). Only SLO runs (``rec.slo``: as the
        scheduler runs them) move the gauges: an ad-hoc run with other cut-offs, mode or
        re-ranking would replace the figures an alert reads (a run at k=1 dropped k=10)."""
        if not rec.slo:
            return
        label = self.namespace_label(rec.namespace)
        with self._eval_lock:
            # A namespace past the cap that since got a label of its own (one was given
            # back) leaves "_other": its old runs there would keep failing that label.
            self._withdraw_runs_locked(rec.namespace, keep=label)
            runs = self._latest_runs.setdefault(label, {})
            runs[(rec.namespace, rec.golden_set)] = rec
            self._export_evaluations(label, list(runs.values()))

    def _withdraw_runs_locked(self, namespace: str, keep: str | None = None) -> None:
        """Take ``namespace``'s runs out of every label's figures but ``keep``'s,
        recomputing the labels left with runs and clearing the others."""
        for label in [lb for lb in self._latest_runs if lb != keep]:
            runs = self._latest_runs[label]
            mine = [key for key in runs if key[0] == namespace]
            if not mine:
                continue
            for key in mine:
                del runs[key]
            if runs:
                self._export_evaluations(label, list(runs.values()))
            else:
                self._latest_runs.pop(label)
                self._clear_evaluations_locked(label)

    def _clear_evaluations_locked(self, label: str) -> None:
        for g in (self.eval_precision, self.eval_recall, self.eval_ndcg):
            for labels in [s.labels for fam in g.collect() for s in fam.samples
                           if s.labels.get("namespace") == label]:
                with suppress(KeyError):
                    g.remove(label, labels["k"])
        for g in (self.eval_mrr, self.eval_queries, self.eval_timestamp):
            with suppress(KeyError):
                g.remove(label)

    def _export_evaluations(self, label: str, runs: list[EvaluationRecord]) -> None:
        gauges = {"precision": self.eval_precision, "recall": self.eval_recall,
                  "ndcg": self.eval_ndcg}
        worst: dict[tuple[str, str], float] = {}
        mrr: float | None = None
        for run in runs:
            for m in run.metrics:
                if m.name in gauges:
                    key = (m.name, str(m.k))
                    worst[key] = min(worst.get(key, m.value), m.value)
                elif m.name == "mrr":
                    mrr = m.value if mrr is None else min(mrr, m.value)
        # Only cut-offs a latest run used stay exported: an older run's k would keep its
        # value (an alert on k="10" reading an old figure), and callers could grow the
        # series with every k they ask for.
        ks = {k for _, k in worst}
        for g in gauges.values():
            for k in [s.labels["k"] for fam in g.collect() for s in fam.samples
                      if s.labels.get("namespace") == label and s.labels["k"] not in ks]:
                with suppress(KeyError):
                    g.remove(label, k)
        for (name, k), value in worst.items():
            gauges[name].labels(label, k).set(value)
        if mrr is not None:
            self.eval_mrr.labels(label).set(mrr)
        latest = max(runs, key=lambda r: r.started_at.timestamp() if r.started_at else 0.0)
        self.eval_queries.labels(label).set(latest.query_count)
        if latest.started_at is not None:
            self.eval_timestamp.labels(label).set(latest.started_at.timestamp())

    def forget_evaluations(self, namespace: str) -> None:
        """Drop a deleted namespace's runs from its label's figures: its own series go; the
        shared "_other" ones are recomputed from the namespaces left in it. Its label is
        given back (a name never seen takes none: deleting names that do not exist cannot
        use up the labels)."""
        label = self._ns_labels.peek(namespace)
        with self._eval_lock:
            # From every label: runs it made past the cap stay in "_other" after it got a
            # label of its own.
            self._withdraw_runs_locked(namespace)
            if label == namespace:  # its own label: every series of it goes, then the label
                self._drop_series(label)
                self._ns_labels.release(namespace)

    def _drop_series(self, label: str) -> None:
        """Remove every series labelled ``namespace=label`` from this instance's metrics
        (counters of a deleted namespace included): a label given back must take its
        series with it, or namespace churn would grow them past metrics_max_namespaces."""
        for metric in vars(self).values():
            names = getattr(metric, "_labelnames", ())
            if not isinstance(metric, (Counter, Gauge, Histogram)) or "namespace" not in names:
                continue
            keys = {tuple(s.labels[n] for n in names) for fam in metric.collect()
                    for s in fam.samples if s.labels.get("namespace") == label}
            for key in keys:
                with suppress(KeyError):
                    metric.remove(*key)

    def watch_feedback(self, window: Callable[[], Iterable[WindowStats]]) -> None:
        """Export online precision@k, computed at scrape time from ``window()``."""
        self.registry.register(_FeedbackCollector(window, self.namespace_label))

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

    def watch_catalog_memory(self, used: Callable[[], int]) -> None:
        """Export the heap SQLite holds, read at scrape time from ``used()``."""
        Gauge("retriever_catalog_memory_bytes",
              "Heap held by SQLite in this process: the page caches of every catalog "
              "connection (bounded by catalog_cache_bytes), schemas and statements.",
              registry=self.registry).set_function(used)

    def watch_sources(self, lags: Callable[[], Iterable[SourceLag]]) -> None:
        """Export each bound namespace's lag behind its git source, computed at scrape time
        from ``lags()`` (the last read of each source)."""
        self.registry.register(_SourceCollector(lags, self.namespace_label))

    def observe_stage(self, name: str, seconds: float) -> None:
        """Record a stage timed elsewhere (e.g. a wait measured across threads)."""
        self.stage_duration.labels(name).observe(seconds)
        add_stage(name, seconds)

    @contextmanager
    def stage(self, name: str, span: str | None = None,
              attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[list[float]]:
        """Times the block into the stage histogram; the yielded list receives the seconds.
        With tracing on, the block is also a span: ``span``, by default
        ``retriever.upsert.<name>`` (the upsert pipeline's stages call this without one)."""
        out: list[float] = []
        with tracing.span(span or f"retriever.upsert.{name}", attributes):
            t0 = time.perf_counter()
            try:
                yield out
            finally:
                dt = time.perf_counter() - t0
                out.append(dt)
                self.observe_stage(name, dt)


class _SourceCollector:
    def __init__(self, lags: Callable[[], Iterable[SourceLag]],
                 label: Callable[[str], str]) -> None:
        self._lags = lags
        self._label = label  # capped namespace label: namespaces past the cap share "_other"

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
        worst: dict[str, tuple[float, int, int]] = {}  # label -> (staleness, behind, readable)
        for lag in self._lags():
            ns = self._label(lag.namespace)
            s, b, r = worst.get(ns, (0.0, 0, 1))
            worst[ns] = (max(s, lag.staleness_s(now)), max(b, lag.commits_behind),
                         min(r, 0 if lag.error else 1))
        for ns, (s, b, r) in sorted(worst.items()):  # "_other": the worst of its namespaces
            stale.add_metric([ns], s)
            behind.add_metric([ns], b)
            readable.add_metric([ns], r)
        yield stale
        yield behind
        yield readable


# The shared label of the namespaces past metrics_max_namespaces: not a valid namespace name
# (those start with a letter or digit), so a namespace named "other" keeps series of its own.
OTHER = "_other"


class NamespaceLabels:
    """The namespace label of per-namespace quality metrics, bounded: the first ``limit``
    namespaces seen keep their name, later ones are reported as OTHER ("_other")."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, namespace: str) -> str:
        with self._lock:
            if namespace in self._known:
                return namespace
            if len(self._known) < self._limit:
                self._known.add(namespace)
                return namespace
            return OTHER

    def peek(self, namespace: str) -> str:
        """The label ``namespace`` has now, taking none."""
        with self._lock:
            return namespace if namespace in self._known else OTHER

    def release(self, namespace: str) -> None:
        """Give a deleted namespace's label back: a namespace seen later may take it."""
        with self._lock:
            self._known.discard(namespace)


class _FeedbackCollector:
    def __init__(self, window: Callable[[], Iterable[WindowStats]],
                 label: Callable[[str], str]) -> None:
        self._window = window
        self._label = label

    def describe(self) -> list[object]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        precision = GaugeMetricFamily(
            "retriever_online_precision_at_k",
            "RecordFeedback judgements of the last feedback_window_s seconds: relevant among "
            "the judged chunks returned at rank <= k, over those judged (absent without any).",
            labels=["namespace", "k"])
        judged = GaugeMetricFamily(
            "retriever_online_judged_at_k",
            "Judgements of the last feedback_window_s seconds of chunks returned at rank <= "
            "k (the sample behind retriever_online_precision_at_k).", labels=["namespace", "k"])
        sums: dict[tuple[str, int], list[int]] = {}
        for w in self._window():
            c = sums.setdefault((self._label(w.namespace), w.k), [0, 0])
            c[0] += w.relevant
            c[1] += w.judged
        for (ns, k), (rel, n) in sorted(sums.items()):
            judged.add_metric([ns, str(k)], n)
            if n:
                precision.add_metric([ns, str(k)], rel / n)
        yield precision
        yield judged


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
