"""An optional on-disk cache of document embeddings, keyed by embedder revision and the
exact embedded text (header included), so re-indexing the same corpus (benchmarks, a
namespace rebuilt from scratch) embeds only what changed. Off unless ``embed_cache_dir`` is
set; the catalog's own copy of each vector stays the source of truth.

The cache is an optimisation only: it never fails an upsert or the start. A file that is not
a cache (damaged, or not SQLite) is moved aside; one that cannot be read or written (a full
or read-only volume) is skipped with one warning; an entry that is not a vector this
embedder could have made (wrong length, not finite, not of unit length) is a miss and is
removed, so a damaged entry never reaches the catalog.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILE = "embeddings.sqlite3"
# Every vector the embedder makes is L2-normalised (float32 rounding stays far inside this).
UNIT_TOLERANCE = 1e-3


class EmbeddingCache:
    def __init__(self, directory: Path, revision: str, dimension: int) -> None:
        """Raises OSError or sqlite3.Error when ``directory`` cannot hold a cache
        (`open_cache` says so and runs without one)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FILE
        self._revision = revision
        self._dimension = dimension
        self._lock = threading.Lock()
        self._warned = False
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=60)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY,"
                             " vector BLOB NOT NULL)")
            self._db.execute("SELECT count(*) FROM (SELECT 1 FROM vectors LIMIT 1)").fetchone()
        except BaseException:
            self._db.close()
            raise

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self._revision}\x00{text}".encode()).digest()

    def _skip(self, what: str, exc: BaseException) -> None:
        if not self._warned:  # once: a full volume would say it at every upsert
            self._warned = True
            log.warning("embedding cache %s: could not %s (%s: %s); upserts embed without it "
                        "until it can (check RETRIEVER_EMBED_CACHE_DIR's volume)", self.path,
                        what, type(exc).__name__, exc)

    def get(self, texts: Sequence[str]) -> dict[int, np.ndarray]:
        """Cached vectors by position in ``texts``; an entry that is not a unit vector of
        this dimension is left out (and removed)."""
        keys = [self._key(t) for t in texts]
        found: dict[bytes, bytes] = {}
        try:
            with self._lock:
                for i in range(0, len(keys), 500):
                    batch = keys[i : i + 500]
                    found.update(self._db.execute(
                        "SELECT key, vector FROM vectors WHERE key IN "
                        f"({','.join('?' * len(batch))})", batch).fetchall())
        except sqlite3.Error as exc:
            self._skip("read", exc)
            return {}
        out, bad = {}, []
        for i, k in enumerate(keys):
            blob = found.get(k)
            if blob is None:
                continue
            vec = _vector(blob, self._dimension)
            if vec is None:
                bad.append(k)
            else:
                out[i] = vec
        if bad:
            log.warning("embedding cache %s: %d entries are not vectors this embedder makes "
                        "(damaged); embedding their texts again", self.path, len(bad))
            self._delete(bad)
        return out

    def _delete(self, keys: list[bytes]) -> None:
        try:
            with self._lock:
                self._db.executemany("DELETE FROM vectors WHERE key = ?", [(k,) for k in keys])
        except sqlite3.Error as exc:
            self._skip("remove damaged entries", exc)

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(self._key(t), np.ascontiguousarray(v, dtype=np.float32).tobytes())
                for t, v in zip(texts, vectors, strict=True)]
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            self._skip("write", exc)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _vector(blob: bytes, dimension: int) -> np.ndarray | None:
    if not isinstance(blob, bytes) or len(blob) != 4 * dimension:
        return None
    vec = np.frombuffer(blob, dtype=np.float32)
    if not np.all(np.isfinite(vec)):
        return None
    if abs(float(np.linalg.norm(vec.astype(np.float64))) - 1.0) > UNIT_TOLERANCE:
        return None
    return vec


def open_cache(directory: Path, revision: str, dimension: int) -> EmbeddingCache | None:
    """The cache in ``directory``, or None (logged) when there can be none: a damaged file
    is moved aside and a new cache started; a directory that cannot hold one (a file in its
    place, no permission, a full volume) leaves the service running without a cache."""
    reason: BaseException | None = None
    for attempt in range(2):
        try:
            return EmbeddingCache(directory, revision, dimension)
        except sqlite3.DatabaseError as exc:
            path = directory / FILE
            if attempt or "not a database" not in str(exc) and "malformed" not in str(exc):
                reason = exc
                break
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            moved = path.with_name(f"{FILE}.damaged-{stamp}")
            try:
                path.rename(moved)
                for suffix in ("-wal", "-shm"):
                    path.with_name(FILE + suffix).unlink(missing_ok=True)
            except OSError as err:
                reason = err
                break
            log.warning("embedding cache %s is damaged (%s); moved it to %s and started a "
                        "new one", path, exc, moved)
        except (OSError, sqlite3.Error) as exc:
            reason = exc
            break
    log.warning("embedding cache in %s cannot be used (%s: %s); running without one (fix "
                "or unset RETRIEVER_EMBED_CACHE_DIR)", directory, type(reason).__name__, reason)
    return None
