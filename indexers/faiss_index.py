"""FAISS, in process: exact search for small collections, HNSW (or IVF) for large ones,
with tombstones, payload filters inside the index, and snapshots that stall nobody.

**Slots.** Every vector written takes the next *slot* (append-only rows, see
``_faiss_store``); an id maps to its slot. A replacement appends and tombstones the old
slot, a delete tombstones: a write costs O(rows written), never a scan of the index. A
search excludes tombstones with a bitmap selector (``faiss.IDSelectorBitmap`` over slots).

**Kinds.** ``flat`` scores every live slot exactly (``faiss.knn_*`` block by block, no copy
of the vectors). ``hnsw`` and ``ivf`` keep an approximate *main* index over slots
``[0, main.ntotal)``; slots written after it are the *tail*, scored exactly, and a
background merger adds them to the main index in steps of ~10 ms under its write lock
(searches read it under a shared lock, FAISS releasing the GIL, so they run in parallel).
``auto`` is flat below ``auto_threshold`` live vectors and ``auto_kind`` above it.

**Rebuilds** (a kind switch, compaction once tombstones exceed ``compact_ratio``, an IVF
that outgrew its training) run in a background thread from a consistent view: the new
generation (main index, and a store without the dead rows when compacting) is built
without any lock, rows written meanwhile are copied in, and the swap takes the lock only
to copy the last few rows and remap the live bitmap (O(N) vectorised, a few ms at 1M).

**Filters.** Payloads are stored as interned codes per slot (doc id, path, language, kind,
metadata); a ``Filter`` becomes passing codes per column (a path prefix through a sorted
list of distinct paths), then a bitmap over slots (a vectorised gather, ~1 ms per column at
1M). When few vectors pass (``exact_max``), an approximate index is bypassed and they are
scored exactly; when it returns fewer hits than pass, that query is rerun exactly.

**Snapshots.** ``flush`` writes one file (``index.faiss``: see ``_faiss_snapshot``) from a
view: rows below a watermark never change, so only the main index needs holding still,
and only merges into it pause while it is written; searches and writes go on. Durability:
temp file + fsync + rename, ``meta.json`` with the SHA-256 of the last two snapshots, and
a damaged file is renamed ``<file>.corrupt-<time>`` at open (the collection starts empty;
the caller refills it from the catalog). Snapshots of the previous version (a bare
IndexIDMap2) still load, without payloads (``ids_without_payload`` lists them).

What was written after the last snapshot is restored by the service's start-up reconcile
from the catalog, so a snapshot per write is not needed for durability.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexers.base import (
    CollectionClosed,
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    QuarantinedFile,
    SearchHits,
)
from indexers.payload import Filter, Payload

try:
    import faiss as _faiss
except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
    raise EngineUnavailable(
        "the faiss backend needs faiss: pip install faiss-cpu (or retriever[gpu] for faiss-gpu)"
    ) from exc
faiss: Any = _faiss  # its stubs lag its API (knn_*, SearchParametersHNSW, ...)

from indexers._faiss_gpu import GpuScorer  # noqa: E402
from indexers._faiss_snapshot import (  # noqa: E402 - after the install hint
    MAGIC,
    METRICS,
    SnapshotError,
    SnapshotWriter,
    file_sha256,
    read_header,
    read_snapshot,
    write_sections,
)
from indexers._faiss_store import (  # noqa: E402
    PayloadTable,
    RWLock,
    Store,
    clear_slots,
    grown,
    nbytes,
    pack,
    set_range,
    unpack,
)

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INDEX_FILE, META_FILE = "index.faiss", "meta.json"
_METRICS = METRICS
KINDS = ("auto", "flat", "hnsw", "ivf")
MERGE_STEP_S = 0.01  # target length of one merge step under the main index's write lock
BUILD_CHUNK = 8192  # rows per add while building in the background (stop checked between)
ALLOWED_BY_DICT = 4096  # allowed_ids up to this many are looked up one by one
EF_CAP = 4096
CALIBRATE_MIN = 1_000  # graphs smaller than this keep the configured efSearch
MASK_CACHE = 16  # filters whose slot bitmaps are kept for the current view
REBUILD_RETRY_S = 60.0


@dataclass(frozen=True, slots=True)
class FaissOptions:
    """How a FAISS collection indexes its vectors (FaissBackend's keyword arguments)."""

    kind: str = "auto"  # auto | flat | hnsw | ivf
    auto_threshold: int = 50_000  # live vectors from which "auto" leaves exact search
    auto_kind: str = "hnsw"  # what "auto" builds past the threshold: hnsw | ivf
    hnsw_m: int = 32  # graph degree (memory: ~8*M bytes per vector more than the vectors)
    # 80: at 1M (hard mixture, bench/results/faiss-scale.md) recall@10 0.979 at efSearch
    # 128 for a 184 s build, against 0.940 at efSearch 1024 for 148 s at 40.
    hnsw_ef_construction: int = 80
    # Raised per search to at least k, and for selective filters. 128: at 100k (384-d)
    # recall@10 0.996 for 0.36 ms, against 0.975 for 0.19 ms at 64 (bench/results/
    # faiss-scale.md); at 1M on that hard synthetic mixture 256 is needed for 0.9.
    hnsw_ef_search: int = 128
    # After each HNSW build, efSearch is calibrated on the collection's own vectors: the
    # smallest of hnsw_ef_search, x2, x4, ... (at most hnsw_max_ef_search) whose recall@10
    # against exact search reaches this target (0: no calibration, hnsw_ef_search as is).
    hnsw_target_recall: float = 0.95
    hnsw_max_ef_search: int = 1024
    ivf_nlist: int = 0  # 0: 4*sqrt(n) at build time, 16..65536
    ivf_nprobe: int = 16  # raised per search for selective filters
    exact_max: int = 20_000  # at most this many candidates (after filter): exact search
    compact_ratio: float = 0.2  # tombstones over this share of slots trigger a compaction...
    compact_min: int = 1_000  # ...once there are at least this many
    build_threads: int = 1  # OpenMP threads for background builds and merges
    # Exact scoring on a GPU (faiss-gpu, see _faiss_gpu): True requires one, None uses one
    # when faiss sees it, False never does.
    gpu: bool | None = None
    gpu_device: int = 0
    gpu_engine: str = "auto"  # auto | torch | faiss (see _faiss_gpu: which runs where)
    # "auto" keeps exact search up to this many live vectors while a GPU scores it: on an
    # H200 exact k=10 took 0.69 ms at 1M and 1.78 ms at 4M with recall 1.0, where CPU HNSW
    # answers in 0.4-4 ms with recall < 1 (bench/results/gpu-faiss-h200.md).
    gpu_exact_max: int = 4_000_000

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"faiss index kind must be one of {KINDS}, got {self.kind!r}")
        if self.gpu_engine not in ("auto", "torch", "faiss"):
            raise ValueError(f"faiss gpu_engine must be auto, torch or faiss, "
                             f"got {self.gpu_engine!r}")
        if self.auto_kind not in ("hnsw", "ivf"):
            raise ValueError(f"faiss auto_kind must be hnsw or ivf, got {self.auto_kind!r}")
        for name in ("auto_threshold", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "hnsw_max_ef_search", "ivf_nprobe", "build_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"faiss {name} must be positive, got {getattr(self, name)}")
        for name in ("ivf_nlist", "exact_max", "compact_min", "gpu_exact_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"faiss {name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.hnsw_target_recall <= 1.0:
            raise ValueError("faiss hnsw_target_recall must be in [0, 1], got "
                             f"{self.hnsw_target_recall}")
        if not 0.0 < self.compact_ratio <= 1.0:
            raise ValueError(f"faiss compact_ratio must be in (0, 1], got {self.compact_ratio}")


class _Damaged(Exception):
    """A collection file that cannot be used; the message says why."""

    def __init__(self, kind: str, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.kind = kind
        self.path = path
        self.reason = reason


class _Stopped(Exception):
    """A background build noticed the collection closing."""


def _read_meta(path: Path) -> dict:
    """meta.json, parsed and shape-checked; _Damaged when it is not what flush writes."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Damaged("faiss_meta", path, f"not valid JSON ({exc})") from None
    except OSError as exc:  # a directory in its place, an I/O error
        raise _Damaged("faiss_meta", path, f"unreadable ({exc.strerror or exc})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("dimension"), int)
            and meta.get("metric") in _METRICS
            and isinstance(meta.get("sha256", []), list)
            and all(isinstance(h, str) for h in meta.get("sha256", []))):
        raise _Damaged("faiss_meta", path, "not a collection's metadata (dimension, metric, "
                       "sha256)")
    return meta


def _current_format(path: Path) -> bool:
    """Whether the snapshot at ``path`` is of the current format (else the one written
    before checksums existed, or not a snapshot). OSError when it cannot be read."""
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def _check_digest(path: Path, meta: dict | None) -> str:
    """The checksum in ``meta`` the file matches ("" when ``meta`` lists none and the file
    is of the format written before checksums existed); _Damaged when it matches none, or
    when ``meta`` lists none for a snapshot of the current format (every one is written
    with its checksum: a meta.json that lists none was damaged or edited, and the snapshot
    cannot be verified)."""
    digests = meta.get("sha256", []) if meta is not None else []
    if not digests:
        try:
            current = _current_format(path)
        except OSError as exc:
            raise _Damaged("faiss_snapshot", path,
                           f"unreadable ({exc.strerror or exc})") from None
        if current:
            raise _Damaged("faiss_snapshot", path, "meta.json lists no checksum for it "
                           "(snapshots of this format are always written with one), so it "
                           "cannot be verified")
        return ""
    digest = file_sha256(str(path))
    if digest not in digests:
        raise _Damaged("faiss_snapshot", path, "its SHA-256 does not match meta.json "
                       "(bytes changed or the file was cut short)")
    return str(digest)


def _load_snapshot(path: Path, meta: dict | None, dimension: int,
                   metric: str) -> tuple[Any, str]:
    """The snapshot's contents and its checksum (see _check_digest)."""
    try:
        digest = _check_digest(path, meta)
        return read_snapshot(str(path), dimension, metric), digest
    except (SnapshotError, OSError, ValueError, MemoryError) as exc:
        raise _Damaged("faiss_snapshot", path, str(exc)) from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Gen:
    """One generation of a collection: its rows and, for hnsw/ivf, the main index over the
    first ``main.ntotal`` of them. Replaced whole by a rebuild."""

    __slots__ = ("store", "main", "main_kind", "built_n", "rw", "merge_mutex", "ef", "recall",
                 "calibrated_n", "calibrated_for")

    def __init__(self, store: Store, main: Any, main_kind: str | None, built_n: int,
                 ef: int = 0, recall: float | None = None, calibrated_n: int = 0,
                 calibrated_for: tuple[float, int, int] | None = None) -> None:
        self.store = store
        self.main = main
        self.main_kind = main_kind
        self.built_n = built_n
        # HNSW: the calibrated efSearch (0: not calibrated, the options' own), the recall@10
        # measured with it, and the graph's size then (recalibrated once it doubles).
        self.ef = ef
        self.recall = recall
        self.calibrated_n = calibrated_n
        # (target recall, efSearch floor, cap) it was calibrated for: other settings at a
        # later start calibrate again.
        self.calibrated_for = calibrated_for
        self.rw = RWLock()  # main index: searches shared, merge steps exclusive
        self.merge_mutex = threading.Lock()  # held by a merge step, or a snapshot of main


@dataclass(frozen=True, slots=True)
class _View:
    """What a search sees: slots [0, n) of ``gen``, ``live`` their packed live bitmap (never
    changed once published: writers publish a new one)."""

    gen: _Gen
    n: int
    live: np.ndarray
    n_live: int


class FaissIndex:
    backend = "faiss"
    max_k = 2**31 - 1  # faiss takes k as a C int

    def __init__(self, spec: CollectionSpec, directory: Path, omp_threads: int = 1,
                 options: FaissOptions | None = None) -> None:
        self.spec = spec
        self._dir = directory
        self._omp_threads = omp_threads
        self._opts = options or FaissOptions()
        self._ip = spec.metric != "l2"
        self._lock = threading.Lock()  # slots, tables, view publication: short sections
        self._flush_lock = threading.Lock()  # one snapshot write at a time
        self._dirty = False
        self._closed = False
        # Checksums meta.json lists: the last snapshot's and the one before, so a crash
        # between writing meta.json and renaming the new snapshot into place finds either.
        self._digests: list[str] = []
        # Each listed snapshot's HNSW calibration (meta.json; see _Gen).
        self._efs: dict[str, dict[str, float]] = {}
        self.quarantined: tuple[QuarantinedFile, ...] = ()  # see SelfRepairing
        self._stop = threading.Event()
        self._merge_wake = threading.Event()
        self._merger: threading.Thread | None = None
        self._rebuilder: threading.Thread | None = None
        self._force_compact = False
        self._rebuild_retry_at = 0.0
        self._generation = 0  # rebuilds swapped in since open
        self._gpu = _gpu_scorer(self._opts, spec.dimension, self._ip)
        self._tables = PayloadTable()
        self._slots: dict[int, int] = {}
        self._view: _View | None = None
        # Filter -> (view, passing mask, its bitmap, how many pass): a filter repeated on an
        # unchanged collection skips the O(N) evaluation; any write publishes a new view.
        self._masks: dict[Filter, tuple[_View, np.ndarray, np.ndarray, int]] = {}
        self._load_or_create()
        with self._lock:
            self._maintain_locked()

    # -- storage ---------------------------------------------------------------------------
    @property
    def _index_path(self) -> Path:
        return self._dir / INDEX_FILE

    @property
    def _meta_path(self) -> Path:
        return self._dir / META_FILE

    def _load_or_create(self) -> None:
        moved: list[QuarantinedFile] = []
        if self._dir.exists() and not self._dir.is_dir():  # a file where it belongs
            moved.append(self._quarantine(_Damaged("faiss_dir", self._dir, "not a directory")))
        self._dir.mkdir(parents=True, exist_ok=True)
        for stale in self._dir.glob("*.tmp"):  # a snapshot write cut short by a crash
            stale.unlink(missing_ok=True)
        meta = None
        if self._index_path.exists() and not self._meta_path.exists():
            # flush writes meta.json (with the snapshot's checksum) before the snapshot:
            # one without it cannot be verified, and the catalog can rebuild it.
            moved.append(self._quarantine(_Damaged(
                "faiss_snapshot", self._index_path, "no meta.json to check it against")))
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
                self._efs = _efs_of(meta)
        data = None
        digest = ""
        if self._index_path.exists():
            try:
                data, digest = _load_snapshot(self._index_path, meta, self.spec.dimension,
                                              self.spec.metric)
            except _Damaged as d:
                moved.append(self._quarantine(d))
        if data is None:
            self._digests = []
            self._efs = {}
        if meta is None or data is None:
            self._write_meta(self._digests)
        self.quarantined = tuple(moved)
        if data is None:  # an hnsw/ivf main index is built in the background once written
            self._view = _View(_Gen(Store(self.spec.dimension), None, None, 0), 0,
                               np.zeros(0, dtype=np.uint8), 0)
            return
        store = data.store
        self._tables = data.tables
        live_slots = np.flatnonzero(unpack(data.live, store.n))
        self._slots = dict(zip(store.ids[live_slots].tolist(), live_slots.tolist(),
                               strict=True))
        c = self._efs.get(digest)
        gen = _Gen(store, data.main, data.main_kind, data.built_n)
        if c is not None:
            gen.ef, gen.recall, gen.calibrated_n = int(c["ef"]), c["recall"], int(c["vectors"])
            gen.calibrated_for = (c["target"], int(c["floor"]), int(c["cap"]))
        self._view = _View(gen, store.n, data.live, data.n_live)
        self._dirty = data.legacy  # rewrite an old-format snapshot in the new format

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

    def _write_meta(self, digests: list[str],
                    efs: dict[str, dict[str, float]] | None = None) -> None:
        tmp = self._meta_path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"dimension": self.spec.dimension, "metric": self.spec.metric,
                           "sha256": digests, "hnsw_ef": efs or {}}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._meta_path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no litter on a full disk
            raise

    # -- VectorIndex -----------------------------------------------------------------------
    def upsert(self, ids: Sequence[int], vectors: np.ndarray,
               payloads: Sequence[Payload] | None = None) -> None:
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d vectors, "
                f"got shape {vecs.shape}"
            )
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids for {len(vecs)} vectors")
        if payloads is not None and len(payloads) != len(id_arr):
            raise ValueError(f"{len(payloads)} payloads for {len(id_arr)} ids")
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("duplicate ids in one upsert")
        m = len(id_arr)
        if not m:
            return
        id_list = id_arr.tolist()
        with self._lock:
            v = self._live_view()
            store = v.gen.store
            codes = self._tables.encode(payloads, m)
            lo = store.n
            store.append(id_arr, vecs, codes)
            old = [s for s in map(self._slots.get, id_list) if s is not None]
            self._slots.update(zip(id_list, range(lo, lo + m), strict=True))
            live = grown(v.live, lo + m)
            set_range(live, lo, lo + m)
            clear_slots(live, np.asarray(old, dtype=np.int64))
            self._view = _View(v.gen, lo + m, live, v.n_live + m - len(old))
            self._masks.clear()
            self._dirty = True
            self._maintain_locked()

    def delete(self, ids: Iterable[int]) -> int:
        id_list = np.unique(np.fromiter(ids, dtype=np.int64)).tolist()
        if not id_list:
            return 0
        with self._lock:
            v = self._live_view()
            old = [s for s in (self._slots.pop(i, None) for i in id_list) if s is not None]
            if not old:
                return 0
            live = v.live.copy()
            clear_slots(live, np.asarray(old, dtype=np.int64))
            self._view = replace(v, live=live, n_live=v.n_live - len(old))
            self._masks.clear()
            self._dirty = True
            self._maintain_locked()
            return len(old)

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
        where: Filter | None = None,
    ) -> list[SearchHits]:
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.spec.dimension:
            raise DimensionMismatch(
                f"collection {self.spec.name!r} takes {self.spec.dimension}-d queries, "
                f"got shape {queries.shape}"
            )
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        nq = len(queries)
        flt = where if where is not None and not where.empty else None
        allowed = (None if allowed_ids is None
                   else np.asarray(allowed_ids, dtype=np.int64).reshape(-1))
        compiled = None
        allowed_slots = None
        with self._lock:
            v = self._live_view()
            if flt is not None:
                compiled = self._tables.compile(flt)
                if compiled is None:
                    return [_empty() for _ in range(nq)]
            if allowed is not None and len(allowed) <= ALLOWED_BY_DICT:
                allowed_slots = np.fromiter(
                    (s for s in map(self._slots.get, allowed.tolist()) if s is not None),
                    dtype=np.int64)
        n, store = v.n, v.gen.store
        if v.n_live == 0 or (allowed is not None and len(allowed) == 0):
            return [_empty() for _ in range(nq)]
        combined = None
        bits: np.ndarray | None
        cached = self._masks.get(flt) if flt is not None and allowed is None else None
        if cached is not None and cached[0] is v:  # the same filter on the same view
            _, combined, bits, passing = cached
        elif compiled is not None or allowed is not None:
            mask = compiled.mask(store.codes, n) if compiled is not None else None
            if allowed is not None:
                if allowed_slots is not None:
                    by_id = np.zeros(n, dtype=np.bool_)
                    by_id[allowed_slots] = True
                else:
                    by_id = np.isin(store.ids[:n], allowed)
                mask = by_id if mask is None else mask & by_id
            assert mask is not None
            combined = mask & unpack(v.live, n)
            passing = int(np.count_nonzero(combined))
            bits = pack(combined)
            if flt is not None and allowed is None:
                with self._lock:
                    if self._view is v:  # else a write made it stale already
                        if len(self._masks) >= MASK_CACHE:
                            self._masks.pop(next(iter(self._masks)))
                        self._masks[flt] = (v, combined, bits, passing)
        else:
            passing = v.n_live
            bits = v.live if v.n_live < n else None
        if passing == 0:
            return [_empty() for _ in range(nq)]
        kk = min(k, passing)
        _omp(self._omp_threads)
        if v.gen.main is None or passing <= self._opts.exact_max:
            scores, slots = self._exact(v, store, queries, kk, n, bits, combined, passing)
        else:
            scores, slots = self._approximate(v, queries, kk, bits, combined, passing)
        out = []
        for row_scores, row_slots in zip(scores, slots, strict=True):
            keep = row_slots >= 0
            out.append(SearchHits(ids=store.ids[row_slots[keep]].astype(np.int64),
                                  scores=row_scores[keep].astype(np.float32)))
        return out

    def ids(self) -> np.ndarray:
        with self._lock:
            v = self._live_view()
        return v.gen.store.ids[: v.n][unpack(v.live, v.n)].copy()

    def count(self) -> int:
        with self._lock:
            return self._live_view().n_live

    def flush(self) -> None:
        with self._flush_lock, ExitStack() as held:
            while True:
                with self._lock:
                    v = self._live_view()
                    if not self._dirty and self._index_path.exists():
                        return
                gen = v.gen
                held.enter_context(gen.merge_mutex)  # merges pause; nothing else does
                with self._lock:
                    v = self._live_view()
                    if v.gen is gen:
                        self._dirty = False
                        sizes = self._tables.sizes()
                        break
                held.close()
            self._write_snapshot(v, sizes, held)

    def _write_snapshot(self, v: _View, sizes: tuple[int, ...], held: ExitStack) -> None:
        """Write the snapshot of view ``v``; ``held`` holds ``v.gen``'s merge mutex and is
        released as soon as the main index is written."""
        gen = v.gen
        tmp = self._index_path.with_suffix(".tmp")
        try:
            # Python's own file I/O (faiss.write_index only through a callback): a full disk
            # is then an OSError(ENOSPC) the service can name, not a C++ assertion.
            with open(tmp, "wb") as fh:
                w = SnapshotWriter(fh)
                main_n = 0
                if gen.main is not None:
                    main_n = int(gen.main.ntotal)
                    w.faiss_index("main", gen.main)
                held.close()
                digest = _write_rows(w, self.spec, v, self._tables, sizes, gen, main_n)
                fh.flush()
                os.fsync(fh.fileno())
            # meta.json lists the new checksum before the rename and keeps the current
            # one, so the snapshot on disk matches it at every instant.
            digests = [digest, *self._digests[:1]]
            efs = {d: self._efs[d] for d in digests[1:] if d in self._efs}
            if gen.ef and gen.recall is not None and gen.calibrated_for is not None:
                target, floor, cap = gen.calibrated_for
                efs[digest] = {"ef": gen.ef, "recall": gen.recall,
                               "vectors": gen.calibrated_n, "target": target,
                               "floor": floor, "cap": cap}
            self._write_meta(digests, efs)
            os.replace(tmp, self._index_path)
            _fsync_dir(self._dir)
            self._digests = digests
            self._efs = efs
        except BaseException:
            held.close()
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
            self._shutdown()

    def _shutdown(self) -> None:
        """Mark closed, stop the background threads and drop the data."""
        with self._lock:
            self._closed = True
            self._view = None
            self._slots = {}
            self._masks = {}
            self._gpu = None  # its device copies go with it
        self._stop.set()
        self._merge_wake.set()
        for thread in (self._merger, self._rebuilder):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=60)

    def _live_view(self) -> _View:
        """The current view, or CollectionClosed once closed or dropped. Call under
        ``_lock``."""
        if self._closed or self._view is None:
            raise CollectionClosed(f"collection {self.spec.name!r} is closed")
        return self._view

    # -- beyond the contract: maintenance, for the service, tests and benchmarks ----------
    def stats(self) -> dict[str, Any]:
        """Kind, slots, live vectors, tombstones, rows not yet in the main index, whether
        a rebuild runs, and how many were swapped in since open."""
        with self._lock:
            v = self._live_view()
            rebuilding = self._rebuilder is not None and self._rebuilder.is_alive()
        main = v.gen.main
        hnsw = {}
        if v.gen.main_kind == "hnsw":
            hnsw = {"hnsw_ef_search": self._ef_search(v.gen),
                    "hnsw_calibrated_recall": v.gen.recall,
                    "hnsw_calibrated_vectors": v.gen.calibrated_n}
        return {"kind": v.gen.main_kind or "flat", "slots": v.n, "live": v.n_live, **hnsw,
                "tombstones": v.n - v.n_live,
                "unmerged": v.n - int(main.ntotal) if main is not None else 0,
                "rebuilding": rebuilding, "generation": self._generation,
                **(self._gpu.stats() if self._gpu is not None else {})}

    def ids_without_payload(self) -> np.ndarray:
        """Live ids stored without a payload (e.g. loaded from an old-format snapshot): the
        service re-upserts them with their payloads so that filters see them."""
        with self._lock:
            v = self._live_view()
        codes = v.gen.store.codes[0, : v.n]
        return v.gen.store.ids[: v.n][unpack(v.live, v.n) & (codes < 0)].copy()

    def compact(self) -> None:
        """Start a compaction (and any kind switch due) in the background now."""
        with self._lock:
            self._live_view()
            self._force_compact = True
            self._rebuild_retry_at = 0.0
            self._maintain_locked()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no rebuild runs or is due, the main index holds every slot and no
        efSearch calibration is due; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                v = self._live_view()
                thread = self._rebuilder
                busy = ((thread is not None and thread.is_alive())
                        or self._rebuild_reason(v) is not None
                        or (v.gen.main is not None and v.gen.main.ntotal < v.n)
                        or self._calibration_due(v.gen))
                if busy:
                    self._maintain_locked()
            if not busy:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    # -- search internals ------------------------------------------------------------------
    def _knn(self, queries: np.ndarray, rows: np.ndarray, k: int,
             sel: Any) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of ``rows`` (contiguous float32): scores (higher is better, -inf for
        none) and row numbers (-1 for none)."""
        nq, ny = len(queries), len(rows)
        k = min(k, ny)
        if k == 0:
            return (np.full((nq, 0), -np.inf, dtype=np.float32),
                    np.full((nq, 0), -1, dtype=np.int64))
        dist = np.empty((nq, k), dtype=np.float32)
        idx = np.empty((nq, k), dtype=np.int64)
        sp = faiss.swig_ptr
        if self._ip:
            faiss.knn_inner_product(sp(queries), sp(rows), self.spec.dimension, nq, ny,
                                    k, sp(dist), sp(idx), sel)
        else:
            faiss.knn_L2sqr(sp(queries), sp(rows), self.spec.dimension, nq, ny, k,
                            sp(dist), sp(idx), None, sel)
        if not self._ip:
            np.negative(dist, out=dist)
        dist[idx < 0] = -np.inf
        return dist, idx

    def _scan(self, store: Store, queries: np.ndarray, k: int, lo: int, hi: int,
              bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over slots [lo, hi), those whose bit is set when ``bits`` is given:
        block by block, without copying vectors."""
        parts = []
        start = lo & ~7 if bits is not None else lo  # bitmap slices start on a byte
        for slot0, rows in store.pieces(start, hi):
            sel = None
            if bits is not None:
                sub = bits[slot0 >> 3 : nbytes(slot0 + len(rows))]
                if slot0 < lo:  # the slots of the first byte that are below lo
                    sub = sub.copy()
                    sub[0] &= np.uint8((0xFF << (lo - slot0)) & 0xFF)
                sel = faiss.IDSelectorBitmap(len(sub), faiss.swig_ptr(sub))
            scores, idx = self._knn(queries, rows, k, sel)
            parts.append((scores, np.where(idx >= 0, idx + slot0, -1)))
        return _best(parts, k, len(queries))

    def _exact(self, v: _View, store: Store, queries: np.ndarray, k: int, n: int,
               bits: np.ndarray | None, combined: np.ndarray | None,
               passing: int) -> tuple[np.ndarray, np.ndarray]:
        if combined is not None and passing * 32 <= n:  # few pass: gather and score them
            slots = np.flatnonzero(combined)
            scores, idx = self._knn(queries, store.take(slots), k, None)
            return scores, np.where(idx >= 0, slots[np.maximum(idx, 0)], -1)
        if self._gpu is not None and store is v.gen.store:
            got = self._gpu.search(store, queries, k, n, v.live, v.n_live, bits, passing)
            if got is not None:
                return got
        return self._scan(store, queries, k, 0, n, bits)

    def _approximate(self, v: _View, queries: np.ndarray, k: int, bits: np.ndarray | None,
                     combined: np.ndarray | None,
                     passing: int) -> tuple[np.ndarray, np.ndarray]:
        gen, n = v.gen, v.n
        with gen.rw.read():
            main = gen.main
            m = int(main.ntotal)
            sel_bits = bits if bits is not None else (v.live if m > n else None)
            share = passing / max(n, 1)
            if gen.main_kind == "hnsw":
                params = faiss.SearchParametersHNSW()
                params.efSearch = int(max(self._ef_search(gen), k,
                                          min(EF_CAP, math.ceil(2 * k / share))))
            else:
                params = faiss.SearchParametersIVF()
                params.nprobe = int(min(main.nlist, math.ceil(self._opts.ivf_nprobe / share)))
            sel = None
            if sel_bits is not None:
                sel = faiss.IDSelectorBitmap(len(sel_bits), faiss.swig_ptr(sel_bits))
                params.sel = sel
            dist, idx = main.search(queries, k, params=params)
        scores = dist if self._ip else -dist
        idx = np.where((idx >= 0) & (idx < n), idx, -1)
        scores = np.where(idx >= 0, scores, -np.inf).astype(np.float32)
        parts = [(scores, idx)]
        if m < n:
            parts.append(self._scan(gen.store, queries, k, m, n, bits))
        best_scores, best_slots = _best(parts, k, len(queries))
        short = np.flatnonzero((best_slots >= 0).sum(axis=1) < k)
        if len(short):  # holes (a filter HNSW could not satisfy): exact for those rows
            again = self._exact(v, gen.store, np.ascontiguousarray(queries[short]), k, n, bits,
                                combined, passing)
            best_scores[short], best_slots[short] = again
        return best_scores, best_slots

    # -- background work -------------------------------------------------------------------
    def _ivf_nlist(self, n: int) -> int:
        return self._opts.ivf_nlist or int(min(65536, max(16, 4 * math.isqrt(max(n, 1)))))

    def _desired(self, n_live: int, current: str | None) -> str | None:
        """The main index kind this collection should have at ``n_live`` vectors."""
        kind = self._opts.kind
        if kind == "flat":
            return None
        if kind == "hnsw":
            return "hnsw"
        if kind == "ivf":
            trainable = n_live >= 39 * self._ivf_nlist(n_live)
            return "ivf" if trainable or current == "ivf" else None
        big = self._opts.auto_kind
        if self._gpu is not None and n_live <= self._opts.gpu_exact_max:
            return None  # the GPU's exact search beats an approximate index on the CPU
        if n_live >= self._opts.auto_threshold:
            if big == "ivf" and n_live < 39 * self._ivf_nlist(n_live):
                return current
            return big
        if current is not None and n_live >= self._opts.auto_threshold // 2:
            return current  # hysteresis: no flip-flop around the threshold
        return None

    def _needs_compaction(self, v: _View) -> bool:
        dead = v.n - v.n_live
        return dead > 0 and (self._force_compact or (
            dead >= self._opts.compact_min and dead > self._opts.compact_ratio * v.n))

    def _rebuild_reason(self, v: _View) -> str | None:
        gen = v.gen
        if self._desired(v.n_live, gen.main_kind) != gen.main_kind:
            return "kind"
        if self._needs_compaction(v):
            return "compact"
        if gen.main_kind == "ivf" and v.n_live > 4 * max(gen.built_n, 1):
            return "grow"
        if gen.main is not None and v.n - gen.main.ntotal > max(4 * BUILD_CHUNK,
                                                                gen.main.ntotal):
            return "tail"  # a bulk load: faster built in chunks than merged step by step
        return None

    def _maintain_locked(self) -> None:
        """Wake the merger (it also calibrates efSearch when due), start a rebuild when one
        is due. Call under ``_lock``."""
        if self._closed or self._view is None:
            return
        v = self._view
        main = v.gen.main
        if main is not None and (main.ntotal < v.n or self._calibration_due(v.gen)):
            if self._merger is None:
                self._merger = threading.Thread(target=self._merge_loop, daemon=True,
                                                name=f"faiss-merge-{self.spec.name}")
                self._merger.start()
            self._merge_wake.set()
        if ((self._rebuilder is None or not self._rebuilder.is_alive())
                and time.monotonic() >= self._rebuild_retry_at
                and self._rebuild_reason(v) is not None):
            self._rebuilder = threading.Thread(target=self._rebuild_loop, daemon=True,
                                               name=f"faiss-rebuild-{self.spec.name}")
            self._rebuilder.start()

    def _merge_loop(self) -> None:
        """Add tail rows to the main index in steps of about MERGE_STEP_S, each under the
        main index's write lock (a search waits at most one step)."""
        step = 32
        while not self._stop.is_set():
            self._merge_wake.wait(1.0)
            self._merge_wake.clear()
            try:
                step = self._merge_all(step)
                self._calibrate_if_due()
            except Exception:  # the tail is still searched exactly: log, retry later
                log.exception("faiss collection %s: merging into the main index failed; "
                              "retrying", self.spec.name)
                self._stop.wait(REBUILD_RETRY_S)

    def _merge_all(self, step: int) -> int:
        while not self._stop.is_set():
            rebuilder = self._rebuilder
            if rebuilder is not None and rebuilder.is_alive():
                break  # it replaces the main index: merging into this one is wasted
            v = self._view
            if v is None or v.gen.main is None:
                break
            gen = v.gen
            with gen.merge_mutex:
                now = self._view
                if now is None or now.gen is not gen:
                    continue
                m = int(gen.main.ntotal)
                if m >= now.n:
                    break
                rows = np.ascontiguousarray(gen.store.rows(m, min(now.n, m + step)))
                with gen.rw.write():
                    t0 = time.perf_counter()
                    _omp(self._opts.build_threads)
                    gen.main.add(rows)
                    took = time.perf_counter() - t0
            step = int(min(8192, max(8, step * min(2.0, MERGE_STEP_S / max(took, 1e-5)))))
        return step

    def _rebuild_loop(self) -> None:
        try:
            for _ in range(3):
                with self._lock:
                    if self._closed or self._view is None:
                        return
                    reason = self._rebuild_reason(self._view)
                if reason is None or not self._rebuild_once():
                    return
        except _Stopped:
            return
        except Exception:
            log.exception("faiss collection %s: background rebuild failed; retrying in %d s",
                          self.spec.name, REBUILD_RETRY_S)
            with self._lock:
                self._rebuild_retry_at = time.monotonic() + REBUILD_RETRY_S
        finally:
            self._merge_wake.set()  # the merger paused while this ran

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def _new_main(self, kind: str, n: int, store: Store | None = None) -> Any:
        d, metric = self.spec.dimension, _METRICS[self.spec.metric]
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self._opts.hnsw_m, metric)
            index.hnsw.efConstruction = self._opts.hnsw_ef_construction
            return index
        assert store is not None
        nlist = max(1, min(self._ivf_nlist(n), n // 39))  # k-means wants 39 points a list
        quantizer = faiss.IndexFlatIP(d) if self._ip else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        if self.spec.metric == "cosine":
            index.cp.spherical = True
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))
        _omp(self._opts.build_threads)
        index.train(store.take(sample))
        return index

    def _build_main(self, kind: str | None, store: Store, n: int) -> Any:
        if kind is None or (kind == "ivf" and n == 0):  # nothing to train IVF on
            return None
        index = self._new_main(kind, n, store)
        for lo in range(0, n, BUILD_CHUNK):
            self._check_stop()
            _omp(self._opts.build_threads)
            index.add(np.ascontiguousarray(store.rows(lo, min(n, lo + BUILD_CHUNK))))
        return index

    def _calibrate(self, main: Any, kind: str | None, store: Store, n: int,
                   hold: Any = contextlib.nullcontext) -> tuple[int, float | None]:
        """The efSearch this HNSW graph over rows [0, n) needs for the target recall@10,
        and the recall it measured: (0, None) when not calibrated (another kind, target 0,
        too few rows to matter)."""
        target = self._opts.hnsw_target_recall
        if kind != "hnsw" or main is None or not target or n < CALIBRATE_MIN:
            return 0, None
        t0 = time.perf_counter()
        _omp(self._opts.build_threads)
        ef, recall = calibrate_ef(
            main, store, n, lambda q, kk: self._scan(store, q, kk, 0, n, None), target,
            self._opts.hnsw_ef_search, self._opts.hnsw_max_ef_search, self._check_stop,
            hold=hold)
        log.info("faiss collection %s: efSearch %d for recall@10 %.3f (target %.2f) on %d "
                 "vectors, calibrated in %.1f s", self.spec.name, ef, recall, target, n,
                 time.perf_counter() - t0)
        if recall < target:
            log.warning("faiss collection %s: recall@10 %.3f at the largest efSearch (%d) is "
                        "under the target %.2f: raise faiss_ef_construction or "
                        "faiss_hnsw_max_ef_search, or use exact search", self.spec.name,
                        recall, ef, target)
        return ef, recall

    def _calibrated_for(self) -> tuple[float, int, int]:
        o = self._opts
        return (o.hnsw_target_recall, o.hnsw_ef_search, o.hnsw_max_ef_search)

    def _ef_search(self, gen: _Gen) -> int:
        """The graph's calibrated efSearch while it holds for these settings, else the
        configured one."""
        if gen.ef and gen.calibrated_for == self._calibrated_for():
            return gen.ef
        return self._opts.hnsw_ef_search

    def _calibration_due(self, gen: _Gen) -> bool:
        """An HNSW graph never calibrated (or for other settings), or twice as large as
        when it was (merges grow it: a graph built at the auto threshold may reach 20 times
        that)."""
        if not (gen.main_kind == "hnsw" and gen.main is not None
                and self._opts.hnsw_target_recall > 0):
            return False
        n = int(gen.main.ntotal)
        if gen.calibrated_for != self._calibrated_for():
            return n >= CALIBRATE_MIN
        return n >= max(CALIBRATE_MIN, 2 * gen.calibrated_n)

    def _calibrate_if_due(self) -> None:
        """Calibrate the current graph if due (in the merger's thread, between merges: a
        graph loaded without a calibration, or grown twice as large by merges)."""
        v = self._view
        rebuilder = self._rebuilder
        if v is None or not self._calibration_due(v.gen) or (
                rebuilder is not None and rebuilder.is_alive()):
            return  # (a rebuild calibrates its own graph)
        gen = v.gen
        try:
            with gen.rw.read():
                n = int(gen.main.ntotal)
            ef, recall = self._calibrate(gen.main, gen.main_kind, gen.store, n, gen.rw.read)
        except _Stopped:
            return
        except Exception:
            log.exception("faiss collection %s: efSearch calibration failed; searching at "
                          "efSearch %d", self.spec.name, self._ef_search(gen))
            with self._lock:  # not again until it doubles
                gen.calibrated_n = max(gen.calibrated_n, n)
                gen.calibrated_for = self._calibrated_for()
            return
        with self._lock:
            gen.ef, gen.recall, gen.calibrated_n = ef, recall, n
            gen.calibrated_for = self._calibrated_for()
            self._dirty = True  # the next snapshot records it

    def _rebuild_once(self) -> bool:
        """Build the next generation from a view and swap it in. False when it could not
        (the collection closed or changed generation meanwhile)."""
        with self._lock:
            v0 = self._live_view()
            gen0 = v0.gen
            target = self._desired(v0.n_live, gen0.main_kind)
            compacting = self._needs_compaction(v0)
            self._force_compact = False
        if not compacting:
            # Same rows, new main index: built beside the old one, swapped in; the rows
            # written meanwhile are its tail, which the merger adds.
            main = self._build_main(target, gen0.store, v0.n)
            ef, recall = self._calibrate(main, target, gen0.store, v0.n)
            gen1 = _Gen(gen0.store, main, target if main is not None else None, v0.n, ef,
                        recall, v0.n if ef else 0, self._calibrated_for() if ef else None)
            with self._lock:
                v = self._view
                if self._closed or v is None or v.gen is not gen0:
                    return False
                self._view = replace(v, gen=gen1)
                self._masks.clear()
                self._generation += 1
                self._dirty = True
                self._maintain_locked()
            return True
        old = gen0.store
        n0 = v0.n
        keep = np.flatnonzero(unpack(v0.live, n0))
        new = Store(self.spec.dimension)
        for i in range(0, len(keep), BUILD_CHUNK):
            self._check_stop()
            part = keep[i : i + BUILD_CHUNK]
            new.append(old.ids[part], old.take(part), old.codes[:, part])
        main = self._build_main(target, new, new.n)
        built_n = new.n
        ef, recall = self._calibrate(main, target, new, built_n)
        # Rows written meanwhile, copied without the lock (rows below a view's n never
        # change) until few are left for the swap.
        sources = [keep]
        n1 = n0
        for _ in range(8):
            self._check_stop()
            v = self._view
            if v is None or v.gen is not gen0:
                return False
            if v.n - n1 <= BUILD_CHUNK // 4:
                break
            _copy_rows(old, new, n1, v.n)
            sources.append(np.arange(n1, v.n))
            n1 = v.n
        v = self._view
        if v is None or v.gen is not gen0:
            return False
        old_of_new = np.concatenate(sources)
        assumed = unpack(v.live, v.n)[old_of_new]  # liveness the id map below is built on
        alive = np.flatnonzero(assumed)
        slots = dict(zip(new.ids[alive].tolist(), alive.tolist(), strict=True))
        with self._lock:
            v = self._view
            if self._closed or v is None or v.gen is not gen0:
                return False
            n2 = v.n
            if n2 > n1:
                _copy_rows(old, new, n1, n2)
                old_of_new = np.concatenate([old_of_new, np.arange(n1, n2)])
            live_now = unpack(v.live, n2)[old_of_new]
            for s in np.flatnonzero(assumed & ~live_now[: len(assumed)]).tolist():
                i = int(new.ids[s])
                if slots.get(i) == s:
                    del slots[i]
            for s in (len(assumed) + np.flatnonzero(live_now[len(assumed):])).tolist():
                slots[int(new.ids[s])] = s
            gen1 = _Gen(new, main, target if main is not None else None, built_n, ef, recall,
                        built_n if ef else 0, self._calibrated_for() if ef else None)
            self._view = _View(gen1, new.n, pack(live_now), int(np.count_nonzero(live_now)))
            self._slots = slots
            self._masks.clear()
            self._generation += 1
            self._dirty = True
            self._maintain_locked()
        return True


def calibrate_ef(main: Any, store: Store, n: int,
                 exact: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                 target: float, floor: int, cap: int, check_stop: Any = lambda: None,
                 k: int = 10, queries: int = 200, hold: Any = contextlib.nullcontext
                 ) -> tuple[int, float]:
    """The smallest efSearch of floor, 2*floor, ... (at most ``cap``) at which ``main`` (an
    HNSW graph over rows [0, n) of ``store``) finds ``target`` of the exact top-``k``, and
    the recall it found (at ``cap`` when none reaches the target). Queries: ``queries``
    rows of the collection itself, each without itself in either answer (so a vector
    that is its own nearest neighbour does not flatter the graph). ``exact(q, k)``: the
    exact (scores, rows) over rows [0, n). ``hold()`` is held around each search of
    ``main`` (its read lock when others may write it meanwhile)."""
    rng = np.random.default_rng(n)
    picks = np.sort(rng.choice(n, min(n, queries), replace=False))
    q = np.ascontiguousarray(store.take(picks))
    check_stop()
    _, exact_i = exact(q, k + 1)
    want = [set(row[(row >= 0) & (row != p)].tolist()[:k]) for row, p in
            zip(exact_i, picks, strict=True)]
    ef, recall = floor, 0.0
    while True:
        check_stop()
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(max(ef, k + 1))
        with hold():
            _, got = main.search(q, k + 1, params=params)
        hits = sum(len(w & set(row[(row >= 0) & (row < n) & (row != p)].tolist()[:k]))
                   for w, row, p in zip(want, got, picks, strict=True))
        recall = hits / max(1, sum(len(w) for w in want))
        if recall >= target or ef >= cap:
            return int(ef), float(recall)
        ef = min(cap, ef * 2)


_CALIBRATION_KEYS = ("ef", "recall", "vectors", "target", "floor", "cap")


def _efs_of(meta: dict) -> dict[str, dict[str, float]]:
    """meta.json's calibrations by snapshot checksum (none in files written before; an
    entry not of this shape is ignored: the graph is calibrated again)."""
    raw = meta.get("hnsw_ef", {})
    if not isinstance(raw, dict):
        return {}
    return {d: {k: float(v[k]) for k in _CALIBRATION_KEYS} for d, v in raw.items()
            if isinstance(d, str) and isinstance(v, dict)
            and all(isinstance(v.get(k), int | float) for k in _CALIBRATION_KEYS)}


def _copy_rows(old: Store, new: Store, lo: int, hi: int) -> None:
    for start in range(lo, hi, BUILD_CHUNK):
        end = min(hi, start + BUILD_CHUNK)
        new.append(old.ids[start:end], old.rows(start, end), old.codes[:, start:end])


def _write_rows(w: SnapshotWriter, spec: CollectionSpec, v: _View, tables: PayloadTable,
                sizes: tuple[int, ...], gen: _Gen, main_n: int) -> str:
    """The sections after ``main``, and the header; returns the file's SHA-256."""
    return write_sections(w, dimension=spec.dimension, metric=spec.metric, store=gen.store,
                          n=v.n, live=v.live, n_live=v.n_live, tables=tables,
                          table_sizes=sizes, main_kind=gen.main_kind, main_n=main_n,
                          built_n=gen.built_n)


def _best(parts: list[tuple[np.ndarray, np.ndarray]], k: int,
          nq: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several (scores, slots) result sets, best first, padded with -1."""
    if not parts:
        return (np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, np.int64))
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        # One block (an index of up to a block's rows): FAISS's top-k comes best first
        # already, the missing (-inf) last; re-sorting it cost each search ~25 us of Python.
        return parts[0]
    scores = np.concatenate([p[0] for p in parts], axis=1)
    slots = np.concatenate([p[1] for p in parts], axis=1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        slots = np.pad(slots, ((0, 0), (0, pad)), constant_values=-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(scores, order, axis=1),
            np.take_along_axis(slots, order, axis=1))


_GPU_LOCK = threading.Lock()
_GPU_RES: dict[int, Any] = {}  # device -> the process's StandardGpuResources for it


def _torch_cuda_devices() -> tuple[Any, int]:
    """torch and how many CUDA devices it sees (0 for a CPU build, or no torch)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency of the service
        return None, 0
    try:
        return torch, torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a CUDA build on a machine whose driver fails
        return torch, 0


def _faiss_gpus() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - a faiss-gpu build whose CUDA cannot start
        return 0


def _gpu_scorer(opts: FaissOptions, dim: int, ip: bool) -> GpuScorer | None:
    """The GPU scorer the options ask for: ``gpu=True`` requires one (EngineUnavailable
    otherwise), None takes one when a GPU is seen, False never. Engine ``auto``: torch when it
    sees CUDA (PyPI's faiss-gpu has no Hopper kernels: see _faiss_gpu), else faiss-gpu."""
    if opts.gpu is False:
        return None
    dev = opts.gpu_device
    engines = ("torch", "faiss") if opts.gpu_engine == "auto" else (opts.gpu_engine,)
    for engine in engines:
        if engine == "torch":
            torch, count = _torch_cuda_devices()
            if count > dev:
                return GpuScorer(faiss, None, _GPU_LOCK, dim, ip, device=dev, engine="torch",
                                 torch=torch)
        elif _faiss_gpus() > dev:
            with _GPU_LOCK:
                res = _GPU_RES.get(dev)
                if res is None:
                    res = _GPU_RES[dev] = faiss.StandardGpuResources()
            return GpuScorer(faiss, res, _GPU_LOCK, dim, ip, device=dev, engine="faiss")
    if opts.gpu:
        raise EngineUnavailable(
            f"faiss gpu=true but no GPU {dev} is usable through "
            + " or ".join(engines) + ": torch needs a CUDA build, faiss needs "
            "faiss-gpu (make install-gpu); or set faiss_gpu=false")
    return None


def _omp(threads: int) -> None:
    """Set FAISS's OpenMP threads for the calling thread (the setting is per thread).

    faiss-cpu bundles its own libgomp, apart from torch's. Its idle worker threads spin after
    every parallel region; at a search every few milliseconds they never sleep, and on a
    small machine they take the cores the embedder needs: a query's forward pass went from
    4.6 ms to 11.2 ms here. One thread per search (concurrency comes from concurrent
    requests) avoids that; raise it for very large exact indexes on many cores.

    Set once per thread and value: the call lets go of the interpreter lock, and winning it
    back on a loaded server can cost a context switch on every search."""
    if threads > 0 and getattr(_OMP_SET, "threads", 0) != threads:
        faiss.omp_set_num_threads(threads)
        _OMP_SET.threads = threads


_OMP_SET = threading.local()  # the value _omp last set in this thread


def _empty() -> SearchHits:
    return SearchHits(ids=np.empty(0, dtype=np.int64), scores=np.empty(0, dtype=np.float32))


class FaissBackend:
    """Collections live in ``root/<name>/`` as a FAISS snapshot plus its metadata.

    ``omp_threads``: FAISS OpenMP threads per search (0 leaves FAISS's default); the other
    keyword arguments are ``FaissOptions`` fields (kind, auto_threshold, hnsw_m, ...)."""

    name = "faiss"

    def __init__(self, root: Path, omp_threads: int = 1, **options: Any) -> None:
        self._root = Path(root)
        self._omp_threads = omp_threads
        self._options = FaissOptions(**options)
        self._open: dict[str, FaissIndex] = {}
        self._lock = threading.Lock()

    @property
    def local_store(self) -> Path:
        return self._root

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
            index = FaissIndex(spec, self._dir(spec.name), self._omp_threads, self._options)
            self._open[spec.name] = index
            return index

    def drop(self, name: str) -> None:
        with self._lock:
            index = self._open.pop(name, None)
            if index is not None:
                # No snapshot may be half-way to disk while the files go.
                with index._flush_lock:
                    index._shutdown()
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
        if directory.exists() and not directory.is_dir():
            return [f"{directory}: not a directory (moved aside and rebuilt from the catalog "
                    "at start)"]
        if index_path.exists() and not meta_path.exists():
            return [f"{index_path}: no meta.json to check it against (moved aside and rebuilt "
                    "from the catalog at start)"]
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
            if index_path.exists() and meta is not None:  # (without meta.json: above)
                _verify_snapshot(index_path, meta, meta["dimension"], meta["metric"])
        except _Damaged as d:
            problems.append(str(d))
        except OSError as exc:  # a directory in a file's place, an I/O error
            problems.append(f"{exc.filename or directory}: unreadable ({exc.strerror or exc}): "
                            "moved aside and rebuilt from the catalog at start")
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


def _verify_snapshot(path: Path, meta: dict | None, dimension: int, metric: str) -> None:
    """The checks of a load without building anything: checksum, then the header (the
    checksum covers every byte); files without a checksum are loaded whole."""
    if not _current_format(path) or not (meta and meta.get("sha256")):
        _load_snapshot(path, meta, dimension, metric)
        return
    _check_digest(path, meta)
    try:
        with open(path, "rb") as fh:
            header = read_header(fh)
    except (SnapshotError, OSError) as exc:
        raise _Damaged("faiss_snapshot", path, str(exc)) from None
    if header.get("dimension") != dimension or header.get("metric") != metric:
        raise _Damaged("faiss_snapshot", path, f"holds {header.get('dimension')}-d vectors "
                       f"of metric {header.get('metric')}, its meta.json says {dimension}-d "
                       f"{metric}")
