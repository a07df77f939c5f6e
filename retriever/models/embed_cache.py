"""An optional on-disk cache of document embeddings, keyed by embedder revision and the
exact embedded text (header included), so re-indexing the same corpus (benchmarks, a
namespace rebuilt from scratch) embeds only what changed. Off unless ``embed_cache_dir`` is
set; the catalog's own copy of each vector stays the source of truth.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class EmbeddingCache:
    def __init__(self, directory: Path, revision: str, dimension: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._revision = revision
        self._dimension = dimension
        self._lock = threading.Lock()
        self._db = sqlite3.connect(directory / "embeddings.sqlite3", isolation_level=None,
                                   check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY,"
                         " vector BLOB NOT NULL)")

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self._revision}\x00{text}".encode()).digest()

    def get(self, texts: Sequence[str]) -> dict[int, np.ndarray]:
        """Cached vectors by position in ``texts``."""
        keys = [self._key(t) for t in texts]
        found: dict[bytes, bytes] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                batch = keys[i : i + 500]
                found.update(self._db.execute(
                    f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(batch))})",
                    batch).fetchall())
        out = {}
        for i, k in enumerate(keys):
            blob = found.get(k)
            if blob is not None and len(blob) == 4 * self._dimension:
                out[i] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(self._key(t), np.ascontiguousarray(v, dtype=np.float32).tobytes())
                for t, v in zip(texts, vectors, strict=True)]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
