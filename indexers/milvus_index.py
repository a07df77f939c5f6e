"""Milvus: milvus-lite in a local directory by default, a Milvus server or cluster by URI.

Collections. The service's names ("<namespace>.g<generation>") may hold characters Milvus
refuses, so each maps to ``<prefix>_<slug>_<hash>``: the slug (letters and digits of the
name, for people listing collections) and the first 16 hex digits of its SHA-256 (so two
names never meet). The service's name, dimension and metric are kept in the collection's
properties; ``collections()`` lists only collections that carry them under this prefix.

Schema. ``id`` INT64 primary key, ``vector`` FLOAT_VECTOR, and the payload: ``has_payload``
BOOL (False for vectors stored without one, which then match only an empty filter),
``doc_id`` and ``path`` VARCHAR of up to 65,535 UTF-8 bytes, ``language`` and ``kind`` of up
to 1,024, ``metadata`` JSON (up to 65,536 bytes as JSON). A metadata key is stored as it is
when it is plain (letters, digits, ``_ - . : / @ +`` and spaces); any other key (empty, or
holding quotes, brackets, backslashes or control characters, which a Milvus 2.3 server
cannot address in a JSON path) is stored as ``~`` + the hex of its UTF-8 bytes, so every key
can be filtered on exactly.

Filters become Milvus boolean expressions with every string literal escaped. A path prefix
is a range, ``path >= "p" and path < "p'"`` (p' is p with its last character incremented):
exact for every character, where ``like "p%"`` would treat ``%`` and ``_`` as wildcards
(milvus-lite has no LIKE escape; a 2.3 server accepts only plain prefix patterns).

Index. "auto" builds HNSW (M=16, efConstruction=200) on a server and on milvus-lite (which
builds it with FAISS when a segment is sealed); a server that refuses HNSW (e.g. a managed
one) gets AUTOINDEX. Another type can be named (FLAT, IVF_FLAT, ...). Searches ask for
``ef = max(ef_search, k)``. Under a filter that passes a small share of a collection,
HNSW comes back with fewer than k hits (milvus-lite, and a Milvus 2.3 server, at ~0.1%,
whatever the ef): when a search returns fewer than k, the passing set is counted; up to
``exact_scan_limit`` (16,384) passing vectors are fetched and scored exactly here, a larger
set is searched again much wider and, if that is still short, scanned page by page.

Scores: COSINE and IP come back as similarities; Milvus reports L2 as a squared distance,
returned negated, as base.py asks.

Consistency. Searches run at Milvus's Session level (no wait), except the first search after
a write of this process, which runs Strong (waits until the server has applied it: about a
time tick, 200 ms on a default server): a search that starts after an upsert or delete
returned sees it. ``count()`` and ``ids()`` are always Strong. ``consistency="strong"``
makes every search Strong, so that writes of other replicas are seen at once too.
milvus-lite applies writes at once; the levels cost nothing there.

Durability: Milvus logs every write before it acknowledges it; ``flush()`` seals the
growing segments (when something was written since the last flush) so that the server
indexes them. ``close()`` flushes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from indexers.base import (
    CollectionClosed,
    CollectionSpec,
    DimensionMismatch,
    EngineError,
    EngineUnavailable,
    LossReporter,
    SearchHits,
    StoreInUse,
)
from indexers.payload import Filter, Payload

_HINT = "the milvus backend needs pymilvus and milvus-lite: pip install 'retriever[milvus]'"

try:
    import grpc
    from pymilvus import DataType, MilvusClient
    from pymilvus.client.types import Status
    from pymilvus.exceptions import (
        CollectionNotExistException,
        ConnectionConfigException,
        ConnectionNotExistException,
        ErrorCode,
        MilvusException,
        MilvusUnavailableException,
    )
except ImportError as exc:  # pragma: no cover - an optional dependency
    raise EngineUnavailable(_HINT) from exc

log = logging.getLogger(__name__)

# -- limits of the schema and of one request ---------------------------------------------------
MAX_ID_BYTES = 65_535  # doc_id and path, UTF-8 bytes (Milvus's largest VARCHAR)
MAX_TAG_BYTES = 1_024  # language and kind
MAX_METADATA_JSON_BYTES = 65_536  # Milvus's default limit of a JSON value
MAX_TOP_K = 16_384  # Milvus answers at most this many hits per query
IDS_PER_EXPRESSION = 8_192  # allowed_ids / delete ids per expression (~170 KB of text)
REQUEST_BYTES = 16 << 20  # one upsert request at most (a gRPC message; servers take 64 MB+)
ITERATOR_BATCH = 16_384  # rows per page of ids() and of an exact scan

_METRICS: dict[str, str] = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}
_PROP_NAME, _PROP_DIM, _PROP_METRIC = "retriever.name", "retriever.dimension", "retriever.metric"
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PLAIN_KEY = re.compile(r"[\w\-.:/@+ ]+")
_SCHEMES = ("http://", "https://", "tcp://", "unix:")

# Milvus raises these when it cannot be reached or refuses the connection's credentials.
_UNREACHABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
})

_COLLECTION_NOT_FOUND = ErrorCode.COLLECTION_NOT_FOUND  # 100, merr's code on 2.3+ servers
_COLLECTION_NOT_LOADED = 101  # merr.ErrCollectionNotLoaded

T = TypeVar("T")


# -- names ---------------------------------------------------------------------------------------
def milvus_name(name: str, prefix: str = "retriever") -> str:
    """The Milvus collection name that stands for the service's collection ``name``."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:48]
    return f"{prefix}_{slug}_{digest}" if slug else f"{prefix}_{digest}"


# -- expressions -------------------------------------------------------------------------------
def quote(value: str) -> str:
    """A Milvus string literal holding exactly ``value`` (both milvus-lite and a server parse
    these escapes; every other character, control characters included, may stand as is)."""
    return '"' + (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                  .replace("\r", "\\r")) + '"'


def metadata_key(key: str) -> str:
    """The JSON key a metadata key is stored under (see the module docstring)."""
    if _PLAIN_KEY.fullmatch(key):
        return key
    return "~" + key.encode("utf-8").hex()


def prefix_successor(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix`` (by code
    point, which is also UTF-8 byte order), or None when there is none."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code <= 0x10FFFF:
            if 0xD800 <= code <= 0xDFFF:  # surrogates are not characters of a UTF-8 string
                code = 0xE000
            return "".join(chars) + chr(code)
    return None


def _in(field: str, values: Iterable[str]) -> str:
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def filter_expression(flt: Filter) -> str:
    """The Milvus boolean expression of ``flt`` (``Filter.matches``); "" for an empty one."""
    if flt.empty:
        return ""
    parts = ["has_payload == true"]
    if flt.doc_ids:
        parts.append(_in("doc_id", flt.doc_ids))
    if flt.path_prefix:
        upper = prefix_successor(flt.path_prefix)
        parts.append(f"path >= {quote(flt.path_prefix)}")
        if upper is not None:
            parts.append(f"path < {quote(upper)}")
    if flt.languages:
        parts.append(_in("language", flt.languages))
    if flt.kinds:
        parts.append(_in("kind", flt.kinds))
    for key, value in flt.metadata:
        # A missing key compares as null: it never equals a string, "" included.
        parts.append(f"metadata[{quote(metadata_key(key))}] == {quote(value)}")
    return " and ".join(parts)


def ids_expression(ids: Iterable[int]) -> str:
    return f"id in [{', '.join(str(int(i)) for i in ids)}]"


def _and(*exprs: str) -> str:
    present = [e for e in exprs if e]
    return " and ".join(f"({e})" for e in present) if len(present) > 1 else "".join(present)


# -- errors ---------------------------------------------------------------------------------------
def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, MilvusUnavailableException | ConnectionNotExistException):
        return True
    if isinstance(exc, grpc.RpcError):
        return exc.code() in _UNREACHABLE_CODES
    if isinstance(exc, MilvusException):
        code = exc.code
        return code in _UNREACHABLE_CODES or code == Status.CONNECT_FAILED
    return False


_NO_COLLECTION = re.compile(r"collection\b.*\b(does not exist|not exist|not found)|"
                            r"can'?t find collection", re.IGNORECASE)


def _collection_missing(exc: BaseException) -> bool:
    """Milvus says the collection does not exist (code 100 from 2.3 servers and
    milvus-lite; the message for older ones)."""
    if isinstance(exc, CollectionNotExistException):
        return True
    if isinstance(exc, MilvusException):
        return exc.code == _COLLECTION_NOT_FOUND or bool(_NO_COLLECTION.search(str(exc.message)))
    return False


def _not_loaded(exc: BaseException) -> bool:
    """Milvus has the collection but not in memory (code 101): a server restarted, before
    it loaded the collection again, or one that never does."""
    return isinstance(exc, MilvusException) and (
        exc.code == _COLLECTION_NOT_LOADED or "not loaded" in str(exc.message).lower())


@contextmanager
def _engine_errors(where: str, collection: str = "",
                   losses: LossReporter | None = None) -> Iterator[None]:
    """Milvus's exceptions as the engine errors of base.py. ``collection``: the service's
    name of the collection an index works on, whose disappearance is CollectionLost (raised
    through ``losses``)."""
    try:
        yield
    except (EngineError, ValueError):
        raise
    except (MilvusException, grpc.RpcError) as exc:
        if _unreachable(exc):
            raise EngineUnavailable(f"Milvus at {where} cannot be reached or refused the "
                                    f"connection: {exc}") from exc
        if _not_loaded(exc):
            raise EngineUnavailable(f"Milvus at {where} has not loaded the collection "
                                    f"(yet): {exc}") from exc
        if collection and losses is not None and _collection_missing(exc):
            raise losses.lost(collection, f"collection {collection!r} no longer exists in "
                              f"Milvus at {where} ({exc})") from exc
        raise EngineError(f"Milvus at {where}: {exc}") from exc


class _QuietIteratorWarning(logging.Filter):
    """pymilvus's query iterator warns on every use against servers that do not return a
    session timestamp (milvus-lite, Milvus 2.3), then uses the client's time, which is what
    a Strong read wants anyway: the warning says nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


_iterator_filter_installed = False


def _quiet_iterator() -> None:
    global _iterator_filter_installed
    if not _iterator_filter_installed:
        logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(
            _QuietIteratorWarning())
        _iterator_filter_installed = True


# -- milvus-lite servers: one per data directory in this process, shared by backends ------------
_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds milvus-lite's lock on the files in ``path`` (its
    ``LOCK`` file, an exclusive flock while a server of it runs)."""
    import fcntl
    import os

    try:
        fd = os.open(path / "LOCK", os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _lite_acquire(path: Path) -> None:
    with _lite_lock:
        _lite_users[str(path)] = _lite_users.get(str(path), 0) + 1


def _lite_release(path: Path) -> None:
    """Stop the in-process milvus-lite server of ``path`` when its last backend closes, so
    that its files are closed and another process may open them."""
    with _lite_lock:
        left = _lite_users.get(str(path), 0) - 1
        if left > 0:
            _lite_users[str(path)] = left
            return
        _lite_users.pop(str(path), None)
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:  # pragma: no cover - it was imported to start the server
            return
        server_manager_instance.release_server(str(path))


# -- one collection ----------------------------------------------------------------------------
class MilvusIndex:
    backend = "milvus"
    max_k = MAX_TOP_K

    def __init__(self, owner: MilvusBackend, spec: CollectionSpec, collection: str,
                 index_type: str) -> None:
        self.spec = spec
        self.collection = collection  # the Milvus name
        self.index_type = index_type  # the vector index Milvus built
        self._owner = owner
        self._metric = _METRICS[spec.metric]
        self._write_lock = threading.Lock()  # one write at a time: delete counts stay exact
        self._flush_lock = threading.Lock()  # one flush at a time
        self._state = threading.Lock()
        self._closed = False
        self._dirty = False
        # Writes done, and the last of them a Strong read has waited for (see the docstring).
        self._writes = 0
        self._seen = 0

    # -- plumbing --------------------------------------------------------------------------
    def _client(self) -> MilvusClient:
        if self._closed:
            raise CollectionClosed(f"collection {self.spec.name!r} is closed")
        return self._owner._connect()

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with _engine_errors(self._owner.where, self.spec.name, self._owner.losses):
            try:
                return fn(*args, timeout=self._owner.timeout, **kwargs)
            except MilvusException as exc:
                if not _not_loaded(exc):
                    raise
                # A restarted server has the collection but not in memory: load it (what
                # open did), then try once more.
                log.warning("milvus collection %s (%s) was not loaded: loading it",
                            self.collection, self.spec.name)
                try:
                    self._client().load_collection(self.collection,
                                                   timeout=self._owner.timeout)
                except MilvusException as failed:  # e.g. "index not found" while a restarted
                    # server is still reading its metadata: a retry later succeeds
                    raise EngineUnavailable(
                        f"Milvus at {self._owner.where} has not loaded collection "
                        f"{self.spec.name!r} and could not load it yet: {failed}") from failed
                return fn(*args, timeout=self._owner.timeout, **kwargs)

    def _wrote(self) -> None:
        with self._state:
            self._writes += 1
            self._dirty = True

    def _read_level(self) -> tuple[str, int]:
        """The consistency level of the next read, and the write count it will cover."""
        with self._state:
            writes = self._writes
            strong = self._owner.consistency == "strong" or writes != self._seen
        return ("Strong" if strong else "Session"), writes

    def _read_done(self, level: str, writes: int) -> None:
        if level == "Strong":
            with self._state:
                self._seen = max(self._seen, writes)

    # -- VectorIndex -----------------------------------------------------------------------
    def upsert(self, ids: Sequence[int], vectors: np.ndarray,
               payloads: Sequence[Payload] | None = None) -> None:
        try:
            id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        except OverflowError:
            raise ValueError("ids must be int64") from None
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d vectors, "
                f"got shape {vecs.shape}")
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids for {len(vecs)} vectors")
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("duplicate ids in one upsert")
        if payloads is not None and len(payloads) != len(id_arr):
            raise ValueError(f"{len(payloads)} payloads for {len(id_arr)} ids")
        if not len(id_arr):
            return
        rows = [_row(int(i), v, p) for i, v, p in zip(
            id_arr.tolist(), vecs, payloads if payloads is not None else [None] * len(vecs),
            strict=True)]
        with self._write_lock:
            client = self._client()
            for batch in _batches(rows, self.spec.dimension):
                self._call(client.upsert, self.collection, batch)
                self._wrote()

    def delete(self, ids: Iterable[int]) -> int:
        # An id outside int64 cannot be stored: unknown, so ignored.
        id_arr = np.unique(np.array([i for i in map(int, ids) if -(2**63) <= i < 2**63],
                                    dtype=np.int64))
        if not len(id_arr):
            return 0
        removed = 0
        with self._write_lock:
            client = self._client()
            for lo in range(0, len(id_arr), IDS_PER_EXPRESSION):
                chunk = id_arr[lo : lo + IDS_PER_EXPRESSION]
                # Milvus counts the ids it was given, not those it removed: ask first (no
                # other write of this collection can run in between).
                level, writes = self._read_level()
                present = self._call(client.query, self.collection,
                                     filter=ids_expression(chunk.tolist()),
                                     output_fields=["id"], consistency_level=level)
                self._read_done(level, writes)
                found = [int(r["id"]) for r in present]
                if found:
                    self._call(client.delete, self.collection, ids=found)
                    self._wrote()
                    removed += len(found)
        return removed

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
        where: Filter | None = None,
    ) -> list[SearchHits]:
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d queries, "
                f"got shape {queries.shape}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if k > MAX_TOP_K:
            raise ValueError(f"k is {k}; Milvus returns at most {MAX_TOP_K} hits per query")
        client = self._client()
        if not len(queries):
            return []
        where_expr = filter_expression(where) if where is not None else ""
        if allowed_ids is None:
            parts = [where_expr]
        else:
            allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if not len(allowed):
                return [_empty() for _ in range(len(queries))]
            # Each part searches its own slice of the allowed ids; their top-k merge into
            # the top-k of all of them.
            parts = [_and(where_expr, ids_expression(allowed[lo : lo + IDS_PER_EXPRESSION]
                                                     .tolist()))
                     for lo in range(0, len(allowed), IDS_PER_EXPRESSION)]
        level, writes = self._read_level()
        found = [self._search_part(client, queries, k, expr, level) for expr in parts]
        self._read_done(level, writes)
        if len(found) == 1:
            return found[0]
        return [_merge([part[row] for part in found], k) for row in range(len(queries))]

    def _search_part(self, client: MilvusClient, queries: np.ndarray, k: int, expr: str,
                     level: str) -> list[SearchHits]:
        hits = self._ann(client, queries, k, expr, level, wide=False)
        short = [r for r, h in enumerate(hits) if len(h.ids) < k]
        if not short:
            return hits
        # Fewer than k: all that pass, or did the approximate index lose some? (Under a
        # filter that passes a small share, HNSW on milvus-lite and on a Milvus 2.3 server
        # comes back short.) Count them.
        passing = self._count(client, expr, level)
        short = [r for r in short if len(hits[r].ids) < passing]
        if not short:
            return hits
        if passing > self._owner.exact_scan_limit:
            redo = self._ann(client, queries[short], k, expr, level, wide=True)
            for r, h in zip(short, redo, strict=True):
                hits[r] = h
            short = [r for r in short if len(hits[r].ids) < min(k, passing)]
            if not short:
                return hits
            log.warning("milvus collection %s (%s): a search under a filter passing %d "
                        "vectors came back short even searched wide; scanning them exactly",
                        self.collection, self.spec.name, passing)
        redo = self._exact(client, queries[short], k, expr, level, passing)
        for r, h in zip(short, redo, strict=True):
            hits[r] = h
        return hits

    def _ann(self, client: MilvusClient, queries: np.ndarray, k: int, expr: str, level: str,
             wide: bool) -> list[SearchHits]:
        params = {"metric_type": self._metric,
                  "params": _search_params(self.index_type, k, self._owner.ef_search, wide)}
        result = self._call(client.search, self.collection, data=list(queries), limit=k,
                            filter=expr, search_params=params, output_fields=[],
                            consistency_level=level)
        out = []
        for row in result:
            ids = np.asarray(list(row.ids), dtype=np.int64)
            scores = np.asarray(list(row.distances), dtype=np.float32)
            if self.spec.metric == "l2":  # Milvus reports the squared distance
                scores = -scores
            out.append(SearchHits(ids=ids, scores=scores))
        return out

    def _count(self, client: MilvusClient, expr: str, level: str) -> int:
        rows = self._call(client.query, self.collection, filter=expr,
                          output_fields=["count(*)"], consistency_level=level)
        return int(rows[0]["count(*)"])

    def _iterate(self, client: MilvusClient, expr: str, fields: list[str],
                 level: str) -> Iterator[list[dict[str, Any]]]:
        _quiet_iterator()
        it = self._call(client.query_iterator, self.collection, batch_size=ITERATOR_BATCH,
                        filter=expr, output_fields=fields, consistency_level=level)
        try:
            while True:
                with _engine_errors(self._owner.where, self.spec.name, self._owner.losses):
                    page = it.next()
                if not page:
                    return
                yield page
        finally:
            it.close()

    def _exact(self, client: MilvusClient, queries: np.ndarray, k: int, expr: str,
               level: str, passing: int) -> list[SearchHits]:
        """The top k of the passing set, scored here (a page of vectors at a time)."""
        if passing <= ITERATOR_BATCH:  # one query: the iterator costs several round trips
            pages: Iterable[list[dict[str, Any]]] = [self._call(
                client.query, self.collection, filter=expr, output_fields=["vector"],
                limit=passing, consistency_level=level)]
        else:
            pages = self._iterate(client, expr, ["vector"], level)
        best = [_empty() for _ in range(len(queries))]
        for page in pages:
            if not page:
                continue
            ids = np.asarray([r["id"] for r in page], dtype=np.int64)
            data = np.asarray([r["vector"] for r in page], dtype=np.float32)
            if self.spec.metric == "l2":
                scores = -((queries[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)
            elif self.spec.metric == "cosine":  # as Milvus computes it: both normalised
                scores = _normalised(queries) @ _normalised(data).T
            else:
                scores = queries @ data.T
            best = [_merge([b, SearchHits(ids=ids, scores=row.astype(np.float32))], k)
                    for b, row in zip(best, scores, strict=True)]
        return best

    def ids(self) -> np.ndarray:
        client = self._client()
        level, writes = "Strong", self._writes
        found = [np.asarray([r["id"] for r in page], dtype=np.int64)
                 for page in self._iterate(client, "", ["id"], level)]
        self._read_done(level, writes)
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def count(self) -> int:
        client = self._client()
        writes = self._writes
        n = self._count(client, "", "Strong")
        self._read_done("Strong", writes)
        return n

    def flush(self) -> None:
        # Not under the write lock: on a server a flush waits for the sealed segments to be
        # stored (seconds), and writes may go on meanwhile (into new segments).
        with self._flush_lock:
            client = self._client()
            with self._state:
                if not self._dirty:
                    return
                self._dirty = False
            try:
                self._call(client.flush, self.collection)
            except BaseException:
                with self._state:
                    self._dirty = True
                raise

    def close(self) -> None:
        """Flush and release. The collection is closed even when the flush fails: Milvus
        logged every acknowledged write already."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True


def _close(index: MilvusIndex) -> Exception | None:
    try:
        index.close()
    except Exception as exc:
        return exc
    return None


def _row(id_: int, vector: np.ndarray, payload: Payload | None) -> dict[str, Any]:
    if payload is None:
        return {"id": id_, "vector": vector, "has_payload": False, "doc_id": "", "path": "",
                "language": "", "kind": "", "metadata": {}}
    for field, value, limit in (("doc_id", payload.doc_id, MAX_ID_BYTES),
                                ("path", payload.path, MAX_ID_BYTES),
                                ("language", payload.language, MAX_TAG_BYTES),
                                ("kind", payload.kind, MAX_TAG_BYTES)):
        if len(value.encode("utf-8")) > limit:
            raise ValueError(f"payload {field} of id {id_} is over {limit} UTF-8 bytes")
    metadata = {metadata_key(k): v for k, v in payload.metadata}
    if len(json.dumps(metadata, ensure_ascii=False).encode("utf-8")) > MAX_METADATA_JSON_BYTES:
        raise ValueError(f"payload metadata of id {id_} is over {MAX_METADATA_JSON_BYTES} "
                         "bytes as JSON")
    return {"id": id_, "vector": vector, "has_payload": True, "doc_id": payload.doc_id,
            "path": payload.path, "language": payload.language, "kind": payload.kind,
            "metadata": metadata}


def _batches(rows: list[dict[str, Any]], dimension: int) -> Iterator[list[dict[str, Any]]]:
    """Rows in requests of at most about REQUEST_BYTES each."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        n = 4 * dimension + 64 + sum(len(row[f]) for f in ("doc_id", "path", "language",
                                                            "kind"))
        n += sum(len(k) + len(v) + 8 for k, v in row["metadata"].items())
        if batch and size + n > REQUEST_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += n
    if batch:
        yield batch


def _search_params(index_type: str, k: int, ef: int, wide: bool) -> dict[str, Any]:
    if index_type.startswith("HNSW"):
        return {"ef": min(max(4096 if wide else ef, k), 32_768)}
    if index_type.startswith("IVF") or index_type == "SCANN":
        return {"nprobe": 1024 if wide else 32}
    if index_type == "DISKANN":
        return {"search_list": min(max(4096 if wide else ef, k), 65_535)}
    return {}


def _normalised(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms == 0, 1, norms)


def _merge(parts: list[SearchHits], k: int) -> SearchHits:
    ids = np.concatenate([p.ids for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    order = np.argsort(-scores, kind="stable")[:k]
    return SearchHits(ids=ids[order], scores=scores[order])


def _empty() -> SearchHits:
    return SearchHits(ids=np.empty(0, dtype=np.int64), scores=np.empty(0, dtype=np.float32))


_BUILD_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
    "IVF_PQ": {"nlist": 1024, "m": 8, "nbits": 8},
    "SCANN": {"nlist": 1024},
}


class MilvusBackend:
    """Collections in milvus-lite under ``root`` (``root/milvus.db``), or on a Milvus server.

    ``uri``: empty for milvus-lite; ``http(s)://host:port`` (or ``tcp://``, ``unix:``) for a
    server or cluster, with ``token`` ("user:password" or an API key) when it asks for one.
    ``index_type``: "auto" (HNSW, or AUTOINDEX where a server refuses HNSW) or a Milvus
    index type for new collections; an existing collection keeps the index it has.
    ``consistency``: "session" (default, see the module docstring) or "strong".
    ``prefix``: starts every Milvus collection name of this backend, so that deployments
    sharing a server keep apart. ``timeout``: seconds per Milvus call (retries included).
    """

    name = "milvus"

    def __init__(self, root: Path, uri: str = "", token: str = "", index_type: str = "auto",
                 *, consistency: Literal["session", "strong"] = "session",
                 prefix: str = "retriever", timeout: float = 30.0, ef_search: int = 128,
                 exact_scan_limit: int = ITERATOR_BATCH) -> None:
        self._root = Path(root)
        self._uri = uri.strip()
        self._token = token
        if self._uri and not (self._uri.startswith(_SCHEMES) or self._uri.endswith(".db")):
            raise ValueError(f"milvus uri {self._uri!r} is not http(s)://host:port, "
                             "tcp://host:port, unix:path or a milvus-lite path ending .db")
        self._lite_path: Path | None = (
            None if self._uri.startswith(_SCHEMES)
            else Path(self._uri).resolve() if self._uri else (self._root / "milvus.db").resolve())
        self.where = str(self._lite_path) if self._lite_path else self._uri
        self.losses = LossReporter()
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"milvus collection prefix {prefix!r} must be letters, digits or "
                             "_ (not starting with a digit), at most 64")
        if consistency not in ("session", "strong"):
            raise ValueError(f"milvus consistency must be 'session' or 'strong', got "
                             f"{consistency!r}")
        self._index_type = index_type.strip().upper() or "AUTO"
        self.consistency = consistency
        self._prefix = prefix
        self.timeout = timeout
        self.ef_search = ef_search
        self.exact_scan_limit = exact_scan_limit
        self._client: MilvusClient | None = None
        self._open: dict[str, MilvusIndex] = {}
        self._lock = threading.RLock()
        self._closed = False

    @property
    def is_lite(self) -> bool:
        return self._lite_path is not None

    @property
    def local_store(self) -> Path | None:
        """milvus-lite's files (derived data only: the service can move them aside when
        damaged and refill them); None for a server."""
        return self._lite_path

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> MilvusClient:
        """The client, connected on first use (constructors stay cheap)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is not None:
                return self._client
            if self._closed:
                raise CollectionClosed("the milvus backend is closed")
            if self._lite_path is not None:
                try:
                    import milvus_lite  # noqa: F401
                except ImportError as exc:
                    raise EngineUnavailable(_HINT) from exc
                self._lite_path.parent.mkdir(parents=True, exist_ok=True)
            uri = str(self._lite_path) if self._lite_path is not None else self._uri
            try:
                client = MilvusClient(uri=uri, token=self._token, timeout=self.timeout)
            except ConnectionConfigException as exc:  # milvus-lite could not start
                if self._lite_path is not None and _held_elsewhere(self._lite_path):
                    raise StoreInUse(
                        f"milvus-lite's files in {self.where} are in use by another process "
                        "(it holds their lock): stop it, or give this server a data dir of "
                        "its own") from exc
                raise EngineUnavailable(
                    f"milvus-lite could not open {self.where}: {exc}") from exc
            except (MilvusException, grpc.RpcError) as exc:
                raise EngineUnavailable(f"Milvus at {self.where} cannot be reached or "
                                        f"refused the connection: {exc}") from exc
            with _engine_errors(self.where):
                client.list_collections(timeout=self.timeout)  # fails fast when down
            if self._lite_path is not None:
                _lite_acquire(self._lite_path)
            self._client = client
            return client

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with _engine_errors(self.where):
            return fn(*args, timeout=self.timeout, **kwargs)

    # -- Backend ---------------------------------------------------------------------------
    def open(self, spec: CollectionSpec) -> MilvusIndex:
        if spec.metric not in _METRICS:
            raise ValueError(f"unknown metric {spec.metric!r}")
        with self._lock:
            existing = self._open.get(spec.name)
            if existing is not None and not existing._closed:
                if existing.spec != spec:
                    raise DimensionMismatch(
                        f"collection {spec.name!r} is open as {existing.spec}, asked {spec}")
                return existing
            client = self._connect()
            collection = milvus_name(spec.name, self._prefix)
            if not self._call(client.has_collection, collection):
                try:
                    self._create(client, collection, spec)
                except EngineUnavailable:
                    raise
                except EngineError:  # another replica may have just created it
                    if not self._call(client.has_collection, collection):
                        raise
            self._check(client, collection, spec)
            index_type = self._ensure_index(client, collection, spec)
            self._call(client.load_collection, collection)
            index = MilvusIndex(self, spec, collection, index_type)
            self._open[spec.name] = index
            return index

    def _check(self, client: MilvusClient, collection: str, spec: CollectionSpec) -> None:
        """An existing collection must be this one, with this dimension and metric."""
        desc = self._call(client.describe_collection, collection)
        props = desc.get("properties") or {}
        if props.get(_PROP_NAME) != spec.name:
            raise EngineError(f"Milvus collection {collection} at {self.where} is not the "
                              f"retriever collection {spec.name!r} (its properties name "
                              f"{props.get(_PROP_NAME)!r}); drop it or choose another prefix")
        dims = [f.get("params", {}).get("dim") for f in desc["fields"]
                if f["name"] == "vector"]
        dim = int(dims[0]) if dims and dims[0] is not None else None
        metric = props.get(_PROP_METRIC)
        if dim != spec.dimension or metric != spec.metric:
            raise DimensionMismatch(f"collection {spec.name!r} holds {dim}-d {metric} vectors, "
                                    f"asked for {spec.dimension}-d {spec.metric}")

    def _create(self, client: MilvusClient, collection: str, spec: CollectionSpec) -> None:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                      description=f"retriever collection {spec.name}")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=spec.dimension)
        schema.add_field("has_payload", DataType.BOOL)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        schema.add_field("language", DataType.VARCHAR, max_length=MAX_TAG_BYTES)
        schema.add_field("kind", DataType.VARCHAR, max_length=MAX_TAG_BYTES)
        schema.add_field("metadata", DataType.JSON)
        self._call(client.create_collection, collection, schema=schema,
                   consistency_level="Session",
                   properties={_PROP_NAME: spec.name, _PROP_DIM: str(spec.dimension),
                               _PROP_METRIC: spec.metric})

    def _ensure_index(self, client: MilvusClient, collection: str, spec: CollectionSpec) -> str:
        """The vector index's type, building it first when the collection has none."""
        if self._call(client.list_indexes, collection):
            desc = self._call(client.describe_index, collection, "vector")
            built = str(desc.get("index_type", "")).upper()
            if self._index_type not in ("AUTO", built):
                log.warning("milvus collection %s (%s) keeps its %s index; index_type %s "
                            "applies to new collections", collection, spec.name, built,
                            self._index_type)
            return built
        wanted = "HNSW" if self._index_type == "AUTO" else self._index_type
        try:
            self._create_index(client, collection, spec, wanted)
            return wanted
        except EngineUnavailable:
            raise
        except EngineError as exc:
            if self._call(client.list_indexes, collection):  # another replica built one
                return self._ensure_index(client, collection, spec)
            if self._index_type != "AUTO":
                raise
            log.warning("Milvus at %s refused an HNSW index (%s); building AUTOINDEX",
                        self.where, exc)
        self._create_index(client, collection, spec, "AUTOINDEX")
        return "AUTOINDEX"

    def _create_index(self, client: MilvusClient, collection: str, spec: CollectionSpec,
                      index_type: str) -> None:
        params = client.prepare_index_params()
        params.add_index("vector", index_type=index_type, index_name="vector",
                         metric_type=_METRICS[spec.metric],
                         params=dict(_BUILD_PARAMS.get(index_type, {})))
        self._call(client.create_index, collection, params)

    def drop(self, name: str) -> None:
        with self._lock:
            index = self._open.pop(name, None)
            if index is not None:
                # No write or flush may be half-way while it goes.
                with index._flush_lock, index._write_lock:
                    index._closed = True
            client = self._connect()
            collection = milvus_name(name, self._prefix)
            if self._call(client.has_collection, collection):
                self._call(client.drop_collection, collection)

    def collections(self) -> list[str]:
        client = self._connect()
        names = []
        for collection in self._call(client.list_collections):
            if not collection.startswith(self._prefix + "_"):
                continue
            props = self._call(client.describe_collection, collection).get("properties") or {}
            name = props.get(_PROP_NAME)
            if name is not None and milvus_name(name, self._prefix) == collection:
                names.append(name)
        return sorted(names)

    def close(self) -> None:
        """Close (flush) every open collection, all of them even when one fails; then
        disconnect and raise the first failure. Collections flush side by side: a server
        takes seconds for each."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            indexes = list(self._open.values())
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(indexes))),
                                    thread_name_prefix="milvus-close") as pool:
                failures = [f for f in pool.map(_close, indexes) if f is not None]
            first = failures[0] if failures else None
            self._open.clear()
            client, self._client = self._client, None
            if client is not None:
                try:
                    client.close()
                except Exception as exc:  # pragma: no cover - closing a channel
                    log.debug("closing the milvus client: %s", exc)
                if self._lite_path is not None:
                    _lite_release(self._lite_path)
        if first is not None:
            raise first
