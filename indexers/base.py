"""The one contract between the service and a vector engine.

Engines store float32 vectors under int64 ids in named collections. They know nothing of
documents, chunks or namespaces beyond the collection name; the catalog is the source of
truth and can rebuild any collection from the vectors it stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from indexers.payload import Filter, Payload

Metric = Literal["cosine", "ip", "l2"]


class EngineError(Exception):
    """Base of errors raised by engines."""


class DimensionMismatch(EngineError):
    """Vectors of the wrong width for the collection, or a collection reopened with another."""


class EngineUnavailable(EngineError):
    """The engine's optional dependency is missing or the engine cannot be reached."""


class StoreInUse(EngineUnavailable):
    """An embedded engine's files are held by another process (its lock is taken): they
    are not damaged and must not be moved aside."""


class StoreDamaged(EngineUnavailable):
    """An embedded engine cannot read its own files: the service moves them aside and
    refills them from the catalog at its next start."""


class CollectionClosed(EngineError):
    """The collection was closed or dropped (its namespace is being deleted or the
    service is shutting down)."""


class CollectionLost(EngineError):
    """The engine no longer has a collection the service did not drop: someone dropped it
    behind the service's back, or the engine came back without its data (a server restarted
    on an empty volume). The catalog can rebuild it; ``collection``: its name."""

    def __init__(self, collection: str, message: str) -> None:
        super().__init__(message)
        self.collection = collection


class LossReporter:
    """How a backend whose engine can lose collections behind its back raises
    CollectionLost: through ``lost``, which first tells ``on_lost`` (set by the service,
    which rebuilds the collection), whichever caller the exception then reaches. The
    listener is called from inside the engine call: it must return at once."""

    def __init__(self) -> None:
        self.on_lost: Callable[[str], None] | None = None

    def lost(self, collection: str, message: str) -> CollectionLost:
        if self.on_lost is not None:
            self.on_lost(collection)
        return CollectionLost(collection, message)


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """What a collection is: its name, vector width and similarity metric."""

    name: str
    dimension: int
    metric: Metric = "cosine"


@dataclass(frozen=True, slots=True)
class SearchHits:
    """Results of one query vector, best first. ``scores`` are similarities (higher is
    better) for cosine/ip and negated squared distances for l2."""

    ids: np.ndarray  # int64, shape (n,), n <= k
    scores: np.ndarray  # float32, shape (n,)


@dataclass(frozen=True, slots=True)
class QuarantinedFile:
    """A damaged file of a collection, moved aside when the collection was opened. The
    collection then started without it (empty when it was the snapshot), to be refilled
    from the catalog by the caller."""

    kind: str  # what the file was, e.g. "faiss_snapshot", "faiss_meta"
    path: Path  # where it was
    moved_to: Path  # where it is now
    reason: str  # why it could not be used


@runtime_checkable
class SelfRepairing(Protocol):
    """A collection that moves damaged files aside at open instead of failing to open."""

    quarantined: tuple[QuarantinedFile, ...]  # what was moved aside when it was opened


@runtime_checkable
class Verifiable(Protocol):
    """A backend that can check a collection's stored files without opening or changing
    them (for an offline `retriever check`)."""

    def verify(self, name: str, spec: CollectionSpec | None = None) -> list[str]:
        """Problems found in collection ``name``'s files, each a sentence naming the file;
        empty when they load (and, given ``spec``, match it). A missing collection is no
        problem: it is created, and filled from the catalog, at next open."""
        ...


@runtime_checkable
class VectorIndex(Protocol):
    """One collection in one engine.

    Implementations are safe to call from several threads: searches may run while a write
    is in progress and see the collection either before or after that write.
    """

    spec: CollectionSpec
    backend: str
    #: The most hits one search may ask for: the engine's own limit (Milvus: 16384). A
    #: caller that over-fetches (shaping, filters) asks for at most this many.
    max_k: int

    def upsert(self, ids: Sequence[int], vectors: np.ndarray,
               payloads: Sequence[Payload] | None = None) -> None:
        """Insert or replace vectors under ``ids`` (unique int64). ``vectors`` is float32
        of shape (len(ids), dimension); for cosine they must be L2-normalised by the caller.
        ``payloads`` (one per id) are stored with the vectors for ``search(where=...)``; a
        vector stored without one matches only an empty filter. Raises DimensionMismatch
        for a wrong width and ValueError for duplicate ids or a payload count that is not
        len(ids)."""
        ...

    def delete(self, ids: Iterable[int]) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were removed."""
        ...

    def search(
        self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
        where: Filter | None = None,
    ) -> list[SearchHits]:
        """The k nearest stored vectors to each row of ``vectors`` (float32, shape (q, dim)).
        When ``allowed_ids`` (int64 array) is given, only those ids are candidates; when
        ``where`` is given (and not empty), only vectors whose stored payload it matches
        (``Filter.matches``), evaluated inside the engine. Returns one SearchHits per
        query row with at most k entries (fewer when the collection or the candidates are
        fewer). An approximate index still returns k hits when k candidates pass the filter
        (it searches wider or falls back to an exact scan of the filtered set)."""
        ...

    def ids(self) -> np.ndarray:
        """Every stored id (int64), in no particular order. Used to reconcile with the
        catalog at start."""
        ...

    def count(self) -> int:
        """How many vectors are stored."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable in the engine's own storage."""
        ...

    def close(self) -> None:
        """Flush and release resources. The object is unusable afterwards."""
        ...


class Backend(Protocol):
    """An engine: opens and drops collections. Registered by name in ``indexers.BACKENDS``."""

    name: str

    @property
    def local_store(self) -> Path | None:
        """Where the engine keeps its files when they live in the service's data dir
        (derived data only: the service may move them aside when damaged and refill them
        from the catalog, and may drop collections no namespace owns); None for an engine
        server, which other deployments may share."""
        ...

    def open(self, spec: CollectionSpec) -> VectorIndex:
        """Open the collection, creating it when absent. Raises DimensionMismatch if it
        exists with another dimension or metric."""
        ...

    def drop(self, name: str) -> None:
        """Delete the collection and its storage; a missing one is not an error."""
        ...

    def collections(self) -> list[str]:
        """Names of the collections stored, open or not."""
        ...

    def close(self) -> None:
        """Close every collection this backend opened."""
        ...
