"""FAISS, in process: an exact inner-product index under an id map, snapshotted to disk.

Writes go to memory; ``flush`` writes a snapshot atomically (temp file + rename). What was
written after the last snapshot is restored by the service's start-up reconcile from the
vectors the catalog keeps, so a snapshot per write is not needed for durability.

A collection directory holds ``index.faiss`` (the snapshot) and ``meta.json`` (dimension,
metric, and the SHA-256 of the snapshot). A file that does not load or does not match its
checksum (bytes overwritten, a truncated copy) is renamed ``<file>.corrupt-<time>`` at open
and the collection starts empty; the caller refills it from the catalog. Both files are
derived data: nothing is lost by moving them aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from indexers.base import (
    CollectionClosed,
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    QuarantinedFile,
    SearchHits,
)

try:
    import faiss
except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
    raise EngineUnavailable(
        "the faiss backend needs faiss: pip install faiss-cpu (or retriever[gpu] for faiss-gpu)"
    ) from exc

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INDEX_FILE, META_FILE = "index.faiss", "meta.json"
_METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT,
            "l2": faiss.METRIC_L2}


class _Damaged(Exception):
    """A collection file that cannot be used; the message says why."""

    def __init__(self, kind: str, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.kind = kind
        self.path = path
        self.reason = reason


def _read_meta(path: Path) -> dict:
    """meta.json, parsed and shape-checked; _Damaged when it is not what flush writes."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Damaged("faiss_meta", path, f"not valid JSON ({exc})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("dimension"), int)
            and meta.get("metric") in _METRICS
            and isinstance(meta.get("sha256", []), list)
            and all(isinstance(h, str) for h in meta.get("sha256", []))):
        raise _Damaged("faiss_meta", path, "not a collection's metadata (dimension, metric, "
                       "sha256)")
    return meta


def _read_snapshot(path: Path, meta: dict | None, dimension: int, metric: str) -> faiss.Index:
    """Load a snapshot, checked against the checksums in ``meta`` (snapshots written before
    checksums existed carry none) and against the collection's dimension and metric."""
    digests = meta.get("sha256", []) if meta is not None else []
    if digests:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        if h.hexdigest() not in digests:
            raise _Damaged("faiss_snapshot", path, "its SHA-256 does not match meta.json "
                           "(bytes changed or the file was cut short)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:  # FAISS's message is a C++ assertion: keep its last words
        last = (str(exc).strip().splitlines() or ["unknown error"])[-1][-160:]
        raise _Damaged("faiss_snapshot", path, f"FAISS cannot read it ({last})") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise _Damaged("faiss_snapshot", path, f"holds a {type(index).__name__}, not the "
                       "IndexIDMap2 this backend writes")
    if index.d != dimension or index.metric_type != _METRICS[metric]:
        raise _Damaged("faiss_snapshot", path, f"holds {index.d}-d vectors of metric "
                       f"{index.metric_type}, its meta.json says {dimension}-d {metric}")
    return index


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FaissIndex:
    backend = "faiss"

    def __init__(self, spec: CollectionSpec, directory: Path, omp_threads: int = 1) -> None:
        self.spec = spec
        self._dir = directory
        self._omp_threads = omp_threads
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one snapshot write at a time
        self._dirty = False
        self._closed = False
        # Checksums meta.json lists: the last snapshot's and the one before, so a crash
        # between writing meta.json and renaming the new snapshot into place finds either.
        self._digests: list[str] = []
        self.quarantined: tuple[QuarantinedFile, ...] = ()  # see SelfRepairing
        self._index: faiss.Index | None = self._load_or_create()

    # -- storage ---------------------------------------------------------------------------
    @property
    def _index_path(self) -> Path:
        return self._dir / INDEX_FILE

    @property
    def _meta_path(self) -> Path:
        return self._dir / META_FILE

    def _new_index(self) -> faiss.IndexIDMap2:
        inner = (
            faiss.IndexFlatL2(self.spec.dimension)
            if self.spec.metric == "l2"
            else faiss.IndexFlatIP(self.spec.dimension)
        )
        return faiss.IndexIDMap2(inner)

    def _load_or_create(self) -> faiss.Index:
        self._dir.mkdir(parents=True, exist_ok=True)
        for stale in self._dir.glob("*.tmp"):  # a snapshot write cut short by a crash
            stale.unlink(missing_ok=True)
        meta = None
        moved: list[QuarantinedFile] = []
        if self._meta_path.exists():
            try:
                meta = _read_meta(self._meta_path)
            except _Damaged as d:
                moved.append(self._quarantine(d))
                if self._index_path.exists():  # it cannot be verified without its checksum
                    moved.append(self._quarantine(_Damaged(
                        "faiss_snapshot", self._index_path, "moved with its damaged "
                        "meta.json, which holds its checksum")))
            else:
                if meta["dimension"] != self.spec.dimension or meta["metric"] != self.spec.metric:
                    raise DimensionMismatch(
                        f"collection {self.spec.name!r} holds {meta['dimension']}-d "
                        f"{meta['metric']} vectors, asked for {self.spec.dimension}-d "
                        f"{self.spec.metric}"
                    )
                self._digests = list(meta.get("sha256", []))
        index = None
        if self._index_path.exists():
            try:
                index = _read_snapshot(self._index_path, meta, self.spec.dimension,
                                       self.spec.metric)
            except _Damaged as d:
                moved.append(self._quarantine(d))
        if index is None:
            self._digests = []
        if meta is None or index is None:
            self._write_meta(self._digests)
        self.quarantined = tuple(moved)
        return index if index is not None else self._new_index()

    def _quarantine(self, damage: _Damaged) -> QuarantinedFile:
        """Rename a damaged file aside (kept for inspection; dropped with the collection)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = damage.path.with_name(f"{damage.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = damage.path.with_name(f"{damage.path.name}.corrupt-{stamp}-{n}")
        os.replace(damage.path, target)
        return QuarantinedFile(damage.kind, damage.path, target, damage.reason)

    def _write_meta(self, digests: list[str]) -> None:
        tmp = self._meta_path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"dimension": self.spec.dimension, "metric": self.spec.metric,
                           "sha256": digests}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._meta_path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no litter on a full disk
            raise

    # -- VectorIndex -----------------------------------------------------------------------
    def upsert(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        id_arr = np.asarray(ids, dtype=np.int64)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d vectors, "
                f"got shape {vecs.shape}"
            )
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids for {len(vecs)} vectors")
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("duplicate ids in one upsert")
        if not len(id_arr):
            return
        with self._lock:
            index = self._live()
            _omp(self._omp_threads)
            index.remove_ids(faiss.IDSelectorBatch(id_arr))
            index.add_with_ids(vecs, id_arr)
            self._dirty = True

    def delete(self, ids: Iterable[int]) -> int:
        id_arr = np.fromiter(ids, dtype=np.int64)
        if not len(id_arr):
            return 0
        with self._lock:
            removed = int(self._live().remove_ids(faiss.IDSelectorBatch(id_arr)))
            self._dirty = self._dirty or removed > 0
            return removed

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> list[SearchHits]:
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d queries, "
                f"got shape {queries.shape}"
            )
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        with self._lock:
            index = self._live()
            n = index.ntotal
            if n == 0 or (allowed_ids is not None and len(allowed_ids) == 0):
                return [_empty() for _ in range(len(queries))]
            kk = min(k, n)
            params = None
            if allowed_ids is not None:
                allowed = np.ascontiguousarray(allowed_ids, dtype=np.int64)
                kk = min(kk, len(allowed))
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))  # type: ignore[call-arg]
            _omp(self._omp_threads)
            scores, ids = index.search(queries, kk, params=params)
        out = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            keep = row_ids >= 0
            row_scores = row_scores[keep]
            if self.spec.metric == "l2":
                row_scores = -row_scores
            out.append(SearchHits(ids=row_ids[keep].astype(np.int64), scores=row_scores))
        return out

    def ids(self) -> np.ndarray:
        with self._lock:
            id_map = self._live().id_map  # type: ignore[attr-defined]
            return faiss.vector_to_array(id_map).astype(np.int64)

    def count(self) -> int:
        with self._lock:
            return int(self._live().ntotal)

    def flush(self) -> None:
        with self._flush_lock:
            with self._lock:
                index = self._live()
                if not self._dirty and self._index_path.exists():
                    return
                # Serialize under the lock (a copy), write outside it: searches are not held
                # up while the snapshot goes to disk.
                data = faiss.serialize_index(index)
                self._dirty = False
            digest = hashlib.sha256(data.data).hexdigest()
            tmp = self._index_path.with_suffix(".tmp")
            try:
                # Python's own file I/O, not faiss.write_index: a full disk is then an
                # OSError(ENOSPC) the service can name, not a C++ assertion.
                with open(tmp, "wb") as fh:
                    fh.write(data.data)
                    fh.flush()
                    os.fsync(fh.fileno())
                # meta.json lists the new checksum before the rename and keeps the current
                # one, so the snapshot on disk matches it at every instant.
                digests = [digest, *self._digests[:1]]
                self._write_meta(digests)
                os.replace(tmp, self._index_path)
                _fsync_dir(self._dir)
                self._digests = digests
            except BaseException:
                self._dirty = True
                tmp.unlink(missing_ok=True)  # no litter; the previous snapshot stays whole
                raise

    def close(self) -> None:
        """Flush and release. The collection is closed even when the last snapshot fails
        (e.g. a full disk): the previous snapshot stays, and the catalog has the rest."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._index = None

    def _live(self) -> faiss.Index:
        """The index, or CollectionClosed once closed or dropped. Call under ``_lock``."""
        if self._closed or self._index is None:
            raise CollectionClosed(f"collection {self.spec.name!r} is closed")
        return self._index


def _omp(threads: int) -> None:
    """Set FAISS's OpenMP threads for the calling thread (the setting is per thread).

    faiss-cpu bundles its own libgomp, apart from torch's. Its idle worker threads spin after
    every parallel region; at a search every few milliseconds they never sleep, and on a
    small machine they take the cores the embedder needs: a query's forward pass went from
    4.6 ms to 11.2 ms here. One thread per search (concurrency comes from concurrent
    requests) avoids that; raise it for very large exact indexes on many cores."""
    if threads > 0:
        faiss.omp_set_num_threads(threads)


def _empty() -> SearchHits:
    return SearchHits(ids=np.empty(0, dtype=np.int64), scores=np.empty(0, dtype=np.float32))


class FaissBackend:
    """Collections live in ``root/<name>/`` as a FAISS snapshot plus its metadata."""

    name = "faiss"

    def __init__(self, root: Path, omp_threads: int = 1) -> None:
        """``omp_threads``: FAISS OpenMP threads per call (0 leaves FAISS's default)."""
        self._root = Path(root)
        self._omp_threads = omp_threads
        self._open: dict[str, FaissIndex] = {}
        self._lock = threading.Lock()

    def _dir(self, name: str) -> Path:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"collection name {name!r} is not a safe file name")
        return self._root / name

    def open(self, spec: CollectionSpec) -> FaissIndex:
        with self._lock:
            existing = self._open.get(spec.name)
            if existing is not None and not existing._closed:
                if existing.spec != spec:
                    raise DimensionMismatch(
                        f"collection {spec.name!r} is open as {existing.spec}, asked {spec}"
                    )
                return existing
            index = FaissIndex(spec, self._dir(spec.name), self._omp_threads)
            self._open[spec.name] = index
            return index

    def drop(self, name: str) -> None:
        with self._lock:
            index = self._open.pop(name, None)
            if index is not None:
                # No snapshot may be half-way to disk while the files go.
                with index._flush_lock, index._lock:
                    index._closed = True
                    index._index = None
            directory = self._dir(name)
            if directory.exists():
                shutil.rmtree(directory)

    def collections(self) -> list[str]:
        if not self._root.is_dir():
            return []
        return sorted(p.name for p in self._root.iterdir()
                      if p.is_dir() and _SAFE_NAME.fullmatch(p.name))

    def verify(self, name: str, spec: CollectionSpec | None = None) -> list[str]:
        """See ``Verifiable``: reads the files, changes nothing."""
        directory = self._dir(name)
        meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
        problems: list[str] = []
        meta = None
        try:
            if meta_path.exists():
                meta = _read_meta(meta_path)
                if spec is not None and (meta["dimension"], meta["metric"]) != (
                        spec.dimension, spec.metric):
                    problems.append(f"{meta_path}: holds {meta['dimension']}-d "
                                    f"{meta['metric']} vectors, the catalog says "
                                    f"{spec.dimension}-d {spec.metric}: the server refuses "
                                    f"to open it; move {directory} away and it is rebuilt "
                                    "from the catalog at start")
                    return problems
            if index_path.exists():
                dimension = meta["dimension"] if meta else spec.dimension if spec else None
                metric = meta["metric"] if meta else spec.metric if spec else None
                if dimension is None or metric is None:
                    problems.append(f"{index_path}: no meta.json to check it against")
                else:
                    _read_snapshot(index_path, meta, dimension, metric)
        except _Damaged as d:
            problems.append(str(d))
        return problems

    def close(self) -> None:
        """Close every open collection, all of them even when one's last snapshot fails;
        then raise the first failure."""
        first: BaseException | None = None
        with self._lock:
            for index in self._open.values():
                try:
                    index.close()
                except Exception as exc:
                    first = first or exc
            self._open.clear()
        if first is not None:
            raise first
