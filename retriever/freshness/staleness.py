"""How far indexed documents lag their source.

A namespace bound to a git source (SyncSource) lags it by the commits of its ref after the
commit it was last synced to. `SourceFreshness` keeps, per bound namespace, what those
commits are (`SourceLag`: how many, the commit time of the oldest, and per path the commit
time of the oldest one that touched it), read from the repository itself: a local source's
ref as it is now, a URL's mirror as of its last fetch. Searches read the cached lag and
never wait for git (an expired entry is refreshed in the background); GetIndexStatus reads
it afresh. A source that cannot be read keeps its last known lag, says why, and its
staleness keeps growing from the last successful read: never hidden.

A document of a namespace with no source: the newest version the service knows of is the
one it indexed, so staleness is zero when that version's source time is known and unset when
it is not (never a made-up number).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from retriever.catalog import Catalog, SourceRecord
from retriever.domain import ChunkRecord
from retriever.errors import NotFound, Unavailable, translate
from retriever.freshness.git import (
    GitRepo,
    Pending,
    SourceSpec,
    fetched_stamp,
    has_commit,
    is_url,
    mirror_path,
    open_source,
    pending,
    redact,
    resolve,
)

log = logging.getLogger(__name__)

SOURCE = "source"
DOCUMENT = "document"


def hit_staleness(chunk: ChunkRecord, now: datetime) -> float | None:
    """Seconds the chunk's document version lags its source, by the document rule (no
    source bound): 0 when its source time is known, None when not."""
    if chunk.source_updated_at is None:
        return None
    return 0.0


def chunk_staleness(chunk: ChunkRecord, lag: SourceLag | None,
                    now: datetime) -> tuple[float | None, str]:
    """(seconds, basis) of a chunk: by its namespace's source when one is bound, else by
    the document rule."""
    if lag is not None:
        return lag.path_staleness_s(chunk.path, now), SOURCE
    return hit_staleness(chunk, now), DOCUMENT


@dataclass(frozen=True)
class SourceLag:
    """A bound namespace against its source, as of ``checked_at``."""

    namespace: str
    location: str  # credentials removed
    ref: str
    indexed_commit: str  # "" before the first finished sync
    head_commit: str  # "" when never read
    commits_behind: int
    oldest_pending: datetime | None  # commit time of the oldest commit not indexed
    by_path: dict[str, datetime] = field(repr=False)
    checked_at: datetime | None  # the last successful read of the ref
    bound_at: datetime | None  # when the namespace was (re)bound or last synced
    error: str = ""  # why the last read failed; "" when it succeeded
    # First read that found the indexed commit off the ref's history (force-push, branch
    # moved back); None while it is on it. The index holds changes the source has not.
    diverged_since: datetime | None = None
    # The indexed commit is gone from the repository (history rewritten, then collected):
    # which paths differ is unknown, so every path counts as stale from diverged_since.
    indexed_lost: bool = False

    @property
    def never_synced(self) -> bool:
        return not self.indexed_commit

    def staleness_s(self, now: datetime) -> float:
        """Age of the oldest source change not yet indexed: the oldest pending commit's; for
        a source never synced to the end, since it was bound; while the source cannot be
        read and nothing was pending, since the last successful read. 0 when caught up."""
        since = self.oldest_pending
        if self.never_synced:
            since = self.bound_at or self.checked_at
        elif since is None and self.error:
            since = self.checked_at or self.bound_at
        return max(0.0, (now - since).total_seconds()) if since is not None else 0.0

    def path_staleness_s(self, path: str, now: datetime) -> float:
        """Age of the oldest pending commit that touched ``path``; 0 when none did (as of
        the last read). A source never synced to the end lags everywhere."""
        if self.never_synced or self.indexed_lost:
            return self.staleness_s(now)
        when = self.by_path.get(path)
        return max(0.0, (now - when).total_seconds()) if when is not None else 0.0


@dataclass
class _Entry:
    lag: SourceLag | None  # None: the namespace has no source (cached too: searches ask)
    computed: float  # time.monotonic()
    refreshing: bool = False


class SourceFreshness:
    """Lags of the bound namespaces (and that the others have none), cached ``refresh_s``
    seconds, so a search never queries the catalog or git for them."""

    def __init__(self, catalog: Catalog, mirrors: Path, refresh_s: float,
                 fetch_error: Callable[[str], str] | None = None,
                 allowed: Callable[[str], str] | None = None) -> None:
        """``fetch_error(url)``: why the last fetch of a URL source failed ("" if it did
        not): its mirror is then as old as its last good fetch, and the lag says so.
        ``allowed(location)``: the location to read if this server may still sync it (a
        local path resolved), else an error: a bound path swapped for a symbolic link out of
        the sync roots is not read, as a sync would not read it."""
        self._allowed = allowed or (lambda location: location)
        self._catalog = catalog
        self._fetch_error = fetch_error or (lambda location: "")
        self._mirrors = mirrors
        self._refresh_s = refresh_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._ns_locks: dict[str, threading.Lock] = {}

    def lag(self, namespace: str, *, fresh: bool = False) -> SourceLag | None:
        """The namespace's lag behind its source; None when it has none. ``fresh``: read the
        source now (GetIndexStatus). Otherwise a cached value (a search): an expired one is
        returned as is and refreshed in the background; only a namespace never read waits."""
        with self._lock:
            entry = self._entries.get(namespace)
            if entry is not None and not fresh:
                self._refresh_if_expired(namespace, entry)
                return entry.lag
        return self._refresh(namespace)

    def _refresh_if_expired(self, namespace: str, entry: _Entry) -> None:
        """Read an expired entry again in the background (the caller holds the lock)."""
        if time.monotonic() - entry.computed > self._refresh_s and not entry.refreshing:
            entry.refreshing = True
            threading.Thread(target=self._refresh, args=(namespace,),
                             name="staleness-refresh", daemon=True).start()

    def cached(self) -> list[SourceLag]:
        """Every namespace's last computed lag (for the metrics scrape); expired ones are
        read again in the background, so a namespace nobody searches still shows its source
        moving on by the next scrape."""
        with self._lock:
            for ns, e in self._entries.items():
                if e.lag is not None:
                    self._refresh_if_expired(ns, e)
            return [e.lag for e in self._entries.values() if e.lag is not None]

    def forget(self, namespace: str) -> None:
        """Drop what is cached (the namespace was synced, rebound or deleted)."""
        with self._lock:
            self._entries.pop(namespace, None)

    def warm(self, namespaces: Iterable[str]) -> None:
        for ns in namespaces:
            try:
                self._refresh(ns)
            except Exception:  # noqa: BLE001 - a start-up courtesy, never fatal
                log.exception("reading the source of namespace %r", ns)

    def _refresh(self, namespace: str) -> SourceLag | None:
        with self._lock:
            ns_lock = self._ns_locks.setdefault(namespace, threading.Lock())
        with ns_lock:  # one reader of a source at a time; the others wait for its answer
            try:
                source = self._catalog.get_source(namespace)
                with self._lock:
                    entry = self._entries.get(namespace)
                previous = entry.lag if entry is not None else None
                lag = self._compute(source, previous) if source is not None else None
            except BaseException:
                with self._lock:
                    entry = self._entries.get(namespace)
                    if entry is not None:
                        entry.refreshing = False
                raise
            with self._lock:
                self._entries[namespace] = _Entry(lag, time.monotonic())
        return lag

    def _compute(self, source: SourceRecord, previous: SourceLag | None) -> SourceLag:
        spec = SourceSpec(location=source.location, ref=source.ref)
        now = datetime.now(UTC)
        base = SourceLag(
            namespace=source.namespace, location=redact(source.location), ref=source.ref,
            indexed_commit=source.last_commit, head_commit="", commits_behind=0,
            oldest_pending=None, by_path={}, checked_at=None, bound_at=source.updated_at)
        try:
            target = self._allowed(source.location)
            if not is_url(source.location):
                spec = SourceSpec(location=target, ref=source.ref)
            repo, checked_at = self._open(spec, now)
            with repo:
                head = resolve(repo, source.ref)
                if not source.last_commit:
                    return _replace(base, head_commit=head, checked_at=checked_at)
                lost = False
                try:
                    p = pending(repo, source.last_commit, head)
                except NotFound:  # only then is the indexed commit worth looking for
                    if has_commit(repo, source.last_commit):
                        raise
                    lost, p = True, Pending(0, None, {}, True)
            error = self._fetch_error(source.location) if is_url(source.location) else ""
            oldest, by_path, since = p.oldest_time, p.by_path, None
            if p.diverged:
                # What the index holds that the ref no longer has went stale when the ref
                # moved; git does not record when, so: since this was first seen for the
                # indexed commit (kept in the catalog: later moves of the ref, a failed
                # sync and a restart do not reset it).
                since = self._diverged_since(source, previous, checked_at)
                if lost:
                    # Nothing can be compared with a commit git no longer has: every path
                    # is stale from when that was first seen, and what was known before
                    # the commit went (gc) does not get younger.
                    known = (previous if previous is not None
                             and previous.indexed_commit == source.last_commit else None)
                    # (Each path then counts as stale as the oldest: path_staleness_s.)
                    oldest, behind = since, 0
                    if known is not None:
                        if known.oldest_pending is not None:
                            oldest = min(oldest, known.oldest_pending)
                        behind = known.commits_behind
                    return _replace(base, head_commit=head, commits_behind=behind,
                                    oldest_pending=oldest, checked_at=checked_at,
                                    error=redact(error),
                                    diverged_since=since, indexed_lost=True)
                by_path = dict(by_path)
                for path in p.withdrawn:
                    by_path[path] = min(by_path.get(path, since), since)
                if by_path:  # a rewrite that changed no file leaves nothing stale
                    oldest = min(oldest, since) if oldest is not None else since
            if source.diverged_commit and not p.diverged:
                self._catalog.set_diverged(source.namespace, "", None)
            return _replace(base, head_commit=head, commits_behind=p.count,
                            oldest_pending=oldest, by_path=by_path,
                            checked_at=checked_at, error=redact(error), diverged_since=since)
        except Exception as exc:  # noqa: BLE001 - a source that cannot be read is reported
            known_error = translate(exc)
            message = redact(str(known_error) if known_error is not None
                             else f"{type(exc).__name__}: {exc}")
            log.warning("cannot read the source of namespace %r: %s", source.namespace, message,
                        exc_info=known_error is None)
            if previous is not None and previous.indexed_commit == source.last_commit:
                return _replace(previous, error=message, bound_at=source.updated_at)
            return _replace(base, error=message)

    def _diverged_since(self, source: SourceRecord, previous: SourceLag | None,
                        checked_at: datetime) -> datetime:
        if (previous is not None and previous.diverged_since is not None
                and previous.indexed_commit == source.last_commit):
            return previous.diverged_since
        if source.diverged_commit == source.last_commit and source.diverged_since is not None:
            return source.diverged_since
        self._catalog.set_diverged(source.namespace, source.last_commit, checked_at)
        return checked_at

    def _open(self, spec: SourceSpec, now: datetime) -> tuple[GitRepo, datetime]:
        """The repository to read, and when what it says was current: now for a local
        path; a URL's mirror as of its last fetch (never fetched here: that is a sync's)."""
        if not is_url(spec.location):
            return open_source(spec, self._mirrors), now
        mirror = mirror_path(self._mirrors, spec.location)
        if not (mirror / "HEAD").is_file():
            raise Unavailable(f"{redact(spec.location)} has not been fetched yet")
        fetched = fetched_stamp(mirror)
        stamp = fetched if fetched.is_file() else mirror / "HEAD"  # HEAD: as of the clone
        return GitRepo(mirror), datetime.fromtimestamp(stamp.stat().st_mtime, UTC)


def _replace(lag: SourceLag, **changes: object) -> SourceLag:
    return dataclasses.replace(lag, **changes)  # type: ignore[arg-type]
