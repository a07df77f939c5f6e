"""Chroma: an embedded persistent directory by default, a Chroma server by URL.

Each service collection is one Chroma collection with its HNSW space set explicitly
(cosine, ip or l2) and no embedding function: vectors always come from the caller, so
Chroma never loads (or downloads) its default ONNX model.

What is stored, per record (id = ``str(int64 id)``):

* the embedding;
* metadata: ``rid`` (the id as an int, for ``allowed_ids``), ``doc_id``, ``path``,
  ``language``, ``kind`` and ``meta``, a list with one JSON ``[key, value]`` string per
  document metadata pair (user keys never meet ours, and ``$contains`` tests a pair);
* the document: the payload's path, so that a path *prefix* is an anchored, escaped
  ``$regex`` on the document (Chroma has no prefix operator on metadata, and its
  ``$gt``/``$lt`` take numbers only).

Chroma's ``upsert`` merges metadata into an existing record's, so every write names all of
these keys, ``None`` for the absent ones (which deletes them), and an empty document for a
vector without payload: a replaced record keeps nothing of its previous payload.

Collection names are mapped to ``rtv-<slug>-<sha256 prefix>`` (Chroma allows 3-512 of
``[A-Za-z0-9._-]``); the service's name, the dimension and the metric are kept in the
collection's metadata, which is how ``collections()`` finds the collections it made.

Chroma's HNSW is approximate and a filtered search over it may return fewer than k: then
the passing set is counted, and when it holds more than was returned it is scored exactly
with numpy (bounded by ``exact_scan_limit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from indexers._files import file_crc32
from indexers.base import (
    CollectionClosed,
    CollectionSpec,
    DimensionMismatch,
    EngineError,
    EngineUnavailable,
    LossReporter,
    SearchHits,
    StoreDamaged,
)
from indexers.payload import Filter, Payload

try:
    import chromadb
    import chromadb.errors
    import httpx  # chromadb's own HTTP client
    from chromadb.config import Settings as ChromaSettings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise EngineUnavailable(
        "the chroma backend needs chromadb: pip install 'retriever[chroma]'"
    ) from exc

__all__ = ["ChromaBackend", "ChromaIndex", "MatchesNothing", "chroma_name", "compile_filter"]

log = logging.getLogger(__name__)

_META_NAME = "retriever:name"  # the service's collection name
_META_DIM = "retriever:dimension"
_META_METRIC = "retriever:metric"
_META_FORMAT = "retriever:format"  # how records are laid out (this module's version of it)
_FORMAT = 1
_METRICS = ("cosine", "ip", "l2")

# Record metadata keys. Every write names all of them (None deletes): see the module doc.
_RID, _DOC_ID, _PATH, _LANGUAGE, _KIND, _META = "rid", "doc_id", "path", "language", "kind", "meta"

# Ids per `$in` of a where: Chroma's SQLite refuses a statement past 32766 variables, and
# an `$in` of 32000 already fails there. Larger allowed sets are scored exactly in slices.
_MAX_IN = 8192
_PAGE = 5000  # rows per paged get (ids(), exact scans)
_INT64 = (-(2**63), 2**63 - 1)


def chroma_name(name: str) -> str:
    """The Chroma collection name for a service collection name: deterministic, unique by
    its hash, readable by its slug, and within Chroma's rules (3-512 characters of
    [A-Za-z0-9._-], starting and ending alphanumeric, no '..')."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:40].strip("-_")
    return f"rtv-{slug}-{digest}" if slug else f"rtv-{digest}"


def _regex_literal(text: str) -> str:
    """``text`` as a regex (Rust `regex` syntax) matching exactly those characters:
    ASCII letters and digits as themselves, everything else as ``\\x{hex}`` (no character
    can then be read as syntax, whatever the two engines' ideas of escaping)."""
    return "".join(ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):x}}}"
                   for ch in text)


def _meta_entry(key: str, value: str) -> str:
    return json.dumps([key, value], ensure_ascii=False)


class MatchesNothing(Exception):
    """A filter no stored record can pass: one of its criteria holds only strings Chroma
    cannot store (lone surrogates are not UTF-8)."""


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def compile_filter(where: Filter | None, allowed: Sequence[int] | None = None
                   ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A Filter (and an id restriction of at most ``_MAX_IN`` ids) as Chroma's ``where``
    and ``where_document``; None for what does not restrict. Raises MatchesNothing for a
    filter that no storable payload passes."""
    clauses: list[dict[str, Any]] = []
    where_document = None
    if allowed is not None:
        clauses.append({_RID: {"$in": [int(i) for i in allowed]}})
    if where is not None and not where.empty:
        for field, values in ((_DOC_ID, where.doc_ids), (_LANGUAGE, where.languages),
                              (_KIND, where.kinds)):
            if values:
                kept = [v for v in dict.fromkeys(values) if _storable(v)]
                if not kept:
                    raise MatchesNothing(field)
                clauses.append({field: {"$in": kept}})
        for key, value in dict.fromkeys(where.metadata):
            if not (_storable(key) and _storable(value)):
                raise MatchesNothing(_META)
            clauses.append({_META: {"$contains": _meta_entry(key, value)}})
        if where.path_prefix:
            if not _storable(where.path_prefix):
                raise MatchesNothing(_PATH)
            # \A: the start of the text, whatever (?m) might mean to the engine.
            where_document = {"$regex": r"\A" + _regex_literal(where.path_prefix)}
    if not clauses:
        return None, where_document
    return (clauses[0] if len(clauses) == 1 else {"$and": clauses}), where_document


def _record(rid: int, payload: Payload | None) -> tuple[dict[str, Any], str]:
    """The metadata and document stored for one vector."""
    if payload is None:
        return {_RID: rid, _DOC_ID: None, _PATH: None, _LANGUAGE: None, _KIND: None,
                _META: None}, ""
    texts = (payload.doc_id, payload.path, payload.language, payload.kind,
             *(t for kv in payload.metadata for t in kv))
    if not all(_storable(t) for t in texts):
        raise ValueError(f"the payload of id {rid} holds a string that is not valid Unicode "
                         "(a lone surrogate): Chroma stores UTF-8 only")
    meta = [_meta_entry(k, v) for k, v in dict(payload.metadata).items()]
    return {_RID: rid, _DOC_ID: payload.doc_id, _PATH: payload.path,
            _LANGUAGE: payload.language, _KIND: payload.kind,
            _META: meta or None}, payload.path


def _empty() -> SearchHits:
    return SearchHits(ids=np.empty(0, dtype=np.int64), scores=np.empty(0, dtype=np.float32))


def _as_ids(ids: Iterable[int]) -> np.ndarray:
    try:
        return np.fromiter((int(i) for i in ids), dtype=np.int64)
    except OverflowError:
        raise ValueError(f"ids must be int64 (in [{_INT64[0]}, {_INT64[1]}])") from None


class ChromaIndex:
    """One collection. Writes are serialised by a lock (so ``delete`` can count what it
    removes, and ``ids()`` pages over a collection no writer of this process changes);
    searches run beside them and see a write's before or after (Chroma applies each call
    atomically)."""

    backend = "chroma"
    max_k = 2**31 - 1

    def __init__(self, spec: CollectionSpec, collection: Any, owner: ChromaBackend) -> None:
        self.spec = spec
        self._col = collection
        self._owner = owner
        self._lock = threading.RLock()
        self._closed = False

    # -- helpers ---------------------------------------------------------------------------
    @contextmanager
    def _call(self) -> Iterator[Any]:
        """The Chroma collection, with engine errors mapped onto base.py's."""
        if self._closed:
            raise CollectionClosed(f"collection {self.spec.name!r} is closed")
        try:
            yield self._col
        except chromadb.errors.NotFoundError as exc:
            if self._closed:
                raise CollectionClosed(f"collection {self.spec.name!r} is closed") from exc
            raise self._owner.losses.lost(self.spec.name, f"collection {self.spec.name!r} "
                                          f"no longer exists in Chroma ({exc})") from exc
        except (httpx.TransportError, ConnectionError) as exc:
            raise EngineUnavailable(f"Chroma at {self._owner.url} did not answer: "
                                    f"{exc}") from exc
        except BaseException as exc:
            damage = self._owner.damage(exc)
            if damage is None:
                raise
            raise damage from exc

    def _check_width(self, arr: np.ndarray, what: str) -> np.ndarray:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d {what}, "
                f"got shape {arr.shape}")
        return arr

    def _to_scores(self, distances: np.ndarray) -> np.ndarray:
        # hnswlib: cosine d = 1 - cos, ip d = 1 - dot, l2 d = squared distance.
        if self.spec.metric == "l2":
            return (0.0 - distances).astype(np.float32)  # 0 - d: no -0.0 for an exact hit
        return (1.0 - distances).astype(np.float32)

    # -- VectorIndex -----------------------------------------------------------------------
    def upsert(self, ids: Sequence[int], vectors: np.ndarray,
               payloads: Sequence[Payload] | None = None) -> None:
        id_arr = _as_ids(ids)
        vecs = self._check_width(vectors, "vectors")
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids for {len(vecs)} vectors")
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("duplicate ids in one upsert")
        if payloads is not None and len(payloads) != len(id_arr):
            raise ValueError(f"{len(payloads)} payloads for {len(id_arr)} ids")
        if not len(id_arr):
            with self._call():
                return
        records = [_record(int(i), payloads[n] if payloads is not None else None)
                   for n, i in enumerate(id_arr)]
        batch = self._owner.max_batch
        with self._lock, self._call() as col:
            # Chroma caps a call's size; a larger upsert is applied in slices. Ids already
            # present are deleted and added again: Chroma's own upsert of an existing id
            # updates its HNSW node in place, ~20x slower (1,000 replacements: 15.1 s
            # against 0.79 s at 5k; bench/results/engines.md). A search of this collection
            # between the two calls may miss a replaced id; the service never replaces an
            # id in place (a changed chunk gets a new vector id), so its searches cannot.
            for lo in range(0, len(id_arr), batch):
                hi = lo + batch
                keys = [str(int(i)) for i in id_arr[lo:hi]]
                present = col.get(ids=keys, include=[])["ids"]
                if present:
                    col.delete(ids=present)
                # (add takes no None: a key left out is what upsert's None leaves.)
                col.add(ids=keys, embeddings=vecs[lo:hi],
                        metadatas=[{k: v for k, v in m.items() if v is not None}
                                   for m, _ in records[lo:hi]],
                        documents=[d for _, d in records[lo:hi]])

    def delete(self, ids: Iterable[int]) -> int:
        id_arr = np.unique(_as_ids(ids))
        if not len(id_arr):
            return 0
        removed = 0
        with self._lock, self._call() as col:
            for lo in range(0, len(id_arr), _MAX_IN):
                keys = [str(int(i)) for i in id_arr[lo:lo + _MAX_IN]]
                # Chroma's delete counts unknown ids too: count what exists first.
                present = col.get(ids=keys, include=[])["ids"]
                if present:
                    col.delete(ids=present)
                    removed += len(present)
        return removed

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
        where: Filter | None = None,
    ) -> list[SearchHits]:
        queries = self._check_width(vectors, "queries")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        allowed: list[int] | None = None
        if allowed_ids is not None:
            allowed = np.unique(_as_ids(allowed_ids)).tolist()
            if not allowed:
                with self._call():
                    return [_empty() for _ in range(len(queries))]
        if not len(queries):
            with self._call():
                return []
        try:
            if allowed is not None and len(allowed) > _MAX_IN:
                # Too many ids for one where: score the allowed set exactly, in slices.
                return self._exact(queries, k, where, allowed)
            where_, where_doc = compile_filter(where, allowed)
        except MatchesNothing:
            with self._call():
                return [_empty() for _ in range(len(queries))]
        with self._call() as col:
            result = col.query(query_embeddings=queries, n_results=k, where=where_,
                               where_document=where_doc, include=["distances"])
        out: list[SearchHits] = []
        short: list[int] = []
        for row, (keys, dists) in enumerate(zip(result["ids"], result["distances"] or [],
                                                strict=True)):
            out.append(SearchHits(ids=np.array([int(s) for s in keys], dtype=np.int64),
                                  scores=self._to_scores(np.asarray(dists, np.float64))))
            if len(keys) < k:
                short.append(row)
        if short:
            self._complete(queries, k, where_, where_doc, out, short)
        return out

    def _complete(self, queries: np.ndarray, k: int, where_: dict[str, Any] | None,
                  where_doc: dict[str, Any] | None, out: list[SearchHits],
                  short: list[int]) -> None:
        """Rows that got fewer than k hits: when more than that pass, score the passing
        set exactly (HNSW's filtered search can miss candidates; a small collection or
        filter legitimately has fewer)."""
        limit = self._owner.exact_scan_limit
        with self._call() as col:
            if where_ is None and where_doc is None:
                passing = col.count()
                keys = None
            else:
                keys = col.get(where=where_, where_document=where_doc, include=[],
                               limit=limit + 1)["ids"]
                passing = len(keys)
        have = min(len(out[r].ids) for r in short)
        if passing <= have:
            return  # the engine returned every candidate there is
        if passing > limit:
            log.warning("chroma collection %r: a search got %d of %d hits and %d+ rows pass "
                        "its filter, more than exact_scan_limit=%d: returning what HNSW "
                        "found", self.spec.name, have, k, passing, limit)
            return
        exact = self._exact(queries[short], k, None, None,
                            keys=keys, where_=where_, where_doc=where_doc)
        for row, hits in zip(short, exact, strict=True):
            out[row] = hits

    def _exact(self, queries: np.ndarray, k: int, where: Filter | None,
               allowed: list[int] | None, *, keys: list[str] | None = None,
               where_: dict[str, Any] | None = None,
               where_doc: dict[str, Any] | None = None) -> list[SearchHits]:
        """Exact top-k over the rows passing the filter (and the ids in ``allowed``, or in
        ``keys``), fetched in slices and merged, so memory stays bounded."""
        if where is not None:
            where_, where_doc = compile_filter(where)
        best_ids = [np.empty(0, np.int64) for _ in range(len(queries))]
        best_scores = [np.empty(0, np.float32) for _ in range(len(queries))]
        qn = queries
        if self.spec.metric == "cosine":  # what Chroma's cosine space computes
            qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)

        def slices() -> Iterator[dict[str, Any]]:
            with self._call() as col:
                if allowed is not None:
                    for lo in range(0, len(allowed), _MAX_IN):
                        part = {_RID: {"$in": allowed[lo:lo + _MAX_IN]}}
                        w = part if where_ is None else {"$and": [part, where_]}
                        yield col.get(where=w, where_document=where_doc,
                                      include=["embeddings"])
                elif keys is not None:
                    for lo in range(0, len(keys), _PAGE):
                        yield col.get(ids=keys[lo:lo + _PAGE], include=["embeddings"])
                else:
                    offset = 0
                    while True:
                        got = col.get(where=where_, where_document=where_doc,
                                      include=["embeddings"], limit=_PAGE, offset=offset)
                        yield got
                        if len(got["ids"]) < _PAGE:
                            break
                        offset += _PAGE

        for got in slices():
            if not got["ids"]:
                continue
            ids = np.array([int(s) for s in got["ids"]], dtype=np.int64)
            data = np.asarray(got["embeddings"], dtype=np.float32)
            if self.spec.metric == "l2":
                scores = -(((qn[:, None, :] - data[None, :, :]) ** 2).sum(axis=2))
            else:
                if self.spec.metric == "cosine":
                    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True),
                                             1e-30)
                scores = qn @ data.T
            for row in range(len(queries)):
                all_ids = np.concatenate([best_ids[row], ids])
                all_scores = np.concatenate([best_scores[row],
                                             scores[row].astype(np.float32)])
                order = np.argsort(-all_scores, kind="stable")[:k]
                best_ids[row], best_scores[row] = all_ids[order], all_scores[order]
        return [SearchHits(ids=i.astype(np.int64), scores=s.astype(np.float32))
                for i, s in zip(best_ids, best_scores, strict=True)]

    def ids(self) -> np.ndarray:
        parts: list[np.ndarray] = []
        with self._lock, self._call() as col:
            offset = 0
            while True:
                page = col.get(include=[], limit=_PAGE, offset=offset)["ids"]
                parts.append(np.array([int(s) for s in page], dtype=np.int64))
                if len(page) < _PAGE:
                    break
                offset += _PAGE
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def count(self) -> int:
        with self._call() as col:
            return int(col.count())

    def flush(self) -> None:
        """Nothing to do: Chroma has made each write durable (its write-ahead log in
        SQLite) before the call returned; its HNSW files catch up from that log."""
        with self._call():
            return

    def close(self) -> None:
        with self._lock:
            self._closed = True


_CHECKSUMS = "retriever-checksums.json"


def _segment_files(root: Path) -> list[Path]:
    """The embedded Chroma's HNSW segment files (its sqlite file checks itself)."""
    return sorted(p for d in root.iterdir() if d.is_dir() and not d.is_symlink()
                  for p in d.rglob("*") if p.is_file() and not p.is_symlink())


def _record_checksums(root: Path) -> None:
    """Record the size and CRC-32 of every segment file (after a clean stop). A record
    that cannot be written only means the next open checks nothing: logged."""
    tmp = root / (_CHECKSUMS + ".tmp")
    try:
        out = {str(p.relative_to(root)): [p.stat().st_size, file_crc32(p)]
               for p in _segment_files(root)}
        tmp.write_text(json.dumps(out, sort_keys=True), encoding="utf-8")
        tmp.replace(root / _CHECKSUMS)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("could not record the checksums of the embedded Chroma in %s (%s): "
                    "damage to its files will not be found at the next start", root, exc)


def _check_checksums(root: Path) -> None:
    """StoreDamaged when a segment file recorded at the last clean stop is missing or
    differs. The record is then dropped: the engine writes its files while it runs, so only
    a record made by a clean stop says what they must hold (after a crash there is none)."""
    path = root / _CHECKSUMS
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        path.unlink(missing_ok=True)
        log.warning("the checksum record of the embedded Chroma in %s is unreadable (%s): "
                    "its files are not checked this time", root, exc)
        return
    path.unlink()
    for rel, (size, crc) in sorted(recorded.items()):
        f = root / rel
        try:
            same = f.is_file() and f.stat().st_size == size and file_crc32(f) == crc
        except OSError:
            same = False
        if not same:
            raise StoreDamaged(f"the embedded Chroma's file {rel} in {root} changed since it "
                               "was last stopped (missing, cut short or overwritten)")


def _unused(path: str) -> bool:
    """Whether no client in this process uses the embedded Chroma of ``path`` any more."""
    from chromadb.api.shared_system_client import SharedSystemClient as Shared

    with Shared._refcount_lock:  # noqa: SLF001 - see _forget_failed_system
        return Shared._identifier_to_refcount.get(path, 0) <= 0  # noqa: SLF001


def _forget_failed_system(path: str) -> None:
    """chromadb caches one engine per directory for the process, even one whose start
    failed (a damaged chroma.sqlite3): every later client of that directory then fails too,
    after its files were moved aside. Drop it when no client holds it."""
    from chromadb.api.shared_system_client import SharedSystemClient as Shared

    with Shared._refcount_lock:  # noqa: SLF001 - chromadb offers no per-directory reset
        if Shared._identifier_to_refcount.get(path, 0) > 0:  # noqa: SLF001
            return
        system = Shared._identifier_to_system.pop(path, None)  # noqa: SLF001
    if system is not None:
        with contextlib.suppress(Exception):
            system.stop()


class ChromaBackend:
    """Collections in an embedded Chroma under ``root`` (``chromadb.PersistentClient``), or
    in a Chroma server when ``url`` is given (``chromadb.HttpClient``).

    Options: ``url`` (http[s]://host[:port], port 8000 when absent); ``token`` (sent as
    ``Authorization: Bearer``) and ``headers`` for a server behind auth; ``tenant`` and
    ``database``; ``timeout_s`` (connect timeout, and the wait for the first answer) and
    ``request_timeout_s`` (each later request to a server); the HNSW parameters of
    collections it creates (``ef_construction``, ``ef_search``, ``max_neighbors``);
    ``exact_scan_limit`` (the most rows a filtered search scores exactly when HNSW returns
    too few)."""

    name = "chroma"

    def __init__(self, root: Path, url: str = "", *, token: str = "",
                 headers: dict[str, str] | None = None, tenant: str = "",
                 database: str = "", timeout_s: float = 10.0,
                 request_timeout_s: float = 120.0, ef_construction: int = 200,
                 ef_search: int = 200, max_neighbors: int = 32,
                 exact_scan_limit: int = 100_000) -> None:
        self._root = Path(root)
        self.url = url.rstrip("/")
        self._token = token
        self._headers = dict(headers or {})
        self._tenant = tenant or chromadb.DEFAULT_TENANT
        self._database = database or chromadb.DEFAULT_DATABASE
        self._timeout_s = timeout_s
        self._request_timeout_s = request_timeout_s
        self._hnsw = {"ef_construction": ef_construction, "ef_search": ef_search,
                      "max_neighbors": max_neighbors}
        self.exact_scan_limit = exact_scan_limit
        self._client: Any = None
        self._max_batch = 0
        self._open: dict[str, ChromaIndex] = {}
        self._lock = threading.RLock()
        self.losses = LossReporter()

    @property
    def local_store(self) -> Path | None:
        """The embedded engine's directory (derived data only: the service can move it
        aside when damaged and refill it); None for a server."""
        return None if self.url else self._root

    # -- connection ------------------------------------------------------------------------
    def _settings(self) -> ChromaSettings:
        return ChromaSettings(anonymized_telemetry=False)

    def _connect(self) -> Any:
        """The client, made at first use (constructors stay cheap). Call under ``_lock``."""
        if self._client is not None:
            return self._client
        if not self.url:
            try:
                self._root.mkdir(parents=True, exist_ok=True)
                _check_checksums(self._root)
                self._client = chromadb.PersistentClient(
                    path=str(self._root), settings=self._settings(),
                    tenant=self._tenant, database=self._database)
            except StoreDamaged:
                raise
            except BaseException as exc:  # a Rust panic (PanicException) is no Exception
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                _forget_failed_system(str(self._root))
                raise StoreDamaged(f"cannot open the embedded Chroma in {self._root}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        else:
            self._client = self._connect_http()
        try:
            self._max_batch = int(self._client.get_max_batch_size())
        except (httpx.TransportError, ConnectionError) as exc:
            raise EngineUnavailable(f"Chroma at {self.url} did not answer: {exc}") from exc
        return self._client

    def _connect_http(self) -> Any:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"chroma url must be http(s)://host[:port], got {self.url!r}")
        ssl = parts.scheme == "https"
        port = parts.port or 8000
        headers = dict(self._headers)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        # chromadb's HTTP session has no timeout at all: check the server answers first, so
        # an unreachable URL fails in timeout_s instead of hanging the service's start.
        base = f"{parts.scheme}://{parts.hostname}:{port}"
        try:
            httpx.get(f"{base}/api/v2/heartbeat", headers=headers,
                      timeout=self._timeout_s).raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"cannot reach a Chroma server at {self.url}: "
                                    f"{exc}") from exc
        try:
            self._ensure_database(parts.hostname, port, ssl, headers)
            client = chromadb.HttpClient(host=parts.hostname, port=port, ssl=ssl,
                                         headers=headers, settings=self._settings(),
                                         tenant=self._tenant, database=self._database)
        except (httpx.HTTPError, ConnectionError) as exc:
            raise EngineUnavailable(f"cannot reach a Chroma server at {self.url}: "
                                    f"{exc}") from exc
        except chromadb.errors.ChromaError as exc:
            raise EngineUnavailable(f"the Chroma server at {self.url} refused the client "
                                    f"(tenant {self._tenant!r}, database "
                                    f"{self._database!r}): {exc}") from exc
        session = getattr(getattr(client, "_server", None), "_session", None)
        if isinstance(session, httpx.Client):  # bound every later request too
            session.timeout = httpx.Timeout(self._request_timeout_s,
                                            connect=self._timeout_s)
        return client

    def _ensure_database(self, host: str, port: int, ssl: bool,
                         headers: dict[str, str]) -> None:
        """Create this backend's tenant and database on the server when missing (the
        defaults always exist)."""
        if (self._tenant, self._database) == (chromadb.DEFAULT_TENANT,
                                              chromadb.DEFAULT_DATABASE):
            return
        admin = chromadb.AdminClient(ChromaSettings(
            chroma_api_impl="chromadb.api.fastapi.FastAPI", chroma_server_host=host,
            chroma_server_http_port=port, chroma_server_ssl_enabled=ssl,
            chroma_server_headers=headers or None, anonymized_telemetry=False))
        try:
            admin.get_tenant(self._tenant)
        except chromadb.errors.ChromaError:
            admin.create_tenant(self._tenant)
        try:
            admin.get_database(self._database, tenant=self._tenant)
        except chromadb.errors.ChromaError:
            admin.create_database(self._database, tenant=self._tenant)

    @property
    def max_batch(self) -> int:
        return self._max_batch or 1000

    def damage(self, exc: BaseException) -> StoreDamaged | None:
        """The error an engine failure of the embedded Chroma stands for when it says its
        files cannot be read (an InternalError, a Rust panic); None for anything else."""
        if self.url or isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            return None
        if not (isinstance(exc, chromadb.errors.InternalError)
                or type(exc).__name__ == "PanicException"):
            return None
        return StoreDamaged(
            f"the embedded Chroma in {self._root} cannot read its files ({exc}): restart the "
            "server, which moves them aside and rebuilds the namespaces on it from the "
            "catalog")

    @contextmanager
    def _engine(self) -> Iterator[Any]:
        with self._lock:
            client = self._connect()
            try:
                yield client
            except (httpx.TransportError, ConnectionError) as exc:
                raise EngineUnavailable(f"Chroma at {self.url or self._root} did not "
                                        f"answer: {exc}") from exc
            except BaseException as exc:
                damage = self.damage(exc)
                if damage is None:
                    raise
                raise damage from exc

    # -- Backend ---------------------------------------------------------------------------
    def open(self, spec: CollectionSpec) -> ChromaIndex:
        if spec.metric not in _METRICS:
            raise ValueError(f"unknown metric {spec.metric!r}; one of {', '.join(_METRICS)}")
        if spec.dimension <= 0:
            raise ValueError(f"dimension must be positive, got {spec.dimension}")
        with self._engine() as client:
            existing = self._open.get(spec.name)
            if existing is not None and not existing._closed:
                if existing.spec != spec:
                    raise DimensionMismatch(
                        f"collection {spec.name!r} is open as {existing.spec}, asked {spec}")
                return existing
            cname = chroma_name(spec.name)
            col = client.get_or_create_collection(
                cname,
                configuration={"hnsw": {"space": spec.metric, **self._hnsw}},
                metadata={_META_NAME: spec.name, _META_DIM: spec.dimension,
                          _META_METRIC: spec.metric, _META_FORMAT: _FORMAT},
                embedding_function=None,
            )
            meta = col.metadata or {}
            if meta.get(_META_NAME) != spec.name:
                raise EngineError(f"Chroma collection {cname!r} exists but was not made by "
                                  f"this backend for {spec.name!r} (metadata {meta})")
            space = ((col.configuration_json or {}).get("hnsw") or {}).get("space")
            stored = (meta.get(_META_DIM), meta.get(_META_METRIC))
            if stored != (spec.dimension, spec.metric) or space not in (None, spec.metric):
                raise DimensionMismatch(
                    f"collection {spec.name!r} holds {stored[0]}-d {stored[1]} vectors "
                    f"(HNSW space {space}), asked for {spec.dimension}-d {spec.metric}")
            index = ChromaIndex(spec, col, self)
            self._open[spec.name] = index
            return index

    def drop(self, name: str) -> None:
        with self._lock:
            index = self._open.pop(name, None)
            if index is not None:
                with index._lock:
                    index._closed = True
            if not self.url and not (self._root / "chroma.sqlite3").exists():
                return  # nothing was ever stored here
            with self._engine() as client:
                cname = chroma_name(name)
                segments = self._segment_dirs(cname)
                try:
                    client.delete_collection(cname)
                except chromadb.errors.NotFoundError:
                    return
                # Chroma 1.x leaves a deleted collection's HNSW directories on disk (its
                # garbage collector is not part of the embedded engine, chroma #5259).
                for directory in segments:
                    shutil.rmtree(directory, ignore_errors=True)

    def _segment_dirs(self, cname: str) -> list[Path]:
        """The embedded engine's directories of collection ``cname`` (named by segment id),
        read from its SQLite catalog; empty for a server or an unknown schema."""
        db = self._root / "chroma.sqlite3"
        if self.url or not db.exists():
            return []
        try:
            con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                rows = con.execute(
                    "SELECT s.id FROM segments s JOIN collections c ON s.collection = c.id "
                    "WHERE c.name = ?", (cname,)).fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            log.warning("chroma: cannot list the segments of %s (%s); its files stay", cname,
                        exc)
            return []
        dirs = []
        for (segment_id,) in rows:
            try:
                uuid.UUID(str(segment_id))
            except ValueError:
                continue
            if (self._root / str(segment_id)).is_dir():
                dirs.append(self._root / str(segment_id))
        return dirs

    def collections(self) -> list[str]:
        if not self.url and not (self._root / "chroma.sqlite3").exists():
            return []
        names: list[str] = []
        with self._engine() as client:
            offset = 0
            while True:
                page = client.list_collections(limit=100, offset=offset)
                for col in page:
                    meta = col.metadata or {}
                    name = meta.get(_META_NAME)
                    if isinstance(name, str) and col.name == chroma_name(name):
                        names.append(name)
                if len(page) < 100:
                    break
                offset += 100
        return sorted(names)

    def close(self) -> None:
        """Close every open collection and release the client (the embedded engine stops
        when no other client in this process uses its directory). A later call reconnects."""
        with self._lock:
            for index in self._open.values():
                index.close()
            self._open.clear()
            client, self._client = self._client, None
        if client is not None:
            close = getattr(client, "close", None)
            if close is not None:
                close()
            if not self.url and _unused(str(self._root)):
                # Stopped cleanly: the files are final until the next open, which checks
                # them against this (hnswlib's files carry no checksum of their own, and a
                # damaged one crashes the process on a search).
                _record_checksums(self._root)
