"""The catalog: source of truth for namespaces, documents, chunks and their vectors.

SQLite in WAL mode with synchronous=FULL: a committed transaction survives a crash. Every
chunk row keeps its vector, so any vector index can be rebuilt or repaired from here.

Chunk rows are written in two steps so that a crash can never show half a document:
``stage_chunks`` inserts new rows as *pending* (invisible to readers); ``commit_documents``
then, in one transaction, removes the superseded rows, activates the pending ones and
writes the document rows. Start-up reconcile drops whatever is still pending.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from indexers.payload import Payload
from retriever.domain import (
    ChunkRecord,
    DocumentRecord,
    EvalMetric,
    EvaluationRecord,
    GoldenQuery,
    GoldenSet,
    NamespaceRecord,
    SearchFilter,
    SearchMode,
)
from retriever.errors import DataLoss, FailedPrecondition, NotFound, NotReady, translate
from retriever.storage import INDEX_DIR

log = logging.getLogger(__name__)

PENDING, ACTIVE = 0, 1
# Bumped with every schema change; a catalog written by a newer release is refused rather
# than misread, an older one is migrated in open().
SCHEMA_VERSION = 6  # 2: lexical index, catalog_meta; 3: chunk symbol/kind; 4: FTS per namespace;
# 5: sources' outside writes and divergence, evaluations' slo flag; 6: namespaces' embedder
# pipeline

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    embedder TEXT NOT NULL,
    embedder_revision TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    metric TEXT NOT NULL,
    index_generation INTEGER NOT NULL,
    index_version INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_indexed_at REAL,
    embedder_pipeline TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS documents (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    doc_id TEXT NOT NULL,
    path TEXT NOT NULL,
    revision TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    language TEXT NOT NULL,
    version INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    indexed_at REAL NOT NULL,
    source_updated_at REAL,
    metadata TEXT NOT NULL,
    chunker TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (namespace, doc_id)
);
CREATE TABLE IF NOT EXISTS chunks (
    vector_id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    start_line INTEGER NOT NULL,
    end_line INTEGER NOT NULL,
    start_byte INTEGER NOT NULL,
    end_byte INTEGER NOT NULL,
    token_count INTEGER NOT NULL,
    chunker TEXT NOT NULL,
    vector BLOB NOT NULL,
    symbol TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    fallback TEXT NOT NULL DEFAULT '',
    header TEXT NOT NULL DEFAULT '',
    UNIQUE (namespace, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (namespace, doc_id, state);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks (state);
-- What a search reads of each of its ~200 candidates (Catalog.chunk_heads), without
-- touching their wide rows (text, vector) or their documents' (content): small enough to
-- stay in the page cache at 1M chunks.
CREATE INDEX IF NOT EXISTS chunks_heads ON chunks (vector_id, namespace, state, doc_id);
CREATE INDEX IF NOT EXISTS documents_paths ON documents (namespace, doc_id, path);
CREATE TABLE IF NOT EXISTS catalog_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The git source a namespace is bound to (retriever/freshness/sync.py). include/exclude:
-- JSON lists of globs. last_commit: the commit the namespace's documents equal ('' before
-- the first finished sync). pending_commit / pending_full: the commit a sync began applying
-- and did not finish ('' when none), and whether that sync compared the whole tree: what
-- it applied stays applied, so the next sync must compare the whole tree unless it goes to
-- the same commit by the same diff. outside_writes: how many upserts and deletes reached the
-- namespace other than through a sync (each also marks a full compare pending: the next sync
-- puts the namespace back to the source's tree). diverged_commit / diverged_since: when the
-- ref was first seen not to contain the indexed commit (a force-push), for that commit.
CREATE TABLE IF NOT EXISTS sources (
    namespace TEXT PRIMARY KEY,
    location TEXT NOT NULL,
    ref TEXT NOT NULL,
    include TEXT NOT NULL DEFAULT '[]',
    exclude TEXT NOT NULL DEFAULT '[]',
    max_file_bytes INTEGER NOT NULL,
    last_commit TEXT NOT NULL DEFAULT '',
    pending_commit TEXT NOT NULL DEFAULT '',
    pending_full INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    outside_writes INTEGER NOT NULL DEFAULT 0,
    diverged_commit TEXT NOT NULL DEFAULT '',
    diverged_since REAL
);
-- The recent syncs of each namespace (the last few are kept): state 'running',
-- 'succeeded' or 'failed'; commit_sha the commit synced to ('' until resolved); summary the
-- counts as JSON.
CREATE TABLE IF NOT EXISTS syncs (
    sync_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    commit_sha TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS syncs_by_namespace ON syncs (namespace, started_at);
-- Golden query sets (retriever/slo/golden.py): every version of every named set is kept.
-- origin 'request' or 'git-history'; queries a JSON list of {id, text, doc_grades,
-- path_grades}; metadata JSON (for a history set: the corpus commit and the query commits).
CREATE TABLE IF NOT EXISTS golden_sets (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    origin TEXT NOT NULL,
    queries TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (namespace, name, version)
);
-- Runs of golden sets (the latest eval_history_size of each namespace are kept); metrics a
-- JSON list of [name, k, value].
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    golden_set TEXT NOT NULL,
    version INTEGER NOT NULL,
    started_at REAL NOT NULL,
    seconds REAL NOT NULL,
    mode TEXT NOT NULL,
    rerank INTEGER NOT NULL,
    query_count INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    metrics TEXT NOT NULL,
    slo INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS evaluations_by_namespace ON evaluations (namespace, started_at);
"""


@dataclass(frozen=True, slots=True)
class NewChunk:
    """A chunk to stage: everything but its row id."""

    chunk_id: str
    doc_id: str
    ordinal: int
    text: str
    content_hash: str
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int
    token_count: int
    chunker: str
    vector: np.ndarray
    terms: str = ""  # the analyzer's terms of path and text, space-separated
    symbol: str = ""
    kind: str = ""
    fallback: str = ""
    header: str = ""  # what was embedded in front of the text (path, symbol...): not returned


@dataclass(frozen=True, slots=True)
class ChunkPlacement:
    """Where a kept chunk sits in the new version of its document."""

    vector_id: int
    ordinal: int
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """One document version to commit, with the chunk rows it keeps and drops."""

    doc_id: str
    path: str
    revision: str
    content_hash: str
    language: str
    version: int
    content: str
    chunk_count: int
    source_updated_at: datetime | None
    metadata: dict[str, str]
    chunker: str
    keep: tuple[ChunkPlacement, ...]  # rows of the old version that stay (moved)
    activate: tuple[int, ...]  # staged rows to make visible
    drop: tuple[int, ...]  # rows of the old version to delete


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """What an upsert needs to know of an existing chunk row."""

    vector_id: int
    chunk_id: str
    doc_id: str


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """The git source a namespace is bound to, and how far its documents follow it."""

    namespace: str
    location: str
    ref: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    max_file_bytes: int
    last_commit: str = ""
    pending_commit: str = ""
    pending_full: bool = False
    updated_at: datetime | None = None
    outside_writes: int = 0
    diverged_commit: str = ""
    diverged_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One sync of a namespace as the catalog keeps it; ``summary`` holds its counts."""

    sync_id: str
    namespace: str
    state: str
    started_at: datetime | None
    finished_at: datetime | None
    commit: str
    summary: dict[str, object]
    error: str


@dataclass(frozen=True, slots=True)
class DocHead:
    """What an upsert compares against: the current version of a document."""

    content_hash: str
    path: str
    language: str
    version: int
    chunk_count: int
    chunker: str = ""  # the chunking signature it was cut with (Ingestor.chunking_signature)
    metadata: str = "{}"  # JSON, keys sorted (as stored)


_bad_time_logged = False


def _ts(value: float | None) -> datetime | None:
    """A stored epoch as a datetime; None when absent or not representable (a row written
    before input was range-checked, or edited by hand): one such value must not make every
    read of its document fail, so it reads as unknown, and is logged once per process."""
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (ValueError, OverflowError, OSError, TypeError):
        global _bad_time_logged
        if not _bad_time_logged:
            _bad_time_logged = True
            log.warning("the catalog holds a time that is out of range (%r); it reads as "
                        "unknown (further ones are not logged)", value)
        return None


@functools.cache
def sqlite_memory_used() -> Callable[[], int] | None:
    """``sqlite3_memory_used`` of the SQLite library the ``sqlite3`` module runs on: the
    heap it holds (page caches of every connection, schemas, statements), when that library
    is a shared object loaded in this process (Linux); None where it cannot be found, such
    as a Python with SQLite linked in statically. Looked up once per process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    # A mapping line ends with the mapped file's path ("/usr/lib/.../libsqlite3.so.0").
    libs = {ln[ln.index("/"):] for ln in maps.splitlines() if "/libsqlite3" in ln}
    if len(libs) != 1:
        return None
    try:
        fn = ctypes.CDLL(libs.pop()).sqlite3_memory_used
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int64, []
    return lambda: int(fn())


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class Catalog:
    def __init__(self, path: Path, mmap_bytes: int = 0, cache_bytes: int = 0) -> None:
        """``mmap_bytes``: how much of the file SQLite reads through a memory map (0: none;
        see Settings.catalog_mmap_bytes). ``cache_bytes``: SQLite's soft heap limit, set at
        `open` (process-wide; 0 leaves it as it is; see Settings.catalog_cache_bytes)."""
        self._path = Path(path)
        self._mmap_bytes = mmap_bytes
        self._cache_bytes = cache_bytes
        self._local = threading.local()
        self._write_lock = threading.Lock()
        # Every connection with the thread that opened it (thread-local; closed when that
        # thread is gone, at the next connection opened, so short-lived threads leak none).
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._closed = False

    # -- connections -----------------------------------------------------------------------
    def open(self, check: bool = True) -> None:
        """Open the catalog, creating or migrating it. ``check`` first runs SQLite's
        ``quick_check`` (every page and record well formed; what integrity_check does less
        the index-content cross-check). It reads the whole file: on a catalog of 100k
        chunks (519 MB) it took 0.4 s with the file in the page cache and 7-8 s from a cold
        disk (~70 MB/s) here. A damaged catalog raises DataLoss naming the file."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if self._path.is_dir():
            raise FailedPrecondition(
                f"the catalog {self._path} is a directory, not a database file: move it away "
                "and put the catalog back (or, to start empty, move indexes/ and lexical/ out "
                f"of {self._path.parent} too)")
        try:
            with self._write_lock:
                db = self._conn()
                if self._cache_bytes:
                    db.execute(f"PRAGMA soft_heap_limit={int(self._cache_bytes)}").fetchall()
                if check:
                    found_problems = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
                    if found_problems != ["ok"]:
                        raise self.damaged("; ".join(found_problems))
                found = db.execute("PRAGMA user_version").fetchone()[0]
                if found > SCHEMA_VERSION:
                    raise FailedPrecondition(
                        f"catalog {self._path} has schema version {found}, newer than this "
                        f"release's {SCHEMA_VERSION}: run the release that wrote it")
                db.executescript(_SCHEMA)
                _add_missing_columns(db)
                # Release 2-3 kept every namespace's terms in one FTS table, whose BM25
                # statistics mixed namespaces: its rows go, and the start-up reconcile
                # re-analyzes each namespace into its own table.
                db.execute("DROP TRIGGER IF EXISTS chunk_terms_follow_chunks")
                db.execute("DROP TABLE IF EXISTS chunk_terms")
                for (name,) in db.execute("SELECT name FROM namespaces").fetchall():
                    _create_terms(db, name)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            domain = translate(exc)
            if isinstance(domain, DataLoss):
                raise self.damaged(str(exc)) from None
            if domain is not None:
                raise type(domain)(f"catalog {self._path}: {domain.message}") from None
            raise

    def damaged(self, detail: str) -> DataLoss:
        """The error of a damaged catalog: one line naming the file and what to do."""
        data_dir = self._path.parent
        return DataLoss(
            f"the catalog {self._path} is damaged ({detail[:300]}); it is the source of "
            "truth and cannot be rebuilt from the indexes. With the server stopped, run "
            f"`retriever check --data-dir {data_dir}` to see what can be recovered, then "
            f"`retriever repair --data-dir {data_dir}`")

    def release_space(self) -> bool:
        """Give the file system back the pages deletes freed, and shrink the WAL to nothing;
        False when skipped for want of room.

        A checkpoint first copies the WAL's pages into the database file, which may grow by
        up to the WAL's size before the WAL is truncated: on a disk with less room than that
        it would take the space deletes need, so it is skipped. Catalogs created since
        incremental auto-vacuum was turned on then give back free pages in small steps, with
        a RESTART checkpoint between them so the WAL reuses its own space. Older catalogs
        only truncate the WAL (their free pages are reused by later writes)."""
        wal = self._path.with_name(self._path.name + "-wal")
        with self._write_lock:
            wal_bytes = wal.stat().st_size if wal.exists() else 0
            if wal_bytes >= shutil.disk_usage(self._path.parent).free:
                return False
            db = self._conn()
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
                for _ in range(100_000):
                    if db.execute("PRAGMA freelist_count").fetchone()[0] == 0:
                        break
                    # executescript steps the pragma to the end (execute frees one page).
                    db.executescript("PRAGMA incremental_vacuum(32);")
                    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return True

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise NotReady("the catalog is closed: the server is shutting down; retry "
                           "against a running server")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                   timeout=60)
            conn.row_factory = sqlite3.Row
            try:
                # Takes effect only on a new, empty catalog (before WAL mode is set): freed
                # pages can then be given back to a full disk (release_space).
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                # Some builds (Debian's) default to secure_delete=ON, which zeroes every freed
                # page through the WAL: a delete then needs as much free disk as it frees,
                # and fails on a full disk. FAST zeroes only what costs no extra I/O.
                conn.execute("PRAGMA secure_delete=FAST")
                if self._mmap_bytes:
                    conn.execute(f"PRAGMA mmap_size={int(self._mmap_bytes)}")
            except BaseException:
                conn.close()  # e.g. "file is not a database": no half-set-up connection
                raise
            self._local.conn = conn
            with self._conns_lock:
                live = []
                for thread, other in self._conns:
                    if thread.is_alive():
                        live.append((thread, other))
                    else:
                        with suppress(sqlite3.Error):
                            other.close()
                live.append((threading.current_thread(), conn))
                self._conns = live
        return conn

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        """One write transaction at a time, committed on success, rolled back on error."""
        with self._write_lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (disk full, I/O). SQLite may have rolled
                # back already on SQLITE_FULL. A failing ROLLBACK must not hide the error,
                # nor leave this thread a connection stuck in a transaction: closing it
                # rolls back, and the next call opens a fresh one.
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        self._local.conn = None
                        with self._conns_lock:
                            self._conns = [(t, c) for t, c in self._conns if c is not db]
                        with suppress(sqlite3.Error):
                            db.close()
                raise

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads."""
        db = self._conn()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            for _, conn in self._conns:
                with suppress(sqlite3.ProgrammingError):
                    conn.close()
            self._conns.clear()

    # -- namespaces ------------------------------------------------------------------------
    def create_namespace(self, ns: NamespaceRecord) -> bool:
        """Insert ``ns``; False if the name is taken."""
        with self._writer() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO namespaces (name, backend, embedder, embedder_revision,"
                " dimension, metric, index_generation, index_version, created_at,"
                " embedder_pipeline) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (ns.name, ns.backend, ns.embedder, ns.embedder_revision, ns.dimension,
                 ns.metric, ns.index_generation, ns.index_version, _epoch(ns.created_at),
                 ns.embedder_pipeline),
            )
            if cur.rowcount != 1:
                return False
            _create_terms(db, ns.name)
            return True

    def set_index(self, name: str, backend: str, generation: int) -> None:
        """Point the namespace at another index generation (and backend): the atomic swap
        of a re-index."""
        with self._writer() as db:
            if db.execute("UPDATE namespaces SET backend = ?, index_generation = ? WHERE"
                          " name = ?", (backend, generation, name)).rowcount != 1:
                raise NotFound(f"namespace {name!r} does not exist", field="name")

    def get_namespace(self, name: str, *, with_counts: bool = True) -> NamespaceRecord | None:
        with self._reader() as db:
            row = db.execute("SELECT * FROM namespaces WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            counts = self._counts(db, name) if with_counts else (0, 0, 0)
        return _namespace(row, counts)

    def list_namespaces(self, after: str, limit: int) -> list[NamespaceRecord]:
        with self._reader() as db:
            rows = db.execute(
                "SELECT * FROM namespaces WHERE name > ? ORDER BY name LIMIT ?", (after, limit)
            ).fetchall()
            return [_namespace(r, self._counts(db, r["name"])) for r in rows]

    def _counts(self, db: sqlite3.Connection, name: str) -> tuple[int, int, int]:
        docs, nbytes, chunks = db.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0), coalesce(sum(chunk_count), 0)"
            " FROM documents WHERE namespace = ?", (name,),
        ).fetchone()
        return int(docs), int(chunks), int(nbytes)

    def delete_namespace(self, name: str, drop: tuple[str, str] | None = None
                         ) -> tuple[int, int]:
        """Remove the namespace and everything in it; returns (documents, chunks) removed.
        ``drop``: (backend, collection) its index engine must drop, recorded in the same
        transaction (see `pending_drops`): a crash before the engine's drop leaves a record
        of a collection that is certainly this catalog's."""
        with self._writer() as db:
            if drop is not None:
                db.execute("INSERT OR REPLACE INTO catalog_meta (key, value) VALUES (?, '1')",
                           (f"{_DROP}{drop[0]}:{drop[1]}",))
            row = db.execute("SELECT index_generation FROM namespaces WHERE name = ?",
                             (name,)).fetchone()
            if row is not None:
                # A namespace created again under this name starts past every generation
                # this one used or a re-index of it still running may build (one at a time:
                # the next), so the two never share a collection (see `first_generation`).
                db.execute(
                    "INSERT INTO catalog_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO"
                    " UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS"
                    " INTEGER))", (f"{_GENERATION}{name}", str(int(row[0]) + 1)))
            terms = _terms_table(name)
            db.execute(f"DROP TRIGGER IF EXISTS {terms}_follow")
            db.execute(f"DROP TABLE IF EXISTS {terms}_vocab")
            db.execute(f"DROP TABLE IF EXISTS {terms}")
            chunks = db.execute("DELETE FROM chunks WHERE namespace = ?", (name,)).rowcount
            docs = db.execute("DELETE FROM documents WHERE namespace = ?", (name,)).rowcount
            db.execute("DELETE FROM namespaces WHERE name = ?", (name,))
            db.execute("DELETE FROM sources WHERE namespace = ?", (name,))
            db.execute("DELETE FROM syncs WHERE namespace = ?", (name,))
            db.execute("DELETE FROM golden_sets WHERE namespace = ?", (name,))
            db.execute("DELETE FROM evaluations WHERE namespace = ?", (name,))
            return docs, chunks

    def first_generation(self, name: str) -> int:
        """The index generation a namespace created under ``name`` now starts at: past
        every one a deleted namespace of that name used, so that its collections never
        share a name with what an operation of the old namespace still running writes or
        drops."""
        with self._reader() as db:
            row = db.execute("SELECT value FROM catalog_meta WHERE key = ?",
                             (f"{_GENERATION}{name}",)).fetchone()
        return int(row[0]) + 1 if row is not None else 1

    def pending_drops(self) -> dict[str, set[str]]:
        """backend -> collections deleted namespaces left to drop (a crash, or an engine
        that was down, between the delete's commit and the engine's drop)."""
        with self._reader() as db:
            rows = db.execute("SELECT key FROM catalog_meta WHERE key GLOB ?",
                              (_DROP + "*",)).fetchall()
        out: dict[str, set[str]] = {}
        for (key,) in rows:
            backend, _, collection = key[len(_DROP):].partition(":")
            out.setdefault(backend, set()).add(collection)
        return out

    def dropped(self, backend: str, collection: str) -> None:
        """The engine dropped it: forget the record."""
        with self._writer() as db:
            db.execute("DELETE FROM catalog_meta WHERE key = ?",
                       (f"{_DROP}{backend}:{collection}",))

    # -- documents -------------------------------------------------------------------------
    def document_heads(self, namespace: str, doc_ids: Sequence[str]) -> dict[str, DocHead]:
        """The current version's head of those documents that exist."""
        with self._reader() as db:
            rows = _in(db, "SELECT doc_id, content_hash, path, language, version, chunk_count,"
                       " chunker, metadata FROM documents WHERE namespace = ?"
                       " AND doc_id IN ({marks})", doc_ids, namespace)
        return {r["doc_id"]: DocHead(r["content_hash"], r["path"], r["language"], r["version"],
                                     r["chunk_count"], r["chunker"], r["metadata"])
                for r in rows}

    def active_chunks(self, namespace: str, doc_ids: Sequence[str]) -> dict[str, StoredChunk]:
        """chunk_id -> row of the current versions of these documents."""
        with self._reader() as db:
            rows = _in(db, "SELECT vector_id, chunk_id, doc_id FROM chunks WHERE namespace = ?"
                       " AND state = 1 AND doc_id IN ({marks})", doc_ids, namespace)
        return {r["chunk_id"]: StoredChunk(r["vector_id"], r["chunk_id"], r["doc_id"])
                for r in rows}

    def embedded_vectors(self, namespace: str, doc_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Embedded text (header and chunk text) -> vector, over the current versions of
        these documents: what a move can reuse instead of embedding again."""
        with self._reader() as db:
            rows = _in(db, "SELECT header, text, vector FROM chunks WHERE namespace = ?"
                       " AND state = 1 AND doc_id IN ({marks})", doc_ids, namespace)
        return {r["header"] + r["text"]: np.frombuffer(r["vector"], dtype=np.float32)
                for r in rows}

    def stage_chunks(self, namespace: str, chunks: Sequence[NewChunk]) -> list[int]:
        """Insert chunk rows as pending; returns their vector ids in order."""
        ids: list[int] = []
        with self._writer() as db:
            for c in chunks:
                cur = db.execute(
                    "INSERT INTO chunks (namespace, chunk_id, doc_id, state, ordinal, text,"
                    " content_hash, start_line, end_line, start_byte, end_byte, token_count,"
                    " chunker, vector, symbol, kind, fallback, header)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (namespace, c.chunk_id, c.doc_id, PENDING, c.ordinal, c.text,
                     c.content_hash, c.start_line, c.end_line, c.start_byte, c.end_byte,
                     c.token_count, c.chunker,
                     np.ascontiguousarray(c.vector, dtype=np.float32).tobytes(),
                     c.symbol, c.kind, c.fallback, c.header),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
                db.execute(f"INSERT INTO {_terms_table(namespace)} (rowid, terms) VALUES (?,?)",
                           (cur.lastrowid, c.terms))
        return ids

    def stage_copies(self, namespace: str, vector_ids: Sequence[int]
                     ) -> tuple[list[int], np.ndarray, list[str]]:
        """Stage a pending copy of each of these active rows (text, vector, terms) under a
        new vector id; returns (new ids in order, their vectors, their chunk kinds). A
        chunk whose payload changes (its document's metadata) moves to a new vector id so
        that an engine's payload never changes under an id: the start-up reconcile, which
        compares id sets, then repairs payloads as it repairs vectors.
        ``commit_documents(rekeys=...)`` gives a copy its chunk id and makes it visible;
        uncommitted, it is discarded like any staged row."""
        table = _terms_table(namespace)
        new_ids: list[int] = []
        blobs: list[bytes] = []
        kinds: list[str] = []
        with self._writer() as db:
            for old in vector_ids:
                row = db.execute(
                    "INSERT INTO chunks (namespace, chunk_id, doc_id, state, ordinal, text,"
                    " content_hash, start_line, end_line, start_byte, end_byte, token_count,"
                    " chunker, vector, symbol, kind, fallback, header)"
                    " SELECT namespace, 'copy:' || vector_id || ':' || hex(randomblob(8)),"
                    " doc_id, 0, ordinal, text, content_hash, start_line, end_line,"
                    " start_byte, end_byte, token_count, chunker, vector, symbol, kind,"
                    " fallback, header FROM chunks WHERE namespace = ? AND vector_id = ?"
                    " AND state = 1 RETURNING vector_id, vector, kind", (namespace, int(old)),
                ).fetchone()
                if row is None:
                    raise NotFound(f"chunk row {old} of namespace {namespace!r} is gone")
                new_ids.append(int(row[0]))
                blobs.append(row[1])
                kinds.append(row[2])
                db.execute(f"INSERT INTO {table} (rowid, terms) SELECT ?, terms FROM {table}"
                           " WHERE rowid = ?", (row[0], int(old)))
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32)
        return new_ids, vecs.reshape(len(new_ids), -1) if new_ids else vecs.reshape(0, 0), kinds

    def commit_documents(
        self, namespace: str, writes: Sequence[DocumentWrite], refreshes: Sequence[DocumentRefresh],
        rekeys: Sequence[tuple[int, int]] = (), removes: Sequence[str] = (),
    ) -> int:
        """Make new document versions visible at once; returns the namespace's new
        index_version. ``refreshes`` update revision/time/metadata of unchanged documents;
        ``rekeys`` (old vector id, staged copy from ``stage_copies``) replace each old row
        by its copy, which takes its chunk id (``writes`` refer to the copies);
        ``removes``: documents that moved to one of ``writes`` or ``refreshes``, deleted
        with their chunks in the same transaction."""
        now = time.time()
        with self._writer() as db:
            if removes:
                _in(db, "DELETE FROM documents WHERE namespace = ? AND doc_id IN ({marks})",
                    removes, namespace)
                _in(db, "DELETE FROM chunks WHERE namespace = ? AND doc_id IN ({marks})",
                    removes, namespace)
            for old, new in rekeys:
                cid = db.execute("DELETE FROM chunks WHERE vector_id = ? AND state = 1"
                                 " RETURNING chunk_id", (int(old),)).fetchone()
                if cid is None:
                    raise NotFound(f"chunk row {old} of namespace {namespace!r} is gone")
                db.execute("UPDATE chunks SET chunk_id = ?, state = 1 WHERE vector_id = ?"
                           " AND state = 0", (cid[0], int(new)))
            for w in writes:
                _in(db, "DELETE FROM chunks WHERE vector_id IN ({marks})", w.drop)
                for k in w.keep:
                    db.execute(
                        "UPDATE chunks SET ordinal=?, start_line=?, end_line=?, start_byte=?,"
                        " end_byte=? WHERE vector_id=?",
                        (k.ordinal, k.start_line, k.end_line, k.start_byte, k.end_byte,
                         k.vector_id),
                    )
                _in(db, "UPDATE chunks SET state = 1 WHERE vector_id IN ({marks})", w.activate)
                db.execute(
                    "INSERT INTO documents (namespace, doc_id, path, revision, content_hash,"
                    " language, version, size_bytes, chunk_count, indexed_at, source_updated_at,"
                    " metadata, chunker, content) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (namespace, doc_id) DO UPDATE SET path=excluded.path,"
                    " revision=excluded.revision, content_hash=excluded.content_hash,"
                    " language=excluded.language, version=excluded.version,"
                    " size_bytes=excluded.size_bytes, chunk_count=excluded.chunk_count,"
                    " indexed_at=excluded.indexed_at,"
                    " source_updated_at=excluded.source_updated_at,"
                    " metadata=excluded.metadata, chunker=excluded.chunker,"
                    " content=excluded.content",
                    (namespace, w.doc_id, w.path, w.revision, w.content_hash, w.language,
                     w.version, len(w.content.encode("utf-8")), w.chunk_count, now,
                     _epoch(w.source_updated_at), json.dumps(w.metadata, sort_keys=True),
                     w.chunker, w.content),
                )
            for r in refreshes:
                db.execute(
                    "UPDATE documents SET revision=?, source_updated_at=?, metadata=?"
                    " WHERE namespace=? AND doc_id=?",
                    (r.revision, _epoch(r.source_updated_at),
                     json.dumps(r.metadata, sort_keys=True), namespace, r.doc_id),
                )
            return self._bump(db, namespace, now)

    def delete_documents(
        self, namespace: str, doc_ids: Sequence[str]
    ) -> tuple[list[str], list[int], int]:
        """Remove documents with their chunks in one transaction. Returns (deleted doc ids,
        vector ids of their chunks, new index_version)."""
        with self._writer() as db:
            deleted = [r[0] for r in _in(
                db, "DELETE FROM documents WHERE namespace = ? AND doc_id IN ({marks})"
                " RETURNING doc_id", doc_ids, namespace)]
            vector_ids = [r[0] for r in _in(
                db, "DELETE FROM chunks WHERE namespace = ? AND doc_id IN ({marks})"
                " RETURNING vector_id", doc_ids, namespace)]
            if deleted:
                return deleted, vector_ids, self._bump(db, namespace, time.time())
            return deleted, vector_ids, self._version(db, namespace)

    def _bump(self, db: sqlite3.Connection, namespace: str, now: float) -> int:
        db.execute(
            "UPDATE namespaces SET index_version = index_version + 1, last_indexed_at = ?"
            " WHERE name = ?", (now, namespace),
        )
        return self._version(db, namespace)

    @staticmethod
    def _version(db: sqlite3.Connection, namespace: str) -> int:
        row = db.execute("SELECT index_version FROM namespaces WHERE name = ?",
                         (namespace,)).fetchone()
        return int(row[0]) if row else 0

    def get_document(self, namespace: str, doc_id: str) -> DocumentRecord | None:
        with self._reader() as db:
            row = db.execute("SELECT * FROM documents WHERE namespace=? AND doc_id=?",
                             (namespace, doc_id)).fetchone()
            if row is None:
                return None
            chunk_ids = tuple(r[0] for r in db.execute(
                "SELECT chunk_id FROM chunks WHERE namespace=? AND doc_id=? AND state=1"
                " ORDER BY ordinal", (namespace, doc_id)))
        return _document(row, with_content=True, chunk_ids=chunk_ids)

    def list_documents(
        self, namespace: str, after: str, limit: int, path_prefix: str
    ) -> tuple[list[DocumentRecord], int]:
        where = "namespace = ?"
        args: list[object] = [namespace]
        if path_prefix:
            where += " AND substr(path, 1, ?) = ?"
            args += [len(path_prefix), path_prefix]
        cols = ("doc_id, path, revision, content_hash, language, version, size_bytes,"
                " chunk_count, indexed_at, source_updated_at, metadata, namespace")
        with self._reader() as db:
            rows = db.execute(
                f"SELECT {cols} FROM documents WHERE {where} AND doc_id > ?"
                " ORDER BY doc_id LIMIT ?", (*args, after, limit),
            ).fetchall()
            total = db.execute(f"SELECT count(*) FROM documents WHERE {where}",
                               args).fetchone()[0]
        return [_document(r, with_content=False) for r in rows], int(total)

    # -- chunks ----------------------------------------------------------------------------
    def get_chunk(self, namespace: str, chunk_id: str) -> ChunkRecord | None:
        with self._reader() as db:
            row = db.execute(
                f"SELECT {_CHUNK_COLS} FROM chunks c JOIN documents d"
                " ON d.namespace = c.namespace AND d.doc_id = c.doc_id"
                " WHERE c.namespace = ? AND c.chunk_id = ? AND c.state = 1",
                (namespace, chunk_id),
            ).fetchone()
        return None if row is None else _chunk(row)

    def chunks_by_vector_ids(
        self, namespace: str, vector_ids: Sequence[int]
    ) -> tuple[dict[int, ChunkRecord], int]:
        """Visible chunks among these ids (pending and superseded ones are left out), and
        the namespace's index_version they belong to, read in one snapshot."""
        # One statement, one row (see _json_rows): the chunks and the version in one
        # snapshot without BEGIN/COMMIT round trips.
        version, got = self._conn().execute(
            "SELECT (SELECT index_version FROM namespaces WHERE name = ?),"
            # CROSS JOIN: the chunks by id first, then their documents (left to itself the
            # planner walks the namespace's documents: the id list's size is unknown to it).
            f" (SELECT json_group_array({_CHUNK_JSON}) FROM chunks c"
            " CROSS JOIN documents d ON d.namespace = c.namespace AND d.doc_id = c.doc_id"
            " WHERE c.namespace = ? AND c.state = 1"
            " AND c.vector_id IN (SELECT value FROM json_each(?)))",
            (namespace, namespace, _id_list(vector_ids))).fetchone()
        version = int(version or 0)
        out = {}
        for r in _json_rows(got):
            row = dict(zip(_CHUNK_NAMES, r, strict=True))
            for name in _CHUNK_REALS:
                row[name] = _real(row[name])
            out[int(row["vector_id"])] = _chunk(row)
        return out, version

    def filter_vector_ids(self, namespace: str, flt: SearchFilter) -> np.ndarray:
        """Vector ids of visible chunks whose document passes ``flt``."""
        where, args = _filter_sql(namespace, flt)
        with self._reader() as db:
            rows = db.execute(
                "SELECT c.vector_id FROM chunks c JOIN documents d"
                " ON d.namespace = c.namespace AND d.doc_id = c.doc_id"
                f" WHERE {' AND '.join(where)}", args,
            ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def lexical_search(self, namespace: str, terms: Sequence[str], flt: SearchFilter,
                       limit: int) -> list[tuple[int, float]]:
        """The ``limit`` visible chunks of the namespace best matching any of ``terms`` by
        BM25 (FTS5's, k1 1.2, b 0.75, over the namespace's own lexical table: its statistics
        are the namespace's alone), whose document passes ``flt``: (vector_id, score), best
        first, score > 0.

        Unfiltered, the best matches are ranked inside FTS5 first and only those are joined
        to their chunk rows (joining every match before ranking cost more than the ranking
        itself: 15 ms against 8 ms per SciFact query on 15k chunks); matches that are not
        visible (staged rows) are skipped by asking for more. Terms common in the namespace
        are left out of an unfiltered query while the others fill the page
        (COMMON_TERM_SHARE)."""
        if not terms or limit <= 0:
            return []
        table = _terms_table(namespace)
        where, args = _filter_sql(namespace, flt)

        def match(ts: Sequence[str]) -> str:
            return " OR ".join('"' + t.replace('"', "") + '"' for t in ts)

        with self._reader() as db:
            if flt.empty:
                # Terms in a large share of the namespace are left out while the others
                # fill the page (each match must be scored, for almost no weight); a page
                # they leave short is asked again with every term.
                informative = _informative(db, table, terms)
                rows = self._best_matches(db, table, match(informative), limit)
                if len(rows) < limit and len(informative) < len(terms):
                    rows = self._best_matches(db, table, match(terms), limit)
            else:
                # Every term: within the filtered documents a term common in the namespace
                # may be the only one that matches.
                rows = db.execute(
                    f"SELECT c.vector_id, -bm25({table}) AS s FROM {table}"
                    f" JOIN chunks c ON c.vector_id = {table}.rowid JOIN documents d"
                    " ON d.namespace = c.namespace AND d.doc_id = c.doc_id"
                    f" WHERE {table} MATCH ? AND {' AND '.join(where)}"
                    " ORDER BY s DESC LIMIT ?", (match(terms), *args, limit),
                ).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    @staticmethod
    def _best_matches(db: sqlite3.Connection, table: str, match: str, limit: int
                      ) -> list[sqlite3.Row]:
        """The ``limit`` best visible matches of ``match``, ranked inside FTS5 first and only
        those joined to their chunk rows; matches that are not visible (staged rows) are
        skipped by asking for more."""
        k = limit + 16
        while True:
            rows = db.execute(
                f"SELECT c.vector_id, t.s FROM (SELECT rowid, -bm25({table}) AS s"
                f" FROM {table} WHERE {table} MATCH ? ORDER BY s DESC LIMIT ?) t"
                " JOIN chunks c ON c.vector_id = t.rowid WHERE c.state = 1"
                " ORDER BY t.s DESC LIMIT ?", (match, k, limit)).fetchall()
            if len(rows) >= limit or k >= 1 << 20:
                return rows
            matched = db.execute(f"SELECT count(*) FROM {table} WHERE {table}"
                                 " MATCH ?", (match,)).fetchone()[0]
            if matched <= k:
                return rows
            k *= 4

    def chunk_heads(self, namespace: str, vector_ids: Sequence[int]
                    ) -> dict[int, tuple[str, str]]:
        """(doc_id, path) of the visible chunks among these ids: what ranking and shaping
        need of a candidate, without reading its text."""
        # One statement (a snapshot of its own: no BEGIN/COMMIT round trips), one row: see
        # _json_rows. Two narrow covering indexes, named: the planner would rather look up
        # the rows (wide: text, vector; the document's content), a page each. CROSS JOIN
        # fixes the order: given the indexes, the planner would scan the namespace's
        # documents and probe chunks for each (270 ms against 0.2 ms at 10k chunks).
        (got,) = self._conn().execute(
            "SELECT json_group_array(json_array(c.vector_id, c.doc_id, d.path))"
            " FROM chunks c INDEXED BY chunks_heads CROSS JOIN documents d INDEXED BY"
            " documents_paths ON d.namespace = c.namespace AND d.doc_id = c.doc_id"
            " WHERE c.namespace = ? AND c.state = 1"
            " AND c.vector_id IN (SELECT value FROM json_each(?))",
            (namespace, _id_list(vector_ids))).fetchone()
        return {int(r[0]): (r[1], r[2]) for r in _json_rows(got)}

    # -- sources and syncs -----------------------------------------------------------------
    def get_source(self, namespace: str) -> SourceRecord | None:
        with self._reader() as db:
            row = db.execute("SELECT * FROM sources WHERE namespace = ?",
                             (namespace,)).fetchone()
        if row is None:
            return None
        return SourceRecord(
            namespace=row["namespace"], location=row["location"], ref=row["ref"],
            include=tuple(json.loads(row["include"])), exclude=tuple(json.loads(row["exclude"])),
            max_file_bytes=int(row["max_file_bytes"]), last_commit=row["last_commit"],
            pending_commit=row["pending_commit"], pending_full=bool(row["pending_full"]),
            updated_at=_ts(row["updated_at"]), outside_writes=int(row["outside_writes"]),
            diverged_commit=row["diverged_commit"],
            diverged_since=_ts(row["diverged_since"]))

    def source_namespaces(self) -> list[str]:
        """The namespaces bound to a git source."""
        with self._reader() as db:
            return [r[0] for r in db.execute("SELECT namespace FROM sources ORDER BY namespace")]

    def put_source(self, src: SourceRecord, incarnation: datetime | None = None) -> None:
        """Bind (or rebind) the namespace to ``src``, with its commits as given.
        ``updated_at`` (when it was bound or last synced: what the staleness of a source
        never synced counts from) moves only when the binding changes, not at every sync
        attempt that re-states it. A namespace deleted meanwhile (a DeleteNamespace beside
        a starting sync) is NotFound: a binding left behind would have the poller bring the
        namespace back. With ``incarnation`` (the namespace's created_at as the sync found
        it), one created again under its name meanwhile is NotFound too."""
        with self._writer() as db:
            row = db.execute("SELECT created_at FROM namespaces WHERE name = ?",
                             (src.namespace,)).fetchone()
            if row is None or (incarnation is not None
                               and row[0] != _epoch(incarnation)):
                raise NotFound(f"namespace {src.namespace!r} does not exist (deleted while "
                               "the sync started)" if row is None else
                               f"namespace {src.namespace!r} was deleted and created again "
                               "while the sync started; the new namespace is not this "
                               "sync's", field="namespace")
            db.execute(
                "INSERT INTO sources (namespace, location, ref, include, exclude,"
                " max_file_bytes, last_commit, pending_commit, pending_full, updated_at,"
                " outside_writes)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (namespace) DO UPDATE SET"
                " updated_at=CASE WHEN sources.location = excluded.location"
                " AND sources.ref = excluded.ref AND sources.include = excluded.include"
                " AND sources.exclude = excluded.exclude"
                " AND sources.max_file_bytes = excluded.max_file_bytes"
                " AND sources.last_commit = excluded.last_commit"
                " THEN sources.updated_at ELSE excluded.updated_at END,"
                " location=excluded.location, ref=excluded.ref, include=excluded.include,"
                " exclude=excluded.exclude, max_file_bytes=excluded.max_file_bytes,"
                " last_commit=excluded.last_commit, pending_commit=excluded.pending_commit,"
                # A write outside syncs since the caller read the source keeps a full
                # compare pending (``src.outside_writes``: the count it read).
                " pending_full=CASE WHEN sources.outside_writes > excluded.outside_writes"
                " THEN 1 ELSE excluded.pending_full END",
                (src.namespace, src.location, src.ref, json.dumps(list(src.include)),
                 json.dumps(list(src.exclude)), src.max_file_bytes, src.last_commit,
                 src.pending_commit, int(src.pending_full), time.time(), src.outside_writes))

    def source_synced(self, namespace: str, commit: str, outside_writes: int = 0) -> None:
        """The namespace's documents now equal ``commit``: record it, clear the pending
        one — unless more than ``outside_writes`` (the count the sync began with) writes
        reached the namespace outside syncs meanwhile: one may have landed where the sync
        had already been, so a full compare stays pending. A source deleted meanwhile (with
        its namespace) stays deleted."""
        with self._writer() as db:
            db.execute("UPDATE sources SET last_commit = ?,"
                       " pending_commit = CASE WHEN outside_writes > ? THEN ? ELSE '' END,"
                       " pending_full = outside_writes > ?, updated_at = ?"
                       " WHERE namespace = ?",
                       (commit, outside_writes, commit, outside_writes, time.time(),
                        namespace))

    def note_outside_write(self, namespace: str) -> bool:
        """An upsert or delete is about to reach ``namespace`` other than through a sync:
        when it is bound to a source, count it and mark a full compare pending (the next
        sync, the poller's included, puts the namespace back to the source's tree). Whether
        it is bound."""
        with self._reader() as db:
            bound = db.execute("SELECT 1 FROM sources WHERE namespace = ?",
                               (namespace,)).fetchone() is not None
        if not bound:
            return False
        with self._writer() as db:
            db.execute("UPDATE sources SET outside_writes = outside_writes + 1,"
                       " pending_full = 1, pending_commit = CASE WHEN pending_commit = ''"
                       " THEN last_commit ELSE pending_commit END WHERE namespace = ?",
                       (namespace,))
        return True

    def set_diverged(self, namespace: str, commit: str, since: datetime | None) -> None:
        """Record when the ref was first seen not to contain the indexed ``commit`` (''
        and None: it contains it again)."""
        with self._writer() as db:
            db.execute("UPDATE sources SET diverged_commit = ?, diverged_since = ?"
                       " WHERE namespace = ?",
                       (commit, _epoch(since) if since is not None else None, namespace))

    def add_sync(self, sync_id: str, namespace: str, started_at: datetime) -> None:
        with self._writer() as db:
            db.execute("INSERT INTO syncs (sync_id, namespace, state, started_at)"
                       " VALUES (?, ?, 'running', ?)",
                       (sync_id, namespace, _epoch(started_at)))

    def finish_sync(self, rec: SyncRecord, keep: int) -> None:
        """Record how a sync ended, and keep only the ``keep`` latest of its namespace."""
        with self._writer() as db:
            db.execute("UPDATE syncs SET state = ?, finished_at = ?, commit_sha = ?,"
                       " summary = ?, error = ? WHERE sync_id = ?",
                       (rec.state, _epoch(rec.finished_at), rec.commit,
                        json.dumps(rec.summary, sort_keys=True), rec.error, rec.sync_id))
            db.execute("DELETE FROM syncs WHERE namespace = ? AND sync_id NOT IN (SELECT"
                       " sync_id FROM syncs WHERE namespace = ? ORDER BY started_at DESC,"
                       " rowid DESC LIMIT ?)", (rec.namespace, rec.namespace, keep))

    def list_syncs(self, namespace: str, limit: int) -> list[SyncRecord]:
        """The namespace's latest syncs, newest first."""
        with self._reader() as db:
            rows = db.execute("SELECT * FROM syncs WHERE namespace = ?"
                              " ORDER BY started_at DESC, rowid DESC LIMIT ?",
                              (namespace, limit)).fetchall()
        return [SyncRecord(sync_id=r["sync_id"], namespace=r["namespace"], state=r["state"],
                           started_at=_ts(r["started_at"]), finished_at=_ts(r["finished_at"]),
                           commit=r["commit_sha"], summary=json.loads(r["summary"]),
                           error=r["error"]) for r in rows]

    def fail_running_syncs(self, error: str) -> int:
        """Mark syncs still 'running' failed (a previous process stopped during them);
        returns how many. Only at start, while this process holds the data directory."""
        with self._writer() as db:
            return db.execute("UPDATE syncs SET state = 'failed', error = ?,"
                              " finished_at = coalesce(finished_at, ?) WHERE state = 'running'",
                              (error, time.time())).rowcount

    # -- golden sets and evaluations --------------------------------------------------------
    def add_golden_set(self, gs: GoldenSet) -> GoldenSet:
        """Store ``gs`` as the next version of its name (1 for a new name); returns it with
        its version and creation time."""
        now = time.time()
        queries = json.dumps([{"id": q.id, "text": q.text, "doc_grades": q.doc_grades,
                               "path_grades": q.path_grades} for q in gs.queries])
        with self._writer() as db:
            if db.execute("SELECT 1 FROM namespaces WHERE name = ?",
                          (gs.namespace,)).fetchone() is None:
                raise NotFound(f"namespace {gs.namespace!r} does not exist", field="namespace")
            (latest,) = db.execute("SELECT coalesce(max(version), 0) FROM golden_sets"
                                   " WHERE namespace = ? AND name = ?",
                                   (gs.namespace, gs.name)).fetchone()
            version = int(latest) + 1
            db.execute("INSERT INTO golden_sets (namespace, name, version, created_at, origin,"
                       " queries, metadata) VALUES (?,?,?,?,?,?,?)",
                       (gs.namespace, gs.name, version, now, gs.origin, queries,
                        json.dumps(gs.metadata, sort_keys=True)))
        return dataclasses.replace(gs, version=version, created_at=_ts(now))

    def get_golden_set(self, namespace: str, name: str, version: int = 0) -> GoldenSet | None:
        """One version of a set (0: the latest), or None."""
        with self._reader() as db:
            if version:
                row = db.execute("SELECT * FROM golden_sets WHERE namespace = ? AND name = ?"
                                 " AND version = ?", (namespace, name, version)).fetchone()
            else:
                row = db.execute("SELECT * FROM golden_sets WHERE namespace = ? AND name = ?"
                                 " ORDER BY version DESC LIMIT 1", (namespace, name)).fetchone()
        if row is None:
            return None
        return GoldenSet(
            namespace=row["namespace"], name=row["name"], version=int(row["version"]),
            created_at=_ts(row["created_at"]), origin=row["origin"],
            queries=tuple(GoldenQuery(id=q["id"], text=q["text"], doc_grades=q["doc_grades"],
                                      path_grades=q["path_grades"])
                          for q in json.loads(row["queries"])),
            metadata=json.loads(row["metadata"]))

    def golden_set_names(self) -> list[tuple[str, str]]:
        """(namespace, name) of every stored set."""
        with self._reader() as db:
            return [(r[0], r[1]) for r in db.execute(
                "SELECT DISTINCT namespace, name FROM golden_sets ORDER BY namespace, name")]

    def doc_ids_by_path(self, namespace: str, paths: Iterable[str]) -> dict[str, list[str]]:
        """path -> doc ids of the namespace's documents with that path (paths none has are
        absent)."""
        out: dict[str, list[str]] = {}
        with self._reader() as db:
            for r in _in(db, "SELECT path, doc_id FROM documents WHERE namespace = ?"
                         " AND path IN ({marks})", sorted(set(paths)), namespace):
                out.setdefault(r[0], []).append(r[1])
        return out

    def document_paths(self, namespace: str) -> set[str]:
        """Paths of the namespace's current documents."""
        with self._reader() as db:
            return {r[0] for r in db.execute("SELECT path FROM documents WHERE namespace = ?",
                                             (namespace,))}

    def add_evaluation(self, rec: EvaluationRecord, keep: int) -> None:
        """Record a run, and keep only the ``keep`` latest of its namespace, and the latest
        SLO run of each of its sets (what the gauges resume from after a restart, however
        many ad-hoc runs came after it). A namespace deleted meanwhile keeps no history."""
        with self._writer() as db:
            if db.execute("SELECT 1 FROM namespaces WHERE name = ?",
                          (rec.namespace,)).fetchone() is None:
                return
            db.execute("INSERT INTO evaluations (evaluation_id, namespace, golden_set, version,"
                       " started_at, seconds, mode, rerank, query_count, trigger, metrics,"
                       " slo) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (rec.evaluation_id, rec.namespace, rec.golden_set, rec.version,
                        _epoch(rec.started_at), rec.seconds, rec.mode.value, int(rec.rerank),
                        rec.query_count, rec.trigger,
                        json.dumps([[m.name, m.k, m.value] for m in rec.metrics]),
                        int(rec.slo)))
            db.execute("DELETE FROM evaluations WHERE namespace = ? AND evaluation_id NOT IN"
                       " (SELECT evaluation_id FROM evaluations WHERE namespace = ?"
                       " ORDER BY rowid DESC LIMIT ?) AND rowid NOT IN"
                       f" ({_LATEST_SLO_RUNS} AND e.namespace = ?)",
                       (rec.namespace, rec.namespace, keep, rec.namespace))

    def list_evaluations(self, namespace: str, limit: int) -> list[EvaluationRecord]:
        """The latest runs of a namespace, newest first (as recorded: the clock a run read
        may have been set back since)."""
        with self._reader() as db:
            rows = db.execute("SELECT * FROM evaluations WHERE namespace = ?"
                              " ORDER BY rowid DESC LIMIT ?",
                              (namespace, limit)).fetchall()
        return _evaluations(rows)

    def slo_evaluations(self, namespace: str | None = None) -> list[EvaluationRecord]:
        """The latest SLO run of every (namespace, golden set) (of ``namespace``'s sets
        only, when given), oldest first: what the quality gauges resume from at start."""
        where, args = ("", ()) if namespace is None else (" AND e.namespace = ?", (namespace,))
        with self._reader() as db:
            rows = db.execute(
                f"SELECT * FROM evaluations WHERE rowid IN ({_LATEST_SLO_RUNS}{where})"
                " ORDER BY rowid", args).fetchall()
        return _evaluations(rows)

    # -- lexical reconcile -----------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        with self._reader() as db:
            row = db.execute("SELECT value FROM catalog_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._writer() as db:
            db.execute("INSERT INTO catalog_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                       " DO UPDATE SET value = excluded.value", (key, value))

    def chunks_without_terms(self, namespace: str, after: int, limit: int, *,
                             all_rows: bool = False) -> list[tuple[int, str, str, str]]:
        """(vector_id, path, symbol, text) of active chunks lacking lexical terms (or of
        every active chunk with ``all_rows``), by vector_id after ``after``: what a start-up
        reconcile (re)indexes."""
        table = _terms_table(namespace)
        missing = "" if all_rows else (
            f" AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.rowid = c.vector_id)")
        with self._reader() as db:
            rows = db.execute(
                "SELECT c.vector_id, d.path, c.symbol, c.text FROM chunks c JOIN documents d"
                " ON d.namespace = c.namespace AND d.doc_id = c.doc_id"
                " WHERE c.namespace = ? AND c.state = 1 AND c.vector_id > ?" + missing +
                " ORDER BY c.vector_id LIMIT ?", (namespace, after, limit)).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def put_terms(self, namespace: str, rows: Sequence[tuple[int, str]]) -> None:
        """Set the lexical terms of these chunk rows (vector_id, terms)."""
        table = _terms_table(namespace)
        with self._writer() as db:
            for vid, terms in rows:
                db.execute(f"DELETE FROM {table} WHERE rowid = ?", (vid,))
                db.execute(f"INSERT INTO {table} (rowid, terms) VALUES (?,?)", (vid, terms))

    def terms_agree(self, namespace: str) -> bool:
        """Whether the namespace's lexical table holds a row for exactly its active chunks,
        by (count, sum of ids) on both sides: 70 ms at 300k chunks, where finding the rows
        that differ scans every chunk (3.5 s). False when it cannot tell."""
        table = _terms_table(namespace)
        with self._reader() as db:
            try:
                chunks = db.execute("SELECT count(*), sum(vector_id) FROM chunks"
                                    " WHERE namespace = ? AND state = 1",
                                    (namespace,)).fetchone()
                terms = db.execute(f"SELECT count(*), sum(id) FROM {table}_docsize"
                                   ).fetchone()
            except sqlite3.OperationalError:
                return False
        return tuple(chunks) == tuple(terms)

    def terms(self, namespace: str, vector_ids: Sequence[int]) -> dict[int, str]:
        """The lexical terms of these chunk rows (staged or active) that have them."""
        table = _terms_table(namespace)
        with self._reader() as db:
            rows = _in(db, f"SELECT rowid, terms FROM {table} WHERE rowid IN ({{marks}})",
                       [int(v) for v in vector_ids])
        return {int(r[0]): str(r[1]) for r in rows}

    def stray_terms(self, namespace: str) -> int:
        """Delete lexical rows of the namespace whose chunk row is gone; returns how many."""
        table = _terms_table(namespace)
        with self._writer() as db:
            return db.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT t.rowid FROM {table} t"
                " WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.vector_id = t.rowid"
                " AND c.namespace = ?))", (namespace,)).rowcount

    # -- reconcile -------------------------------------------------------------------------
    def drop_pending(self) -> dict[str, list[int]]:
        """Delete every pending row (left by a crash before its commit); returns the vector
        ids per namespace so the index can drop them too."""
        with self._writer() as db:
            out: dict[str, list[int]] = {}
            for r in db.execute("SELECT namespace, vector_id FROM chunks WHERE state = 0"):
                out.setdefault(r[0], []).append(int(r[1]))
            db.execute("DELETE FROM chunks WHERE state = 0")
            return out

    def active_vector_ids(self, namespace: str) -> np.ndarray:
        with self._reader() as db:
            rows = db.execute(
                "SELECT vector_id FROM chunks WHERE namespace = ? AND state = 1", (namespace,)
            ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def vectors(self, namespace: str, vector_ids: Iterable[int],
                dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of these active rows."""
        with self._reader() as db:
            rows = _in(db, "SELECT vector_id, vector FROM chunks WHERE namespace = ?"
                       " AND state = 1 AND vector_id IN ({marks})",
                       [int(v) for v in vector_ids], namespace)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return (np.asarray([r[0] for r in rows], dtype=np.int64),
                vecs.reshape(len(rows), dimension))

    def sample_chunk_texts(self, limit: int) -> list[str]:
        """Up to ``limit`` active chunks' embedded texts (header + text), spread over the
        catalog by a fixed hash: what an int8 embedder is calibrated on."""
        with self._reader() as db:
            rows = db.execute("SELECT header || text FROM chunks WHERE state = 1"
                              " ORDER BY (vector_id * 2654435761) % 4294967291 LIMIT ?",
                              (limit,)).fetchall()
        return [r[0] for r in rows]

    def payloads(self, namespace: str, vector_ids: Sequence[int]) -> dict[int, Payload]:
        """What an engine stores beside each of these active rows' vectors."""
        with self._reader() as db:
            rows = _in(db, "SELECT c.vector_id, c.doc_id, d.path, d.language, c.kind,"
                       " d.metadata FROM chunks c JOIN documents d ON d.namespace = c.namespace"
                       " AND d.doc_id = c.doc_id WHERE c.namespace = ? AND c.state = 1"
                       " AND c.vector_id IN ({marks})", [int(v) for v in vector_ids],
                       namespace)
        return {int(r[0]): Payload(r[1], r[2], r[3], r[4],
                                   tuple(sorted(json.loads(r[5]).items())))
                for r in rows}

    def discard(self, vector_ids: Sequence[int]) -> None:
        """Delete rows that were staged but will not be committed."""
        with self._writer() as db:
            _in(db, "DELETE FROM chunks WHERE state = 0 AND vector_id IN ({marks})",
                [int(v) for v in vector_ids])

    def namespace_names(self) -> list[str]:
        with self._reader() as db:
            return [r[0] for r in db.execute("SELECT name FROM namespaces ORDER BY name")]


@dataclass(frozen=True, slots=True)
class DocumentRefresh:
    """New revision, source time and metadata of a document whose content is unchanged."""

    doc_id: str
    revision: str
    source_updated_at: datetime | None
    metadata: dict[str, str]


def _filter_sql(namespace: str, flt: SearchFilter) -> tuple[list[str], list[object]]:
    """WHERE terms (over chunks ``c`` joined to documents ``d``) of visible chunks of the
    namespace passing ``flt``, and their arguments."""
    where = ["c.namespace = ?", "c.state = 1"]
    args: list[object] = [namespace]
    if flt.doc_ids:
        where.append(f"c.doc_id IN ({','.join('?' * len(flt.doc_ids))})")
        args += list(flt.doc_ids)
    if flt.path_prefix:
        where.append("substr(d.path, 1, ?) = ?")
        args += [len(flt.path_prefix), flt.path_prefix]
    if flt.languages:
        where.append(f"d.language IN ({','.join('?' * len(flt.languages))})")
        args += list(flt.languages)
    if flt.kinds:
        where.append(f"c.kind IN ({','.join('?' * len(flt.kinds))})")
        args += list(flt.kinds)
    for key, value in flt.metadata:
        where.append("EXISTS (SELECT 1 FROM json_each(d.metadata) m"
                     " WHERE m.key = ? AND m.value = ?)")
        args += [key, value]
    return where, args


def _terms_table(namespace: str) -> str:
    """The namespace's lexical table: an FTS5 table of its chunks' analyzer terms (rowid =
    vector_id), one per namespace so that BM25's document frequencies and lengths are the
    namespace's own. Named by a hash: namespace names allow '-', identifiers do not."""
    return "terms_" + hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:16]


# A query term found in more than this share of a namespace's chunks is left out of its
# unfiltered lexical query while the others fill the page: BM25 gives it almost no weight,
# yet it matches a large part of the namespace and every match must be scored. On SciFact
# (11.6k chunks) the query took 5.4 -> 4.3 ms with nDCG@10 0.6843 -> 0.6849; at 10 % it
# saved more but cost 0.02. (Under a filter, or when the others leave the page short, every
# term is asked: the common one may be the only one that matches.)
COMMON_TERM_SHARE = 0.2


def _informative(db: sqlite3.Connection, table: str, terms: Sequence[str]) -> list[str]:
    """``terms`` without those in more than COMMON_TERM_SHARE of the namespace's chunks
    (all of them when every term is that common, or the statistics cannot be read)."""
    if len(terms) < 2:
        return list(terms)
    try:
        row = db.execute(f"SELECT block FROM {table}_data WHERE id = 1").fetchone()
        total = _fts5_row_count(row[0]) if row else 0
        if total < 100:  # too small for document frequencies to say much
            return list(terms)
        marks = ",".join("?" * len(terms))
        df = dict(db.execute(f"SELECT term, doc FROM {table}_vocab WHERE term IN ({marks})",
                             list(terms)).fetchall())
    except sqlite3.OperationalError:  # no vocabulary view (yet): every term
        return list(terms)
    kept = [t for t in terms if df.get(t, 0) <= COMMON_TERM_SHARE * total]
    return kept or list(terms)


def _fts5_row_count(averages: bytes) -> int:
    """Rows of an FTS5 table: the first varint of its averages record (%_data id 1)."""
    value = 0
    for n, byte in enumerate(averages[:9]):
        if n == 8:
            return (value << 8) | byte
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value
    return 0


def _create_terms(db: sqlite3.Connection, namespace: str) -> None:
    """Create the namespace's lexical table and the trigger that takes a chunk's terms away
    in the transaction that deletes the chunk, so BM25 candidates are written and removed
    with the chunk rows (a staged chunk's terms are as invisible as its vector: searches
    join state = 1)."""
    table = _terms_table(namespace)
    literal = namespace.replace("'", "''")
    db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5(terms, tokenize ="
               " \"unicode61 remove_diacritics 0 tokenchars '_.-'\")")
    db.execute(f"CREATE TRIGGER IF NOT EXISTS {table}_follow AFTER DELETE ON chunks"
               f" WHEN old.namespace = '{literal}' BEGIN"
               f" DELETE FROM {table} WHERE rowid = old.vector_id; END")
    # Each term's document frequency, read by lexical_search to leave out near-ubiquitous
    # query terms (a view over the FTS index: it stores nothing).
    db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {table}_vocab USING fts5vocab({table},"
               " 'row')")


# catalog_meta keys "drop:<backend>:<collection>": collections of deleted namespaces their
# engine has yet to drop (Catalog.pending_drops).
_DROP = "drop:"
_GENERATION = "last-generation:"

# The rowids of the latest SLO run (evaluations.slo) of each (namespace, golden set).
# Latest = last recorded (rowid: rows are only ever appended, and trimming keeps the newest),
# not the latest start time: a clock set back since would put an older run first.
_LATEST_SLO_RUNS = (
    "SELECT (SELECT rowid FROM evaluations WHERE namespace = e.namespace"
    " AND golden_set = e.golden_set AND slo = 1 ORDER BY rowid DESC LIMIT 1)"
    " FROM evaluations e WHERE e.slo = 1")


def _evaluations(rows: Iterable[sqlite3.Row]) -> list[EvaluationRecord]:
    return [EvaluationRecord(
        evaluation_id=r["evaluation_id"], namespace=r["namespace"],
        golden_set=r["golden_set"], version=int(r["version"]),
        started_at=_ts(r["started_at"]), seconds=float(r["seconds"]),
        mode=SearchMode(r["mode"]), rerank=bool(r["rerank"]),
        query_count=int(r["query_count"]), trigger=r["trigger"],
        metrics=tuple(EvalMetric(str(n), int(k), float(v))
                      for n, k, v in json.loads(r["metrics"])),
        slo=bool(r["slo"])) for r in rows]


# Columns later schema versions added to existing tables: (table, column, declaration).
_ADDED_COLUMNS = (
    ("chunks", "symbol", "TEXT NOT NULL DEFAULT ''"),
    ("chunks", "kind", "TEXT NOT NULL DEFAULT ''"),
    ("chunks", "fallback", "TEXT NOT NULL DEFAULT ''"),
    ("chunks", "header", "TEXT NOT NULL DEFAULT ''"),
    ("sources", "outside_writes", "INTEGER NOT NULL DEFAULT 0"),
    ("sources", "diverged_commit", "TEXT NOT NULL DEFAULT ''"),
    ("sources", "diverged_since", "REAL"),
    # Runs kept by an older release: whether each was an SLO run is unknown (they are not
    # restored into the gauges; the next SLO run sets them).
    ("evaluations", "slo", "INTEGER NOT NULL DEFAULT 0"),
    # Namespaces of an older release: their embedder's pipeline is unknown (not checked).
    ("namespaces", "embedder_pipeline", "TEXT NOT NULL DEFAULT ''"),
)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a catalog written by an older release up to this schema (in place: SQLite adds
    a column with a constant default without rewriting the table)."""
    for table, column, decl in _ADDED_COLUMNS:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def _in(db: sqlite3.Connection, sql: str, values: Iterable[object], *args: object
        ) -> list[sqlite3.Row]:
    """Run ``sql``, whose ``{marks}`` stands for an IN (...) list, over ``values`` in batches
    that stay within SQLite's bound-parameter limit; ``args`` bind before the list. Returns
    the rows of all batches."""
    items = list(values)
    rows: list[sqlite3.Row] = []
    for i in range(0, len(items), 500):
        batch = items[i : i + 500]
        rows += db.execute(sql.format(marks=",".join("?" * len(batch))), (*args, *batch))
    return rows


# What the namespaces of a catalog derive in its data directory: the vector indexes (one
# directory per backend) and the lexical indexes.
INDEX_DIRS = (INDEX_DIR, "lexical")


def missing_catalog(path: Path) -> str | None:
    """Why a catalog that is not at ``path`` (or is 0 bytes) must not be created anew: the
    data directory holds the indexes of namespaces (the wrong volume mounted, or the file
    lost). Created anew, the start-up reconcile would drop every one of them as "of no
    namespace" and serve nothing. None when there is a catalog, or nothing to lose."""
    try:
        if path.stat().st_size:
            return None
        what = "empty"
    except FileNotFoundError:
        what = "missing"
    found = derived_data(path.parent)
    if not found:
        return None
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"the catalog {path} is {what} but the data directory holds the indexes of "
            f"namespaces ({shown}); the catalog is the source of truth and cannot be "
            "rebuilt from them. Restore it (the right volume or data directory, or a "
            f"backup), or to start empty move {INDEX_DIRS[0]}/ and {INDEX_DIRS[1]}/ out of "
            f"{path.parent}")


def derived_data(data_dir: Path) -> list[str]:
    """The index collections found under the data directory (paths relative to it):
    entries of each backend's directory under indexes/, and of lexical/."""
    out: list[str] = []
    for top in INDEX_DIRS:
        root = Path(data_dir) / top
        try:
            entries = sorted(root.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if top == INDEX_DIR and entry.is_dir():
                try:
                    out += [f"{top}/{entry.name}/{e.name}" for e in sorted(entry.iterdir())]
                except OSError:
                    out.append(f"{top}/{entry.name}")
            else:
                out.append(f"{top}/{entry.name}")
    return out


def _id_list(ids: Iterable[int]) -> str:
    """Integer ids as one JSON array, bound as one parameter (``IN (SELECT value FROM
    json_each(?))``): no bound-parameter limit, and one statement text whatever the count,
    so its prepared form is reused from the connection's cache."""
    return json.dumps([int(v) for v in ids])


def _json_rows(got: str | None) -> list[list[Any]]:
    """The rows a statement aggregated into one JSON array of arrays
    (``json_group_array(json_array(...))``).

    Why one row: Python's sqlite3 lets go of the GIL around every step of a statement (one
    per row) and every prepare, and must win it back after each. With other threads running
    Python (a loaded server's handlers, chunking), each win-back can wait a whole switch
    interval: 200 rows read one by one took 102 ms against 5.4 ms as one aggregated row,
    with two busy threads beside (0.25 and 0.23 ms alone). JSON keeps integers and text
    exactly; a REAL must go through ``quote()`` (JSON prints 15 significant digits) and
    back through ``_real``."""
    return json.loads(got) if got else []


def _real(quoted: str | None) -> float | None:
    """A REAL read through SQL ``quote()`` (exact), back as a float; NULL as None."""
    if quoted is None or quoted == "NULL":
        return None
    try:
        return float(quoted)
    except ValueError:  # text in a REAL column (a hand edit): unknown, as _ts reads it
        return None


def _namespace(row: sqlite3.Row, counts: tuple[int, int, int]) -> NamespaceRecord:
    return NamespaceRecord(
        name=row["name"], backend=row["backend"], embedder=row["embedder"],
        embedder_revision=row["embedder_revision"], dimension=row["dimension"],
        metric=row["metric"], index_generation=row["index_generation"],
        index_version=row["index_version"], created_at=_ts(row["created_at"]),
        document_count=counts[0], chunk_count=counts[1], content_bytes=counts[2],
        last_indexed_at=_ts(row["last_indexed_at"]),
        embedder_pipeline=row["embedder_pipeline"],
    )


def _document(row: sqlite3.Row, *, with_content: bool,
              chunk_ids: tuple[str, ...] = ()) -> DocumentRecord:
    return DocumentRecord(
        namespace=row["namespace"], doc_id=row["doc_id"], path=row["path"],
        revision=row["revision"], content_hash=row["content_hash"], language=row["language"],
        version=row["version"], size_bytes=row["size_bytes"], chunk_count=row["chunk_count"],
        indexed_at=_ts(row["indexed_at"]), source_updated_at=_ts(row["source_updated_at"]),
        metadata=json.loads(row["metadata"]),
        content=row["content"] if with_content else None, chunk_ids=chunk_ids,
    )


# What a ChunkRecord is read from: (SQL expression, name), in one order for both readers.
_CHUNK_FIELDS = (
    ("c.vector_id", "vector_id"), ("c.chunk_id", "chunk_id"), ("c.namespace", "namespace"),
    ("c.doc_id", "doc_id"), ("c.ordinal", "ordinal"), ("c.text", "text"),
    ("c.content_hash", "content_hash"), ("c.start_line", "start_line"),
    ("c.end_line", "end_line"), ("c.start_byte", "start_byte"), ("c.end_byte", "end_byte"),
    ("c.token_count", "token_count"), ("c.chunker", "chunker"), ("c.symbol", "symbol"),
    ("c.kind", "kind"), ("c.fallback", "fallback"), ("d.language", "language"),
    ("d.path", "path"), ("d.revision", "revision"), ("d.version", "version"),
    ("d.content_hash", "document_hash"), ("d.indexed_at", "indexed_at"),
    ("d.source_updated_at", "source_updated_at"), ("d.metadata", "metadata"),
)
_CHUNK_REALS = ("indexed_at", "source_updated_at")  # REAL columns among them
_CHUNK_NAMES = tuple(name for _, name in _CHUNK_FIELDS)
# As columns of a row (get_chunk: sqlite3.Row by name) ...
_CHUNK_COLS = ", ".join(f"{expr} AS {name}" for expr, name in _CHUNK_FIELDS)
# ... and as one JSON array per chunk (see _json_rows), its REALs quoted.
_CHUNK_JSON = "json_array({})".format(", ".join(
    f"quote({expr})" if name in _CHUNK_REALS else expr for expr, name in _CHUNK_FIELDS))


def _chunk(row: Mapping[str, Any]) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=row["chunk_id"], vector_id=int(row["vector_id"]), namespace=row["namespace"],
        doc_id=row["doc_id"], ordinal=row["ordinal"], text=row["text"],
        content_hash=row["content_hash"], start_line=row["start_line"],
        end_line=row["end_line"], start_byte=row["start_byte"], end_byte=row["end_byte"],
        token_count=row["token_count"], language=row["language"], chunker=row["chunker"],
        path=row["path"], revision=row["revision"], document_version=row["version"],
        document_hash=row["document_hash"], indexed_at=_ts(row["indexed_at"]),
        source_updated_at=_ts(row["source_updated_at"]), metadata=json.loads(row["metadata"]),
        symbol=row["symbol"], kind=row["kind"], fallback=row["fallback"],
    )
