"""Source sync: a namespace follows a git source, and a sync applies what changed.

A namespace is bound to a source (location, ref, include/exclude globs, file size limit) in
the catalog. A sync fetches it (a URL is mirrored under ``<data_dir>/sources``), resolves
the ref, and then:

- when the namespace's last synced commit still exists and is an ancestor of the new head
  (and the globs and size limit are those it was synced with), applies the diff: added and
  modified files upserted, deleted files removed, a rename as a move: the new path's document
  replaces the old one in one commit (a search sees one or the other, never both or
  neither), continuing its versions, with the vectors of unchanged embedded texts reused;
- otherwise (a first sync, a rewritten history, changed globs, an interrupted sync to
  another commit) reconciles the whole tree by content hash: files whose text or revision
  differ from their document are upserted, documents not in the tree are deleted (a new
  path with the text of a document no longer in the tree is that document, moved).

Every write goes through the service's own upsert and delete (atomic per call; a document
whose content, path, language and chunking are unchanged comes back UNCHANGED and costs
nothing), in batches of ``sync_batch_documents`` files, so memory stays bounded. A
document's revision is the commit that last changed its file, and its source time that
commit's time. The new last synced commit is recorded only after every batch and delete
has been applied: a sync stopped midway (killed, cancelled, failed) keeps what it applied,
and the next sync finishes the job without duplicating or losing anything.

One sync per namespace at a time: a second answers Aborted naming the running one. Each
sync runs on a thread of its own, owned by the Syncer, which cancels and joins them at
close. Who may sync what is decided by ``sync_roots`` and ``sync_url_prefixes`` alone.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from retriever import validation
from retriever._priority import lower_priority
from retriever.cancel import NEVER, CallToken
from retriever.catalog import Catalog, SourceRecord, SyncRecord
from retriever.config import Settings
from retriever.domain import (
    DeleteResult,
    DocStatus,
    Document,
    UpsertResult,
    moved_candidates,
    sha256,
)
from retriever.errors import (
    Aborted,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotReady,
    PermissionDenied,
    RetrieverError,
    translate,
)
from retriever.freshness.git import (
    Entry,
    GitRepo,
    Revision,
    SourceSpec,
    commit_time,
    commit_times,
    diff,
    fetch,
    is_ancestor,
    is_url,
    last_changes,
    open_source,
    read_text,
    redact,
    resolve,
    snapshot,
)
from retriever.ingest.chunking.languages import detect_language

__all__ = ["SYNC_HISTORY", "SyncRequest", "SyncState", "SyncStatus", "Syncer",
           "check_location", "file_url_place"]

log = logging.getLogger(__name__)

#: Finished syncs kept per namespace in the catalog.
SYNC_HISTORY = 20
MAX_LOCATION_BYTES = 4096
MAX_REF_BYTES = 256
MAX_GLOBS = 64
MAX_GLOB_BYTES = 1024
# How long close() and a cancelled waiting caller wait for a sync to stop (it stops at its
# next batch, or sooner while waiting for the model).
_STOP_WAIT_S = 30.0
_POLL_S = 0.05
_PAGE = 1000


class SyncStatus(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """What a caller asks to sync. An empty ``location`` means the namespace's bound source
    (then the rest must be empty too); ``ref`` empty means HEAD; ``max_file_bytes`` 0 means
    the server's max_document_bytes."""

    location: str = ""
    ref: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_file_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SyncState:
    """A sync as it stands (RUNNING) or ended. Counts are of what this sync did: a file
    whose document already held its content counts as unchanged, whatever git says."""

    sync_id: str
    namespace: str
    status: SyncStatus
    started_at: datetime
    finished_at: datetime | None
    seconds: float
    location: str
    ref: str
    commit: str = ""  # the commit synced to; "" until resolved
    previous_commit: str = ""  # the namespace's last synced commit before this sync
    full_reconcile: bool = False
    files_added: int = 0
    files_modified: int = 0
    files_deleted: int = 0
    files_renamed: int = 0
    documents_unchanged: int = 0
    documents_upserted: int = 0
    documents_deleted: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    error: str = ""

    def summary(self) -> dict[str, object]:
        """The counts as plain JSON values (what the catalog keeps of a finished sync)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("sync_id", "namespace", "status", "started_at", "finished_at",
                             "commit", "error")}


@dataclass(slots=True)
class _Counts:
    """A running sync's counters, named as SyncState names them."""

    files_added: int = 0
    files_modified: int = 0
    files_deleted: int = 0
    files_renamed: int = 0
    documents_unchanged: int = 0
    documents_upserted: int = 0
    documents_deleted: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class _Run:
    """One sync in flight: its thread, its stop token and its counts so far."""

    def __init__(self, namespace: str, spec: SourceSpec, target: str) -> None:
        self.sync_id = uuid.uuid4().hex[:16]
        self.namespace = namespace
        self.spec = spec
        self.target = target  # the checked location to open (a local path resolved)
        self.started_at = datetime.now(UTC)
        self.t0 = time.monotonic()
        self.token = CallToken()  # cancelled by close() or a waiting caller who left
        self.stop_reason = ""
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.counts = _Counts()
        self.commit = ""
        self.previous_commit = ""
        self.full = False
        self.status = SyncStatus.RUNNING
        self.error = ""
        self.exc: BaseException | None = None
        self.incarnation: datetime | None = None  # the namespace's, once the sync made sure of it
        self.finished_at: datetime | None = None
        self.seconds: float | None = None
        self.thread: threading.Thread | None = None
        self.commit_times: list[datetime] = []  # of the commits it makes searchable

    def stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
        self.token.cancel()

    def state(self) -> SyncState:
        with self.lock:
            c = self.counts
            return SyncState(
                sync_id=self.sync_id, namespace=self.namespace, status=self.status,
                started_at=self.started_at, finished_at=self.finished_at,
                seconds=self.seconds if self.seconds is not None
                else time.monotonic() - self.t0,
                location=redact(self.spec.location), ref=self.spec.ref, commit=self.commit,
                previous_commit=self.previous_commit, full_reconcile=self.full,
                **{f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                   if f.name != "skipped"},
                skipped=dict(sorted(c.skipped.items())), error=self.error)


# (namespace, documents or ids, token, incarnation): the incarnation is what
# ``ensure_namespace`` returned; a write to a namespace that is no longer that one (deleted,
# perhaps created again under its name, while the sync ran) is refused with NotFound.
Upsert = Callable[[str, Sequence[Document], CallToken, datetime | None], UpsertResult]
Delete = Callable[[str, Sequence[str], CallToken, datetime | None], DeleteResult]


class Syncer:
    """Runs the syncs of a service. ``upsert`` and ``delete`` are the service's own write
    paths; ``ensure_namespace`` creates a namespace with the server's defaults if missing."""

    def __init__(self, settings: Settings, catalog: Catalog, upsert: Upsert, delete: Delete,
                 ensure_namespace: Callable[[str], datetime | None],
                 on_finish: Callable[[SyncState, list[datetime]], None] | None = None) -> None:
        """``on_finish(state, commit_times)``: after each sync ends, with the committer
        times of the commits it made searchable (empty unless it succeeded)."""
        self._settings = settings
        self._on_finish = on_finish or (lambda state, times: None)
        self._catalog = catalog
        self._upsert = upsert
        self._delete = delete
        self._ensure_namespace = ensure_namespace
        self._mirrors = settings.data_dir / "sources"
        self._batch = max(1, min(settings.sync_batch_documents, settings.max_batch_documents))
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._fetch_errors: dict[str, str] = {}  # URL -> why its last fetch failed
        # namespace -> the poller's last error for it: said once at WARNING, then, while
        # unchanged, at DEBUG (a source broken for days is not a warning per poll).
        self._poll_errors: dict[str, str] = {}
        self._closed = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Mark syncs a previous process left running as failed (this process holds the
        data directory, so none of them can still run)."""
        n = self._catalog.fail_running_syncs(
            "interrupted: the server stopped during this sync; what it applied stays applied "
            "and the next sync finishes the job")
        if n:
            log.warning("%d sync(s) were interrupted by the last shutdown; marked failed", n)
        if self._settings.sync_poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll_loop, name="sync-poller",
                                            daemon=True)
            self._poller.start()

    def close(self) -> None:
        """Stop every running sync at its next batch and wait for it (what was applied stays
        applied; its commit is not recorded as synced)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(_STOP_WAIT_S)
        with self._lock:
            self._closed = True
            runs = list(self._runs.values())
        for run in runs:
            run.stop("the server is shutting down")
        for run in runs:
            if run.thread is not None:
                run.thread.join(_STOP_WAIT_S)

    # -- the API ---------------------------------------------------------------------------
    def sync(self, namespace: str, request: SyncRequest, *, wait: bool,
             token: CallToken = NEVER) -> SyncState:
        """Start a sync of ``namespace``; without ``wait`` return at once (RUNNING), with it
        when it has ended, raising its error if it failed. Bad input, a location outside the
        allowed roots and a second sync of a namespace are refused before anything starts
        (InvalidArgument, NotFound, PermissionDenied, Aborted)."""
        validation.namespace_name(namespace)
        spec = self._spec(namespace, request)
        try:
            target = check_location(spec.location, self._settings)
            if not is_url(target):
                self._check_local(spec, target, self._settings.sync_roots,
                                  "RETRIEVER_SYNC_ROOTS")
            elif target[:7].lower() == "file://":
                # git reads a file:// URL's repository in place: the same checks as a
                # local path, against the directory of the prefix that allowed it.
                real, root = file_url_place(target, self._settings.sync_url_prefixes)
                if root is not None:
                    self._check_local(spec, str(real), [root],
                                      "the directories of RETRIEVER_SYNC_URL_PREFIXES")
        except InvalidArgument as exc:
            if request.location:
                raise
            # The bound source, not the request, is what no longer works.
            raise FailedPrecondition(
                f"namespace {namespace!r} is bound to {redact(spec.location)!r}, which can "
                f"no longer be synced ({exc.message}): restore it there, or give repo to "
                "bind the namespace anew") from None
        self._check_unbound_documents(namespace)
        with self._lock:
            if self._closed:
                raise NotReady("the server is shutting down; retry against a running server")
            running = self._runs.get(namespace)
            if running is not None:
                age = time.monotonic() - running.t0
                raise Aborted(
                    f"namespace {namespace!r} is already syncing: sync {running.sync_id} "
                    f"started at {running.started_at.isoformat(timespec='seconds')} "
                    f"({age:.1f} s ago); retry once it has finished")
            run = _Run(namespace, spec, target)
            self._runs[namespace] = run
        try:
            self._catalog.add_sync(run.sync_id, namespace, run.started_at)
            run.thread = threading.Thread(target=self._execute, args=(run,),
                                          name=f"sync-{namespace}", daemon=True)
            run.thread.start()
        except BaseException:
            with self._lock:
                self._runs.pop(namespace, None)
            raise
        if not wait:
            return run.state()
        return self._wait(run, token)

    def fetch_error(self, location: str) -> str:
        """Why the last fetch of the URL ``location`` failed; "" when it succeeded."""
        with self._lock:
            return self._fetch_errors.get(location, "")

    # -- polling ---------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        lower_priority(self._settings.write_thread_nice)
        while not self._stop.wait(self._settings.sync_poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller outlives any one bad source
                log.exception("polling the sources")

    def poll_once(self) -> list[str]:
        """Start a sync of every bound namespace whose source moved past its last synced
        commit (a URL's mirror is fetched first); returns those namespaces. Namespaces
        already syncing are left alone."""
        started = []
        for ns in self._catalog.source_namespaces():
            if self._stop.is_set():
                break
            with self._lock:
                if ns in self._runs:
                    continue
            source = self._catalog.get_source(ns)
            if source is None:
                continue
            try:
                moved = self._moved(source)
                if self._poll_errors.pop(ns, None) is not None:
                    log.info("polling the source of %s: readable again", ns)
                if not moved:
                    continue
                self.sync(ns, SyncRequest(), wait=False)
                started.append(ns)
            except Aborted:
                continue  # a sync started meanwhile
            except Exception as exc:  # noqa: BLE001 - one source must not stop the round
                known = translate(exc)
                message = redact(known.message if known is not None else
                                 f"{type(exc).__name__}: {exc}")
                repeated = self._poll_errors.get(ns) == message
                self._poll_errors[ns] = message
                log.log(logging.DEBUG if repeated else logging.WARNING,
                        "polling the source of %s: %s%s", ns, message,
                        " (said again at DEBUG while it lasts)" if not repeated else "",
                        exc_info=known is None and not repeated)  # a bug: its traceback
        return started

    def _moved(self, source: SourceRecord) -> bool:
        spec = SourceSpec(location=source.location, ref=source.ref)
        target = check_location(source.location, self._settings)
        repo = open_source(dataclasses.replace(spec, location=target), self._mirrors)
        with repo:
            if is_url(target):
                self._fetch(repo, spec, target, NEVER)
            head = resolve(repo, source.ref)
        return head != source.last_commit or bool(source.pending_commit)

    def _fetch(self, repo: GitRepo, spec: SourceSpec, target: str, token: CallToken) -> None:
        """Fetch a URL's mirror (one fetch of a mirror at a time), remembering how it went."""
        with self._lock:
            lock = self._fetch_locks.setdefault(target, threading.Lock())
        token.acquire(lock, "the fetch")  # git cannot fetch one mirror twice
        try:
            fetch(repo, spec)
        except RetrieverError as exc:
            with self._lock:
                self._fetch_errors[spec.location] = redact(exc.message)
            raise
        finally:
            lock.release()
        with self._lock:
            self._fetch_errors.pop(spec.location, None)

    def recent(self, namespace: str, limit: int = SYNC_HISTORY) -> list[SyncState]:
        """The namespace's latest syncs, newest first: the running one (live counts), then
        those the catalog keeps."""
        with self._lock:
            running = self._runs.get(namespace)
        out = [running.state()] if running is not None else []
        for rec in self._catalog.list_syncs(namespace, limit):
            if len(out) >= limit:
                break
            if running is None or rec.sync_id != running.sync_id:
                out.append(_from_record(rec))
        return out

    # -- request checks --------------------------------------------------------------------
    def _check_unbound_documents(self, namespace: str) -> None:
        """A sync makes the namespace hold exactly the source's files: binding one that
        holds documents of its own (upserted, not from a source) would delete them all, on
        nothing more than a mistyped name. Refused; the caller picks a new namespace or
        deletes the old one on purpose."""
        if self._catalog.get_source(namespace) is not None:
            return  # bound: its documents are the source's (a rebind reconciles, as asked)
        ns = self._catalog.get_namespace(namespace)
        if ns is not None and ns.document_count > 0:
            raise FailedPrecondition(
                f"namespace {namespace!r} holds {ns.document_count} documents that did not "
                "come from a source, and a sync would delete every one that is not in the "
                "repository: sync into a new namespace, or delete this one first "
                "(DeleteNamespace) if that is what you want")


    def _spec(self, namespace: str, req: SyncRequest) -> SourceSpec:
        limit, limit_name = validation.document_limit(self._settings)
        if not req.location:
            if req.ref or req.include or req.exclude or req.max_file_bytes:
                raise InvalidArgument(
                    "ref, include, exclude and max_file_bytes need repo: give repo to bind "
                    "the namespace anew, or leave them all empty to sync its bound source",
                    field="repo")
            src = self._catalog.get_source(namespace)
            if src is None:
                raise NotFound(f"namespace {namespace!r} is bound to no source: give repo (a "
                               "local path or a URL) to bind it", field="repo")
            return SourceSpec(src.location, src.ref, src.include, src.exclude,
                              min(src.max_file_bytes, limit))
        _max_bytes(req.location, MAX_LOCATION_BYTES, "repo")
        _max_bytes(req.ref, MAX_REF_BYTES, "ref")
        for name, globs in (("include", req.include), ("exclude", req.exclude)):
            if len(globs) > MAX_GLOBS:
                raise InvalidArgument(f"{name} has {len(globs)} globs; at most {MAX_GLOBS}",
                                      field=name)
            for g in globs:
                _max_bytes(g, MAX_GLOB_BYTES, name)
        if not 0 <= req.max_file_bytes <= limit:
            raise InvalidArgument(
                f"max_file_bytes must be 1..{limit} (the server's {limit_name}), or 0 "
                f"for that limit; got {req.max_file_bytes}", field="max_file_bytes")
        try:
            return SourceSpec(req.location, req.ref or "HEAD", tuple(req.include),
                              tuple(req.exclude), req.max_file_bytes or limit)
        except InvalidArgument as exc:
            raise _as_repo_field(exc) from None

    def _check_local(self, spec: SourceSpec, target: str, roots: Sequence[Path],
                     setting: str) -> None:
        """A local location must be a repository's top directory, and everything git reads
        of it must lie inside ``roots`` too: its git directories (a `.git` file can point
        elsewhere), its object store and the stores it borrows from (alternates), and
        whatever a symbolic link inside those leads to."""
        try:
            repo = open_source(dataclasses.replace(spec, location=target), self._mirrors)
        except InvalidArgument as exc:
            raise _as_repo_field(exc) from None
        with repo:
            out = repo.run("rev-parse", "--path-format=absolute", "--git-dir",
                           "--git-common-dir", "--git-path", "objects")
        lines = [line.strip() for line in out.decode("utf-8", "surrogateescape").splitlines()
                 if line.strip()]
        outside = _git_data_outside([Path(line) for line in lines], roots)
        if outside is not None:
            raise PermissionDenied(
                f"repo {redact(spec.location)} keeps git data outside {setting} ({outside}): "
                "sync the repository that holds it", field="repo")

    # -- running ---------------------------------------------------------------------------
    def _wait(self, run: _Run, token: CallToken) -> SyncState:
        while not run.done.wait(_POLL_S):
            if token.done:
                deadline = token.expired
                run.stop("the deadline of the waiting call passed" if deadline
                         else "the waiting call was cancelled")
                run.done.wait(_STOP_WAIT_S)
                applied = run.state()
                raise Cancelled(
                    f"{'the deadline passed' if deadline else 'the call was cancelled'} before "
                    f"sync {run.sync_id} finished; it stopped: the "
                    f"{applied.documents_upserted} documents upserted and "
                    f"{applied.documents_deleted} deleted stay applied, and the next sync "
                    "finishes the job", deadline=deadline)
        if run.status is SyncStatus.FAILED:
            assert run.exc is not None
            raise run.exc
        return run.state()

    def _execute(self, run: _Run) -> None:
        lower_priority(self._settings.write_thread_nice)  # a sync is batch work, as upserts
        status, error, exc = SyncStatus.SUCCEEDED, "", None
        try:
            self._apply(run)
        except BaseException as e:  # recorded as the sync's error, raised to a waiting caller
            status, exc = SyncStatus.FAILED, e
            if isinstance(e, Cancelled) or (run.token.done and isinstance(e, NotReady)):
                error = (f"stopped: {run.stop_reason or 'cancelled'}; what was applied "
                         "stays applied, and the next sync finishes the job")
                exc = Cancelled(error, deadline=isinstance(e, Cancelled) and e.deadline)
                log.info("sync %s of %s %s", run.sync_id, run.namespace, error)
            elif (domain := translate(e)) is not None:
                error, exc = domain.message, domain
                log.warning("sync %s of %s failed: %s", run.sync_id, run.namespace, error)
            else:
                error = f"internal error ({type(e).__name__}); the server log has the details"
                log.exception("sync %s of %s failed", run.sync_id, run.namespace)
        with run.lock:
            run.status, run.error, run.exc = status, error, exc
            run.finished_at = datetime.now(UTC)
            run.seconds = time.monotonic() - run.t0
        state = run.state()
        try:
            self._catalog.finish_sync(SyncRecord(
                sync_id=run.sync_id, namespace=run.namespace, state=status.value,
                started_at=run.started_at, finished_at=state.finished_at, commit=state.commit,
                summary=state.summary(), error=error), keep=SYNC_HISTORY)
        except Exception:  # e.g. the catalog closed under a shutdown: start() marks it
            log.warning("could not record the end of sync %s of %s", run.sync_id,
                        run.namespace, exc_info=True)
        finally:
            try:  # before a waiting caller returns: it may read the lag next
                self._on_finish(state, run.commit_times if status is SyncStatus.SUCCEEDED
                                else [])
            except Exception:  # noqa: BLE001 - metrics and caches must not fail a sync
                log.exception("after sync %s of %s", run.sync_id, run.namespace)
            with self._lock:
                if self._runs.get(run.namespace) is run:
                    del self._runs[run.namespace]
            run.done.set()
        if status is SyncStatus.SUCCEEDED:
            log.info("sync %s of %s to %s: %s", run.sync_id, run.namespace, state.commit[:12],
                     state.summary())

    def _apply(self, run: _Run) -> None:
        spec, ns = run.spec, run.namespace
        repo = open_source(dataclasses.replace(spec, location=run.target), self._mirrors)
        with repo:
            if is_url(run.target):
                self._fetch(repo, spec, run.target, run.token)
            run.token.check("the sync's first batch")
            head = resolve(repo, spec.ref)
            source = self._catalog.get_source(ns)
            previous = source.last_commit if source is not None else ""
            # Writes that reach the namespace outside syncs from here on keep a full compare
            # pending after this sync (it may have passed where they landed).
            outside = source.outside_writes if source is not None else 0
            incremental = _can_diff(repo, source, spec, head)
            with run.lock:
                run.commit, run.previous_commit, run.full = head, previous, not incremental
            run.incarnation = self._ensure_namespace(ns)
            if source is None:  # documents upserted since the check in sync()
                self._check_unbound_documents(ns)
            # Bound before anything is applied, and marked pending: if this sync stops
            # midway, the next one knows what state the namespace may be in.
            self._catalog.put_source(SourceRecord(
                namespace=ns, location=spec.location, ref=spec.ref, include=spec.include,
                exclude=spec.exclude, max_file_bytes=spec.max_file_bytes,
                last_commit=previous, pending_commit=head, pending_full=not incremental,
                outside_writes=outside),
                incarnation=run.incarnation)
            if previous == head:
                times: list[datetime] = []
            elif previous and is_ancestor(repo, previous, head):
                times = commit_times(repo, previous, head)
            else:  # first sync or rewritten history: what it makes searchable is the head
                times = [commit_time(repo, head)]
            if incremental:
                self._apply_diff(run, repo, previous, head)
            else:
                self._reconcile(run, repo, head)
            self._catalog.source_synced(ns, head, outside)
            run.commit_times = times

    def _apply_diff(self, run: _Run, repo: GitRepo, previous: str, head: str) -> None:
        changes = diff(repo, previous, head, run.spec)
        skipped = dict(changes.skipped)
        renamed_new = {r.new_path for r in changes.renamed}
        paths = [*changes.added, *changes.modified, *sorted(renamed_new)]
        entries = [changes.entries[p] for p in paths if _usable(p, skipped)]
        # new path -> old path; an old path that is written again itself (renamed away and
        # a new file put in its place) is no move
        moves = {r.new_path: r.old_path for r in changes.renamed
                 if r.old_path not in paths and _usable(r.old_path, None)}
        unreadable = self._upsert_files(run, repo, head, entries, skipped, None, renamed_new,
                                        moves)
        written = {e.path for e in entries} - set(unreadable)
        # A rename whose new path was not written (skipped by rule, not text) is a delete.
        removals = [*changes.deleted, *unreadable,
                    *(r.old_path for r in changes.renamed if r.new_path not in written
                      and r.old_path not in paths)]
        self._delete_docs(run, [p for p in removals if _usable(p, None)], count=True)
        self._add_skipped(run, skipped)

    def _reconcile(self, run: _Run, repo: GitRepo, head: str) -> None:
        snap = snapshot(repo, head, run.spec)
        skipped = dict(snap.skipped)
        known: dict[str, _Known] = {}
        after = ""
        while True:
            page, _ = self._catalog.list_documents(run.namespace, after, _PAGE, "")
            known.update((d.doc_id, _Known(d.content_hash, d.revision, d.path, d.language,
                                           bool(d.metadata), d.source_updated_at))
                         for d in page)
            if len(page) < _PAGE:
                break
            after = page[-1].doc_id
        entries = [e for p, e in sorted(snap.entries.items()) if _usable(p, skipped)]
        # Documents no longer in the tree, by content: a new path with one's text is it, moved.
        gone = moved_candidates({d: k.content_hash for d, k in known.items()},
                                {e.path for e in entries})
        unreadable = set(self._upsert_files(run, repo, head, entries, skipped, known, set(),
                                            by_content=gone))
        present = {e.path for e in entries if e.path not in unreadable}
        # (those that moved are gone already: a delete finds nothing, counts nothing)
        self._delete_docs(run, [d for d in sorted(known) if d not in present], count=True)
        self._add_skipped(run, skipped)

    def _upsert_files(self, run: _Run, repo: GitRepo, head: str, entries: Sequence[Entry],
                      skipped: dict[str, str], known: dict[str, _Known] | None,
                      renamed_new: set[str], moves: dict[str, str] | None = None, *,
                      by_content: dict[str, list[str]] | None = None) -> list[str]:
        """Upsert the text files among ``entries`` in batches, each document at the commit
        that last changed it; with ``known`` (what the catalog holds per doc id) files whose
        document is already what a sync writes (`_as_synced`) are counted unchanged without
        a call. A file moves
        the document ``moves`` names for its path, or, for a path with no document, one of
        ``by_content``'s for its text's hash (taken from the list). Returns the paths that
        are no text (binary, not UTF-8): their reasons go into ``skipped``."""
        if not entries:
            return []
        revisions = last_changes(repo, head, [e.path for e in entries])
        fallback = Revision(head, commit_time(repo, head))
        unreadable: list[str] = []
        batch: list[Document] = []
        for e in entries:
            text = read_text(repo, e, skipped)
            if text is None:
                unreadable.append(e.path)
                continue
            rev = revisions.get(e.path, fallback)
            text_hash = sha256(text) if known is not None else ""
            if known is not None and _as_synced(known.get(e.path), e.path, text, text_hash,
                                                rev):
                with run.lock:
                    run.counts.documents_unchanged += 1
                continue
            moved_from = (moves or {}).get(e.path, "")
            if (by_content is not None and known is not None and e.path not in known
                    and (candidates := by_content.get(text_hash))):
                moved_from = candidates.pop(0)
            batch.append(Document(doc_id=e.path, content=text, path=e.path,
                                  revision=rev.commit, source_updated_at=rev.time,
                                  moved_from=moved_from))
            if len(batch) >= self._batch:
                self._upsert_batch(run, batch, renamed_new)
                batch = []
        if batch:
            self._upsert_batch(run, batch, renamed_new)
        return unreadable

    def _upsert_batch(self, run: _Run, docs: list[Document], renamed_new: set[str]) -> None:
        run.token.check("the sync's next batch")
        result = self._upsert(run.namespace, docs, run.token, run.incarnation)
        with run.lock:
            c = run.counts
            for r in result.results:
                c.chunks_embedded += r.chunks_embedded
                c.chunks_reused += r.chunks_reused
                if r.status is DocStatus.UNCHANGED:
                    c.documents_unchanged += 1
                    continue
                c.documents_upserted += 1
                if r.moved_from or r.doc_id in renamed_new:
                    c.files_renamed += 1
                elif r.status is DocStatus.CREATED:
                    c.files_added += 1
                else:
                    c.files_modified += 1

    def _delete_docs(self, run: _Run, doc_ids: Sequence[str], *, count: bool) -> None:
        """Delete these documents (those that exist), in calls of at most
        max_batch_documents ids; ``count``: as deleted files (not as renames' old paths)."""
        step = self._settings.max_batch_documents
        for i in range(0, len(doc_ids), step):
            run.token.check("the sync's next delete")
            result = self._delete(run.namespace, doc_ids[i:i + step], run.token,
                                  run.incarnation)
            with run.lock:
                run.counts.documents_deleted += result.documents_deleted
                if count:
                    run.counts.files_deleted += result.documents_deleted

    @staticmethod
    def _add_skipped(run: _Run, skipped: dict[str, str]) -> None:
        with run.lock:
            run.counts.skipped.update(skipped.values())


# -- helpers -------------------------------------------------------------------------------


def check_location(location: str, settings: Settings) -> str:
    """The location to open if this server may sync it: a URL as given when it starts with
    one of ``sync_url_prefixes``, a local path resolved (symlinks followed) when that lies
    inside one of ``sync_roots``. Else PermissionDenied saying which setting allows it."""
    roots, prefixes = settings.sync_roots, settings.sync_url_prefixes
    if not roots and not prefixes:
        raise PermissionDenied(
            "source sync is turned off on this server: set RETRIEVER_SYNC_ROOTS to the local "
            "directories repositories may be synced from, and/or RETRIEVER_SYNC_URL_PREFIXES "
            "to the URL prefixes that may be cloned, each a JSON list, e.g. "
            "RETRIEVER_SYNC_ROOTS='[\"/srv/repos\"]' or "
            "RETRIEVER_SYNC_URL_PREFIXES='[\"https://github.com/my-org/\"]'", field="repo")
    if is_url(location):
        shown = redact(location)
        if "://" in location:
            parts = urlsplit(location)
            if parts.password is not None or (parts.username is not None
                                              and parts.scheme in ("http", "https")):
                # It would be stored in the catalog and shown in every status.
                raise InvalidArgument(
                    f"repo {shown} carries credentials: give the URL without them and "
                    "configure them for git in the server's environment (a credential "
                    "helper, e.g. GIT_CONFIG_GLOBAL with credential.helper store, or an "
                    "SSH key); credentials are never stored in the catalog", field="repo")
        if not any(location.startswith(p) for p in prefixes):
            raise PermissionDenied(
                f"repo {shown} starts with none of RETRIEVER_SYNC_URL_PREFIXES "
                f"({_listing(prefixes)}): add a prefix there (a JSON list) to allow it",
                field="repo")
        url_path = urlsplit(location).path if "://" in location else location.split(":", 1)[1]
        if any(part in (".", "..") for part in _segments(url_path)):
            raise PermissionDenied(f"repo {shown} has '.' or '..' path segments (percent-"
                                   "encoded or not): give the URL without them", field="repo")
        if location[:7].lower() == "file://":
            _check_file_url(location, prefixes, shown)
        return location
    path = Path(location)
    if not path.is_absolute():
        raise InvalidArgument(f"repo {location!r} must be an absolute path or a URL",
                              field="repo")
    real = _resolved(path, repr(location))
    if _root_of(real, roots) is None:
        raise PermissionDenied(
            f"repo {location!r} is not inside RETRIEVER_SYNC_ROOTS ({_listing(roots)}; "
            "symbolic links resolved): sync repositories under those directories, or add a "
            "directory there (a JSON list)", field="repo")
    return str(real)


def _resolved(path: Path, shown: str) -> Path:
    """``path`` with symbolic links resolved; a loop or a name the system refuses (too
    long) is the caller's to fix: InvalidArgument."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise InvalidArgument(f"repo {shown} cannot be resolved ({_reason(exc)}): give the "
                              "path of a repository's directory", field="repo") from None


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _git_data_outside(dirs: Sequence[Path], roots: Sequence[Path]) -> str | None:
    """What of a repository's git data lies outside ``roots`` (None: nothing): ``dirs`` are
    its git directory, common directory and object directory. Also read: the object
    stores it borrows from (``objects/info/alternates``, recursively), and every symbolic
    link inside those directories (git follows them)."""
    def inside(p: Path) -> bool:
        try:
            real = p.resolve()
        except (OSError, RuntimeError):
            return False
        return _root_of(real, roots) is not None

    for d in dirs:
        if not inside(d):
            return f"{d.name} resolves elsewhere"
    stores, seen = [dirs[-1]], set()
    while stores:
        store = stores.pop()
        if not inside(store):  # (resolves it, a loop included)
            return "an alternate object store"
        key = store.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            listed = (key / "info" / "alternates").read_text("utf-8", "surrogateescape")
        except FileNotFoundError:
            listed = ""
        except OSError as exc:
            return f"objects/info/alternates unreadable: {_reason(exc)}"
        for line in listed.splitlines():
            line = line.strip().strip('"')
            if line and not line.startswith("#"):
                stores.append(key / line)  # relative to the object directory, or absolute
    walked: list[Path] = []
    for top in sorted({d.resolve() for d in dirs} | seen, key=lambda p: len(p.parts)):
        if any(top == w or w in top.parents for w in walked):
            continue  # inside a directory walked already
        walked.append(top)
        for here, subdirs, files in os.walk(top):  # links are listed, not followed
            for name in (*subdirs, *files):
                entry = Path(here) / name
                if entry.is_symlink() and not inside(entry):
                    return f"the symbolic link {str(entry.relative_to(top))!r} points there"
    return None


def _segments(url_path: str) -> list[str]:
    """The path segments of a URL as its server (or git, for file://) reads them: split
    before and after percent-decoding, which is repeated until nothing changes (so
    ``%2e%2e``, ``%252e%252e`` and an encoded ``/`` or ``\\`` cannot hide a ``..``)."""
    seen = [url_path]
    for _ in range(8):
        decoded = unquote(seen[-1])
        if decoded == seen[-1]:
            break
        seen.append(decoded)
    return [part for text in seen for part in re.split(r"[/\\]", text)]


def file_url_place(location: str, prefixes: Sequence[str]) -> tuple[Path, Path | None]:
    """The directory a file:// URL that `check_location` allowed names (symbolic links
    resolved), and the directory of the prefix that allowed it (None: a bare ``file://``
    prefix, which allows every local repository)."""
    return _check_file_url(location, prefixes, redact(location))


def _check_file_url(location: str, prefixes: Sequence[str], shown: str
                    ) -> tuple[Path, Path | None]:
    """A file:// URL names a local directory: it must resolve (symbolic links followed) to
    a place inside the directory of a file:// prefix it starts with, as a local path must lie
    inside RETRIEVER_SYNC_ROOTS. A bare ``file://`` prefix allows every local repository.
    Returns the place and that directory (None for a bare prefix)."""
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise PermissionDenied(f"repo {shown} names host {parts.netloc!r}: a file:// URL must "
                               "name a local path (file:///path)", field="repo")
    # git takes everything after the host as the path, '?' and '#' included: urlsplit
    # would cut a query or fragment off, and the '..' check (of the path it gives) would
    # not see one after it. Without them, that path is all git reads.
    if "?" in location or "#" in location:
        raise PermissionDenied(f"repo {shown}: a file:// URL may not hold '?' or '#' (git "
                               "reads them as part of the path); give the path without them",
                               field="repo")
    path = unquote(parts.path)
    if "\0" in path:
        raise InvalidArgument(f"repo {shown} holds a NUL character", field="repo")
    real = _resolved(Path(path or "/"), shown)
    for prefix in prefixes:
        if not location.startswith(prefix) or prefix[:7].lower() != "file://":
            continue
        base = urlsplit(prefix).path
        if not base or base == "/":
            return real, None
        root = _resolved(Path(unquote(base)), redact(prefix))
        if real == root or root in real.parents:
            return real, root
    raise PermissionDenied(
        f"repo {shown} resolves (symbolic links followed) to {str(real)!r}, outside the "
        f"directories of the file:// prefixes in RETRIEVER_SYNC_URL_PREFIXES "
        f"({_listing(prefixes)}): sync repositories under those directories, or add a prefix "
        "there (a JSON list)", field="repo")


def _root_of(real: Path, roots: Iterable[Path]) -> Path | None:
    for root in roots:
        r = Path(root).resolve()
        if real == r or r in real.parents:
            return r
    return None


def _listing(items: Sequence[object]) -> str:
    return ", ".join(str(i) for i in items) if items else "none set"


def _can_diff(repo: GitRepo, source: SourceRecord | None, spec: SourceSpec,
              head: str) -> bool:
    """Whether the namespace's documents equal the tree of its last synced commit under
    ``spec``'s rules, and ``head`` descends from that commit: then the diff is the work."""
    if source is None or not source.last_commit:
        return False
    if (source.include, source.exclude, source.max_file_bytes) != (
            spec.include, spec.exclude, spec.max_file_bytes):
        return False
    # An interrupted sync applied part of its work: only a sync to the same commit by the
    # same diff covers all of it.
    if source.pending_commit and (source.pending_commit != head or source.pending_full):
        return False
    try:
        return is_ancestor(repo, source.last_commit, head)
    except RetrieverError:  # a malformed stored sha, another hash kind: compare in full
        return False


class _Known(NamedTuple):
    """What the catalog holds of a document, for a full compare."""

    content_hash: str
    revision: str
    path: str
    language: str
    has_metadata: bool
    source_updated_at: datetime | None


def _as_synced(doc: _Known | None, path: str, text: str, text_hash: str, rev: Revision
               ) -> bool:
    """Whether ``doc`` is exactly what a sync writes for this file at ``rev``: the text, the
    revision, and the fields a caller's own upsert could have set otherwise (path, language,
    metadata, source time). Else the file is sent again, and the upsert puts them back."""
    if doc is None or (doc.content_hash, doc.revision, doc.path) != (text_hash, rev.commit,
                                                                      path):
        return False
    if doc.has_metadata or doc.source_updated_at is None:
        return False
    if abs((doc.source_updated_at - rev.time).total_seconds()) > 1e-3:
        return False
    return doc.language == detect_language(path, text)


def _usable(path: str, skipped: dict[str, str] | None) -> bool:
    """Whether ``path`` can be a doc id; a too-long one is recorded in ``skipped``."""
    size = len(path.encode("utf-8", "surrogatepass"))
    if size <= min(validation.MAX_DOC_ID_BYTES, validation.MAX_PATH_BYTES):
        return True
    if skipped is not None:
        skipped[path] = "path-too-long"
    return False


def _max_bytes(value: str, limit: int, name: str) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidArgument(f"{name} must be at most {limit} bytes", field=name)


def _as_repo_field(exc: InvalidArgument) -> InvalidArgument:
    """The git layer names the location "location"; the API calls it "repo"."""
    if exc.field == "location":
        return InvalidArgument(exc.message.replace("source ", "repo ", 1), field="repo")
    return exc


def _from_record(rec: SyncRecord) -> SyncState:
    s = rec.summary

    def num(key: str) -> int:
        value = s.get(key, 0)
        return int(value) if isinstance(value, int | float) else 0

    skipped = s.get("skipped")
    started = rec.started_at or datetime.fromtimestamp(0, UTC)
    seconds = s.get("seconds")
    return SyncState(
        sync_id=rec.sync_id, namespace=rec.namespace, status=SyncStatus(rec.state),
        started_at=started, finished_at=rec.finished_at,
        seconds=float(seconds) if isinstance(seconds, int | float) else 0.0,
        location=str(s.get("location", "")), ref=str(s.get("ref", "")), commit=rec.commit,
        previous_commit=str(s.get("previous_commit", "")),
        full_reconcile=bool(s.get("full_reconcile", False)),
        files_added=num("files_added"), files_modified=num("files_modified"),
        files_deleted=num("files_deleted"), files_renamed=num("files_renamed"),
        documents_unchanged=num("documents_unchanged"),
        documents_upserted=num("documents_upserted"),
        documents_deleted=num("documents_deleted"), chunks_embedded=num("chunks_embedded"),
        chunks_reused=num("chunks_reused"),
        skipped={str(k): int(v) for k, v in skipped.items()} if isinstance(skipped, dict)
        else {},
        error=rec.error)
