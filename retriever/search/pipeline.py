"""The query path as stages: candidates (dense, lexical) -> fuse -> re-rank -> shape.

- **dense**: the query's embedding (micro-batched with concurrent queries) against the
  namespace's vector index;
- **lexical**: BM25 over the code-aware analyzer's terms (retriever/analyzer.py), from the
  namespace's tantivy index (retriever/lexical.py) or the catalog's FTS5 table;
- **fuse** (HYBRID): per-query normalized scores of both sides, convex combination
  (search/fusion.py);
- **rerank** (when asked): the cross-encoder re-scores the best candidates, on the model
  thread in slices that yield to plain queries;
- **shape**: collapse to one hit per document, min_score, a cap per path, top_k.

Candidate generation and the catalog look-up of the candidates run under the namespace's
shared visibility lock, and ids the catalog does not show (staged or superseded chunks) are
skipped, so a search sees each document entirely before or entirely after a concurrent
upsert, on both sides. Each stage records its time and each hit carries each stage's score.

With tracing on, each query is a span ``retriever.search`` and each stage one below it
(``retriever.search.embed`` — the wait for the batch's query vectors —, ``.ann``,
``.lexical``, ``.fuse``, ``.fetch``, ``.rerank``); Lineage carries the trace id.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from indexers import Filter
from retriever import analyzer, tracing, validation
from retriever.catalog import Catalog
from retriever.config import Settings
from retriever.domain import (
    ChunkRecord,
    Hit,
    Lineage,
    SearchFilter,
    SearchMode,
    SearchQuery,
    SearchResult,
    StageTimings,
)
from retriever.errors import FailedPrecondition, InvalidArgument, NotFound
from retriever.freshness.staleness import SourceLag, chunk_staleness
from retriever.lexical import LexicalIndex, QueryError, is_engine_error
from retriever.models.embedder import Embedder
from retriever.models.reranker import Reranker
from retriever.namespaces import NamespaceHandle, Namespaces
from retriever.search import fusion
from retriever.slo.metrics import Metrics

EmbedQueries = Callable[[Sequence[str]], "Future[np.ndarray]"]
# Scores (query, passage) pairs with their token counts on the model thread.
RerankPairs = Callable[[Sequence[tuple[str, str]], Sequence[int]], "Future[np.ndarray]"]

log = logging.getLogger(__name__)

# The most candidates one side is asked for when shaping needs more than the first pool.
_MAX_WANTED = 1 << 16

_MODES = {"dense": SearchMode.DENSE, "lexical": SearchMode.LEXICAL,
          "hybrid": SearchMode.HYBRID}


def engine_filter(f: SearchFilter) -> Filter:
    """A request's filter in the engines' terms (the same semantics: indexers.payload)."""
    return Filter(doc_ids=tuple(f.doc_ids), path_prefix=f.path_prefix,
                  languages=tuple(f.languages), kinds=tuple(f.kinds),
                  metadata=tuple(f.metadata))


@dataclass(frozen=True, slots=True)
class _Early:
    """A lexical answer read before the visibility lock (see Searcher._early_lexical)."""

    generation: int  # the namespace's visibility generation when it was read
    terms: list[str]  # the query's analyzer terms
    k: int  # entries asked for
    found: list[tuple[int, float]]
    seconds: float


@dataclass(slots=True)
class _Candidate:
    vector_id: int
    doc_id: str
    path: str
    chunk: ChunkRecord | None = None  # read for the final hits (and re-rank candidates) only
    dense: float | None = None
    lexical: float | None = None
    fused: float | None = None
    rerank: float | None = None
    score: float = 0.0


class Searcher:
    def __init__(self, settings: Settings, catalog: Catalog, namespaces: Namespaces,
                 embedder: Embedder, embed_queries: EmbedQueries, metrics: Metrics,
                 reranker: Reranker | None = None, rerank_pairs: RerankPairs | None = None,
                 source_lag: Callable[[str], SourceLag | None] | None = None) -> None:
        """``source_lag(namespace)``: its lag behind a bound git source (None: none bound),
        from which hits take their staleness."""
        self._settings = settings
        self._source_lag = source_lag or (lambda ns: None)
        self._catalog = catalog
        self._namespaces = namespaces
        self._embedder = embedder
        self._embed_queries = embed_queries
        self._metrics = metrics
        self._reranker = reranker if reranker is not None and reranker.loaded else None
        self._rerank_pairs = rerank_pairs
        self.default_mode = _MODES[settings.default_search_mode]

    def mode_of(self, q: SearchQuery) -> SearchMode:
        return self.default_mode if q.mode is SearchMode.DEFAULT else q.mode

    def validate(self, queries: Sequence[SearchQuery], *, batch: bool) -> list[NamespaceHandle]:
        """Check every query before any work; returns each one's namespace."""
        handles = []
        s = self._settings
        for i, q in enumerate(queries):
            prefix = f"requests[{i}]." if batch else ""
            validation.search(q, s, prefix)
            if q.dense_weight is not None and not 0.0 <= q.dense_weight <= 1.0:
                raise InvalidArgument(
                    f"{prefix}dense_weight is {q.dense_weight}; it must be in [0, 1] (1: dense "
                    "only, 0: lexical only)", field=f"{prefix}dense_weight")
            if not 0 <= q.rerank_candidates <= s.max_rerank_candidates:
                raise InvalidArgument(
                    f"{prefix}rerank_candidates is {q.rerank_candidates}; it must be between "
                    f"0 (default {s.default_rerank_candidates}) and {s.max_rerank_candidates} "
                    "(max_rerank_candidates)", field=f"{prefix}rerank_candidates")
            if q.max_hits_per_path < 0:
                raise InvalidArgument(f"{prefix}max_hits_per_path must be 0 (no cap) or "
                                      "positive", field=f"{prefix}max_hits_per_path")
            if q.min_score is not None and not np.isfinite(q.min_score):
                raise InvalidArgument(f"{prefix}min_score must be a finite number",
                                      field=f"{prefix}min_score")
            if q.rerank:
                self.require_reranker(f"{prefix}rerank")
            try:
                handle = self._namespaces.get(q.namespace)
                self._namespaces.require_compatible(handle)
            except (NotFound, FailedPrecondition) as exc:
                if not prefix:
                    raise
                # Which request of the batch, as for its other fields.
                raise type(exc)(f"{prefix}namespace: {exc.message}",
                                field=f"{prefix}{exc.field or 'namespace'}") from None
            handles.append(handle)
        return handles

    def search(self, queries: Sequence[SearchQuery], request_id: str, *,
               batch: bool = False) -> list[SearchResult]:
        t0 = time.perf_counter()
        handles = self.validate(queries, batch=batch)
        modes = [self.mode_of(q) for q in queries]
        dense_rows = [i for i, m in enumerate(modes) if m is not SearchMode.LEXICAL]
        vectors: dict[int, np.ndarray] = {}
        embed_s = None
        early: dict[int, _Early] = {}
        if dense_rows:
            pending = self._embed_queries([queries[i].query for i in dense_rows])
            # While the model embeds the queries, hybrid ones ask the lexical index.
            for i in dense_rows:
                if modes[i] is SearchMode.HYBRID:
                    got = self._early_lexical(queries[i], handles[i])
                    if got is not None:
                        early[i] = got
            with self._metrics.stage("embed", span="retriever.search.embed",
                                     attributes={"retriever.queries": len(dense_rows)}
                                     ) as embed_t:
                out = pending.result()
            embed_s = embed_t[0]
            vectors = {i: out[r] for r, i in enumerate(dense_rows)}
        results = []
        for i, (q, m, h) in enumerate(zip(queries, modes, handles, strict=True)):
            with tracing.span("retriever.search", {
                    "retriever.namespace": q.namespace, "retriever.mode": m.name.lower(),
                    "retriever.top_k": q.top_k, "retriever.rerank": q.rerank}) as span:
                try:
                    result = self._one(q, m, h, vectors.get(i), request_id, embed_s, t0,
                                       early.get(i))
                except NotFound as exc:  # the namespace deleted meanwhile
                    if not batch:
                        raise
                    raise NotFound(f"requests[{i}].namespace: {exc.message}",
                                   field=f"requests[{i}].{exc.field or 'namespace'}") from None
                span.set_attribute("retriever.hits", len(result.hits))
            results.append(result)
        return results

    def require_reranker(self, field: str = "rerank") -> None:
        """FailedPrecondition, naming ``field``, when this server has no re-ranker."""
        if self._reranker is None:
            raise FailedPrecondition(
                f"{field}: this server has no re-ranker; set reranker_model to a local "
                "cross-encoder directory, or leave rerank unset", field=field)

    def _wanted(self, q: SearchQuery, mode: SearchMode) -> int:
        """Candidates each side provides."""
        s = self._settings
        shaped = (q.collapse or q.max_hits_per_path or q.min_score is not None
                  or q.max_staleness_s is not None)
        wanted = q.top_k * (8 if shaped else 2) + 8
        if q.rerank:
            wanted = max(wanted, q.top_k, q.rerank_candidates or s.default_rerank_candidates)
        if mode is SearchMode.HYBRID:
            wanted = max(wanted, s.hybrid_candidates)
        return wanted

    def _heads(self, q: SearchQuery, ids: Sequence[int],
               timings: dict[str, float]) -> dict[int, tuple[str, str]]:
        """(doc_id, path) of the candidate ids the catalog shows: ranking and shaping need
        no more, and a hybrid search ranks ~200 candidates to return ~10 (read whole later:
        0.9 ms for 190 heads against 3.2 ms for 190 whole chunks on SciFact)."""
        f0 = time.perf_counter()
        out = self._catalog.chunk_heads(q.namespace, ids)
        timings["fetch"] = timings.get("fetch", 0.0) + time.perf_counter() - f0
        return out

    # -- one query -------------------------------------------------------------------------
    def _early_lexical(self, q: SearchQuery, handle: NamespaceHandle) -> _Early | None:
        """The lexical index's first answer for a hybrid query, read before the visibility
        lock (while the query is embedded): used under the lock if no commit came between
        (the lock's generation), since the index receives a write's entries before its
        commit and removes them after. None when there is no usable index or it failed
        (the search under the lock then asks, or falls back, as usual)."""
        lex = handle.lexical
        if lex is None or lex.failed:
            return None
        generation = handle.visibility.generation
        terms = analyzer.query_terms(q.query)
        k = self._wanted(q, SearchMode.HYBRID) + 16
        l0 = time.perf_counter()
        try:
            found = lex.search(terms, engine_filter(q.filter), k)
        except BaseException as exc:
            if not is_engine_error(exc):
                raise
            return None  # asked again under the lock, where a failure is handled
        return _Early(generation, terms, k, found, time.perf_counter() - l0)

    def _one(self, q: SearchQuery, mode: SearchMode, handle: NamespaceHandle,
             vec: np.ndarray | None, request_id: str, embed_s: float | None,
             t0: float, early: _Early | None = None) -> SearchResult:
        s = self._settings
        wanted = self._wanted(q, mode)
        rerank_n = 0
        if q.rerank:
            rerank_n = max(q.top_k, q.rerank_candidates or s.default_rerank_candidates)
        timings: dict[str, float] = {}
        now = datetime.now(UTC)
        lag = self._source_lag(q.namespace)
        # Hits beyond max_staleness are dropped before the top_k cut (by path: with a bound
        # source a hit's staleness is its path's; by the document rule it is 0 or unset, never
        # beyond a bound), so stale candidates never take the places of fresh ones.
        drop_stale = (q.max_staleness_s is not None and not q.flag_stale
                      and lag is not None)
        with handle.visibility.read():
            handle.require_live()
            if early is not None and early.generation != handle.visibility.generation:
                early = None  # a commit came between: the lexical index is asked again
            while True:
                dense: dict[int, float] = {}
                lexical: dict[int, float] = {}
                heads: dict[int, tuple[str, str]] = {}
                looked: set[int] = set()  # ids whose heads were asked for (shown or not)
                if vec is not None:
                    with tracing.span("retriever.search.ann",
                                      {"retriever.wanted": wanted}) as sp:
                        # The early lexical answer's heads come in the same catalog statement.
                        also = [v for v, _ in early.found] if early is not None else []
                        dense, heads = self._dense(q, handle, vec, wanted, timings, also,
                                                   looked)
                        sp.set_attribute("retriever.candidates", len(dense))
                if mode is not SearchMode.DENSE:
                    with tracing.span("retriever.search.lexical",
                                      {"retriever.wanted": wanted}) as sp:
                        lexical = self._lexical(q, handle, wanted, heads, timings, early,
                                                looked)
                        sp.set_attribute("retriever.candidates", len(lexical))
                with tracing.span("retriever.search.fuse") as sp:
                    count, ranked = self._fuse(q, mode, dense, lexical, heads, timings)
                    sp.set_attribute("retriever.candidates", count)
                if drop_stale:
                    assert lag is not None and q.max_staleness_s is not None
                    bound = q.max_staleness_s
                    ranked = (c for c in ranked if lag.path_staleness_s(c.path, now) <= bound)
                needed = (list(itertools.islice(ranked, rerank_n)) if q.rerank
                          else self._shape(q, ranked))
                # Shaping (collapse, a cap per path, dropped stale hits) can leave fewer than
                # top_k of a pool that a side cut short: ask both sides for more.
                truncated = len(dense) >= wanted or len(lexical) >= wanted
                if (len(needed) >= (rerank_n if q.rerank else q.top_k) or not truncated
                        or wanted >= _MAX_WANTED):
                    break
                wanted = min(wanted * 4, _MAX_WANTED)
                early = None
            with tracing.span("retriever.search.fetch", {"retriever.chunks": len(needed)}):
                f0 = time.perf_counter()
                # Whole chunks only for what can be returned.
                chunks, index_version = self._catalog.chunks_by_vector_ids(
                    q.namespace, [c.vector_id for c in needed])
                timings["fetch"] = timings.get("fetch", 0.0) + time.perf_counter() - f0
        for c in needed:
            c.chunk = chunks[c.vector_id]  # visible under the lock, so still there
        candidates = needed
        reranker = ""
        if q.rerank and candidates:
            with tracing.span("retriever.search.rerank",
                              {"retriever.candidates": len(candidates[:rerank_n])}):
                candidates = self._rerank(q, candidates[:rerank_n], timings)
            assert self._reranker is not None
            reranker = self._reranker.name
        final = self._shape(q, candidates) if q.rerank else candidates
        hits: list[Hit] = []
        for c in final:
            assert c.chunk is not None
            staleness, basis = chunk_staleness(c.chunk, lag, now)
            stale = (q.max_staleness_s is not None and staleness is not None
                     and staleness > q.max_staleness_s)
            if stale and not q.flag_stale:
                continue  # beyond the caller's bound: dropped
            if staleness is not None:
                self._metrics.result_staleness.observe(staleness)
            hits.append(Hit(chunk=c.chunk, score=float(c.score), rank=len(hits) + 1,
                            staleness_s=staleness, dense_score=c.dense,
                            lexical_score=c.lexical, fused_score=c.fused,
                            rerank_score=c.rerank, staleness_basis=basis, stale=stale))
        if not hits:
            self._metrics.zero_results.labels(self._metrics.namespace_label(q.namespace)).inc()
        for stage, seconds in timings.items():
            if stage != "embed":
                self._metrics.stage_duration.labels(stage).observe(seconds)
        r, e = handle.record, self._embedder
        lineage = Lineage(
            request_id=request_id, namespace=q.namespace, embedder=e.name,
            embedder_revision=e.revision, reranker=reranker, backend=r.backend,
            index_generation=r.index_generation, index_version=index_version, device=e.device,
            reranker_revision=self._reranker.revision if reranker and self._reranker else "",
            mode=mode, analyzer=analyzer.ANALYZER if mode is not SearchMode.DENSE else "",
            trace_id=tracing.current_trace_id(),
        )
        return SearchResult(hits=tuple(hits), lineage=lineage, timings=StageTimings(
            embed=embed_s if vec is not None else None, ann=timings.get("ann"),
            lexical=timings.get("lexical"), rerank=timings.get("rerank"),
            fetch=timings.get("fetch"), fuse=timings.get("fuse"),
            total=time.perf_counter() - t0))

    @staticmethod
    def _shape(q: SearchQuery, candidates: Iterable[_Candidate]) -> list[_Candidate]:
        return fusion.shape(candidates, q.top_k, key_doc=lambda c: c.doc_id,
                            key_path=lambda c: c.path, score=lambda c: c.score,
                            collapse=q.collapse, min_score=q.min_score,
                            max_per_path=q.max_hits_per_path)

    def _dense(self, q: SearchQuery, handle: NamespaceHandle, vec: np.ndarray, wanted: int,
               timings: dict[str, float], also: Sequence[int] = (),
               looked: set[int] | None = None) -> tuple[dict[int, float],
                                                         dict[int, tuple[str, str]]]:
        """ANN candidates that the catalog shows (at most ``wanted``) and the (doc_id, path)
        of those and of the ids ``also`` shown: one catalog statement for a hybrid query's
        candidates of both sides. The ids asked for are added to ``looked``. Call under the
        visibility lock."""
        ann_s = 0.0
        # The filter runs inside the engine, over the payload stored with each vector (it
        # never changes under a vector id: see Catalog.stage_copies).
        where = None if q.filter.empty else engine_filter(q.filter)
        # Over-fetching (shaping, skipped ids) stops at what the engine can answer.
        limit = handle.index.max_k
        k = min(wanted, limit)
        while True:
            a0 = time.perf_counter()
            found = handle.index.search(vec[None, :], k, where=where)[0]
            a1 = time.perf_counter()
            ids = found.ids.tolist()
            asked = [*ids, *also]
            chunks = self._heads(q, asked, timings)
            if looked is not None:
                looked.update(asked)
            ann_s += a1 - a0
            # Skipped ids (staged/superseded) can crowd out real hits: ask for more.
            if sum(1 for v in ids if v in chunks) >= wanted or len(ids) < k or k >= limit:
                break
            k = min(k * 4, limit)
        dense: dict[int, float] = {}
        for vid, score in zip(found.ids.tolist(), found.scores.tolist(), strict=True):
            if vid in chunks and len(dense) < wanted:
                dense[vid] = float(score)
        timings["ann"] = ann_s
        return dense, chunks

    def _lexical(self, q: SearchQuery, handle: NamespaceHandle, wanted: int,
                 heads: dict[int, tuple[str, str]], timings: dict[str, float],
                 early: _Early | None = None, looked: set[int] | None = None
                 ) -> dict[int, float]:
        """BM25 candidates that the catalog shows (at most ``wanted``); their (doc_id, path)
        are added to ``heads`` (ids in ``looked`` were asked for already: not again). Call
        under the visibility lock; ``early`` must be of the lock's generation."""
        terms = early.terms if early is not None else analyzer.query_terms(q.query)
        found: list[tuple[int, float]] | None = None
        lex_s = 0.0
        lex = handle.lexical
        if lex is not None and not lex.failed:
            found, lex_s = self._from_engine(q, lex, terms, wanted, heads, timings, early,
                                             looked if looked is not None else set())
        if found is None:  # the catalog's FTS5 table: visible rows only
            l0 = time.perf_counter()
            found = self._catalog.lexical_search(q.namespace, terms, q.filter, wanted)
            lex_s += time.perf_counter() - l0
            # (The engine path looked its ids up already: what is missing there is what
            # the catalog does not show.)
            missing = [v for v, _ in found if v not in heads]
            if missing:
                heads.update(self._heads(q, missing, timings))
        timings["lexical"] = lex_s
        out: dict[int, float] = {}
        for vid, score in found:
            if vid in heads and len(out) < wanted:
                out[vid] = score
        return out

    def _from_engine(self, q: SearchQuery, lex: LexicalIndex, terms: Sequence[str],
                     wanted: int, heads: dict[int, tuple[str, str]],
                     timings: dict[str, float], early: _Early | None = None,
                     looked: frozenset[int] | set[int] = frozenset()
                     ) -> tuple[list[tuple[int, float]] | None, float]:
        """The lexical index's best matches, enough of them visible in the catalog (their
        heads are added to ``heads``), and the seconds the engine took; None when the
        engine failed (it is marked for rebuild and the caller reads the catalog)."""
        flt = engine_filter(q.filter)
        k = wanted + 16
        spent = 0.0
        while True:
            l0 = time.perf_counter()
            try:
                if early is not None and early.k == k:  # read while the query was embedded
                    found, spent, early = early.found, spent + early.seconds, None
                else:
                    found = lex.search(terms, flt, k)
            except QueryError as exc:  # this query only: the catalog answers it
                log.warning("namespace %s: the lexical index cannot run this query (%s); "
                            "the catalog's FTS5 table answers it", q.namespace, exc)
                return None, spent + time.perf_counter() - l0
            except BaseException as exc:
                if not is_engine_error(exc):
                    raise
                log.error("namespace %s: the lexical index failed a search (%s: %s); "
                          "searching the catalog's FTS5 table until it is rebuilt at the "
                          "next start", q.namespace, type(exc).__name__, exc)
                lex.mark_failed(f"{type(exc).__name__}: {exc}")
                return None, spent + time.perf_counter() - l0
            spent += time.perf_counter() - l0
            unknown = [v for v, _ in found if v not in heads and v not in looked]
            if unknown:
                heads.update(self._heads(q, unknown, timings))
            # Staged or superseded entries can crowd out real hits: ask for more.
            if (len(found) < k or k >= 1 << 20
                    or sum(1 for v, _ in found if v in heads) >= wanted):
                return found, spent
            k *= 4

    def _fuse(self, q: SearchQuery, mode: SearchMode, dense: dict[int, float],
              lexical: dict[int, float], heads: dict[int, tuple[str, str]],
              timings: dict[str, float]) -> tuple[int, Iterator[_Candidate]]:
        """How many candidates there are, and an iterator over them best first, each with
        its stage scores (``score`` is the last one). Lazy: a search ranks a few hundred
        candidates to return ~10, and shaping stops reading once it has them."""
        dense = {v: s for v, s in dense.items() if v in heads}
        lexical = {v: s for v, s in lexical.items() if v in heads}
        if mode is SearchMode.DENSE:
            scores = dense
        elif mode is SearchMode.LEXICAL:
            scores = lexical
        else:
            f0 = time.perf_counter()
            w = self._settings.hybrid_dense_weight if q.dense_weight is None else q.dense_weight
            scores = fusion.fuse(dense, lexical, w, self._settings.hybrid_normalization)
            timings["fuse"] = time.perf_counter() - f0
        hybrid = mode is SearchMode.HYBRID

        def candidates() -> Iterator[_Candidate]:
            for vid in fusion.rank(scores):
                doc_id, path = heads[vid]
                yield _Candidate(vector_id=vid, doc_id=doc_id, path=path, dense=dense.get(vid),
                                 lexical=lexical.get(vid),
                                 fused=scores[vid] if hybrid else None, score=scores[vid])

        return len(scores), candidates()

    def _rerank(self, q: SearchQuery, candidates: list[_Candidate],
                timings: dict[str, float]) -> list[_Candidate]:
        """The candidates re-scored by the cross-encoder, best first."""
        assert self._reranker is not None and self._rerank_pairs is not None
        r0 = time.perf_counter()
        pairs = [(q.query, f"{c.path}\n{c.chunk.text if c.chunk else ''}") for c in candidates]
        scores = self._rerank_pairs(pairs, self._reranker.count_tokens(pairs)).result()
        for c, s in zip(candidates, scores.tolist(), strict=True):
            c.rerank = float(s)
            c.score = float(s)
        timings["rerank"] = time.perf_counter() - r0
        self._metrics.rerank_candidates.observe(len(candidates))
        return sorted(candidates, key=lambda c: -c.score)
