"""Run a query set through a search function, per mode: metrics and latency.

The runner takes any ``search(query_text, top_k, mode) -> (ranked doc ids, seconds)``, so the
same code serves `retriever eval` (over the gRPC client), the in-process Evaluate RPC and the
benchmarks. `client_search` and `index_corpus` are the two helpers that talk to a server
through `retriever.client.RetrieverClient`; they import the client (and so grpc) only when
called, and this module imports neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from retriever.slo.evaluation import DEFAULT_KS, CorpusDoc, QuerySet, metric_names, per_query

if TYPE_CHECKING:
    from retriever.client import RetrieverClient

__all__ = ["MODES", "ModeResult", "ModeUnavailable", "SearchFn", "client_search",
           "evaluate_modes", "index_corpus", "percentile"]

#: Mode names, as `retriever eval --modes` takes them (retriever.v1.SearchMode, lowercase).
MODES = ("dense", "lexical", "hybrid")

SearchFn = Callable[[str, int, str], tuple[Sequence[str], float]]
"""(query text, top_k, mode) -> (doc ids of the hits in rank order, latency in seconds)."""


class ModeUnavailable(Exception):  # noqa: N818 - a condition, not a bug
    """Raised by a search function when the server cannot search in a mode at all."""


@dataclass
class ModeResult:
    mode: str
    available: bool
    reason: str = ""  # why not, when unavailable
    queries: int = 0  # queries evaluated (judged, with a relevant document)
    metrics: dict[str, float] = field(default_factory=dict)
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self, *, with_queries: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "available": self.available}
        if not self.available:
            d["reason"] = self.reason
            return d
        d.update(queries=self.queries, metrics=self.metrics,
                 latency_ms={"p50": self.latency_p50_s * 1e3, "p99": self.latency_p99_s * 1e3})
        if with_queries:
            d["per_query"] = self.per_query
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); 0 if empty."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def evaluate_modes(
    query_set: QuerySet, search: SearchFn, modes: Sequence[str] = MODES, *,
    top_k: int = 100, ks: Sequence[int] = DEFAULT_KS, warmup: int = 1,
    on_query: Callable[[str], None] | None = None,
) -> list[ModeResult]:
    """Every judged query of ``query_set`` through ``search`` in each mode, one at a time.

    ``warmup`` queries run first in each mode and are not timed (the first call of a mode
    pays for lazy set-up). A mode whose search raises `ModeUnavailable` is reported as
    unavailable with the reason; any other exception propagates. ``on_query(mode)`` is
    called after each timed query (progress)."""
    judged = [q for q in query_set.queries if q.id in query_set.qrels]
    results: list[ModeResult] = []
    for mode in modes:
        run: dict[str, list[str]] = {}
        latencies: list[float] = []
        try:
            for q in judged[:warmup]:
                search(q.text, top_k, mode)
            for q in judged:
                ids, seconds = search(q.text, top_k, mode)
                run[q.id] = list(ids)
                latencies.append(seconds)
                if on_query is not None:
                    on_query(mode)
        except ModeUnavailable as exc:
            results.append(ModeResult(mode, available=False, reason=str(exc)))
            continue
        rows = per_query(run, query_set.qrels, ks)
        means = {n: (sum(r[n] for r in rows.values()) / len(rows) if rows else 0.0)
                 for n in metric_names(ks)}
        results.append(ModeResult(
            mode, available=True, queries=len(rows), metrics=means,
            latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
            per_query=rows))
    return results


# -- through the gRPC client ----------------------------------------------------------------
def client_search(client: RetrieverClient, namespace: str) -> SearchFn:
    """A `SearchFn` over the Search RPC of ``client``: doc ids of the hits in rank order and
    the wall time of the call. UNIMPLEMENTED (a mode the server does not serve yet) becomes
    `ModeUnavailable`; other errors propagate as grpc.RpcError."""
    import grpc

    from retriever.client import pb

    def search(query: str, top_k: int, mode: str) -> tuple[list[str], float]:
        # collapse: one hit per document (its best chunk), so top_k counts documents and
        # R@100 means 100 documents, as in BEIR.
        request = pb.SearchRequest(namespace=namespace, query=query, top_k=top_k,
                                   mode=pb.SearchMode.Value(mode.upper()), collapse=True)
        t0 = time.perf_counter()
        try:
            resp = client.stub.Search(request, timeout=client.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ModeUnavailable(exc.details() or "UNIMPLEMENTED") from None
            raise
        seconds = time.perf_counter() - t0
        return [h.chunk.doc_id for h in sorted(resp.hits, key=lambda h: h.rank)], seconds

    return search


def index_corpus(client: RetrieverClient, namespace: str, query_set: QuerySet, *,
                 batch_size: int = 32, prune: bool = False,
                 on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """Upsert the corpus of ``query_set`` into ``namespace`` (created when missing), one call
    per batch of ``batch_size`` documents (``on_batch(n)`` after each); doc_id and path as
    the corpus gives them, revision the set's corpus revision when it has one. Unchanged
    documents are not re-embedded, so re-running is cheap. Documents of the namespace that
    are not in the corpus would be hits too: they are counted (``foreign``) and, with
    ``prune``, deleted (``pruned``). Returns the summed counts of the responses and those."""
    import grpc

    from retriever.client import pb

    try:
        client.create_namespace(namespace)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    revision = str(query_set.metadata.get("corpus_rev", ""))
    counts = dict.fromkeys(("documents_received", "documents_created", "documents_updated",
                            "documents_unchanged", "chunks_total", "chunks_embedded",
                            "chunks_reused"), 0)
    ids: set[str] = set()
    for batch in _batches(query_set.iter_corpus(), batch_size):
        ids.update(d.doc_id for d in batch)
        resp = client.upsert_stream(iter([pb.UpsertDocumentsRequest(
            namespace=namespace,
            documents=[pb.Document(doc_id=d.doc_id, content=d.text, path=d.path,
                                   revision=revision) for d in batch])]))
        for k in counts:
            counts[k] += getattr(resp, k)
        if on_batch is not None:
            on_batch(len(batch))
    foreign = _foreign(client, namespace, ids)
    counts["foreign"] = len(foreign)
    if prune:
        for i in range(0, len(foreign), 256):
            client.delete(namespace, foreign[i:i + 256])
    counts["pruned"] = len(foreign) if prune else 0
    return counts


def _batches(docs: Iterable[CorpusDoc], size: int) -> Iterator[list[CorpusDoc]]:
    batch: list[CorpusDoc] = []
    for d in docs:
        batch.append(d)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _foreign(client: RetrieverClient, namespace: str, keep: set[str]) -> list[str]:
    return [d for d in client.document_ids(namespace) if d not in keep]
