"""Vector index backends behind one interface (indexers.base.VectorIndex).

Engines are registered by name and imported only when chosen, so an optional engine's
dependency is needed only by those who use it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from indexers.base import (
    Backend,
    CollectionClosed,
    CollectionLost,
    CollectionSpec,
    DimensionMismatch,
    EngineError,
    EngineUnavailable,
    LossReporter,
    QuarantinedFile,
    SearchHits,
    SelfRepairing,
    StoreDamaged,
    StoreInUse,
    VectorIndex,
    Verifiable,
)
from indexers.payload import Filter, Payload

# name -> "module:class"; each class takes (root: Path, **options).
BACKENDS: dict[str, str] = {
    "faiss": "indexers.faiss_index:FaissBackend",
    "milvus": "indexers.milvus_index:MilvusBackend",
    "chroma": "indexers.chroma_index:ChromaBackend",
}

__all__ = [
    "BACKENDS",
    "Backend",
    "CollectionClosed",
    "CollectionLost",
    "CollectionSpec",
    "DimensionMismatch",
    "EngineError",
    "EngineUnavailable",
    "Filter",
    "LossReporter",
    "Payload",
    "QuarantinedFile",
    "SearchHits",
    "StoreDamaged",
    "StoreInUse",
    "SelfRepairing",
    "VectorIndex",
    "Verifiable",
    "backend_class",
    "create_backend",
]


def backend_class(name: str) -> type:
    """The class registered as ``name`` (its module imported; the engine's own package is
    imported only when a backend is created)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown index backend {name!r}; available: {', '.join(sorted(BACKENDS))}"
        ) from None
    module_name, class_name = target.split(":")
    cls: type = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_backend(name: str, root: Path, **options: Any) -> Backend:
    """The backend registered as ``name``, storing under ``root``."""
    backend: Backend = backend_class(name)(Path(root) / name, **options)
    return backend
