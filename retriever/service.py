"""The core service: composes catalog, embedder, chunkers, indexes and pipelines.

Constructing it is cheap; ``start()`` loads the model, opens the catalog and every
namespace's index and reconciles them; ``close()`` flushes and releases everything. All
methods are blocking and thread-safe; the gRPC layer runs them off its event loop.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import sqlite3
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import numpy as np

from retriever import validation
from retriever._priority import lower_priority
from retriever.cancel import NEVER, CallToken
from retriever.catalog import Catalog, missing_catalog, sqlite_memory_used
from retriever.config import RESPONSE_ROOM_BYTES, Settings
from retriever.domain import (
    ChunkRecord,
    DeleteResult,
    Document,
    DocumentRecord,
    EvaluationRecord,
    GoldenQuery,
    GoldenSet,
    IndexStatus,
    NamespaceRecord,
    Page,
    SearchMode,
    SearchQuery,
    SearchResult,
    UpsertResult,
)
from retriever.errors import (
    Cancelled,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotReady,
    Overloaded,
    RetrieverError,
    translate,
)
from retriever.freshness.staleness import SourceFreshness, chunk_staleness
from retriever.freshness.sync import (
    Syncer,
    SyncRequest,
    SyncState,
    SyncStatus,
    check_location,
)
from retriever.ingest.chunking import ChunkerSet
from retriever.ingest.pipeline import Ingestor, service_chunkers
from retriever.models.batcher import MicroBatcher
from retriever.models.embed_cache import EmbeddingCache, open_cache
from retriever.models.embedder import Embedder
from retriever.models.reranker import Reranker
from retriever.namespaces import Namespaces, ReindexResult
from retriever.search.pipeline import Searcher
from retriever.slo import golden
from retriever.slo.feedback import FeedbackLog
from retriever.slo.metrics import Metrics, stage_adder
from retriever.storage import DataDirLock, SpaceGuard, catalog_path

log = logging.getLogger(__name__)

class RetrieverService:
    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 embedder: Embedder | None = None) -> None:
        """``embedder`` may be shared, already loaded, between services in one process."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.embedder = embedder or Embedder(settings)
        self.catalog = Catalog(catalog_path(settings.data_dir),
                               mmap_bytes=settings.catalog_mmap_bytes,
                               cache_bytes=settings.catalog_cache_bytes)
        self.freshness = SourceFreshness(
            self.catalog, settings.data_dir / "sources", settings.staleness_refresh_s,
            fetch_error=lambda url: self.syncer.fetch_error(url) if self.syncer else "",
            allowed=lambda location: check_location(location, settings))
        self.metrics.watch_sources(self.freshness.cached)
        self.metrics.cap_namespaces(settings.metrics_max_namespaces)
        # Recent search responses, for RecordFeedback (online precision@k).
        self.feedback = FeedbackLog(settings.feedback_log_size, settings.feedback_window_s)
        self.metrics.watch_feedback(self.feedback.window)
        used = sqlite_memory_used()
        if used is not None:
            self.metrics.watch_catalog_memory(used)
        self._evaluator: threading.Thread | None = None
        self.namespaces = Namespaces(
            self.catalog, self.embedder, settings.data_dir / "indexes", settings.index_backend,
            self.metrics, backend_options=settings.backend_options(),
            lexical_root=(settings.data_dir / "lexical"
                          if settings.lexical_engine == "tantivy" else None))
        self._dir_lock = DataDirLock(settings.data_dir)
        # Writes and deletes go through it: on a full disk deletes still run, writes are
        # refused with StorageFull until space is freed.
        self.space = SpaceGuard(settings.data_dir, settings.storage_reserve_bytes,
                                self.catalog.release_space, self.metrics)
        self._batcher = MicroBatcher(
            # A slice or a batch of queries is one forward pass (slices are already cut).
            lambda texts: self.embedder.embed(texts, batch_size=max(1, len(texts))),
            settings.query_batch_size,
            settings.query_batch_wait_ms / 1000.0,
            on_batch=self.metrics.query_batch_size.observe,
            on_depth=self.metrics.embed_queue.set,
            doc_max_wait_s=settings.embed_doc_max_wait_ms / 1000.0,
            on_wait=lambda kind, s: self.metrics.model_wait.labels(kind).observe(s),
            doc_order=settings.embed_doc_order,
            embed_queries=lambda texts: self.embedder.embed(
                texts, batch_size=max(1, len(texts)), threads=settings.query_threads,
                lane=True),
        )
        self.reranker = Reranker(settings)
        self._embed_cache: EmbeddingCache | None = None
        self.chunkers: ChunkerSet | None = None
        self.ingestor: Ingestor | None = None
        self.searcher: Searcher | None = None
        self.reconcile_report: dict[str, dict[str, int]] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.syncer: Syncer | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock.acquire()
        if s.gil_switch_interval_ms:  # process-wide: the service owns its process
            sys.setswitchinterval(s.gil_switch_interval_ms / 1000)
        # The catalog first: a damaged one stops start-up before the model loads, and so
        # does a missing one beside the indexes of namespaces (not created anew).
        if (why := missing_catalog(catalog_path(s.data_dir))) is not None:
            raise DataLoss(why)
        self.catalog.open(check=s.catalog_check_on_start)
        self.space.start()
        if not self.embedder.loaded:
            self.embedder.load(calibration_texts=self.catalog.sample_chunk_texts)
        if self.reranker.configured and not self.reranker.loaded:
            self.reranker.load()
        if s.embed_cache_dir is not None:
            self._embed_cache = open_cache(s.embed_cache_dir, self.embedder.identity,
                                           self.embedder.dimension)
        self.chunkers = service_chunkers(s, self.embedder)
        try:
            self.reconcile_report = self.namespaces.open_all()
        except sqlite3.DatabaseError as exc:  # damage quick_check missed, or it was skipped
            if isinstance(translate(exc), DataLoss):
                raise self.catalog.damaged(str(exc)) from None
            raise
        self._batcher.doc_batch = self.embedder.default_batch_size
        self._batcher.doc_slice_tokens = self.embedder.default_slice_tokens
        self._batcher.query_lane = self.embedder.has_query_lane
        self._batcher.nice = s.model_nice(self.embedder.has_query_lane)  # once loaded
        self._batcher.lane_nice = s.query_lane_nice
        self._batcher.start()
        if s.embed_layer_checkpoints:
            self.embedder.add_checkpoint(self._batcher.checkpoint)
        self.ingestor = Ingestor(s, self.catalog, self.namespaces, self.embedder,
                                 self._embed_documents, self.chunkers, self.metrics)
        self.searcher = Searcher(
            s, self.catalog, self.namespaces, self.embedder, self._batcher.submit, self.metrics,
            self.reranker,
            lambda pairs, lengths: self._batcher.submit_rerank(self.reranker.score, pairs,
                                                               lengths),
            source_lag=self.freshness.lag)
        self._flusher = threading.Thread(target=self._flush_loop, name="index-flusher",
                                         daemon=True)
        self._flusher.start()
        self.syncer = Syncer(s, self.catalog, self._sync_upsert, self._sync_delete,
                             self._ensure_namespace, on_finish=self._synced)
        self.syncer.start()
        self.freshness.warm(self.catalog.source_namespaces())
        # The quality gauges resume from the catalog's latest SLO run of each golden set.
        for rec in self.catalog.slo_evaluations():
            self.metrics.set_evaluation(rec)
        e = self.embedder
        self.metrics.embedder_info.labels(e.name, e.revision, e.backend, e.precision,
                                          e.device).set(1)
        self._ready.set()
        self.metrics.model_loaded.set(1)
        if s.eval_interval_s > 0:
            self._evaluator = threading.Thread(target=self._eval_loop, name="evaluator",
                                               daemon=True)
            self._evaluator.start()

    def close(self) -> None:
        if self.syncer is not None:
            # Syncs stop at their next batch (what they applied stays applied) while the
            # model and catalog still serve them.
            self.syncer.close()
        self._ready.clear()
        self.metrics.model_loaded.set(0)
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=30)
        if self._evaluator is not None:
            self._evaluator.join(timeout=30)  # stops at its next query batch
        self._batcher.stop()
        self.embedder.remove_checkpoint(self._batcher.checkpoint)
        self.namespaces.close()  # closing an index writes its last snapshot
        self.catalog.close()
        if self._embed_cache is not None:
            self._embed_cache.close()
        self._dir_lock.release()

    def document_backlog_age(self) -> float:
        """How long the oldest upsert not yet begun has waited for the model (seconds)."""
        return self._batcher.document_backlog_age()

    def _admit_documents(self, tokens: int, limit_s: float) -> None:
        """Refuse a new upsert (Overloaded) of ``tokens`` new tokens that the documents
        queued for the model now would delay by more than ``limit_s`` and by more than its
        own work: it could not be done in time, and would only slow those ahead of it. (The
        second condition keeps bulk upserts flowing: two of them delay each other by about
        their own size, and are admitted; it takes a crowd of upserts ahead to refuse.)"""
        delay, own = self._batcher.document_delay(tokens)
        if delay > limit_s and delay > own:
            raise Overloaded(
                f"the model is behind on documents: those queued now would delay this "
                f"upsert by ~{delay:.1f} s (shedding beyond {limit_s:g} s, "
                "upsert_shed_delay_s); retry with backoff")

    def _embed_documents(self, texts: Sequence[str], lengths: Sequence[int],
                         token: CallToken) -> np.ndarray:
        cached = self._embed_cache.get(texts) if self._embed_cache is not None else {}
        todo = [i for i in range(len(texts)) if i not in cached]
        out = np.empty((len(texts), self.embedder.dimension), dtype=np.float32)
        if todo:
            if token.shed_delay_s:
                self._admit_documents(sum(lengths[i] for i in todo), token.shed_delay_s)
                token.shed_delay_s = 0.0
            fut = self._batcher.submit_documents([texts[i] for i in todo],
                                                 [lengths[i] for i in todo],
                                                 stage_adder("embed_model"))
            fresh = token.wait(fut, "the commit",
                               on_cancel=lambda: self._batcher.cancel_documents(fut))
            out[todo] = fresh
            if self._embed_cache is not None:
                self._embed_cache.put([texts[i] for i in todo], fresh)
        for i, vec in cached.items():
            out[i] = vec
        return out

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.index_flush_interval_s):
            self.namespaces.flush_all()  # logs and skips a failed snapshot; retried next time
            if self.space.full:
                self.space.recover()  # space freed by other means (a grown volume)

    def _require_ready(self) -> None:
        if not self._ready.is_set():
            raise NotReady("the service is loading its models and indexes, or shutting down; "
                           "retry shortly")

    # -- namespaces ------------------------------------------------------------------------
    def create_namespace(self, name: str, backend: str = "") -> NamespaceRecord:
        self._require_ready()
        validation.namespace_name(name, "name")
        handle = self.space.write(lambda: self.namespaces.create(name, backend))
        return self.get_namespace(handle.name)

    def reindex_namespace(self, name: str, backend: str = "",
                          token: CallToken = NEVER) -> tuple[NamespaceRecord, ReindexResult]:
        """Rebuild the namespace's index into a new generation (Namespaces.reindex)."""
        self._require_ready()
        validation.namespace_name(name, "name")
        result = self.space.write(lambda: self.namespaces.reindex(name, backend, token))
        return self.get_namespace(name), result

    def get_namespace(self, name: str) -> NamespaceRecord:
        self._require_ready()
        return self._namespace_record(name, "name")

    def _namespace_record(self, name: str, field: str) -> NamespaceRecord:
        """The catalog's record with current counts; ``field`` names the request field."""
        validation.namespace_name(name, field)
        record = self.catalog.get_namespace(name)
        if record is None:
            raise NotFound(f"namespace {name!r} does not exist", field=field)
        return record

    def list_namespaces(self, page_size: int, page_token: str) -> Page[NamespaceRecord]:
        self._require_ready()
        size = validation.page_size(page_size, self.settings)
        scope = _token_scope("namespaces")
        after = _decode_token(page_token, scope)
        items = self.catalog.list_namespaces(after, size + 1)
        more = len(items) > size
        items = items[:size]
        token = _encode_token(scope, items[-1].name) if more else ""
        return Page(items=tuple(items), next_page_token=token)

    def delete_namespace(self, name: str, token: CallToken = NEVER) -> tuple[int, int]:
        self._require_ready()
        validation.namespace_name(name, "name")
        try:
            return self.space.delete(lambda: self.namespaces.delete(name, token))
        finally:
            self.freshness.forget(name)
            # A delete that failed or was cancelled before its commit leaves the namespace,
            # its feedback and its quality gauges as they were.
            try:
                gone = self.catalog.get_namespace(name, with_counts=False) is None
            except RetrieverError:  # the delete's own error says what went wrong
                gone = False
            if gone:
                self.feedback.forget(name)
                self.metrics.forget_evaluations(name)

    # -- documents -------------------------------------------------------------------------
    def upsert(self, namespace: str, docs: Sequence[Document],
               token: CallToken = NEVER, *, create: bool = True,
               incarnation: datetime | None = None) -> UpsertResult:
        """A caller's upsert. Into a namespace bound to a git source it is applied, and the
        next sync compares the whole tree (putting the namespace back to the source's files:
        a bound namespace holds exactly them). ``incarnation``: the namespace must be that
        one (the one an earlier message of the same stream wrote), else NotFound."""
        self._require_ready()
        return self._upsert(namespace, docs, token, create=create, outside=True,
                            incarnation=incarnation)

    def _upsert(self, namespace: str, docs: Sequence[Document], token: CallToken, *,
                create: bool = True, outside: bool = False,
                incarnation: datetime | None = None) -> UpsertResult:
        self._require_ready()
        ingestor = self.ingestor
        assert ingestor is not None

        def write() -> UpsertResult:
            if not outside or not self._note_outside_write(namespace, docs):
                return ingestor.upsert(namespace, docs, token, create=create,
                                       incarnation=incarnation)
            try:
                return ingestor.upsert(namespace, docs, token, create=create,
                                       incarnation=incarnation)
            finally:  # again once it is in: a sync that began meanwhile keeps it pending
                self._note_outside_write(namespace, docs)
        return self.space.write(write)

    def delete_documents(self, namespace: str, doc_ids: Sequence[str],
                         token: CallToken = NEVER) -> DeleteResult:
        """A caller's delete; in a bound namespace, as `upsert`."""
        self._require_ready()
        return self._delete_documents(namespace, doc_ids, token, outside=True)

    def _delete_documents(self, namespace: str, doc_ids: Sequence[str],
                          token: CallToken, *, outside: bool = False,
                          incarnation: datetime | None = None) -> DeleteResult:
        self._require_ready()
        ingestor = self.ingestor
        assert ingestor is not None

        def delete() -> DeleteResult:
            if not outside:
                return ingestor.delete(namespace, doc_ids, token, incarnation=incarnation)
            if not self._note_outside_write(namespace, doc_ids):
                return ingestor.delete(namespace, doc_ids, token)
            try:
                return ingestor.delete(namespace, doc_ids, token)
            finally:
                self._note_outside_write(namespace, doc_ids)
        return self.space.delete(delete)

    def _note_outside_write(self, namespace: str, items: Sequence[object]) -> bool:
        """Before and after a caller's write (inside the storage guard: a full disk fails it
        as it fails the write): a bound namespace's source is marked for a full compare.
        Before, so a crash after the write's commit cannot lose the mark (a write that then
        fails costs one compare); after, so a sync that started in between (the first mark
        wakes the poller) and listed the documents before this write committed does not
        clear it. Whether the namespace is bound (an unbound one is not looked up again)."""
        return bool(items) and self.catalog.note_outside_write(namespace)

    # -- sources -----------------------------------------------------------------------------
    def sync_source(self, namespace: str, request: SyncRequest, *, wait: bool = False,
                    token: CallToken = NEVER) -> SyncState:
        """Sync ``namespace`` with its git source (retriever/freshness/sync.py): at once
        RUNNING, or with ``wait`` when finished (its error raised if it failed)."""
        self._require_ready()
        assert self.syncer is not None
        return self.syncer.sync(namespace, request, wait=wait, token=token)

    def _synced(self, state: SyncState, commit_times: list[datetime]) -> None:
        """After a sync: its commits' commit-to-searchable latency, and the namespace's lag
        read afresh (the next search must not show the lag from before the sync)."""
        if commit_times and state.finished_at is not None:
            hist = self.metrics.commit_to_searchable.labels(
                self.metrics.namespace_label(state.namespace))
            for t in commit_times:
                hist.observe(max(0.0, (state.finished_at - t).total_seconds()))
        self.freshness.forget(state.namespace)
        try:  # read again now, so the staleness gauges never go missing after a sync
            self.freshness.lag(state.namespace)
        except Exception:  # noqa: BLE001 - the next read reports it
            log.warning("reading the source of %s after its sync", state.namespace,
                        exc_info=True)

    def chunk_staleness(self, chunk: ChunkRecord) -> tuple[float | None, str]:
        """(seconds, basis) of one chunk now (GetChunk)."""
        return chunk_staleness(chunk, self.freshness.lag(chunk.namespace), datetime.now(UTC))

    def recent_syncs(self, namespace: str) -> list[SyncState]:
        """The namespace's latest syncs, newest first (the running one included)."""
        self._require_ready()
        assert self.syncer is not None
        validation.namespace_name(namespace)
        return self.syncer.recent(namespace)

    def _sync_upsert(self, namespace: str, docs: Sequence[Document],
                     token: CallToken, incarnation: datetime | None) -> UpsertResult:
        # The sync created the namespace before its first batch: one deleted while the sync
        # runs stays deleted (its later batches fail NOT_FOUND) instead of coming back, and
        # one created again under its name meanwhile is not this sync's.
        return self._upsert(namespace, docs, token, create=False, incarnation=incarnation)

    def _sync_delete(self, namespace: str, doc_ids: Sequence[str],
                     token: CallToken, incarnation: datetime | None) -> DeleteResult:
        return self._delete_documents(namespace, doc_ids, token, incarnation=incarnation)

    def _ensure_namespace(self, namespace: str) -> datetime | None:
        """Create the namespace with the server's defaults when it does not exist; its
        incarnation (when it was created), which the sync's writes must find."""
        handle = self.space.write(lambda: self.namespaces.get_or_create(namespace))
        return handle.record.created_at

    def get_document(self, namespace: str, doc_id: str) -> DocumentRecord:
        self._require_ready()
        validation.namespace_name(namespace)
        validation.doc_id(doc_id)  # bad input is INVALID_ARGUMENT before any look-up
        self._existing(namespace)
        record = self.catalog.get_document(namespace, doc_id)
        if record is None:
            raise NotFound(f"document {doc_id!r} is not in namespace {namespace!r}",
                           field="doc_id")
        return record

    def list_documents(self, namespace: str, page_size: int, page_token: str,
                       path_prefix: str = "", *,
                       item_bytes: Callable[[DocumentRecord], int] | None = None
                       ) -> Page[DocumentRecord]:
        """A page of at most ``page_size`` documents; with ``item_bytes`` (an item's size
        in the response) the page also ends before the response would pass the message
        limit (documents with metadata at its limits: 1,000 of them took 76 MB), the next
        page token going on from there."""
        self._require_ready()
        validation.namespace_name(namespace)
        size = validation.page_size(page_size, self.settings)
        validation.path(path_prefix, "path_prefix")
        scope = _token_scope("documents", namespace, path_prefix)
        after = _decode_token(page_token, scope)
        self._existing(namespace)
        items, total = self.catalog.list_documents(namespace, after, size + 1, path_prefix)
        more = len(items) > size
        items = items[:size]
        if item_bytes is not None:
            room = self.settings.grpc_max_message_bytes - RESPONSE_ROOM_BYTES
            for n, d in enumerate(items):
                room -= item_bytes(d)
                if room < 0 and n > 0:  # (one document's entry always fits)
                    items, more = items[:n], True
                    break
        token = _encode_token(scope, items[-1].doc_id) if more else ""
        return Page(items=tuple(items), next_page_token=token, total_size=total)

    def get_chunk(self, namespace: str, chunk_id: str) -> ChunkRecord:
        self._require_ready()
        validation.namespace_name(namespace)
        validation.chunk_id(chunk_id)
        self._existing(namespace)
        chunk = self.catalog.get_chunk(namespace, chunk_id)
        if chunk is None:
            raise NotFound(
                f"chunk {chunk_id!r} is not part of any current document in namespace "
                f"{namespace!r}", field="chunk_id")
        return chunk

    def _existing(self, namespace: str) -> None:
        validation.namespace_name(namespace)
        self.namespaces.get(namespace)

    # -- search ----------------------------------------------------------------------------
    def search(self, query: SearchQuery, request_id: str) -> SearchResult:
        self._require_ready()
        assert self.searcher is not None
        result = self.searcher.search([query], request_id)[0]
        self._check_response_size([result], "top_k")
        self._log_responses(request_id, [result])
        return result

    def batch_search(self, queries: Sequence[SearchQuery], request_id: str) -> list[SearchResult]:
        self._require_ready()
        assert self.searcher is not None
        if not queries:
            raise InvalidArgument("requests is empty: send at least one search",
                                  field="requests")
        if len(queries) > self.settings.max_batch_queries:
            raise InvalidArgument(
                f"requests has {len(queries)} searches; at most "
                f"{self.settings.max_batch_queries} (max_batch_queries)", field="requests")
        results = self.searcher.search(queries, request_id, batch=True)
        self._check_response_size(results, "requests")
        self._log_responses(request_id, results)
        return results

    def _log_responses(self, request_id: str, results: Sequence[SearchResult]) -> None:
        """Keep what a request returned, for RecordFeedback to join to."""
        self.feedback.record(request_id, [(r.lineage.namespace,
                                           [h.chunk.chunk_id for h in r.hits]) for r in results])

    # -- quality: feedback, golden sets, evaluation ----------------------------------------
    def record_feedback(self, namespace: str, request_id: str,
                        judgements: Sequence[tuple[str, bool]]) -> tuple[int, int]:
        """Judgements of chunks a recent search returned; (recorded, relevant)."""
        self._require_ready()
        recorded, relevant, by_ns = self.feedback.judge(namespace, request_id, judgements)
        # Each judgement counts for the namespace of the search that returned its chunk
        # (a BatchSearch judged without a namespace may span several).
        for ns, (n, rel) in by_ns.items():
            label = self.metrics.namespace_label(ns)
            self.metrics.feedback.labels(label, "relevant").inc(rel)
            self.metrics.feedback.labels(label, "not_relevant").inc(n - rel)
        return recorded, relevant

    def register_golden_set(self, namespace: str, name: str, queries: Sequence[GoldenQuery],
                            history: tuple[int, Sequence[str]] | None = None, *,
                            check_reply: Callable[[GoldenSet], None] | None = None
                            ) -> GoldenSet:
        """Store a new version of the set ``name``: ``queries``, or, with ``history``
        (commits, path prefixes), queries built from the namespace's git source history.
        ``check_reply(set)`` runs before anything is stored (the server: that its echo fits
        one message), so a set that cannot be answered is not stored either."""
        check = check_reply or (lambda gs: None)
        self._require_ready()
        s = self.settings
        validation.namespace_name(namespace)
        golden.check_name(name)
        if history is not None and queries:
            raise InvalidArgument("give either queries or from_source_history, not both",
                                  field="from_source_history")
        if history is None:
            checked = golden.check_queries(queries, s.max_golden_set_queries,
                                           s.max_query_bytes)
            self._namespace_record(namespace, "namespace")
            new = GoldenSet(namespace=namespace, name=name, version=0, created_at=None,
                            origin="request", queries=checked)
            check(new)
            return self.catalog.add_golden_set(new)
        commits, paths = history
        if not 1 <= commits <= s.max_golden_set_queries:
            raise InvalidArgument(
                f"from_source_history.commits is {commits}; it must be between 1 and "
                f"{s.max_golden_set_queries} (max_golden_set_queries)",
                field="from_source_history.commits")
        if len(paths) > golden.MAX_HISTORY_PATHS:
            raise InvalidArgument(f"from_source_history.paths has {len(paths)} prefixes; at "
                                  f"most {golden.MAX_HISTORY_PATHS}",
                                  field="from_source_history.paths")
        for p in paths:
            validation.path(p, "from_source_history.paths")
        self._namespace_record(namespace, "namespace")
        source = self.catalog.get_source(namespace)
        if source is None:
            raise FailedPrecondition(
                f"namespace {namespace!r} is bound to no git source: bind and sync one "
                "(SyncSource) before building a golden set from its history",
                field="from_source_history")
        if not source.last_commit:
            raise FailedPrecondition(
                f"namespace {namespace!r} has not finished a sync of its source yet: its "
                "indexed revision is unknown", field="from_source_history")
        repo = golden.open_source_repo(source, s.data_dir / "sources")
        try:
            built, meta = golden.history_queries(
                repo, source.last_commit, commits, self.catalog.document_paths(namespace),
                paths=paths, max_query_bytes=s.max_query_bytes)
        finally:
            repo.close()
        new = GoldenSet(namespace=namespace, name=name, version=0, created_at=None,
                        origin="git-history", queries=tuple(built), metadata=meta)
        check(new)
        return self.catalog.add_golden_set(new)

    def evaluate(self, namespace: str, name: str, version: int = 0, ks: Sequence[int] = (),
                 mode: SearchMode = SearchMode.DEFAULT, rerank: bool = False, *,
                 trigger: str = "request", token: CallToken = NEVER) -> EvaluationRecord:
        """Run a stored golden set (version 0: the latest) through the search path, keep the
        run in the catalog and, when it is an SLO run (the latest version, the default mode
        and cut-offs, no re-ranking: as the scheduler runs it), export it to the quality
        gauges; returns it. A caller that goes away (cancelled, deadline passed) stops it
        before its next batch of queries, and nothing is recorded."""
        self._require_ready()
        assert self.searcher is not None
        searcher = self.searcher
        validation.namespace_name(namespace)
        golden.check_name(name, "golden_set")
        if version < 0:
            raise InvalidArgument(f"version is {version}; 0 means the latest",
                                  field="version")
        cutoffs = golden.check_ks(ks, self.settings.max_top_k)
        if rerank:
            searcher.require_reranker()  # named as the EvaluateRequest names it
        self._namespace_record(namespace, "namespace")
        gs = self.catalog.get_golden_set(namespace, name, version)
        if gs is None:
            which = f"version {version} of golden set" if version else "golden set"
            raise NotFound(f"{which} {name!r} is not registered in namespace {namespace!r}",
                           field="version" if version else "golden_set")
        top_k = max(cutoffs)
        rid = f"eval-{uuid.uuid4().hex[:12]}"

        def search(texts: Sequence[str]) -> list[list[str]]:
            if self._stop.is_set():
                raise NotReady("the service is shutting down; the evaluation stopped")
            token.check("the evaluation's next queries")
            results = searcher.search(
                [SearchQuery(namespace=namespace, query=t, top_k=top_k, mode=mode,
                             rerank=rerank, collapse=True) for t in texts], rid, batch=True)
            return [[h.chunk.doc_id for h in r.hits] for r in results]

        paths = {p for q in gs.queries for p in q.path_grades}
        run = golden.EvalRun(namespace, gs.name, gs.version,
                             searcher.mode_of(SearchQuery(namespace, "q", 1, mode=mode)),
                             rerank, cutoffs, trigger)
        try:
            rec = golden.run_evaluation(
                run, gs.queries, search,
                self.catalog.doc_ids_by_path(namespace, paths) if paths else {},
                batch=min(32, self.settings.max_batch_queries))
            token.check("recording the evaluation")
        except Cancelled:
            self.metrics.evaluations.labels(trigger, "cancelled").inc()
            raise
        except BaseException:
            self.metrics.evaluations.labels(trigger, "error").inc()
            raise
        latest = gs if not version else self.catalog.get_golden_set(namespace, name, 0)
        slo = (not rerank and run.mode == searcher.mode_of(SearchQuery(namespace, "q", 1))
               and cutoffs == golden.check_ks((), self.settings.max_top_k)
               and latest is not None and latest.version == gs.version)
        rec = dataclasses.replace(rec, slo=slo)
        self.catalog.add_evaluation(rec, self.settings.eval_history_size)
        self.metrics.set_evaluation(rec)
        self.metrics.evaluations.labels(trigger, "ok").inc()
        return rec

    def _eval_loop(self) -> None:
        """Evaluate every namespace's golden sets (latest versions) every eval_interval_s."""
        lower_priority(self.settings.write_thread_nice)  # batch work, as upserts and syncs
        while not self._stop.wait(self.settings.eval_interval_s):
            self.evaluate_all()

    def evaluate_all(self) -> int:
        """One scheduled round: every stored set once; returns the runs that succeeded.
        A failing set is logged and does not stop the others."""
        done = 0
        for namespace, name in self.catalog.golden_set_names():
            if self._stop.is_set():
                break
            try:
                self.evaluate(namespace, name, trigger="schedule")
                done += 1
            except RetrieverError as exc:
                log.warning("scheduled evaluation of golden set %r of %r: %s", name,
                            namespace, exc)
            except Exception:
                log.exception("scheduled evaluation of golden set %r of %r failed", name,
                              namespace)
        return done

    def _check_response_size(self, results: Sequence[SearchResult], field: str) -> None:
        """Refuse, by name, an answer too big for one gRPC message, rather than let the
        transport fail it. With chunks capped at chunk_max_chars the limits keep ASCII
        answers well under (64 queries x 100 hits x 4096 chars ~ 26 MB of 64 MiB); only
        multi-byte text or large metadata on many hits can get here."""
        limit = self.settings.grpc_max_message_bytes
        size = _response_bytes(results)
        if size > limit:
            hits = sum(len(r.hits) for r in results)
            raise InvalidArgument(
                f"the {hits} hits asked for would make a response of about {size} bytes, over "
                f"the message limit of {limit} bytes (grpc_max_message_bytes): ask for fewer "
                "hits (top_k) or fewer searches per BatchSearch", field=field)

    # -- status ----------------------------------------------------------------------------
    def index_status(self, namespace: str) -> IndexStatus:
        self._require_ready()
        record = self._namespace_record(namespace, "namespace")
        handle = self.namespaces.get(namespace)
        assert self.chunkers is not None
        with handle.visibility.read():
            handle.require_live()
            vector_count = handle.index.count()
        assert self.syncer is not None
        recent = self.syncer.recent(namespace)
        running = next((r for r in recent if r.status is SyncStatus.RUNNING), None)
        finished = next((r for r in recent if r.status is not SyncStatus.RUNNING), None)
        return IndexStatus(
            namespace=record, vector_count=vector_count, device=self.embedder.device,
            precision=self.embedder.precision,
            serving_embedder_revision=self.embedder.revision,
            chunk_tokens=min(self.settings.chunk_tokens, self.embedder.max_tokens),
            overlap_tokens=self.settings.overlap_tokens,
            chunker=",".join(self.chunkers.names),
            source=self.freshness.lag(namespace, fresh=True), running_sync=running,
            last_sync=finished,
            last_evaluation=next(iter(self.catalog.list_evaluations(namespace, 1)), None),
            slo_evaluations=tuple(sorted(self.catalog.slo_evaluations(namespace),
                                         key=lambda e: e.golden_set)))


# Bytes a hit takes in a response besides its strings (ids, hashes, numbers, timestamps,
# field tags), rounded up; and those of a response besides its hits (lineage, timings).
_HIT_OVERHEAD = 320
_RESPONSE_OVERHEAD = 1024


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _response_bytes(results: Sequence[SearchResult]) -> int:
    """An upper estimate of the encoded size of these results."""
    total = 0
    for r in results:
        total += _RESPONSE_OVERHEAD
        for h in r.hits:
            c = h.chunk
            total += _HIT_OVERHEAD + sum(_utf8_size(x) for x in (
                c.text, c.doc_id, c.path, c.revision, c.language, c.chunker, c.namespace))
            total += sum(_utf8_size(k) + _utf8_size(v) + 8 for k, v in c.metadata.items())
    return total


_TOKEN_PREFIX = "after:"


def _token_scope(kind: str, *parts: str) -> str:
    """What a page token pages: the listing and its filters. A token carries it, so one
    issued for one namespace (or prefix, or listing) is refused by every other."""
    return hashlib.sha256("\0".join((kind, *parts)).encode("utf-8")).hexdigest()[:16]


def _encode_token(scope: str, last: str) -> str:
    """An opaque page token: the listing's scope and the last key of the page, so pages
    stay stable under writes."""
    text = f"{_TOKEN_PREFIX}{scope}:{last}"
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii")


def _decode_token(token: str, scope: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        text = raw.decode("utf-8")
    except (ValueError, UnicodeError):
        text = ""
    found, sep, last = text[len(_TOKEN_PREFIX):].partition(":")
    if not text.startswith(_TOKEN_PREFIX) or not sep:
        raise InvalidArgument("page_token is not a token this server issued; pass the "
                              "next_page_token of the previous page", field="page_token")
    if found != scope:
        raise InvalidArgument(
            "page_token was issued for another listing (another namespace, path_prefix or "
            "list): pass the next_page_token of the previous page of this same listing, or "
            "no token to start over", field="page_token")
    return last
