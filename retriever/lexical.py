"""A namespace's lexical search engine: tantivy, BM25 with block-max WAND.

SQLite FTS5 (the catalog's own lexical table) scores every chunk that matches any query
term: 3.6 -> 31 -> 444 ms per query from 10k to 100k to 1M chunks (bench/results/
lexical-scale.md). tantivy skips the blocks of postings that cannot reach the top k, so the
same queries stay within milliseconds at 1M. The catalog stays the source of truth: its
FTS5 table keeps every chunk's terms inside the commit's transaction, and this index is
derived from it (rebuilt from it when it is missing, damaged or disagrees).

How a search never sees half a document (the same order as the vectors): a write adds the
staged chunks here and commits **before** the catalog flips them visible, and removes the
superseded chunks **after**; a search keeps only the ids the catalog shows under the
namespace's visibility lock (staged and superseded ids are skipped, asking for more when
they crowd out the top). Vector ids are never reused (AUTOINCREMENT), so a left-over entry
can only ever be skipped.

Documents: the analyzer's terms (``whitespace`` tokenizer: the terms are already the
analyzer's), the vector id (a fast field) and the filter payload (doc id, path, language,
kind, metadata as ``key NUL value``), so filters run inside the engine with the semantics
of ``indexers.payload.Filter``: a path prefix is a regular expression over the raw path.

Writers are opened on the first write and closed after ``idle_close_s`` without one (each
holds six threads), so thousands of idle namespaces cost nothing.

Damage: tantivy reads its segment files without checking their checksums (a flipped byte in
a postings file silently changes scores), so each committed segment file's CRC-32 is kept in
``retriever-checksums.json`` beside them and checked when the index is opened. An index that
cannot be opened, fails that check, or failed a search (``failed``; marked on disk so the
next start sees it) is moved aside and rebuilt from the catalog; meanwhile searches read the
catalog's FTS5 table.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tantivy
from tantivy import Occur, Query

from indexers import Filter, Payload
from indexers._files import file_crc32
from retriever.errors import StorageFull, translate

log = logging.getLogger(__name__)

ENGINE = "tantivy"
_HEAP = 32_000_000  # writer arena; the floor tantivy accepts is 15 MB
_META = frozenset("\\.+*?()|[]{}^$#&-~")  # regex-syntax meta characters
_CHECKSUMS = "retriever-checksums.json"
# Listings of the committed files tried when merges keep replacing them meanwhile.
_CHECKSUM_ATTEMPTS = 5
_FAILED = "retriever-failed"  # marker: a search failed on this index; rebuild it at start
_SEGMENT_EXTS = (".idx", ".term", ".pos", ".store", ".fast", ".fieldnorm")
# UTF-8 bytes of a path prefix matched by the engine's regular expression (which refuses
# more than 1,000 automaton states: ~980 bytes); a longer prefix is checked on the hits.
PREFIX_REGEX_BYTES = 512


class QueryError(ValueError):
    """The engine refused to build a query from these terms and filter (not a fault of
    the index: searches go on)."""


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("terms", stored=False, tokenizer_name="whitespace", index_option="freq")
    sb.add_unsigned_field("vid", stored=True, indexed=True, fast=True)
    for name in ("doc", "path", "lang", "kind", "meta"):
        # The path is stored too: a prefix too long for one regular expression is matched
        # in part by the engine and checked whole on the hits.
        sb.add_text_field(name, stored=name == "path", tokenizer_name="raw",
                          index_option="basic")
    return sb.build()


SCHEMA = _schema()


def _regex_part(prefix: str) -> str:
    """The longest start of ``prefix`` within PREFIX_REGEX_BYTES bytes of UTF-8."""
    raw = prefix.encode("utf-8")
    if len(raw) <= PREFIX_REGEX_BYTES:
        return prefix
    return raw[:PREFIX_REGEX_BYTES].decode("utf-8", errors="ignore")


def prefix_regex(prefix: str) -> str:
    """A regular expression (tantivy's syntax) matching every string starting with
    ``prefix`` character for character."""
    return "(?s)" + "".join("\\" + c if c in _META else c for c in prefix) + ".*"


@dataclass(frozen=True, slots=True)
class Damaged:
    """An index directory that could not be opened, moved aside."""

    path: Path
    moved_to: Path
    reason: str


class LexicalIndex:
    """One namespace's tantivy index in ``path`` (created when missing)."""

    def __init__(self, path: Path, *, idle_close_s: float = 30.0) -> None:
        self.path = Path(path)
        self.damaged: Damaged | None = None
        self._idle_close_s = idle_close_s
        self._lock = threading.Lock()  # the writer: one at a time
        self._writer: tantivy.IndexWriter | None = None
        self._last_write = 0.0
        self._closer: threading.Timer | None = None
        self._closed = False
        self.failed = False  # a search failed: searches read the catalog's FTS5 table
        self._index = self._open()
        # The searcher of the last reload, shared by searches until the next commit reloads:
        # a new one per search cost 0.17 ms, most of a small search's engine time. Reloads
        # happen after each commit (_write), so a search still sees a write's
        # entries once add() returns; a merge publishes the same entries in fewer segments.
        self._searcher = self._index.searcher()

    def _open(self) -> tantivy.Index:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if (self.path / _FAILED).exists():
                raise ValueError("a search failed on it before")
            _verify_files(self.path)
            index = tantivy.Index(SCHEMA, path=str(self.path), reuse=True)
            index.reload()
            index.searcher().num_docs  # noqa: B018 - reads the segment list
            return index
        # Damaged files (a Rust panic among them: a BaseException), a file where the
        # directory should be, or a schema from another release.
        except BaseException as exc:
            if not is_engine_error(exc):
                raise
            moved = move_aside(self.path, "damaged")
            self.damaged = Damaged(self.path, moved, f"{type(exc).__name__}: {exc}")
            self.path.mkdir(parents=True)
            return tantivy.Index(SCHEMA, path=str(self.path), reuse=False)

    # -- checksums -------------------------------------------------------------------------
    def _record_checksums_locked(self) -> None:
        """Record the CRC of each committed segment file not recorded yet (segment files
        never change once written), forgetting those no longer committed.

        A merge ending on the writer's own threads publishes its segment and deletes the
        files it replaced whenever it ends, so a file listed here may be gone when it is
        read: the listing is then taken again (a file gone is no longer committed). The
        record only serves to find damage at the next start: failing to make it fails
        nothing (the write it follows is committed), it is logged."""
        path = self.path / _CHECKSUMS
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            recorded = {}
        tmp = path.with_suffix(".tmp")
        try:
            for _ in range(_CHECKSUM_ATTEMPTS):
                try:
                    files = _committed_files(self.path)
                    out = {n: recorded[n] if n in recorded else file_crc32(self.path / n)
                           for n in files}
                    break
                except FileNotFoundError:
                    continue  # deleted by a merge meanwhile: list again
            else:
                raise OSError(f"segment files kept changing ({_CHECKSUM_ATTEMPTS} listings)")
            if out == recorded:
                return
            tmp.write_text(json.dumps(out, sort_keys=True), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("lexical index %s: could not record its segment checksums (%s); "
                        "damage to the new segments would be found by a search, not at "
                        "start", self.path, exc)

    def mark_failed(self, reason: str) -> None:
        """A search failed on this index: searches read the catalog from now on, and the
        next start rebuilds it (the marker survives a crash)."""
        self.failed = True
        try:
            (self.path / _FAILED).write_text(reason + "\n", encoding="utf-8")
        except OSError:
            log.exception("could not mark the lexical index %s for rebuild", self.path)

    # -- writes ----------------------------------------------------------------------------
    def _writer_locked(self) -> tantivy.IndexWriter:
        if self._closed:
            raise RuntimeError(f"lexical index {self.path} is closed")
        if self._writer is None:
            self._writer = self._index.writer(heap_size=_HEAP, num_threads=1)
        self._last_write = time.monotonic()
        if self._closer is None and self._idle_close_s > 0:
            self._arm_closer(self._idle_close_s)
        return self._writer

    def _arm_closer(self, delay: float) -> None:
        self._closer = threading.Timer(delay, self._close_if_idle)
        self._closer.daemon = True
        self._closer.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            self._closer = None
            if self._writer is None:
                return
            idle = time.monotonic() - self._last_write
            if idle < self._idle_close_s:  # written meanwhile: look again later
                self._arm_closer(self._idle_close_s - idle)
                return
            self._release_writer_locked(wait_merges=True)

    def _release_writer_locked(self, *, wait_merges: bool) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and wait_merges:
            writer.wait_merging_threads()  # finishes the merges it started, then ends
            # A merge that ended after the last commit published a segment no record
            # covers: record it, or the next start could not verify it (and rebuilds).
            self._record_checksums_locked()
        # (Otherwise dropped here: that stops its threads and releases its lock file.)

    def add(self, ids: Sequence[int], terms: Sequence[str], payloads: Sequence[Payload]
            ) -> None:
        """Add these chunks and commit; searches see them when this returns."""
        if not ids:
            return

        def write(w: tantivy.IndexWriter) -> None:
            for vid, text, p in zip(ids, terms, payloads, strict=True):
                doc = tantivy.Document(terms=text, doc=p.doc_id, path=p.path,
                                       lang=p.language, kind=p.kind)
                doc.add_unsigned("vid", int(vid))
                for key, value in p.metadata:
                    doc.add_text("meta", f"{key}\x00{value}")
                w.add_document(doc)
        self._write(write)

    def delete(self, ids: Iterable[int]) -> None:
        """Remove these chunks (absent ones are ignored) and commit."""
        values = [int(v) for v in ids]
        if not values:
            return

        def write(w: tantivy.IndexWriter) -> None:
            for i in range(0, len(values), 8192):
                w.delete_documents_by_query(
                    Query.term_set_query(SCHEMA, "vid", values[i : i + 8192]))
        self._write(write)

    def clear(self) -> None:
        self._write(lambda w: w.delete_all_documents())

    def _write(self, fill: Callable[[tantivy.IndexWriter], object]) -> None:
        """``fill`` the writer, then commit. A failure at either step rolls back and drops
        the writer (a writer whose worker thread died, as on a full disk, fails every write
        after: the next write opens a new one); a failure for want of space is raised as
        OSError ENOSPC, which the service answers as a full disk (tantivy says so only in
        its message, if at all: "An index writer was killed ... io::Error")."""
        with self._lock:
            w = self._writer_locked()
            try:
                fill(w)
                w.commit()
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    w.rollback()
                # Ended now, not when the last reference goes (the traceback keeps one):
                # until then it holds the index's lock and the next writer fails LockBusy.
                with contextlib.suppress(BaseException):
                    w.wait_merging_threads()
                self._writer = None
                if is_engine_error(exc) and _disk_full(self.path, exc):
                    raise OSError(errno.ENOSPC, f"No space left on device (the lexical "
                                  f"index {self.path} could not be written: {exc})") from exc
                raise
            self._index.reload()
            self._searcher = self._index.searcher()
            self._record_checksums_locked()

    # -- reads -----------------------------------------------------------------------------
    def search(self, terms: Sequence[str], flt: Filter, limit: int
               ) -> list[tuple[int, float]]:
        """The ``limit`` best chunks by BM25 (k1 1.2, b 0.75) matching any of ``terms``
        and passing ``flt``: (vector_id, score), best first. Staged and superseded chunks
        are among them: the caller keeps those the catalog shows."""
        unique = list(dict.fromkeys(terms))
        if not unique or limit <= 0:
            return []
        try:
            query = Query.boolean_query(
                [(Occur.Should, Query.term_query(SCHEMA, "terms", t)) for t in unique])
            if not flt.empty:
                query = Query.boolean_query([(Occur.Must, query),
                                             (Occur.Must, Query.const_score_query(
                                                 _filter_query(flt), 0.0))])
        except ValueError as exc:
            raise QueryError(str(exc)) from exc
        searcher = self._searcher
        whole = flt.path_prefix if _regex_part(flt.path_prefix) != flt.path_prefix else ""
        k = limit
        while True:
            found = searcher.search(query, k, count=False).hits
            # The ids from the fast field, for all hits in one call: reading each stored
            # document (doc()) gives up the GIL once per hit and must win it back, a switch
            # interval each behind busy threads (100 hits: 43 ms against 2.6 ms with two
            # busy threads beside; 0.22 and 0.18 ms alone).
            vids = searcher.fast_field_values("vid", [addr for _, addr in found])
            out = []
            for (score, addr), vid in zip(found, vids, strict=True):
                if whole and not searcher.doc(addr)["path"][0].startswith(whole):
                    continue  # matched the regex's part of the prefix only
                if vid is None:  # no column in that segment (not written by this schema)
                    vid = searcher.doc(addr)["vid"][0]
                out.append((int(vid), float(score)))
            if not whole or len(out) >= limit or len(found) < k:
                return out[:limit]
            k *= 4

    def fingerprint(self) -> tuple[int, int]:
        """(entries, sum of their vector ids): compared with the catalog's at start."""
        searcher = self._index.searcher()
        n = int(searcher.num_docs)
        if n == 0:
            return 0, 0
        agg = searcher.aggregate(Query.all_query(), {"s": {"sum": {"field": "vid"}}})
        return n, int(agg["s"]["value"])

    def ids(self) -> list[int]:
        """Every vector id held, ascending (from the fast field: no stored document is
        read)."""
        searcher = self._index.searcher()
        n = int(searcher.num_docs)
        if n == 0:
            return []
        hits = searcher.search(Query.all_query(), n, order_by_field="vid").hits
        return sorted(int(value) for value, _ in hits)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self, *, wait_merges: bool = True) -> None:
        """No more writes; the writer ends (after its merges unless ``wait_merges`` is
        false)."""
        with self._lock:
            self._closed = True
            if self._closer is not None:
                self._closer.cancel()
                self._closer = None
            self._release_writer_locked(wait_merges=wait_merges)

    def drop(self) -> None:
        """Close without waiting for merges (their work is thrown away) and delete the
        index's files: called under the namespace registry's lock."""
        self.close(wait_merges=False)
        shutil.rmtree(self.path, ignore_errors=True)


def _filter_query(flt: Filter) -> tantivy.Query:
    parts: list[tuple[Occur, tantivy.Query]] = []
    if flt.doc_ids:
        parts.append((Occur.Must, Query.term_set_query(SCHEMA, "doc", list(flt.doc_ids))))
    if flt.path_prefix:
        parts.append((Occur.Must, Query.regex_query(
            SCHEMA, "path", prefix_regex(_regex_part(flt.path_prefix)))))
    if flt.languages:
        parts.append((Occur.Must, Query.term_set_query(SCHEMA, "lang", list(flt.languages))))
    if flt.kinds:
        parts.append((Occur.Must, Query.term_set_query(SCHEMA, "kind", list(flt.kinds))))
    for key, value in flt.metadata:
        parts.append((Occur.Must, Query.term_query(SCHEMA, "meta", f"{key}\x00{value}")))
    return Query.boolean_query(parts)


def _committed_files(path: Path, *, present: bool = True) -> list[str]:
    """The segment files the last commit of the index in ``path`` references (merges in
    progress write others: those are not final yet)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    names = []
    for seg in meta.get("segments", []):
        sid = str(seg["segment_id"]).replace("-", "")
        names += [sid + ext for ext in _SEGMENT_EXTS]
        deletes = seg.get("deletes")
        if deletes:
            names.append(f"{sid}.{deletes['opstamp']}.del")
    return [n for n in names if not present or (path / n).exists()]


def _verify_files(path: Path) -> None:
    """Raise ValueError when a committed segment file differs from its recorded CRC or has
    none (written after the last record: a merge that ended before a kill, or a
    record that could not be written; nothing can tell whether it is whole, so the index is
    rebuilt from the catalog, as when damaged)."""
    names = _committed_files(path, present=False)
    try:
        recorded = json.loads((path / _CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not names:
            return
        raise ValueError(f"its segment checksums ({_CHECKSUMS}) are missing") from None
    if not names and recorded and not (path / "meta.json").exists():
        raise ValueError("meta.json, its list of segments, is missing")
    if not isinstance(recorded, dict):
        raise ValueError(f"{_CHECKSUMS} is not a record of checksums")
    for name in names:
        if not (path / name).exists():
            if name in recorded:
                raise ValueError(f"{name}, a committed segment file, is missing")
            continue  # a kind of file this segment never had
        want = recorded.get(name)
        if want is None:
            raise ValueError(f"{name} has no recorded checksum")
        if file_crc32(path / name) != want:
            raise ValueError(f"{name} does not match its checksum")


# Free space under which a failed engine write is taken as one that ran out of it (the
# engine may have removed the partial files it wrote by the time this is looked at).
LOW_SPACE_BYTES = 16 << 20


def _disk_full(path: Path, exc: BaseException) -> bool:
    if isinstance(translate(exc), StorageFull):  # the engine named the OS error
        return True
    try:
        return shutil.disk_usage(path).free < LOW_SPACE_BYTES
    except OSError:
        return False


def move_aside(path: Path, what: str) -> Path:
    """Move ``path`` (a directory or a file in its place) aside as
    ``<name>.<what>-<time>[-n]``, a name not taken; returns where it went."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for n in itertools.count():
        moved = path.with_name(f"{path.name}.{what}-{stamp}" + (f"-{n}" if n else ""))
        if not moved.exists():
            path.rename(moved)
            return moved
    raise AssertionError("unreachable")


def verify(path: Path) -> list[str]:
    """What is wrong with the index in ``path``, found without changing it (`retriever
    check`); empty when nothing is."""
    problems = []
    failed = path / _FAILED
    if failed.exists():
        reason = failed.read_text(encoding="utf-8", errors="replace").strip()
        problems.append(f"a search failed on it ({reason}): rebuilt at the next start")
    try:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a directory")
        _verify_files(path)
        tantivy.Index.open(str(path)).searcher().num_docs  # noqa: B018 - reads the segments
    except BaseException as exc:  # a Rust panic is a BaseException
        if not is_engine_error(exc):
            raise
        problems.append(f"{type(exc).__name__}: {exc}")
    return problems


def is_engine_error(exc: BaseException) -> bool:
    """An error raised by the engine (a Rust panic reaches Python as a BaseException)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


