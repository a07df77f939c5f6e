"""Open namespaces: each one's vector collection, write lock and visibility lock.

A namespace remembers the embedder (name, revision, dimension) and backend that built it.
Writing or searching it with another embedder is refused (ModelMismatch): vectors of two
models must never be mixed in one index. Re-embedding goes into a new generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from indexers import (
    BACKENDS,
    Backend,
    CollectionSpec,
    DimensionMismatch,
    EngineError,
    EngineUnavailable,
    LossReporter,
    SelfRepairing,
    StoreInUse,
    VectorIndex,
    create_backend,
)
from retriever._rwlock import RWLock
from retriever.analyzer import ANALYZER, chunk_terms
from retriever.cancel import NEVER, CallToken
from retriever.catalog import Catalog
from retriever.domain import NamespaceRecord
from retriever.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ModelMismatch,
    NotFound,
    translate,
)
from retriever.lexical import LexicalIndex, move_aside
from retriever.models.embedder import Embedder, pipeline_differences
from retriever.slo.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class NamespaceHandle:
    record: NamespaceRecord  # as created; counts are not kept current here
    index: VectorIndex
    # The lexical engine's index (retriever/lexical.py); None: lexical searches read the
    # catalog's FTS5 table (lexical_engine = fts5).
    lexical: LexicalIndex | None = None
    # One writer at a time per namespace (the diff of old and new chunks needs it).
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    # Searches hold it shared from ANN to catalog look-up; a commit holds it exclusively,
    # so a search sees a document entirely before or entirely after an upsert.
    visibility: RWLock = field(default_factory=RWLock)
    # Set (under both locks) when the namespace is deleted; holders of a stale handle then
    # answer NotFound instead of touching a dropped index.
    deleted: bool = False
    # Held by the one re-index (ReindexNamespace, or the rebuild of a lost collection) that
    # may run at a time: two would build the same next generation.
    reindexing: threading.Lock = field(default_factory=threading.Lock)

    def require_live(self) -> None:
        if self.deleted:
            raise NotFound(f"namespace {self.name!r} was deleted", field="namespace")

    @property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True, slots=True)
class ReindexResult:
    backend: str
    generation: int
    vectors: int  # in the new generation at the swap
    caught_up: int  # of them, written or removed after the copy (writes made meanwhile)
    seconds: float


# How often a namespace whose engine server did not answer at start is tried again (by a
# look-up of it, in the background).
REOPEN_RETRY_S = 10.0
# Catalog vectors searched for at start, to find an index whose vectors changed in place.
SELF_CHECK_SAMPLES = 64


def collection_name(name: str, generation: int) -> str:
    return f"{name}.g{generation}"


def lexical_dir(name: str) -> str:
    """The directory of a namespace's lexical index (namespace names may hold characters
    a file name should not: named by a hash, like the catalog's FTS table)."""
    return "ns_" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


class Namespaces:
    def __init__(self, catalog: Catalog, embedder: Embedder, index_root: Path,
                 default_backend: str, metrics: Metrics,
                 backend_options: dict[str, dict[str, Any]] | None = None,
                 lexical_root: Path | None = None) -> None:
        """``backend_options``: per backend name, keyword arguments for its constructor;
        ``lexical_root``: where each namespace's tantivy index lives (None: lexical search
        reads the catalog's FTS5 tables)."""
        self._backend_options = backend_options or {}
        self._lexical_root = Path(lexical_root) if lexical_root is not None else None
        self._catalog = catalog
        self._embedder = embedder
        self._index_root = Path(index_root)
        self._default_backend = default_backend
        self._metrics = metrics
        self._backends: dict[str, Backend] = {}
        self._handles: dict[str, NamespaceHandle] = {}
        # Namespaces on a backend this server cannot open (its engine is not installed):
        # name -> why. They answer FAILED_PRECONDITION and can be deleted; the rest serve.
        self._unopened: dict[str, str] = {}
        # Of those, the ones whose engine server did not answer: name -> when (monotonic) a
        # look-up may next try to open it again (in the background).
        self._retry_at: dict[str, float] = {}
        self._reopening: set[str] = set()
        self._lock = threading.Lock()
        # The lost collections being rebuilt (by name), under a lock of their own (engine
        # calls report losses, maybe under the registry lock), and the token that stops the
        # rebuilds when the service closes.
        self._rebuilding: set[str] = set()
        self._rebuild_lock = threading.Lock()
        self._closing = CallToken()

    # -- lifecycle -------------------------------------------------------------------------
    def open_all(self) -> dict[str, dict[str, int]]:
        """Open every namespace and repair disagreement between catalog and index left by a
        crash. Returns per namespace the repairs made."""
        pending = self._catalog.drop_pending()
        report: dict[str, dict[str, int]] = {}
        records = [r for r in (self._catalog.get_namespace(n, with_counts=False)
                               for n in self._catalog.namespace_names()) if r is not None]
        known = {collection_name(r.name, r.index_generation) for r in records}
        to_drop = self._catalog.pending_drops()
        missing: dict[str, str] = {}  # backend -> why it cannot be opened, and what to do
        down: set[str] = set()  # of those, engine servers that did not answer
        for backend_name in sorted({self._default_backend, *(r.backend for r in records),
                                    *(b for b in to_drop if b in BACKENDS)}):
            try:
                backend = self._backend(backend_name)
            except FailedPrecondition as exc:
                if backend_name == self._default_backend:
                    raise  # the configuration names an engine that is not there
                missing[backend_name] = (
                    f"which this server cannot open ({exc.message}): install it and restart")
                continue
            mine = [r for r in records if r.backend == backend_name]
            try:
                present = self._probe(backend, mine)
            except EngineError as exc:
                store = backend.local_store
                if store is None or isinstance(exc, StoreInUse):
                    # A server down or refusing us, or embedded files another process holds
                    # (not damaged: left alone). The others serve.
                    missing[backend_name] = (
                        f"whose engine did not answer at start ({exc}): it is tried again "
                        f"every {REOPEN_RETRY_S:.0f} s while the namespace is used; bring "
                        "the engine back")
                    down.add(backend_name)
                    continue
                # Embedded files (milvus-lite, Chroma's) hold nothing the catalog lacks.
                backend = self._quarantine_store(backend_name, backend, store, exc)
                present = self._probe(backend, mine)
            orphans = set(present) - known
            # Deleted namespaces' collections the catalog recorded: certainly ours.
            for collection in sorted(to_drop.get(backend_name, set())):
                if collection in orphans:
                    log.warning("dropping collection %s of a deleted namespace", collection)
                    backend.drop(collection)
                    orphans.discard(collection)
                self._catalog.dropped(backend_name, collection)
            if orphans and backend.local_store is None:
                # A server's collections may be another deployment's (a Chroma database,
                # a Milvus prefix shared by mistake): only other generations of this
                # catalog's namespaces (a re-index stopped by a crash) are dropped.
                ours = {r.name for r in records}
                strangers = {c for c in orphans if c.rpartition(".g")[0] not in ours}
                if strangers:
                    log.warning("%d collections on the %s server belong to no namespace of "
                                "this catalog and are left alone (another deployment's): %s",
                                len(strangers), backend_name,
                                ", ".join(sorted(strangers)[:10]))
                orphans -= strangers
            for orphan in orphans:
                # Left by a crash between a DeleteNamespace's commit and its drop.
                log.warning("dropping collection %s of no namespace", orphan)
                backend.drop(orphan)
        rebuild_terms = self._catalog.meta("analyzer") != ANALYZER
        self._drop_orphan_lexical(records)
        # Collections written before engines stored payloads get theirs once.
        add_payloads = self._catalog.meta("index_payloads") != "1"
        for record in records:
            if record.backend in missing:
                why = (f"namespace {record.name!r} is on the {record.backend} backend, "
                       f"{missing[record.backend]}, or delete the namespace (its documents "
                       "are in the catalog until then)")
                log.error("%s; the other namespaces serve", why)
                with self._lock:
                    self._unopened[record.name] = why
                    if record.backend in down:
                        self._retry_at[record.name] = time.monotonic() + REOPEN_RETRY_S
                continue
            report[record.name] = self._reconciled(
                self._open(record), len(pending.get(record.name, ())), rebuild_terms,
                add_payloads)
        # One-time upgrades are marked done only when every namespace had them: one left
        # unopened (its engine missing or down) gets them at the start that opens it.
        if not any(r.backend in missing for r in records):
            self._catalog.set_meta("analyzer", ANALYZER)
            self._catalog.set_meta("index_payloads", "1")
        return report

    def _reconciled(self, handle: NamespaceHandle, pending: int, rebuild_terms: bool,
                    add_payloads: bool) -> dict[str, int]:
        """Make an opened namespace's index and lexical engine agree with the catalog; the
        repairs made."""
        record = handle.record
        self._report_quarantined(handle)
        active = np.sort(self._catalog.active_vector_ids(record.name))
        report = self._reconcile(handle, pending, active)
        lexical = self._reconcile_lexical(handle.name, rebuild_terms)
        report.update(lexical)
        report.update(self._reconcile_engine(
            handle, rebuild_terms or lexical["lexical_rows_restored"] > 0, active))
        if add_payloads:
            report["payloads_written"] = self._write_payloads(handle)
        if self._vectors_damaged(handle, active):
            # Rebuilt from the catalog into a new generation, in the background (as a lost
            # collection is): its calls answer UNAVAILABLE until the swap.
            self._metrics.derived_files_rebuilt.labels(f"{record.backend}_vectors").inc()
            self.recover_lost(collection_name(record.name, record.index_generation))
            report["vectors_rebuilt"] = 1
        return report

    def _vectors_damaged(self, handle: NamespaceHandle, active: np.ndarray) -> bool:
        """Whether the index's vectors have changed from the catalog's (bytes changed in
        an engine's data file that still parses). Which ids each side holds is compared by
        the reconcile; this looks at the vectors, at a sample's cost (SELF_CHECK_SAMPLES
        searches): each must find a stored vector as close as itself (its own copy, or a
        duplicate); one changed in place is farther from every query, its own included. An
        index that checks its own files when it opens (FAISS: its snapshot's SHA-256) is
        not searched."""
        if len(active) == 0 or isinstance(handle.index, SelfRepairing):
            return False
        rng = np.random.default_rng()
        sample = rng.choice(active, size=min(SELF_CHECK_SAMPLES, len(active)), replace=False)
        record = handle.record
        ids, vecs = self._catalog.vectors(record.name, sample.tolist(), record.dimension)
        if len(ids) == 0:
            return False
        if record.metric == "cosine":
            expect = np.ones(len(ids), dtype=np.float64)
        elif record.metric == "ip":
            expect = np.einsum("ij,ij->i", vecs.astype(np.float64), vecs.astype(np.float64))
        else:
            expect = np.zeros(len(ids), dtype=np.float64)
        rows = np.arange(len(ids))
        # Searched for again, wider, those missed: an approximate index may miss the odd
        # one among its nearest ten, hardly among a hundred.
        for k in (10, 100):
            try:
                hits = handle.index.search(np.ascontiguousarray(vecs[rows], dtype=np.float32),
                                           min(k, len(active)))
            except EngineError as exc:
                log.warning("namespace %s: could not check its index's vectors (%s)",
                            handle.name, exc)
                return False
            # A stored vector as close as the vector itself: itself (or a duplicate).
            rows = rows[[j for j, (r, h) in enumerate(zip(rows.tolist(), hits, strict=True))
                         if not (len(h.scores) and h.scores[0] >= expect[r] - 1e-3 * max(
                             1.0, abs(expect[r])))]]
            if len(rows) == 0:
                return False
        log.error("namespace %s: %d of %d of its vectors sampled from the catalog are not "
                  "found in its %s index as they are (its files changed in place): "
                  "rebuilding it from the catalog", handle.name, len(rows), len(ids),
                  record.backend)
        return True

    def _reopen(self, name: str) -> None:
        """Open a namespace whose engine server did not answer at start (a background
        thread started by a look-up): on success it serves from the next look-up; else it
        stays FAILED_PRECONDITION, with the new error, until the next try."""
        handle: NamespaceHandle | None = None
        try:
            record = self._catalog.get_namespace(name, with_counts=False)
            if record is None:
                return
            backend = self._backend(record.backend)
            self._probe(backend, [record])
            # Reconciled before it is registered: until then look-ups answer as before.
            handle = self._new_handle(record)
            report = self._reconciled(handle, 0, self._catalog.meta("analyzer") != ANALYZER,
                                      self._catalog.meta("index_payloads") != "1")
            with self._lock:
                if name in self._unopened:
                    self._handles[name] = handle
                    handle = None
                self._unopened.pop(name, None)
                self._retry_at.pop(name, None)
            if handle is not None:  # deleted meanwhile (its collection drop is recorded)
                return
            log.warning("namespace %s: its %s engine answers again; opened (%s)", name,
                        record.backend, ", ".join(f"{k} {v}" for k, v in report.items() if v)
                        or "nothing to repair")
        except Exception as exc:  # noqa: BLE001 - the namespace stays refused, says why
            with self._lock:
                if name in self._unopened:
                    self._unopened[name] = (
                        f"namespace {name!r} is on an index engine that does not answer "
                        f"({exc}): it is tried again every {REOPEN_RETRY_S:.0f} s while the "
                        "namespace is used; bring the engine back, or delete the namespace "
                        "(its documents are in the catalog until then)")
                    self._retry_at[name] = time.monotonic() + REOPEN_RETRY_S
        finally:
            if handle is not None and handle.lexical is not None:  # never registered
                with contextlib.suppress(Exception):
                    handle.lexical.close(wait_merges=False)
            with self._lock:
                self._reopening.discard(name)

    @staticmethod
    def _probe(backend: Backend, records: list[NamespaceRecord]) -> list[str]:
        """The backend's collections, each of ``records``' opened (kept open by the
        backend for the reconcile) and counted: an engine that cannot read its files, or
        does not answer, says so here, before anything is reconciled."""
        present = backend.collections()
        for r in records:
            with contextlib.suppress(DimensionMismatch):  # reported when the namespace opens
                backend.open(CollectionSpec(collection_name(r.name, r.index_generation),
                                            r.dimension, r.metric)).count()  # type: ignore[arg-type]
        return present

    def _quarantine_store(self, name: str, backend: Backend, store: Path,
                          exc: Exception) -> Backend:
        """Move an embedded engine's damaged files aside and open it afresh: the
        reconcile then refills every namespace on it from the catalog's vectors."""
        with contextlib.suppress(Exception):
            backend.close()
        with self._lock:
            self._backends.pop(name, None)
        moved = store.with_name(f"{store.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        if store.exists():
            store.rename(moved)
        log.error("the %s engine could not read its files in %s (%s): moved them aside to %s; "
                  "its namespaces are rebuilt from the catalog (delete the moved copy once "
                  "they serve)", name, store, exc, moved.name)
        self._metrics.derived_files_rebuilt.labels(f"{name}_store").inc()
        return self._backend(name)

    def _reconcile_lexical(self, name: str, rebuild: bool) -> dict[str, int]:
        """Make the lexical index agree with the catalog's chunks: terms for every active
        chunk that lacks them (a catalog from before the lexical index, or rows lost with a
        damaged page), all of them again when the analyzer changed, none for chunks gone.
        Both sides' (count, sum of ids) are compared first: the search for the rows that
        differ reads every chunk."""
        if not rebuild and self._catalog.terms_agree(name):
            return {"lexical_rows_restored": 0, "lexical_rows_removed": 0}
        restored = 0
        after = 0
        while True:
            rows = self._catalog.chunks_without_terms(name, after, 2048, all_rows=rebuild)
            if not rows:
                break
            self._catalog.put_terms(name, [(vid, chunk_terms(path, symbol, text))
                                           for vid, path, symbol, text in rows])
            restored += len(rows)
            after = rows[-1][0]
        stray = self._catalog.stray_terms(name)
        if restored or stray:
            log.warning("reconciled the lexical index of namespace %s: %s %d chunks' terms, "
                        "removed %d stray rows", name, "rebuilt" if rebuild else "restored",
                        restored, stray)
        self._metrics.reconcile_repairs.labels("lexical_rows_restored").inc(restored)
        self._metrics.reconcile_repairs.labels("lexical_rows_removed").inc(stray)
        return {"lexical_rows_restored": restored, "lexical_rows_removed": stray}

    def _drop_orphan_lexical(self, records: list[NamespaceRecord]) -> None:
        """Lexical indexes of no namespace: left by a crash between a DeleteNamespace's
        commit and the removal of its files (moved-aside damaged copies are kept)."""
        root = self._lexical_root
        if root is not None and (root.is_symlink() or root.exists()) and not root.is_dir():
            # A file where the lexical indexes' directory should be: moved aside, and every
            # namespace's index is rebuilt from the catalog.
            moved = move_aside(root, "damaged")
            log.warning("lexical index directory %s is not a directory: moved it to %s; the "
                        "lexical indexes are rebuilt from the catalog", root, moved)
            self._metrics.derived_files_rebuilt.labels("lexical_index").inc()
        if root is None or not root.is_dir():
            return
        known = {lexical_dir(r.name) for r in records}
        for path in root.iterdir():
            if path.is_dir() and ".damaged-" not in path.name and path.name not in known:
                log.warning("dropping lexical index %s of no namespace", path.name)
                shutil.rmtree(path, ignore_errors=True)

    def _reconcile_engine(self, handle: NamespaceHandle, rebuild: bool, want: np.ndarray
                          ) -> dict[str, int]:
        """Make the lexical engine hold exactly the catalog's active chunks: what a crash
        between its write and the catalog's commit (or before a removal) left, and all of
        it when its files were damaged or the terms were rebuilt. ``want``: the catalog's
        active ids, sorted. A matching fingerprint (entries, sum of ids) skips the
        comparison."""
        lex = handle.lexical
        if lex is None:
            return {}
        if lex.damaged is not None:
            d = lex.damaged
            log.warning("namespace %s: moved damaged lexical index %s aside to %s (%s); "
                        "rebuilding it from the catalog", handle.name, d.path,
                        d.moved_to.name, d.reason)
            self._metrics.derived_files_rebuilt.labels("lexical_index").inc()
        if rebuild:
            lex.clear()
            have = np.empty(0, dtype=np.int64)
        else:
            n, total = lex.fingerprint()
            if n == len(want) and total == int(want.sum()):
                return {"lexical_entries_removed": 0, "lexical_entries_added": 0}
            have = np.asarray(lex.ids(), dtype=np.int64)
        extra = np.setdiff1d(have, want)
        missing = np.setdiff1d(want, have)
        lex.delete(extra.tolist())
        for i in range(0, len(missing), 4096):
            self._restore_lexical(handle, missing[i : i + 4096].tolist())
        if len(extra) or len(missing):
            log.warning("reconciled the lexical index of namespace %s: removed %d stray "
                        "entries, added %d", handle.name, len(extra), len(missing))
        self._metrics.reconcile_repairs.labels("lexical_entries_removed").inc(len(extra))
        self._metrics.reconcile_repairs.labels("lexical_entries_added").inc(len(missing))
        return {"lexical_entries_removed": int(len(extra)),
                "lexical_entries_added": int(len(missing))}

    def _restore_lexical(self, handle: NamespaceHandle, vector_ids: list[int]) -> None:
        """Add these active chunks to the lexical index, with their terms and payloads from
        the catalog."""
        assert handle.lexical is not None
        terms = self._catalog.terms(handle.name, vector_ids)
        payloads = self._catalog.payloads(handle.name, vector_ids)
        ids = [v for v in vector_ids if v in payloads]
        handle.lexical.add(ids, [terms.get(v, "") for v in ids], [payloads[v] for v in ids])

    def _write_payloads(self, handle: NamespaceHandle) -> int:
        """Rewrite every vector of the namespace with its payload (from the catalog)."""
        n = self._copy_all(handle.name, handle.index, handle.record.dimension)
        if n:
            handle.index.flush()
            log.warning("namespace %s: wrote the filter payloads of %d vectors", handle.name, n)
        return n

    def _copy_all(self, name: str, index: VectorIndex, dimension: int,
                  token: CallToken = NEVER, handle: NamespaceHandle | None = None) -> int:
        """Write every active row's vector and payload from the catalog into ``index``
        (stopping with NotFound once ``handle``'s namespace is deleted: the rows under its
        name may be another namespace's by then)."""
        ids = np.sort(self._catalog.active_vector_ids(name))
        for i in range(0, len(ids), 4096):
            token.check("the copy")
            if handle is not None:
                handle.require_live()
            self._restore_into(name, index, dimension, ids[i : i + 4096].tolist())
        return int(len(ids))

    def _restore(self, handle: NamespaceHandle, vector_ids: list[int]) -> None:
        """Write these active rows' vectors and payloads from the catalog into the index."""
        self._restore_into(handle.name, handle.index, handle.record.dimension, vector_ids)

    def _restore_into(self, name: str, index: VectorIndex, dimension: int,
                      vector_ids: list[int]) -> None:
        ids, vecs = self._catalog.vectors(name, vector_ids, dimension)
        payloads = self._catalog.payloads(name, ids.tolist())
        index.upsert(ids.tolist(), vecs, [payloads[int(v)] for v in ids])

    def reindex(self, name: str, backend: str, token: CallToken = NEVER) -> ReindexResult:
        """Rebuild the namespace's index from the catalog into a new generation (on
        ``backend``, or its own when empty) while the current one keeps serving searches
        and writes; then catch up with the writes made meanwhile and swap atomically, and
        drop the old generation. A crash before the swap leaves the new collection an
        orphan, after it the old one: the next start drops either."""
        handle = self.get(name)
        handle.require_live()
        if not handle.reindexing.acquire(blocking=False):
            raise Aborted(f"namespace {name!r} is being re-indexed already (a ReindexNamespace "
                          "or the rebuild of a lost collection); retry once it has finished")
        try:
            return self._reindex(handle, backend, token)
        finally:
            handle.reindexing.release()

    def _reindex(self, handle: NamespaceHandle, backend: str, token: CallToken
                 ) -> ReindexResult:
        t0 = time.perf_counter()
        name = handle.name
        old = handle.record
        target = backend or old.backend
        engine = self._backend(target)
        generation = old.index_generation + 1
        spec = CollectionSpec(collection_name(name, generation), old.dimension,
                              old.metric)  # type: ignore[arg-type]
        engine.drop(spec.name)  # left by a re-index that crashed
        index = engine.open(spec)
        swapped = False
        try:
            copied = self._copy_all(name, index, old.dimension, token, handle)
            token.acquire(handle.write_lock, "the re-index's swap")
            try:
                handle.require_live()
                if handle.record.index_generation != old.index_generation:
                    raise Aborted(f"namespace {name!r} was re-indexed meanwhile; retry")
                # No writer runs now: catch up with what was committed during the copy.
                have = index.ids()
                want = self._catalog.active_vector_ids(name)
                extra = np.setdiff1d(have, want, assume_unique=True)
                missing = np.setdiff1d(want, have, assume_unique=True)
                if len(extra):
                    index.delete(extra.tolist())
                for i in range(0, len(missing), 4096):
                    self._restore_into(name, index, old.dimension,
                                       missing[i : i + 4096].tolist())
                index.flush()
                with handle.visibility.write():
                    token.check("the re-index's swap")
                    self._catalog.set_index(name, target, generation)
                    handle.index = index
                    handle.record = dataclasses.replace(old, backend=target,
                                                        index_generation=generation)
                    swapped = True
            finally:
                handle.write_lock.release()
        finally:
            if not swapped:
                try:
                    engine.drop(spec.name)
                except Exception:  # an orphan: dropped at next start
                    log.exception("could not drop the unfinished re-index of %s", name)
        try:
            self._backend(old.backend).drop(collection_name(name, old.index_generation))
        except Exception:  # an orphan now: dropped at next start
            log.exception("could not drop the old index generation of %s", name)
        log.info("re-indexed namespace %s into %s generation %d: %d vectors (%d caught up) "
                 "in %.1f s", name, target, generation, copied + len(missing), len(missing),
                 time.perf_counter() - t0)
        return ReindexResult(backend=target, generation=generation,
                             vectors=int(len(want)), caught_up=int(len(missing) + len(extra)),
                             seconds=time.perf_counter() - t0)

    def recover_lost(self, collection: str) -> None:
        """The engine no longer has ``collection`` (the backends' LossReporter calls this
        before raising CollectionLost, whichever path met it): rebuild it from the catalog,
        and every other collection of a namespace on the same backend that is gone from it
        too (an engine server back on an empty volume lost them all). Each goes into a new
        generation, as a re-index does; calls answer UNAVAILABLE meanwhile and the swap
        makes the namespace whole again. Returns at once (it is called from inside engine
        calls): the work runs on a thread of its own, one rebuild at a time per
        collection."""
        with self._rebuild_lock:
            if collection in self._rebuilding:
                return
            self._rebuilding.add(collection)
        threading.Thread(target=self._recover, args=(collection,), daemon=True,
                         name="rebuild-lost").start()

    def _recover(self, collection: str) -> None:
        claimed = {collection}
        try:
            with self._lock:
                current = {collection_name(h.name, h.record.index_generation): h
                           for h in self._handles.values() if not h.deleted}
            handle = current.get(collection)
            if handle is None:  # rebuilt, re-indexed or deleted meanwhile
                return
            backend = handle.record.backend
            try:
                present = set(self._backend(backend).collections())
            except Exception as exc:  # the others are found by the calls that touch them
                log.warning("listing the collections of backend %s failed: %s", backend, exc)
                present = set(current) - {collection}
            with self._rebuild_lock:
                gone = [(c, h) for c, h in current.items() if c == collection or (
                    h.record.backend == backend and c not in present
                    and c not in self._rebuilding)]
                claimed.update(c for c, _ in gone)
                self._rebuilding.update(claimed)
            for c, h in gone:
                self._rebuild_lost(h, c)
        finally:
            with self._rebuild_lock:
                self._rebuilding -= claimed

    def _rebuild_lost(self, handle: NamespaceHandle, collection: str) -> None:
        if handle.deleted or collection != collection_name(handle.name,
                                                          handle.record.index_generation):
            return  # deleted, or re-indexed since the engine's collections were listed
        log.warning("namespace %s: the %s engine no longer has its collection %s; rebuilding "
                    "it from the catalog", handle.name, handle.record.backend, collection)
        try:
            result = self.reindex(handle.name, "", self._closing)
        except Exception as exc:  # the engine down again, say: the next request retries
            log.warning("namespace %s: rebuilding its lost collection failed: %s",
                        handle.name, exc)
            return
        self._metrics.lost_collections_rebuilt.labels(result.backend).inc()
        log.warning("namespace %s: rebuilt its lost collection from the catalog into "
                    "generation %d: %d vectors in %.1f s", handle.name, result.generation,
                    result.vectors, result.seconds)

    def _report_quarantined(self, handle: NamespaceHandle) -> None:
        """Log and count the damaged index files the engine moved aside at open; the
        reconcile that follows refills the index from the catalog."""
        if not isinstance(handle.index, SelfRepairing):
            return
        for q in handle.index.quarantined:
            log.warning("namespace %s: moved damaged %s aside to %s (%s); rebuilding its "
                        "index from the catalog", handle.name, q.path, q.moved_to.name,
                        q.reason)
            self._metrics.derived_files_rebuilt.labels(q.kind).inc()

    def _reconcile(self, handle: NamespaceHandle, pending: int, in_catalog: np.ndarray
                   ) -> dict[str, int]:
        """``in_catalog``: the catalog's active ids of the namespace."""
        index = handle.index
        in_index = index.ids()
        extra = np.setdiff1d(in_index, in_catalog, assume_unique=True)
        missing = np.setdiff1d(in_catalog, in_index, assume_unique=True)
        if len(extra):
            index.delete(extra.tolist())
        for i in range(0, len(missing), 4096):
            self._restore(handle, missing[i : i + 4096].tolist())
        if len(extra) or len(missing):
            try:
                index.flush()
            except Exception as exc:  # e.g. a full disk: the catalog has it all anyway
                if translate(exc) is None:
                    raise
                log.warning("namespace %s: snapshot after reconcile failed (%s); the next "
                            "flush retries it", handle.name, exc)
            log.warning("reconciled namespace %s: removed %d stray vectors, restored %d",
                        handle.name, len(extra), len(missing))
        self._metrics.reconcile_repairs.labels("pending_rows_dropped").inc(pending)
        self._metrics.reconcile_repairs.labels("stray_vectors_removed").inc(len(extra))
        self._metrics.reconcile_repairs.labels("vectors_restored").inc(len(missing))
        return {"pending_rows_dropped": pending, "stray_vectors_removed": int(len(extra)),
                "vectors_restored": int(len(missing))}

    def flush_all(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            if h.deleted:
                continue
            try:
                h.index.flush()
            except Exception as exc:  # one failed snapshot must not skip the others
                known = translate(exc)
                if known is None:
                    log.exception("snapshot of namespace %s failed", h.name)
                else:  # e.g. a full disk: the previous snapshot stays; retried next time
                    log.warning("snapshot of namespace %s failed: %s (%s)", h.name,
                                known.message, exc)

    def close(self) -> None:
        """Close every backend (each writes its last snapshots), even when one fails."""
        self._closing.cancel()  # a rebuild of a lost collection stops at its next batch
        with self._lock:
            for name, backend in self._backends.items():
                try:
                    backend.close()
                except Exception as exc:
                    known = translate(exc)
                    if known is None:
                        log.exception("closing index backend %s failed", name)
                    else:  # the previous snapshot stays; start-up reconcile restores the rest
                        log.warning("last snapshot of index backend %s failed: %s (%s)", name,
                                    known.message, exc)
            for h in self._handles.values():
                if h.lexical is not None:
                    try:
                        h.lexical.close()
                    except Exception:  # its last commit stands; reconcile checks it
                        log.exception("closing the lexical index of %s failed", h.name)
            self._backends.clear()
            self._handles.clear()

    # -- look-up ---------------------------------------------------------------------------
    def get(self, name: str) -> NamespaceHandle:
        with self._lock:
            handle = self._handles.get(name)
            unopened = self._unopened.get(name)
            retry = self._retry_at.get(name)
            if (unopened is not None and retry is not None and time.monotonic() >= retry
                    and name not in self._reopening and not self._closing.done):
                self._reopening.add(name)
                threading.Thread(target=self._reopen, args=(name,), daemon=True,
                                 name=f"reopen-{name}").start()
        if unopened is not None:
            raise FailedPrecondition(unopened, field="namespace")
        if handle is None:
            raise NotFound(f"namespace {name!r} does not exist", field="namespace")
        return handle

    def get_or_create(self, name: str) -> NamespaceHandle:
        try:
            return self.get(name)
        except NotFound:
            try:
                return self.create(name, "")
            except AlreadyExists:  # created by a concurrent request meanwhile
                return self.get(name)

    def require_compatible(self, handle: NamespaceHandle) -> None:
        """Raise ModelMismatch unless the loaded embedder's weights built this namespace (at
        any float precision: see `retriever.models.embedder.compatibility_key`)."""
        r, e = handle.record, self._embedder
        if (r.embedder, r.dimension) != (e.name, e.dimension) or not e.serves(
                r.embedder_revision):
            raise ModelMismatch(
                f"namespace {r.name!r} was built by embedder {r.embedder}@"
                f"{r.embedder_revision} ({r.dimension}-d); this server runs {e.name}@"
                f"{e.revision} ({e.dimension}-d), whose vectors are not interchangeable "
                "with them (int8 and float vectors mix only where a gate verdict for this "
                "CPU says so). Serve it with that embedder (embedder_backend and "
                "embedder_precision), or upsert its documents again into a new namespace "
                "(`retriever index` / `retriever sync`); ReindexNamespace copies the stored "
                "vectors and cannot change them", field="namespace")
        changed = pipeline_differences(_pipeline(r.embedder_pipeline), e.pipeline)
        if changed:
            raise ModelMismatch(
                f"namespace {r.name!r} was built by embedder {r.embedder}@"
                f"{r.embedder_revision} with another pipeline around the same weights "
                f"({'; '.join(changed)}), whose vectors are not interchangeable with this "
                "server's. Serve it with the model as it was, or upsert its documents again "
                "into a new namespace (`retriever index` / `retriever sync`)",
                field="namespace")

    # -- changes ---------------------------------------------------------------------------
    def create(self, name: str, backend: str) -> NamespaceHandle:
        backend = backend or self._default_backend
        self._backend(backend)
        e = self._embedder
        record = NamespaceRecord(
            name=name, backend=backend, embedder=e.name, embedder_revision=e.revision,
            dimension=e.dimension, metric="cosine",
            index_generation=self._catalog.first_generation(name), index_version=0,
            created_at=datetime.now(UTC),
            embedder_pipeline=json.dumps(e.pipeline, sort_keys=True) if e.pipeline else "",
        )
        with self._lock:
            if name in self._handles or not self._catalog.create_namespace(record):
                raise AlreadyExists(f"namespace {name!r} already exists", field="name")
            try:
                # A collection of this name can only be left over by a crash during an
                # earlier DeleteNamespace: a new namespace starts empty.
                self._backend(backend).drop(collection_name(name, record.index_generation))
                if self._lexical_root is not None:
                    shutil.rmtree(self._lexical_root / lexical_dir(name), ignore_errors=True)
                return self._open_locked(record)
            except BaseException:
                self._catalog.delete_namespace(name)  # no catalog row without its index
                raise

    def delete(self, name: str, token: CallToken = NEVER) -> tuple[int, int]:
        """Delete the namespace; gives up (Cancelled) while waiting behind its writers once
        the caller is gone, so a delete its caller saw fail never applies later."""
        with self._lock:
            if name in self._unopened:  # its engine is not here: the catalog's part goes,
                token.check("the delete")  # its collection when the engine is back
                record = self._catalog.get_namespace(name, with_counts=False)
                docs, chunks = self._catalog.delete_namespace(name, drop=(
                    (record.backend, collection_name(name, record.index_generation))
                    if record is not None else None))
                del self._unopened[name]
                self._retry_at.pop(name, None)
                if self._lexical_root is not None:
                    shutil.rmtree(self._lexical_root / lexical_dir(name), ignore_errors=True)
                return docs, chunks
        handle = self.get(name)
        token.acquire(handle.write_lock, "the delete started")
        try:
            # All under the registry lock too: a CreateNamespace of the same name waits until
            # the old collection is gone, and never gets the old, closing index.
            with handle.visibility.write(), self._lock:
                handle.require_live()
                token.check("the delete")
                collection = collection_name(name, handle.record.index_generation)
                docs, chunks = self._catalog.delete_namespace(
                    name, drop=(handle.record.backend, collection))
                handle.deleted = True
                self._handles.pop(name, None)
                # Deleted from here on: the caller hears so even when the engine cannot
                # drop the collection now (down, damaged); the drop stays recorded in the
                # catalog and is done at the next start.
                try:
                    self._backend(handle.record.backend).drop(collection)
                except Exception as exc:  # noqa: BLE001 - the delete has committed
                    log.warning("namespace %s is deleted, but its collection %s could not be "
                                "dropped now (%s): it is dropped at the next start", name,
                                collection, exc)
                else:
                    self._catalog.dropped(handle.record.backend, collection)
                if handle.lexical is not None:
                    try:
                        handle.lexical.drop()
                    except Exception as exc:  # noqa: BLE001 - removed at the next start
                        log.warning("namespace %s is deleted, but its lexical index could "
                                    "not be removed now (%s): it is at the next start", name,
                                    exc)
        finally:
            handle.write_lock.release()
        return docs, chunks

    def _open(self, record: NamespaceRecord) -> NamespaceHandle:
        with self._lock:
            return self._open_locked(record)

    def _open_locked(self, record: NamespaceRecord) -> NamespaceHandle:
        handle = self._new_handle(record)
        self._handles[record.name] = handle
        return handle

    def _new_handle(self, record: NamespaceRecord) -> NamespaceHandle:
        backend = self._backend(record.backend)
        name = collection_name(record.name, record.index_generation)
        spec = CollectionSpec(name, record.dimension, record.metric)  # type: ignore[arg-type]
        try:
            index = backend.open(spec)
        except DimensionMismatch as exc:
            if backend.local_store is None:  # a server's collection: not ours to replace
                raise ModelMismatch(f"namespace {record.name!r}: {exc}",
                                    field="namespace") from exc
            # Embedded files that disagree with the catalog (which says what the namespace
            # holds) are damaged derived data: dropped, and refilled by the reconcile.
            log.error("namespace %s: its %s collection disagrees with the catalog (%s): "
                      "dropped, and rebuilt from the catalog's vectors", record.name,
                      record.backend, exc)
            self._metrics.derived_files_rebuilt.labels(f"{record.backend}_collection").inc()
            backend.drop(name)
            index = backend.open(spec)
        lexical = None
        if self._lexical_root is not None:
            lexical = LexicalIndex(self._lexical_root / lexical_dir(record.name))
        return NamespaceHandle(record=record, index=index, lexical=lexical)

    def _backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            try:
                backend = create_backend(name, self._index_root,
                                         **self._backend_options.get(name, {}))
            except ValueError as exc:
                raise InvalidArgument(str(exc), field="backend") from None
            except EngineUnavailable as exc:
                raise FailedPrecondition(str(exc), field="backend") from exc
            losses = getattr(backend, "losses", None)
            if isinstance(losses, LossReporter):  # an engine that can lose collections
                losses.on_lost = self.recover_lost
            self._backends[name] = backend
        return backend


def _pipeline(recorded: str) -> dict[str, object]:
    """A namespace's recorded embedder pipeline; {} when none (an older release's) or it
    cannot be read (nothing to compare: not a difference)."""
    try:
        got = json.loads(recorded) if recorded else {}
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}
