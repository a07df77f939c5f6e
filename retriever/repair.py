"""Offline check and repair of a data directory: `retriever check` and `retriever repair`.

The catalog is the source of truth; index files are derived from it. So:

- a damaged index file needs no hand repair: the server moves it aside at start and
  rebuilds the index from the catalog. ``check`` reports it and says so.
- a damaged catalog is what these commands are for. ``check`` runs SQLite's
  ``integrity_check`` and, when it fails, a dry run of the salvage, to say what ``repair``
  would recover. ``repair`` builds a new catalog from every row that can still be read,
  keeps only whole documents, moves the damaged catalog and the index files into
  ``quarantine/<time>/`` in the data directory, and the next start rebuilds the indexes
  from the new catalog.

Rows are read in rowid order. When a read fails, it resumes at the first rowid past the
damage (found by probing forward, then bisecting), so a bad page costs the rows on it, not
the rest of the table. A row that reads but does not match its own content hash is dropped
too. A document is never half present: one whose chunks were not all recovered is dropped
with them and reported by id, and so is one whose row was lost but whose id the surviving
chunks or the catalog's indexes still name. Rows of uncommitted upserts are dropped as at
every start. Pure Python on the sqlite3 module: no ``sqlite3`` command-line tool needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexers import (
    BACKENDS,
    CollectionSpec,
    EngineUnavailable,
    Verifiable,
    backend_class,
    create_backend,
)
from retriever.catalog import _SCHEMA, SCHEMA_VERSION, Catalog, missing_catalog
from retriever.storage import DataDirLock, catalog_path, index_root, quarantine_dir

TABLES = ("namespaces", "documents", "chunks", "sources", "syncs", "golden_sets", "evaluations")
LOST_LIST = "lost-documents.tsv"  # in the quarantine directory: namespace<TAB>doc_id
_SHOWN = 100  # lost documents listed in a report; the quarantine has the full list
_METRICS = ("cosine", "ip", "l2")
_MAX_ROWID = 2**63 - 1


class RepairError(Exception):
    """The repair cannot be done (the message says why and what to do); nothing changed."""


@dataclass
class CatalogHealth:
    path: Path
    exists: bool
    problems: list[str] = field(default_factory=list)  # integrity_check's, or why it failed

    @property
    def ok(self) -> bool:
        """True also when there is no catalog yet (a new one is created at start)."""
        return not self.problems


@dataclass
class IndexHealth:
    collection: str
    backend: str
    namespace: str | None  # None: no namespace of the catalog owns it (or it is unreadable)
    problems: list[str]
    exists: bool = True  # False: not built yet (the server builds it from the catalog)
    checked: bool = True  # False: an engine with its own storage, not checked offline


@dataclass
class Salvage:
    """What could be read from a damaged catalog, and what a repaired one holds."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    # Rowid spans of each table that could not be read (how many rows they held is unknown).
    unreadable: dict[str, list[tuple[int, int]]] = field(
        default_factory=lambda: {t: [] for t in TABLES})
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    pending_dropped: int = 0  # chunk rows of upserts that never committed
    lost_namespaces: list[str] = field(default_factory=list)
    lost_documents: list[tuple[str, str]] = field(default_factory=list)  # (namespace, doc_id)
    # False when document rows may have been lost whose ids nothing readable names.
    ids_complete: bool = True
    fatal: str | None = None  # why nothing at all could be read

    @property
    def damaged_rows(self) -> bool:
        return any(self.unreadable[t] or self.rejected[t] for t in TABLES)


@dataclass
class CheckReport:
    data_dir: Path
    catalog: CatalogHealth
    indexes: list[IndexHealth]
    salvage: Salvage | None  # a dry run, when the catalog is damaged
    # (backend, collection) of deleted namespaces whose engine has not dropped them yet
    pending_drops: list[tuple[str, str]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.catalog.ok and not any(i.problems for i in self.indexes)


@dataclass
class RepairReport:
    data_dir: Path
    catalog: CatalogHealth
    salvage: Salvage | None  # None when the catalog needed no repair
    quarantine: Path | None  # where the damaged catalog and the index files went


# -- check -------------------------------------------------------------------------------------
def check(data_dir: Path) -> CheckReport:
    """Check the catalog and every index collection's files; changes nothing."""
    data_dir = Path(data_dir)
    path = catalog_path(data_dir)
    health = catalog_health(path)
    salvage = None
    if health.exists and not health.ok:
        with closing(_scratch_catalog()) as scratch:
            salvage = _salvage(path, scratch, light=True)
    return CheckReport(data_dir, health, _check_indexes(data_dir, _namespace_specs(path)),
                       salvage, _pending_drops(path) if health.ok else [])


def _pending_drops(path: Path) -> list[tuple[str, str]]:
    """The collections deleted namespaces left for their engines to drop (see
    `Catalog.pending_drops`), read without changing anything."""
    from retriever.catalog import _DROP

    try:
        with closing(_open_damaged(path)) as db:
            rows = db.execute("SELECT key FROM catalog_meta WHERE key GLOB ?",
                              (_DROP + "*",)).fetchall()
    except sqlite3.DatabaseError:
        return []
    out = []
    for (key,) in rows:
        backend, _, collection = key[len(_DROP):].partition(":")
        out.append((backend, collection))
    return sorted(out)


def catalog_health(path: Path) -> CatalogHealth:
    """SQLite's integrity_check of the catalog at ``path``."""
    if (why := missing_catalog(path)) is not None:
        return CatalogHealth(path, exists=False, problems=[why])
    if not path.exists():
        return CatalogHealth(path, exists=False)
    try:
        with closing(_open_damaged(path)) as db:
            rows = [str(r[0]) for r in db.execute("PRAGMA integrity_check(20)")]
            found = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        return CatalogHealth(path, exists=True, problems=[str(exc)])
    if rows != ["ok"]:
        return CatalogHealth(path, exists=True, problems=rows)
    if found > SCHEMA_VERSION:
        return CatalogHealth(path, exists=True, problems=[
            f"schema version {found} is newer than this release's {SCHEMA_VERSION}: use the "
            "release that wrote it"])
    return CatalogHealth(path, exists=True)


def _namespace_specs(path: Path) -> list[tuple[str, str, CollectionSpec]] | None:
    """(namespace, backend, spec of its collection) per namespace; None when unreadable."""
    from retriever.namespaces import collection_name

    if not path.exists():
        return []
    try:
        with closing(_open_damaged(path)) as db:
            rows = db.execute("SELECT name, backend, dimension, metric, index_generation"
                              " FROM namespaces").fetchall()
    except sqlite3.DatabaseError:
        return None
    return [(name, backend, CollectionSpec(collection_name(name, gen), dim, metric))
            for name, backend, dim, metric, gen in rows if metric in _METRICS]


def _check_lexical(data_dir: Path,
                   specs: list[tuple[str, str, CollectionSpec]] | None) -> list[IndexHealth]:
    """Each namespace's tantivy index (and any of no namespace), checked offline."""
    from retriever import lexical
    from retriever.namespaces import lexical_dir

    root = data_dir / "lexical"
    owned = {lexical_dir(ns): ns for ns, _, _ in specs or ()}
    found = ({p.name for p in root.iterdir() if p.is_dir() and ".damaged-" not in p.name}
             if root.is_dir() else set())
    out = []
    for name in sorted(found | set(owned)):
        path = root / name
        exists = path.exists() or path.is_symlink()
        out.append(IndexHealth(name, "lexical", owned.get(name),
                               lexical.verify(path) if exists else [], exists=exists))
    return out


def _check_indexes(data_dir: Path,
                   specs: list[tuple[str, str, CollectionSpec]] | None) -> list[IndexHealth]:
    out = _check_vectors(data_dir, specs)
    if (data_dir / "lexical").is_dir():
        out += _check_lexical(data_dir, specs)
    return out


def _check_vectors(data_dir: Path,
                   specs: list[tuple[str, str, CollectionSpec]] | None) -> list[IndexHealth]:
    root = index_root(data_dir)
    names = {backend for _, backend, _ in specs or ()}
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if p.is_dir() and p.name in BACKENDS}
    out: list[IndexHealth] = []
    for backend_name in sorted(names):
        owned = {spec.name: (ns, spec) for ns, b, spec in specs or () if b == backend_name}
        if not hasattr(backend_class(backend_name), "verify"):
            # An engine with its own storage (Milvus, Chroma) checks itself; opening it
            # here could create files. The service's start-up reconcile refills it.
            out.extend(IndexHealth(coll, backend_name, ns, [], exists=True, checked=False)
                       for coll, (ns, _) in sorted(owned.items()))
            continue
        try:
            backend = create_backend(backend_name, root)
        except (ValueError, EngineUnavailable) as exc:
            out.append(IndexHealth("*", backend_name, None, [f"cannot check: {exc}"]))
            continue
        try:
            for coll in sorted(set(backend.collections()) | set(owned)):
                ns, spec = owned.get(coll, (None, None))
                problems = (backend.verify(coll, spec) if isinstance(backend, Verifiable)
                            else [])
                out.append(IndexHealth(coll, backend_name, ns, problems,
                                       exists=coll in backend.collections()))
        finally:
            backend.close()
    return out


# -- repair ------------------------------------------------------------------------------------
def repair(data_dir: Path) -> RepairReport:
    """Rebuild a damaged catalog from what can be read (see the module docstring). Takes the
    data directory's lock, so it refuses to run while a server uses the directory."""
    data_dir = Path(data_dir)
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        return _repair_locked(data_dir)
    finally:
        lock.release()


def _repair_locked(data_dir: Path) -> RepairReport:
    path = catalog_path(data_dir)
    health = catalog_health(path)
    if health.ok:
        return RepairReport(data_dir, health, None, None)
    if not health.exists:  # nothing to rebuild it from
        raise RepairError(health.problems[0])
    tmp = path.with_name(path.name + ".repairing")
    _remove_db(tmp)  # left by an interrupted repair
    try:
        new = Catalog(tmp)
        new.open(check=False)  # the current schema, as the server creates it
        new.close()
        with closing(sqlite3.connect(tmp, isolation_level=None)) as dst:
            dst.execute("BEGIN")
            salvage = _salvage(path, dst, light=False)
            if salvage.fatal is not None or not salvage.rows["namespaces"]:
                dst.execute("ROLLBACK")
                why = salvage.fatal or "no namespace row is readable"
                raise RepairError(
                    f"nothing could be recovered from {path} ({why}). Restore it from a "
                    "backup, or move it away and start the server to begin with an empty "
                    "catalog (then index the sources again)")
            dst.execute("COMMIT")
            problems = [str(r[0]) for r in dst.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                raise RepairError(f"the rebuilt catalog fails its own check ({problems}); "
                                  f"nothing was changed, {path} is where it was")
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        _remove_db(tmp)
        raise
    quarantine = quarantine_dir(data_dir, time.strftime("%Y%m%dT%H%M%S"))
    # The damaged catalog's WAL goes first: it must never meet the new catalog.
    for suffix in ("-wal", "-shm", ""):
        old = path.with_name(path.name + suffix)
        if old.exists():
            os.replace(old, quarantine / old.name)
    os.replace(tmp, path)
    indexes = index_root(data_dir)
    if indexes.exists():  # rebuilt from the new catalog at next start
        os.replace(indexes, quarantine / indexes.name)
    lexical = data_dir / "lexical"
    if lexical.exists():  # likewise
        os.replace(lexical, quarantine / lexical.name)
    if salvage.lost_documents:
        (quarantine / LOST_LIST).write_text("".join(
            f"{ns}\t{doc_id}\n" for ns, doc_id in salvage.lost_documents), encoding="utf-8")
    _fsync_dir(data_dir)
    return RepairReport(data_dir, health, salvage, quarantine)


# -- salvage -----------------------------------------------------------------------------------
def _salvage(src_path: Path, dst: sqlite3.Connection, *, light: bool) -> Salvage:
    """Copy every readable, valid row of ``src_path`` into ``dst`` (a catalog of the
    current schema, in a transaction), then drop whatever would leave a document partial.
    ``light`` (a dry run) stores no texts or vectors."""
    out = Salvage()
    try:
        src = _open_damaged(src_path)
    except sqlite3.DatabaseError as exc:
        out.fatal, out.ids_complete = str(exc), False
        return out
    with closing(src):
        try:
            columns = {t: _columns(src, dst, t) for t in TABLES}
        except sqlite3.DatabaseError as exc:  # the schema page itself is unreadable
            out.fatal, out.ids_complete = f"its schema cannot be read: {exc}", False
            return out
        dims: dict[str, int] = {}
        for table in TABLES:
            cols = columns[table]
            if not cols:
                continue
            insert = (f"INSERT INTO {table} ({', '.join(cols)})"
                      f" VALUES ({', '.join('?' * len(cols))})")
            for row in _readable_rows(src, table, cols, out.unreadable[table]):
                values = dict(zip(cols, row[1:], strict=True))
                verdict = _VALIDATE[table](values, dims)
                if verdict == "pending":
                    out.pending_dropped += 1
                    continue
                if verdict != "ok":
                    out.rejected[table] += 1
                    continue
                if light:
                    _lighten(table, values)
                try:
                    dst.execute(insert, [values[c] for c in cols])
                except sqlite3.IntegrityError:  # e.g. a garbled row repeating a key
                    out.rejected[table] += 1
                    continue
                out.rows[table] += 1
                if table == "namespaces":
                    dims[values["name"]] = values["dimension"]
        known, index_complete = _indexed_doc_ids(src)
        seq = _sequence(src)
    _settle(dst, out, known)
    table_complete = not (out.unreadable["documents"] or out.rejected["documents"])
    out.ids_complete = table_complete or index_complete
    if seq is not None:  # vector ids are never reused, also those of lost rows
        dst.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'chunks'",
                    (seq,))
        if not dst.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'chunks'").fetchone():
            dst.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('chunks', ?)", (seq,))
    # A repair changed what the namespaces hold: clients that cache by version see it.
    dst.execute("UPDATE namespaces SET index_version = index_version + 1")
    return out


def _readable_rows(src: sqlite3.Connection, table: str, cols: list[str],
                   skipped: list[tuple[int, int]]) -> Iterator[tuple[Any, ...]]:
    """(rowid, *cols) of every row that reads, in rowid order. A failed read resumes at
    the first rowid from which a row reads again; skipped rowid spans go to ``skipped``."""
    select = f"SELECT rowid, {', '.join(cols)} FROM {table} WHERE rowid >= ? ORDER BY rowid"

    def reads_from(p: int) -> bool:
        try:
            src.execute(select + " LIMIT 1", (p,)).fetchall()
            return True
        except sqlite3.DatabaseError:
            return False

    pos = -_MAX_ROWID
    while True:
        last: int | None = None
        try:
            for row in src.execute(select, (pos,)):
                last = row[0]
                yield tuple(row)
            return
        except sqlite3.DatabaseError:
            pass
        bad = last + 1 if last is not None else max(pos, 0)
        # Probe forward in growing steps for a rowid from which reading works again...
        step, hi = 1, None
        while bad + step <= _MAX_ROWID:
            if reads_from(bad + step):
                hi = bad + step
                break
            step *= 2
        if hi is None:
            skipped.append((bad, _MAX_ROWID))
            return
        # ...then bisect down to the first such rowid.
        lo = bad + step // 2 + 1 if step > 1 else bad + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if reads_from(mid):
                hi = mid
            else:
                lo = mid + 1
        skipped.append((bad, hi - 1))
        pos = max(hi, pos + 1)


def _ok_text(value: Any) -> bool:
    return isinstance(value, str)


def _valid_namespace(v: dict[str, Any], dims: dict[str, int]) -> str:
    ok = (_ok_text(v["name"]) and v["name"] and _ok_text(v["backend"])
          and isinstance(v["dimension"], int) and v["dimension"] > 0
          and v["metric"] in _METRICS and isinstance(v["index_generation"], int))
    return "ok" if ok else "bad"


def _valid_document(v: dict[str, Any], dims: dict[str, int]) -> str:
    if not (_ok_text(v["namespace"]) and _ok_text(v["doc_id"]) and _ok_text(v["content"])
            and isinstance(v["chunk_count"], int) and v["chunk_count"] >= 0):
        return "bad"
    if hashlib.sha256(v["content"].encode("utf-8")).hexdigest() != v["content_hash"]:
        return "bad"
    try:
        return "ok" if isinstance(json.loads(v["metadata"]), dict) else "bad"
    except (TypeError, ValueError):
        return "bad"


def _valid_chunk(v: dict[str, Any], dims: dict[str, int]) -> str:
    if v["state"] == 0:
        return "pending"
    if v["state"] != 1 or not (_ok_text(v["namespace"]) and _ok_text(v["doc_id"])
                               and _ok_text(v["text"]) and isinstance(v["ordinal"], int)):
        return "bad"
    if hashlib.sha256(v["text"].encode("utf-8")).hexdigest() != v["content_hash"]:
        return "bad"
    dim = dims.get(v["namespace"])
    vector = v["vector"]
    if not isinstance(vector, bytes) or (dim is not None and len(vector) != 4 * dim):
        return "bad"
    return "ok"


def _valid_source(v: dict[str, Any], dims: dict[str, int]) -> str:
    """A namespace's git source binding. Kept, but as never synced: the repair may have
    dropped documents that git still holds, and the next sync's full reconcile (by content
    hash) brings them back instead of diffing from the last synced commit."""
    if not (_ok_text(v["namespace"]) and _ok_text(v["location"]) and _ok_text(v["ref"])
            and isinstance(v["max_file_bytes"], int)):
        return "bad"
    for key, value in (("last_commit", ""), ("pending_commit", ""), ("pending_full", 1)):
        if key in v:
            v[key] = value
    return "ok"


def _valid_namespaced(v: dict[str, Any], dims: dict[str, int]) -> str:
    """A row that belongs to a namespace (a sync's record, a golden set, an evaluation):
    kept when it names a namespace that was recovered."""
    return "ok" if _ok_text(v.get("namespace")) and v["namespace"] in dims else "bad"


_VALIDATE = {"namespaces": _valid_namespace, "documents": _valid_document,
             "chunks": _valid_chunk, "sources": _valid_source, "syncs": _valid_namespaced,
             "golden_sets": _valid_namespaced, "evaluations": _valid_namespaced}


def _lighten(table: str, values: dict[str, Any]) -> None:
    if table == "documents":
        values["content"] = ""
    elif table == "chunks":
        values["text"], values["vector"] = "", b""


def _settle(dst: sqlite3.Connection, out: Salvage, known: set[tuple[str, str]]) -> None:
    """Drop what would leave a namespace or a document partial; record it in ``out``."""
    lost_ns = [r[0] for r in dst.execute(
        "SELECT namespace FROM documents WHERE namespace NOT IN (SELECT name FROM namespaces)"
        " UNION SELECT namespace FROM chunks WHERE namespace NOT IN"
        " (SELECT name FROM namespaces) ORDER BY 1")]
    lost: set[tuple[str, str]] = set()
    lost.update((r[0], r[1]) for r in dst.execute(
        "SELECT namespace, doc_id FROM documents WHERE namespace NOT IN"
        " (SELECT name FROM namespaces) UNION SELECT namespace, doc_id FROM chunks"
        " WHERE namespace NOT IN (SELECT name FROM namespaces)"))
    # Documents whose chunks are not exactly ordinals 0..chunk_count-1.
    lost.update((r[0], r[1]) for r in dst.execute(
        "SELECT d.namespace, d.doc_id FROM documents d LEFT JOIN"
        " (SELECT namespace, doc_id, count(*) AS n, count(DISTINCT ordinal) AS k,"
        "  min(ordinal) AS lo, max(ordinal) AS hi FROM chunks GROUP BY namespace, doc_id) c"
        " ON c.namespace = d.namespace AND c.doc_id = d.doc_id"
        " WHERE coalesce(c.n, 0) != d.chunk_count"
        " OR (c.n IS NOT NULL AND (c.k != c.n OR c.lo != 0 OR c.hi != d.chunk_count - 1))"))
    # Chunks whose document row was lost.
    lost.update((r[0], r[1]) for r in dst.execute(
        "SELECT DISTINCT namespace, doc_id FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM"
        " documents d WHERE d.namespace = c.namespace AND d.doc_id = c.doc_id)"))
    for ns, doc_id in lost:
        dst.execute("DELETE FROM documents WHERE namespace = ? AND doc_id = ?", (ns, doc_id))
        dst.execute("DELETE FROM chunks WHERE namespace = ? AND doc_id = ?", (ns, doc_id))
    dst.execute("DELETE FROM sources WHERE namespace NOT IN (SELECT name FROM namespaces)")
    kept = {(r[0], r[1]) for r in dst.execute("SELECT namespace, doc_id FROM documents")}
    # Documents the damaged catalog's indexes name, of which nothing readable is left.
    lost |= known - kept
    out.lost_namespaces = lost_ns
    out.lost_documents = sorted(lost)
    out.rows["documents"] = len(kept)
    out.rows["chunks"] = dst.execute("SELECT count(*) FROM chunks").fetchone()[0]


def _indexed_doc_ids(src: sqlite3.Connection) -> tuple[set[tuple[str, str]], bool]:
    """(namespace, doc_id) of every document the damaged catalog's indexes name (they are
    b-trees apart from the tables), and whether they could be read to the end."""
    ids: set[tuple[str, str]] = set()
    complete = True
    for table, index, where in (("documents", "sqlite_autoindex_documents_1", ""),
                                ("chunks", "chunks_by_doc", " WHERE state = 1")):
        sql = f"SELECT namespace, doc_id FROM {table} INDEXED BY {index}{where}"
        try:
            for r in src.execute(f"{sql} ORDER BY namespace, doc_id"):
                ids.add((r[0], r[1]))
            continue
        except sqlite3.DatabaseError:
            complete = False
        with suppress(sqlite3.DatabaseError):  # from the far end, up to the bad page
            for r in src.execute(f"{sql} ORDER BY namespace DESC, doc_id DESC"):
                ids.add((r[0], r[1]))
    return ids, complete


def _sequence(src: sqlite3.Connection) -> int | None:
    with suppress(sqlite3.DatabaseError):
        row = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        if row is not None and isinstance(row[0], int):
            return int(row[0])
    return None


def _columns(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> list[str]:
    """The columns of ``table`` to copy: the current schema's, less those a catalog written
    by an older release lacks and the current one fills by default (chunk symbols, ...).
    A table an older release did not have yet (``sources``) has none to copy."""
    info = list(dst.execute(f"PRAGMA table_info({table})"))
    old = {r[1] for r in src.execute(f"PRAGMA table_info({table})")}
    if not old and table not in ("namespaces", "documents", "chunks"):
        return []
    # (PRAGMA table_info: name, NOT NULL and default are fields 1, 3 and 4.)
    missing = [r[1] for r in info if r[1] not in old and r[3] and r[4] is None]
    if missing:
        raise sqlite3.DatabaseError(f"table {table} lacks columns {missing}")
    return [r[1] for r in info if r[1] in old]


def _open_damaged(path: Path) -> sqlite3.Connection:
    """A connection that reads a possibly damaged catalog and writes nothing to it."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA query_only = ON")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def _scratch_catalog() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(_SCHEMA)
    db.execute("BEGIN")
    return db


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reports -----------------------------------------------------------------------------------
def render_check(report: CheckReport) -> list[str]:
    """The lines `retriever check` prints."""
    lines = [f"data directory {report.data_dir}"]
    c = report.catalog
    if not c.exists and c.problems:
        lines += [f"catalog {c.path}: MISSING", f"  {c.problems[0]}"]
    elif not c.exists:
        lines.append(f"catalog {c.path}: none yet (created at start)")
    elif c.ok:
        lines.append(f"catalog {c.path}: ok (integrity_check)")
    else:
        lines.append(f"catalog {c.path}: DAMAGED")
        lines += [f"  {p}" for p in c.problems[:10]]
        if len(c.problems) > 10:
            lines.append(f"  ... {len(c.problems) - 10} more")
        if report.salvage is not None:
            lines += ["  what `retriever repair` would recover:",
                      *(f"  {line}" for line in _render_salvage(report.salvage))]
    for i in report.indexes:
        owner = f"namespace {i.namespace}" if i.namespace else "no namespace"
        if not i.exists:
            lines.append(f"index {i.backend}/{i.collection} ({owner}): not built yet (the "
                         "server builds it from the catalog at start)")
            continue
        if not i.checked:
            lines.append(f"index {i.backend}/{i.collection} ({owner}): kept by the engine, "
                         "not checked offline (the server reconciles it with the catalog "
                         "at start)")
            continue
        if not i.problems:
            lines.append(f"index {i.backend}/{i.collection} ({owner}): ok"
                         + ("" if i.namespace else " (of no namespace: dropped at start)"))
            continue
        lines.append(f"index {i.backend}/{i.collection} ({owner}): DAMAGED")
        lines += [f"  {p}" for p in i.problems]
        lines.append("  recoverable: a damaged file is moved aside by the server at start "
                     "and the index rebuilt from the catalog" if c.ok else
                     "  recoverable: `retriever repair` rebuilds every index with the catalog")
    lines += [f"index {b}/{coll} (a deleted namespace's): not dropped yet (the server drops "
              "it at start, or when its engine is back)" for b, coll in report.pending_drops]
    lines.append("healthy" if report.healthy else
                 "CATALOG MISSING: restore it (`retriever repair` has nothing to rebuild it "
                 "from)" if not c.exists and not c.ok else
                 "DAMAGED: run `retriever repair` with the server stopped" if not c.ok else
                 "DAMAGED index files only: starting the server repairs them")
    return lines


def render_repair(report: RepairReport) -> list[str]:
    """The lines `retriever repair` prints."""
    c = report.catalog
    if report.salvage is None:
        return [f"catalog {c.path}: {'ok' if c.exists else 'none yet'}, nothing to repair "
                "(damaged index files, if any, are rebuilt by the server at start)"]
    lines = [f"catalog {c.path} was damaged: {'; '.join(c.problems[:3])}",
             "rebuilt it from what could be read:",
             *(f"  {line}" for line in _render_salvage(report.salvage)),
             f"moved the damaged catalog and the index files to {report.quarantine}"
             + (f" (lost documents listed in {LOST_LIST})"
                if report.salvage.lost_documents else ""),
             "the server rebuilds the indexes from the new catalog at its next start"]
    return lines


def _render_salvage(s: Salvage) -> list[str]:
    if s.fatal is not None:
        return [f"nothing: {s.fatal}"]
    lines = ["rows: " + ", ".join(f"{t} {s.rows[t]}" for t in TABLES)]
    spans = {t: len(v) for t, v in s.unreadable.items() if v}
    if spans:
        lines.append("unreadable: " + ", ".join(f"{t} {n} rowid span(s)"
                                                for t, n in spans.items()))
    bad = {t: n for t, n in s.rejected.items() if n}
    if bad:
        lines.append("rows that read but failed their checks (dropped): " + ", ".join(
            f"{t} {n}" for t, n in bad.items()))
    if s.pending_dropped:
        lines.append(f"rows of uncommitted upserts dropped: {s.pending_dropped}")
    if s.lost_namespaces:
        lines.append("namespaces lost (their rows are unreadable): "
                     + ", ".join(s.lost_namespaces))
    if s.lost_documents:
        lines.append(f"documents lost ({len(s.lost_documents)}; dropped whole, index them "
                     "again):")
        lines += [f"  {ns}/{doc_id}" for ns, doc_id in s.lost_documents[:_SHOWN]]
        if len(s.lost_documents) > _SHOWN:
            lines.append(f"  ... {len(s.lost_documents) - _SHOWN} more (`retriever repair` "
                         f"writes them all to quarantine/<time>/{LOST_LIST})")
    else:
        lines.append("documents lost: none known")
    if not s.ids_complete:
        lines.append("some lost documents may be missing from this list: their ids were "
                     "unreadable too")
    return lines
