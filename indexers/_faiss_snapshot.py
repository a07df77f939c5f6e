"""The FAISS backend's snapshot file: one file, written front to back in one pass (so its
SHA-256 is computed while it is written) and read back section by section.

Layout::

    MAGIC | section bytes ... | header (JSON, UTF-8) | TRAILER_MAGIC | u64 header offset

Sections: ``main`` (the approximate index as ``faiss.write_index`` writes it, when there is
one), ``vectors`` (float32 rows ``vectors_from`` to ``n``: an HNSW index holds rows below
``main_n`` itself, so they are not written twice), ``ids`` (int64 per slot), ``live`` (the
packed live bitmap), ``codes`` (int32 payload codes, 5 x n) and ``tables`` (the interned
payload strings, JSON). The header lists each section's offset and length.

A file of the previous version (a bare ``faiss.IndexIDMap2`` over a flat index, no
payloads) still loads: its vectors and ids become slots, without payloads.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import faiss as _faiss
import numpy as np

from indexers._faiss_store import FIELDS, PayloadTable, Store, nbytes, set_range

MAGIC = b"retriever-faiss\x02"
TRAILER_MAGIC = b"RTVXEND\x00"
LEGACY_FOURCC = b"IxM2"  # faiss.IndexIDMap2, what the previous version wrote
faiss: Any = _faiss  # its stubs lag its API (PyCallbackIOWriter, SearchParameters...)

METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT,
           "l2": faiss.METRIC_L2}


class SnapshotError(Exception):
    """The file is not a snapshot this backend can load; the message says why."""


@dataclass
class SnapshotData:
    """What a snapshot holds, ready to serve."""

    store: Store
    live: np.ndarray  # packed bitmap over store.n slots
    n_live: int
    tables: PayloadTable
    main: Any  # faiss.Index over slots [0, main.ntotal), or None
    main_kind: str | None
    built_n: int  # rows the main index was built from (IVF retrains when it grows past)
    legacy: bool = False


class SnapshotWriter:
    """Streams sections to ``fh``, hashing what it writes."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
        self._pos = 0
        self.sections: dict[str, dict[str, int]] = {}
        self.write(MAGIC)

    def write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def array(self, name: str, arr: np.ndarray) -> None:
        start = self._pos
        if arr.size:
            self.write(np.ascontiguousarray(arr).data.cast("B"))
        self.sections[name] = {"offset": start, "length": self._pos - start}

    def rows(self, name: str, pieces: list[np.ndarray]) -> None:
        start = self._pos
        for rows in pieces:
            if rows.size:
                self.write(np.ascontiguousarray(rows).data.cast("B"))
        self.sections[name] = {"offset": start, "length": self._pos - start}

    def faiss_index(self, name: str, index: Any) -> None:
        """``faiss.write_index`` through a callback: no in-memory copy of the index, and a
        full disk is the OSError the callback raised."""
        start = self._pos
        writer = faiss.PyCallbackIOWriter(self.write)
        faiss.write_index(index, writer)
        del writer  # flushes its buffer
        self.sections[name] = {"offset": start, "length": self._pos - start}

    def finish(self, header: dict[str, Any]) -> str:
        """Write the header and trailer; the file's SHA-256."""
        offset = self._pos
        self.write(json.dumps({**header, "sections": self.sections}).encode("utf-8"))
        self.write(TRAILER_MAGIC + struct.pack("<Q", offset))
        return self._sha.hexdigest()


def write_sections(w: SnapshotWriter, *, dimension: int, metric: str, store: Store, n: int,
                   live: np.ndarray, n_live: int, tables: PayloadTable,
                   table_sizes: tuple[int, ...], main_kind: str | None, main_n: int,
                   built_n: int) -> str:
    """Write slots [0, n) after the ``main`` section (written first, by the caller, who
    holds that index still meanwhile; it covers slots [0, main_n)), then the header.
    Returns the file's SHA-256."""
    vectors_from = main_n if main_kind == "hnsw" else 0
    w.rows("vectors", [rows for _, rows in store.pieces(vectors_from, n)])
    w.array("ids", store.ids[:n])
    w.array("live", live[: nbytes(n)])
    w.array("codes", store.codes[:, :n])
    tables_json = {"values": [v[:size] for v, size in zip(tables.values, table_sizes,
                                                          strict=False)],
                   "metas": [list(map(list, m)) for m in tables.metas[: table_sizes[4]]]}
    w.array("tables", np.frombuffer(json.dumps(tables_json).encode("utf-8"), dtype=np.uint8))
    return w.finish({"format": 2, "dimension": dimension, "metric": metric, "n": n,
                     "n_live": n_live, "main_kind": main_kind, "main_n": main_n,
                     "vectors_from": vectors_from, "built_n": built_n,
                     "fields": list(FIELDS)})


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_snapshot(path: str, dimension: int, metric: str) -> SnapshotData:
    """Load a snapshot (either format), checked against the collection's dimension and
    metric. SnapshotError when it cannot be used."""
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC))
        if head == MAGIC:
            return _read_v2(fh, dimension, metric)
    if head[:4] == LEGACY_FOURCC:
        return _read_legacy(path, dimension, metric)
    raise SnapshotError("not a snapshot of this backend (unknown leading bytes)")


def read_header(fh: BinaryIO) -> dict[str, Any]:
    fh.seek(0, 2)
    size = fh.tell()
    if size < len(MAGIC) + len(TRAILER_MAGIC) + 8:
        raise SnapshotError("too short to be a snapshot")
    fh.seek(size - len(TRAILER_MAGIC) - 8)
    tail = fh.read(len(TRAILER_MAGIC) + 8)
    if tail[: len(TRAILER_MAGIC)] != TRAILER_MAGIC:
        raise SnapshotError("no trailer (the file was cut short)")
    (offset,) = struct.unpack("<Q", tail[len(TRAILER_MAGIC):])
    end = size - len(TRAILER_MAGIC) - 8
    if not len(MAGIC) <= offset < end:
        raise SnapshotError("its trailer points outside the file")
    fh.seek(offset)
    try:
        header = json.loads(fh.read(end - offset).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != 2:
        raise SnapshotError("its header is not a format-2 snapshot header")
    for section in header.get("sections", {}).values():
        if section["offset"] + section["length"] > offset:
            raise SnapshotError("a section runs past the header")
    return header


def _section(fh: BinaryIO, header: dict[str, Any], name: str, dtype: Any,
             count: int) -> np.ndarray:
    section = header["sections"].get(name)
    want = count * np.dtype(dtype).itemsize
    if section is None or section["length"] != want:
        raise SnapshotError(f"its {name!r} section is missing or of the wrong length")
    fh.seek(section["offset"])
    data = np.fromfile(fh, dtype=dtype, count=count) if count else np.empty(0, dtype)
    if len(data) != count:
        raise SnapshotError(f"its {name!r} section is cut short")
    return data


def _read_v2(fh: BinaryIO, dimension: int, metric: str) -> SnapshotData:
    header = read_header(fh)
    try:
        d, n, main_n = int(header["dimension"]), int(header["n"]), int(header["main_n"])
        vectors_from, main_kind = int(header["vectors_from"]), header["main_kind"]
        built_n = int(header.get("built_n", main_n))
    except (KeyError, TypeError, ValueError):
        raise SnapshotError("its header lacks a field") from None
    if d != dimension or header.get("metric") != metric:
        raise SnapshotError(f"holds {d}-d vectors of metric {header.get('metric')}, its "
                            f"meta.json says {dimension}-d {metric}")
    if main_kind not in (None, "hnsw", "ivf") or not 0 <= main_n <= n \
            or vectors_from not in (0, main_n):
        raise SnapshotError("its header is inconsistent")
    main: Any = None
    if main_kind is not None:
        section = header["sections"].get("main")
        if section is None:
            raise SnapshotError("its 'main' section is missing")
        fh.seek(section["offset"])
        left = [int(section["length"])]

        def read(size: int) -> bytes:
            data = fh.read(min(size, left[0]))
            left[0] -= len(data)
            return data

        try:
            main = faiss.read_index(faiss.PyCallbackIOReader(read))
        except RuntimeError as exc:
            last = (str(exc).strip().splitlines() or ["unknown error"])[-1][-160:]
            raise SnapshotError(f"FAISS cannot read its index ({last})") from None
        if main.ntotal != main_n or main.d != dimension \
                or main.metric_type != METRICS[metric]:
            raise SnapshotError("its index does not match its header")
    store = Store(dimension)
    ids = _section(fh, header, "ids", np.int64, n)
    codes = _section(fh, header, "codes", np.int32, len(FIELDS) * n).reshape(len(FIELDS), n)
    section = header["sections"].get("vectors")
    if section is None or section["length"] != (n - vectors_from) * dimension * 4:
        raise SnapshotError("its 'vectors' section is missing or of the wrong length")
    if vectors_from:  # rows the HNSW index holds
        flat = faiss.downcast_index(main.storage)
        head = faiss.rev_swig_ptr(flat.get_xb(), main_n * dimension).reshape(main_n, dimension)
        store.append(ids[:main_n], head, codes[:, :main_n])
    fh.seek(section["offset"])
    for lo in range(vectors_from, n, 1 << 16):
        hi = min(n, lo + (1 << 16))
        rows = np.fromfile(fh, dtype=np.float32, count=(hi - lo) * dimension)
        if len(rows) != (hi - lo) * dimension:
            raise SnapshotError("its 'vectors' section is cut short")
        store.append(ids[lo:hi], rows.reshape(hi - lo, dimension), codes[:, lo:hi])
    live = _section(fh, header, "live", np.uint8, nbytes(n)).copy()
    raw = _section(fh, header, "tables", np.uint8, header["sections"]["tables"]["length"]
                   if "tables" in header["sections"] else 0)
    try:
        tables_json = json.loads(raw.tobytes().decode("utf-8"))
        tables = PayloadTable.restore(tables_json["values"], tables_json["metas"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise SnapshotError("its payload tables do not parse") from None
    sizes = tables.sizes()
    for row in range(len(FIELDS)):
        if n and int(codes[row].max()) >= sizes[row]:
            raise SnapshotError("its payload codes point past its tables")
    n_live = int(np.bitwise_count(live).sum())
    if n_live != header.get("n_live", n_live):
        raise SnapshotError("its live bitmap does not match its header")
    return SnapshotData(store, live, n_live, tables, main, main_kind, built_n)


def _read_legacy(path: str, dimension: int, metric: str) -> SnapshotData:
    try:
        index = faiss.read_index(path)
    except RuntimeError as exc:  # FAISS's message is a C++ assertion: keep its last words
        last = (str(exc).strip().splitlines() or ["unknown error"])[-1][-160:]
        raise SnapshotError(f"FAISS cannot read it ({last})") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise SnapshotError(f"holds a {type(index).__name__}, not the IndexIDMap2 the "
                            "previous version wrote")
    if index.d != dimension or index.metric_type != METRICS[metric]:
        raise SnapshotError(f"holds {index.d}-d vectors of metric {index.metric_type}, its "
                            f"meta.json says {dimension}-d {metric}")
    n = int(index.ntotal)
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlat):
        raise SnapshotError(f"wraps a {type(inner).__name__}, not a flat index")
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    store = Store(dimension)
    if n:
        xb = faiss.rev_swig_ptr(inner.get_xb(), n * dimension).reshape(n, dimension)
        store.append(ids, xb, np.full((len(FIELDS), n), -1, dtype=np.int32))
    live = np.zeros(nbytes(n), dtype=np.uint8)
    set_range(live, 0, n)
    return SnapshotData(store, live, n, PayloadTable(), None, None, 0, legacy=True)
