"""The in-memory parts of the FAISS backend that know nothing of FAISS: append-only rows,
packed bitmaps, interned payload columns, and a reader/writer lock.

Every vector lives in a *slot*; slots are numbered in append order and never rewritten. A
replacement or a delete only clears the old slot's bit in the live bitmap (a tombstone), so a
write costs O(rows written), and a reader that knows a row count ``n`` reads rows ``< n``
without a lock while writers append behind it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from indexers.payload import Filter, Payload

BLOCK_ROWS = 1 << 16  # rows per vector block; a multiple of 8 so blocks start on bitmap bytes
FIELDS = ("doc_id", "path", "language", "kind", "metadata")  # rows of Store.codes


# -- bitmaps (little bit order: slot s is bit s & 7 of byte s >> 3, as faiss.IDSelectorBitmap) --
def nbytes(n: int) -> int:
    return (n + 7) >> 3


def pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits[: nbytes(n)], count=n, bitorder="little").view(np.bool_)


def popcount(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum())


def grown(bits: np.ndarray, n: int) -> np.ndarray:
    """A copy of ``bits`` sized for ``n`` slots (new bits clear)."""
    out = np.zeros(nbytes(n), dtype=np.uint8)
    keep = min(len(bits), len(out))
    out[:keep] = bits[:keep]
    return out


def set_range(bits: np.ndarray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) in place."""
    if lo >= hi:
        return
    first, last = lo >> 3, (hi - 1) >> 3
    if first == last:
        bits[first] |= np.uint8(((1 << (hi - lo)) - 1) << (lo & 7))
        return
    bits[first] |= np.uint8((0xFF << (lo & 7)) & 0xFF)
    bits[first + 1 : last] = 0xFF
    bits[last] |= np.uint8((1 << (((hi - 1) & 7) + 1)) - 1)


def clear_slots(bits: np.ndarray, slots: np.ndarray) -> None:
    """Clear the bits of ``slots`` in place."""
    if len(slots):
        slots = np.asarray(slots, dtype=np.int64)
        np.bitwise_and.at(bits, slots >> 3,
                          ~np.left_shift(np.uint8(1), (slots & 7).astype(np.uint8)))


# -- the rows --------------------------------------------------------------------------------
class Store:
    """Rows in slot order: vectors in blocks that never move (the last one grows by copy up
    to BLOCK_ROWS, which is safe: a reader that read the row count first finds its rows in
    either copy), ids and payload codes in arrays that grow by copy. Appends are made by one
    writer at a time (the index's lock); readers read rows below a count they were given."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.blocks: list[np.ndarray] = []
        self.ids = np.empty(0, dtype=np.int64)
        self.codes = np.empty((len(FIELDS), 0), dtype=np.int32)  # -1: no payload
        self.n = 0

    def _reserve(self, n: int) -> None:
        if n > len(self.ids):
            cap = max(n, 2 * len(self.ids), 256)
            ids = np.empty(cap, dtype=np.int64)
            ids[: self.n] = self.ids[: self.n]
            codes = np.full((len(FIELDS), cap), -1, dtype=np.int32)
            codes[:, : self.n] = self.codes[:, : self.n]
            self.ids, self.codes = ids, codes
        need = (n + BLOCK_ROWS - 1) // BLOCK_ROWS
        for b in range(need):
            rows = min(BLOCK_ROWS, n - b * BLOCK_ROWS)
            if b == len(self.blocks):
                self.blocks.append(np.empty((max(rows, 256) if b == 0 else BLOCK_ROWS,
                                             self.dim), dtype=np.float32))
            elif len(self.blocks[b]) < rows:
                block = np.empty((min(BLOCK_ROWS, max(rows, 2 * len(self.blocks[b]))),
                                  self.dim), dtype=np.float32)
                used = min(len(self.blocks[b]), max(0, self.n - b * BLOCK_ROWS))
                block[:used] = self.blocks[b][:used]
                self.blocks[b] = block

    def append(self, ids: np.ndarray, vectors: np.ndarray, codes: np.ndarray) -> None:
        m = len(ids)
        lo, hi = self.n, self.n + m
        self._reserve(hi)
        done = 0
        for _, rows in self.pieces(lo, hi):
            rows[:] = vectors[done : done + len(rows)]
            done += len(rows)
        self.ids[lo:hi] = ids
        self.codes[:, lo:hi] = codes
        self.n = hi

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first slot, rows) of slots [lo, hi), one contiguous view per block."""
        while lo < hi:
            b, off = divmod(lo, BLOCK_ROWS)
            take = min(hi - lo, BLOCK_ROWS - off)
            yield lo, self.blocks[b][off : off + take]
            lo += take

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Slots [lo, hi) as one contiguous array (a view when they sit in one block)."""
        parts = [rows for _, rows in self.pieces(lo, hi)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)

    def take(self, slots: np.ndarray) -> np.ndarray:
        """The vectors of ``slots`` (ascending), gathered into one array."""
        out = np.empty((len(slots), self.dim), dtype=np.float32)
        blocks = slots // BLOCK_ROWS
        bounds = np.searchsorted(blocks, np.arange(len(self.blocks) + 1))
        for b in range(len(self.blocks)):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if lo < hi:
                out[lo:hi] = self.blocks[b][slots[lo:hi] - b * BLOCK_ROWS]
        return out


# -- payloads --------------------------------------------------------------------------------
class Compiled:
    """A Filter turned into the codes that pass, per payload column (None: no restriction),
    with the table sizes the codes index into."""

    def __init__(self, columns: list[tuple[int, np.ndarray, int]]) -> None:
        self.columns = columns  # (row of Store.codes, passing codes, table size)

    def mask(self, codes: np.ndarray, n: int) -> np.ndarray:
        """Which of the first ``n`` rows pass: a vector without payload passes no filter."""
        out = codes[0, :n] >= 0
        for row, passing, size in self.columns:
            lut = np.zeros(size + 1, dtype=np.bool_)  # lut[-1]: the "no payload" code
            lut[passing] = True
            out &= lut[codes[row, :n]]
        return out


class PayloadTable:
    """Interned payload strings, shared by every generation of one collection. Tables only
    grow (codes stay valid for ever); mutate and compile under the index's lock."""

    def __init__(self) -> None:
        self.values: list[list[str]] = [[], [], [], []]  # doc_id, path, language, kind
        self.metas: list[tuple[tuple[str, str], ...]] = []
        self._codes: list[dict[str, int]] = [{}, {}, {}, {}]
        self._meta_codes: dict[tuple[tuple[str, str], ...], int] = {}
        self._pairs: dict[tuple[str, str], list[int]] = {}  # (key, value) -> meta codes
        self._sorted_paths: list[str] = []
        self._sorted_path_codes: list[int] = []

    @classmethod
    def restore(cls, values: Sequence[Sequence[str]],
                metas: Sequence[Sequence[Sequence[str]]]) -> PayloadTable:
        table = cls()
        for row, strings in enumerate(values):
            for s in strings:
                table._intern(row, str(s))
        for pairs in metas:
            table._intern_meta(tuple((str(k), str(v)) for k, v in pairs))
        table._resort_paths()
        return table

    def sizes(self) -> tuple[int, ...]:
        return (*(len(v) for v in self.values), len(self.metas))

    def _intern(self, row: int, s: str) -> int:
        code = self._codes[row].get(s)
        if code is None:
            code = len(self.values[row])
            self.values[row].append(s)
            self._codes[row][s] = code
        return code

    def _intern_meta(self, pairs: tuple[tuple[str, str], ...]) -> int:
        code = self._meta_codes.get(pairs)
        if code is None:
            code = len(self.metas)
            self.metas.append(pairs)
            self._meta_codes[pairs] = code
            for pair in pairs:
                self._pairs.setdefault(pair, []).append(code)
        return code

    def _resort_paths(self) -> None:
        order = sorted(range(len(self.values[1])), key=self.values[1].__getitem__)
        self._sorted_paths = [self.values[1][c] for c in order]
        self._sorted_path_codes = order

    def encode(self, payloads: Sequence[Payload] | None, m: int) -> np.ndarray:
        """Codes of ``payloads`` (-1 everywhere for none), interning new strings."""
        codes = np.full((len(FIELDS), m), -1, dtype=np.int32)
        if payloads is None:
            return codes
        paths_before = len(self.values[1])
        for j, p in enumerate(payloads):
            codes[0, j] = self._intern(0, p.doc_id)
            codes[1, j] = self._intern(1, p.path)
            codes[2, j] = self._intern(2, p.language)
            codes[3, j] = self._intern(3, p.kind)
            codes[4, j] = self._intern_meta(tuple(sorted(dict(p.metadata).items())))
        new_paths = len(self.values[1]) - paths_before
        if new_paths > 64:
            self._resort_paths()
        else:
            for code in range(paths_before, len(self.values[1])):
                path = self.values[1][code]
                at = bisect.bisect_left(self._sorted_paths, path)
                self._sorted_paths.insert(at, path)
                self._sorted_path_codes.insert(at, code)
        return codes

    def compile(self, flt: Filter) -> Compiled | None:
        """The filter as passing codes per column; None when nothing can pass."""
        sizes = self.sizes()
        columns: list[tuple[int, np.ndarray, int]] = []
        for row, wanted in ((0, flt.doc_ids), (2, flt.languages), (3, flt.kinds)):
            if wanted:
                codes = [c for c in (self._codes[row].get(w) for w in wanted) if c is not None]
                if not codes:
                    return None
                columns.append((row, np.asarray(codes, dtype=np.int64), sizes[row]))
        if flt.path_prefix:
            lo = bisect.bisect_left(self._sorted_paths, flt.path_prefix)
            upper = _successor(flt.path_prefix)
            hi = (len(self._sorted_paths) if upper is None
                  else bisect.bisect_left(self._sorted_paths, upper, lo))
            if lo >= hi:
                return None
            columns.append((1, np.asarray(self._sorted_path_codes[lo:hi], dtype=np.int64),
                            sizes[1]))
        if flt.metadata:
            passing: set[int] | None = None
            for pair in flt.metadata:
                posting = self._pairs.get((pair[0], pair[1]))
                if not posting:
                    return None
                passing = set(posting) if passing is None else passing & set(posting)
            if not passing:
                return None
            columns.append((4, np.fromiter(passing, dtype=np.int64), sizes[4]))
        return Compiled(columns)


def _successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix`` (None: none
    is, the prefix being all U+10FFFF)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


# -- locking ---------------------------------------------------------------------------------
class RWLock:
    """Shared readers, one exclusive writer, fair both ways: a waiting writer holds back
    new readers (a merge step is not starved by a stream of searches), and readers waiting
    when a writer lets go all get in before the next writer (searches are not starved by a
    merger taking step after step)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # inside
        self._readers_waiting = 0
        self._readers_turn = False  # a writer let go while readers waited: they go first
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or (self._writers_waiting and not self._readers_turn):
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._readers += 1
            if not self._readers_waiting:
                self._readers_turn = False
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers or self._readers_turn:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._readers_turn = self._readers_waiting > 0
                self._cond.notify_all()
