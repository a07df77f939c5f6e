"""Exact scoring on a GPU: a collection's rows mirrored in device memory.

Two engines do the scoring: faiss-gpu's ``GpuIndexFlat`` (``retriever[gpu]``), or torch (a
CUDA build, as the embedder uses on a GPU): a matrix product and a top-k over rows kept in a
device tensor. The PyPI faiss-gpu-cu12 wheels (1.9 to 1.14) carry kernels for sm_70 and sm_80
only, so on Hopper (H100/H200) a faiss GPU search stops the process with CUDA error 209 ("no
kernel image"); ``auto`` therefore uses torch when it sees CUDA, faiss-gpu otherwise.

A *mirror* is a flat device index over the rows of one ``Store`` (one generation of a
collection): the rows that were live when it was built, then every row appended since, in
slot order (``slots[i]`` is the slot of device row ``i``). Rows below a count never change,
so a mirror only grows: a search uploads the rows written since the last one and nothing
else. Tombstones and filters are honoured by asking the GPU for ``k`` plus the number of
device rows that cannot pass (dead, filtered out, or beyond the searcher's view) and dropping
those, which keeps the answer exact. When that number is more than a GPU selection returns
(``MAX_K``, 2048 in faiss), torch scores with a mask of the rows that pass instead, and
faiss leaves the search to the CPU; once the dead rows alone
pass ``rebuild_dead`` the mirror is rebuilt from the live rows in the background (searches
score on the CPU meanwhile).

GPU calls are serialised by one process-wide lock (faiss's ``StandardGpuResources`` is not
thread-safe); a search holds it for the GPU's time (``bench/results/gpu-faiss-h200.md``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from indexers._faiss_store import Store, unpack

log = logging.getLogger(__name__)

MAX_K = 2048  # the largest k a faiss GPU k-selection returns
UPLOAD_ROWS = 1 << 16  # rows per add while uploading


class TorchFlat:
    """A flat index in a torch device tensor: ``add`` appends rows, ``search`` returns faiss's
    (distances, row numbers): inner products, or squared L2 distances, best first; ``mask``
    (a bool per row) restricts it to the rows that pass."""

    masks = True  # takes a row mask: nothing to over-fetch

    def __init__(self, torch: Any, dim: int, ip: bool, device: str) -> None:
        self._t = torch
        self.d = dim
        self._ip = ip
        self._device = device
        self._x = torch.empty((0, dim), dtype=torch.float32, device=device)
        self._norms = torch.empty(0, dtype=torch.float32, device=device)
        self.ntotal = 0

    def add(self, rows: np.ndarray) -> None:
        t = self._t
        m = len(rows)
        need = self.ntotal + m
        if need > len(self._x):  # grow by half again: amortised O(1) copies per row
            cap = max(need, len(self._x) * 3 // 2, 1024)
            x = t.empty((cap, self.d), dtype=t.float32, device=self._device)
            x[: self.ntotal] = self._x[: self.ntotal]
            norms = t.empty(cap, dtype=t.float32, device=self._device)
            norms[: self.ntotal] = self._norms[: self.ntotal]
            self._x, self._norms = x, norms
        chunk = t.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self._device)
        self._x[self.ntotal : need] = chunk
        self._norms[self.ntotal : need] = (chunk * chunk).sum(dim=1)
        self.ntotal = need

    def search(self, queries: np.ndarray, k: int,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        t = self._t
        n = self.ntotal
        q = t.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self._device)
        with t.inference_mode():
            scores = q @ self._x[:n].T
            if not self._ip:  # -(|q|^2 + |x|^2 - 2 q.x): larger is nearer
                scores = 2 * scores - self._norms[:n] - (q * q).sum(dim=1, keepdim=True)
            if mask is not None:
                allowed = t.from_numpy(mask).to(self._device)
                scores = scores.masked_fill(~allowed, float("-inf"))
            k = min(k, n)
            top, rows = t.topk(scores, k, dim=1)
            top, rows = top.cpu().numpy(), rows.cpu().numpy().astype(np.int64)
        rows[np.isneginf(top)] = -1
        return (top if self._ip else -top), rows


class _Mirror:
    __slots__ = ("index", "slots", "m", "hw", "built_live")

    def __init__(self, index: Any, slots: np.ndarray, hw: int) -> None:
        self.index = index
        self.slots = slots  # capacity >= m; slots[:m] ascending
        self.m = len(slots)
        self.hw = hw  # every slot below hw that can still be live is on the device
        self.built_live = len(slots)

    def append_slots(self, lo: int, hi: int) -> None:
        need = self.m + hi - lo
        if need > len(self.slots):
            grown = np.empty(max(need, 2 * len(self.slots), 1024), dtype=np.int64)
            grown[: self.m] = self.slots[: self.m]
            self.slots = grown
        self.slots[self.m : need] = np.arange(lo, hi, dtype=np.int64)
        self.m = need
        self.hw = hi


class GpuScorer:
    """Exact top-k over a collection's rows on GPU ``device`` (see the module doc)."""

    def __init__(self, faiss: Any, resources: Any, lock: threading.Lock, dim: int, ip: bool,
                 device: int = 0, rebuild_dead: int = MAX_K // 2,
                 index_factory: Callable[[], Any] | None = None, engine: str = "faiss",
                 torch: Any = None) -> None:
        self._faiss = faiss
        self._torch = torch
        self.engine = engine  # "faiss" or "torch"
        self._index_factory = index_factory  # tests: a CPU flat index in the GPU's place
        self._res = resources
        self._lock = lock  # the process's GPU lock (faiss's resources are not thread-safe)
        self._dim = dim
        self._ip = ip
        self._device = device
        self.rebuild_dead = rebuild_dead
        self._mirrors: weakref.WeakKeyDictionary[Store, _Mirror] = weakref.WeakKeyDictionary()
        self._rebuilding: set[int] = set()
        self.searches = 0  # answered on the GPU
        self.masked = 0  # of those, answered with a row mask (torch) rather than over-fetching
        self.declined = 0  # left to the CPU (too many rows to skip, or a rebuild running)
        self.uploaded_rows = 0

    def _new_index(self) -> Any:
        if self._index_factory is not None:
            return self._index_factory()
        if self.engine == "torch":
            return TorchFlat(self._torch, self._dim, self._ip, f"cuda:{self._device}")
        f = self._faiss
        cfg = f.GpuIndexFlatConfig()
        cfg.device = self._device
        cls = f.GpuIndexFlatIP if self._ip else f.GpuIndexFlatL2
        return cls(self._res, self._dim, cfg)

    def _upload(self, index: Any, rows: np.ndarray) -> None:
        for lo in range(0, len(rows), UPLOAD_ROWS):
            index.add(np.ascontiguousarray(rows[lo : lo + UPLOAD_ROWS]))
        self.uploaded_rows += len(rows)

    def _build(self, store: Store, n: int, live: np.ndarray,
                hold: Callable[[], Any] = contextlib.nullcontext) -> _Mirror:
        """A mirror of the live rows below ``n``; ``hold()`` is entered around each GPU step
        (the GPU lock for a background rebuild, nothing for a caller that holds it)."""
        keep = np.flatnonzero(unpack(live, n))
        with hold():
            index = self._new_index()
        for lo in range(0, len(keep), UPLOAD_ROWS):
            rows = store.take(keep[lo : lo + UPLOAD_ROWS])
            with hold():
                self._upload(index, rows)
        return _Mirror(index, keep.astype(np.int64), n)

    def drop(self, store: Store) -> None:
        with self._lock:
            self._mirrors.pop(store, None)

    def search(self, store: Store, queries: np.ndarray, k: int, n: int, live: np.ndarray,
               n_live: int, bits: np.ndarray | None,
               passing: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Scores (higher is better, -inf for none) and slots (-1 for none) of the exact top
        ``k`` among slots ``< n`` whose bit is set in ``bits`` (all live ones when None), or
        None when the GPU cannot answer this one exactly (the caller scores on the CPU).
        ``live``/``n_live``: the searcher's view; ``passing``: how many slots pass."""
        with self._lock:
            mirror = self._mirrors.get(store)
            if mirror is None:
                if id(store) in self._rebuilding:
                    self.declined += 1
                    return None
                mirror = self._build(store, n, live)
                self._mirrors[store] = mirror
            if mirror.hw < n:  # rows written since: append them, dead or alive
                self._upload(mirror.index, store.rows(mirror.hw, n))
                mirror.append_slots(mirror.hw, n)
            dead = int(np.searchsorted(mirror.slots[: mirror.m], n)) - n_live
            if dead > self.rebuild_dead:
                self._rebuild_later(store, n, live)
            skip = mirror.m - passing  # device rows that cannot be in this answer
            slots_map = mirror.slots[: mirror.m]
            if k + skip > MAX_K:
                if not getattr(mirror.index, "masks", False):
                    self.declined += 1
                    return None
                mask = _passing(slots_map, n, bits)  # for the device to skip the rest
                dist, rows = mirror.index.search(queries, min(k, mirror.m), mask)
                self.masked += 1
            else:
                dist, rows = mirror.index.search(queries, min(k + skip, mirror.m))
            self.searches += 1
        found = rows >= 0
        slots = np.where(found, slots_map[np.maximum(rows, 0)], -1)
        ok = found & _passing(slots, n, bits)
        scores = dist if self._ip else -dist
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # passing first, in rank order
        take_ok = np.take_along_axis(ok, order, axis=1)
        out_scores = np.where(take_ok, np.take_along_axis(scores, order, axis=1), -np.inf)
        out_slots = np.where(take_ok, np.take_along_axis(slots, order, axis=1), -1)
        return out_scores.astype(np.float32), out_slots.astype(np.int64)

    def _rebuild_later(self, store: Store, n: int, live: np.ndarray) -> None:
        """Rebuild ``store``'s mirror from the live rows in a thread; call under the lock.
        Searches are declined (CPU) until it is in place."""
        key = id(store)
        if key in self._rebuilding:
            return
        self._rebuilding.add(key)
        self._mirrors.pop(store, None)
        live = live.copy()

        def run() -> None:
            try:
                mirror = self._build(store, n, live, hold=lambda: self._lock)
                with self._lock:
                    self._mirrors[store] = mirror
            except Exception:  # a failed upload: the next search tries again
                log.exception("rebuilding the GPU copy of a collection failed")
            finally:
                with self._lock:
                    self._rebuilding.discard(key)

        threading.Thread(target=run, name="faiss-gpu-rebuild", daemon=True).start()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = sum(m.m for m in self._mirrors.values())
        return {"gpu_engine": self.engine, "gpu_searches": self.searches,
                "gpu_masked": self.masked, "gpu_declined": self.declined,
                "gpu_rows": rows, "gpu_uploaded_rows": self.uploaded_rows}


def _passing(slots: np.ndarray, n: int, bits: np.ndarray | None) -> np.ndarray:
    """Whether each slot (any shape; -1 allowed) is below ``n`` and has its bit set in
    ``bits`` (every slot below ``n`` passes when ``bits`` is None)."""
    ok = (slots >= 0) & (slots < n)
    if bits is not None:
        safe = np.where(ok, slots, 0)
        ok &= ((bits[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1).astype(bool)
    return ok
