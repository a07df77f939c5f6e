"""FAISS, in process: an exact inner-product index under an id map, snapshotted to disk.

Writes go to memory; ``flush`` writes a snapshot atomically (temp file + rename). What was
written after the last snapshot is restored by the service's start-up reconcile from the
vectors the catalog keeps, so a snapshot per write is not needed for durability.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from indexers.base import (
    CollectionClosed,
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    SearchHits,
)

try:
    import faiss
except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
    raise EngineUnavailable(
        "the faiss backend needs faiss: pip install faiss-cpu (or retriever[gpu] for faiss-gpu)"
    ) from exc

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        self._index: faiss.Index | None = self._load_or_create()

    # -- storage ---------------------------------------------------------------------------
    @property
    def _index_path(self) -> Path:
        return self._dir / "index.faiss"

    @property
    def _meta_path(self) -> Path:
        return self._dir / "meta.json"

    def _new_index(self) -> faiss.IndexIDMap2:
        inner = (
            faiss.IndexFlatL2(self.spec.dimension)
            if self.spec.metric == "l2"
            else faiss.IndexFlatIP(self.spec.dimension)
        )
        return faiss.IndexIDMap2(inner)

    def _load_or_create(self) -> faiss.Index:
        self._dir.mkdir(parents=True, exist_ok=True)
        if self._meta_path.exists():
            meta = json.loads(self._meta_path.read_text())
            if meta["dimension"] != self.spec.dimension or meta["metric"] != self.spec.metric:
                raise DimensionMismatch(
                    f"collection {self.spec.name!r} holds {meta['dimension']}-d "
                    f"{meta['metric']} vectors, asked for {self.spec.dimension}-d "
                    f"{self.spec.metric}"
                )
        else:
            self._write_meta()
        if self._index_path.exists():
            index = faiss.read_index(str(self._index_path))
            if index.d != self.spec.dimension:
                raise DimensionMismatch(
                    f"snapshot of {self.spec.name!r} is {index.d}-d, expected "
                    f"{self.spec.dimension}"
                )
            return index
        return self._new_index()

    def _write_meta(self) -> None:
        tmp = self._meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dimension": self.spec.dimension, "metric": self.spec.metric}))
        os.replace(tmp, self._meta_path)

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
                # Copy under the lock (a memcpy), write outside it: searches are not held up
                # while the snapshot goes to disk.
                snapshot = faiss.clone_index(index)
                self._dirty = False
            tmp = self._index_path.with_suffix(".tmp")
            try:
                faiss.write_index(snapshot, str(tmp))
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self._index_path)
            except BaseException:
                self._dirty = True
                raise

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
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

    def close(self) -> None:
        with self._lock:
            for index in self._open.values():
                index.close()
            self._open.clear()
