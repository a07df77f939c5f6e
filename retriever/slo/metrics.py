"""Prometheus metrics of one service instance, on a registry of its own.

Label sets are bounded: rpc, code, stage, namespace, status. Never a query or a doc id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets for an embedding service: sub-ms catalog look-ups to multi-second bulk
# upserts.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0)
_STALENESS = (0, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)


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
