"""The query path: embed (micro-batched) -> ANN -> catalog look-up -> hits with lineage.

ANN and the catalog look-up of its ids run under the namespace's shared visibility lock,
and ids the catalog does not show (staged or superseded chunks) are skipped, so a search
sees each document entirely before or entirely after a concurrent upsert.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime

import numpy as np

from retriever import validation
from retriever.catalog import Catalog
from retriever.config import Settings
from retriever.domain import (
    Hit,
    Lineage,
    SearchMode,
    SearchQuery,
    SearchResult,
    StageTimings,
)
from retriever.errors import Unimplemented
from retriever.freshness.staleness import hit_staleness
from retriever.models.embedder import Embedder
from retriever.namespaces import NamespaceHandle, Namespaces
from retriever.slo.metrics import Metrics

EmbedQueries = Callable[[Sequence[str]], "Future[np.ndarray]"]


class Searcher:
    def __init__(self, settings: Settings, catalog: Catalog, namespaces: Namespaces,
                 embedder: Embedder, embed_queries: EmbedQueries, metrics: Metrics) -> None:
        self._settings = settings
        self._catalog = catalog
        self._namespaces = namespaces
        self._embedder = embedder
        self._embed_queries = embed_queries
        self._metrics = metrics

    def validate(self, queries: Sequence[SearchQuery], *, batch: bool) -> list[NamespaceHandle]:
        """Check every query before any work; returns each one's namespace."""
        handles = []
        for i, q in enumerate(queries):
            prefix = f"requests[{i}]." if batch else ""
            validation.search(q, self._settings, prefix)
            if q.mode in (SearchMode.LEXICAL, SearchMode.HYBRID):
                raise Unimplemented(
                    f"{prefix}mode {q.mode.name} needs the lexical index, which this server "
                    "does not have yet; use DENSE or leave mode unset", field=f"{prefix}mode")
            if q.rerank:
                raise Unimplemented(
                    f"{prefix}rerank: no re-ranker is configured on this server; leave "
                    "rerank unset", field=f"{prefix}rerank")
            handle = self._namespaces.get(q.namespace)
            self._namespaces.require_compatible(handle)
            handles.append(handle)
        return handles

    def search(self, queries: Sequence[SearchQuery], request_id: str, *,
               batch: bool = False) -> list[SearchResult]:
        t0 = time.perf_counter()
        handles = self.validate(queries, batch=batch)
        with self._metrics.stage("embed") as embed_t:
            vectors = self._embed_queries([q.query for q in queries]).result()
        results = []
        for q, handle, vec in zip(queries, handles, vectors, strict=True):
            results.append(self._one(q, handle, vec, request_id, embed_t[0], t0))
        return results

    def _one(self, q: SearchQuery, handle: NamespaceHandle, vec: np.ndarray, request_id: str,
             embed_s: float, t0: float) -> SearchResult:
        ann_s = fetch_s = 0.0
        with handle.visibility.read():
            handle.require_live()
            allowed = None
            if not q.filter.empty:
                f0 = time.perf_counter()
                allowed = self._catalog.filter_vector_ids(q.namespace, q.filter)
                fetch_s += time.perf_counter() - f0
            k = q.top_k * 2 + 8
            while True:
                a0 = time.perf_counter()
                found = handle.index.search(vec[None, :], k, allowed)[0]
                a1 = time.perf_counter()
                chunks, index_version = self._catalog.chunks_by_vector_ids(
                    q.namespace, found.ids.tolist())
                f1 = time.perf_counter()
                ann_s += a1 - a0
                fetch_s += f1 - a1
                # Skipped ids (staged/superseded) can crowd out real hits: ask for more.
                if len(chunks) >= q.top_k or len(found.ids) < k:
                    break
                k *= 4
        now = datetime.now(UTC)
        hits: list[Hit] = []
        for vid, score in zip(found.ids.tolist(), found.scores.tolist(), strict=True):
            chunk = chunks.get(vid)
            if chunk is None:
                continue
            staleness = hit_staleness(chunk, now)
            if staleness is not None:
                self._metrics.result_staleness.observe(staleness)
            hits.append(Hit(chunk=chunk, score=float(score), rank=len(hits) + 1,
                            staleness_s=staleness))
            if len(hits) == q.top_k:
                break
        if not hits:
            self._metrics.zero_results.labels(q.namespace).inc()
        self._metrics.stage_duration.labels("ann").observe(ann_s)
        self._metrics.stage_duration.labels("fetch").observe(fetch_s)
        r, e = handle.record, self._embedder
        lineage = Lineage(
            request_id=request_id, namespace=q.namespace, embedder=e.name,
            embedder_revision=e.revision, reranker="", backend=r.backend,
            index_generation=r.index_generation, index_version=index_version, device=e.device,
        )
        timings = StageTimings(embed=embed_s, ann=ann_s, fetch=fetch_s,
                               total=time.perf_counter() - t0)
        return SearchResult(hits=tuple(hits), lineage=lineage, timings=timings)
