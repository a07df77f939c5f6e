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
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    QuarantinedFile,
    SearchHits,
    SelfRepairing,
    VectorIndex,
    Verifiable,
)

# name -> "module:class"; each class takes (root: Path, **options).
BACKENDS: dict[str, str] = {
    "faiss": "indexers.faiss_index:FaissBackend",
}

__all__ = [
    "BACKENDS",
    "Backend",
    "CollectionClosed",
    "CollectionSpec",
    "DimensionMismatch",
    "EngineUnavailable",
    "QuarantinedFile",
    "SearchHits",
    "SelfRepairing",
    "VectorIndex",
    "Verifiable",
    "create_backend",
]


def create_backend(name: str, root: Path, **options: Any) -> Backend:
    """The backend registered as ``name``, storing under ``root``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown index backend {name!r}; available: {', '.join(sorted(BACKENDS))}"
        ) from None
    module_name, class_name = target.split(":")
    module = importlib.import_module(module_name)
    backend: Backend = getattr(module, class_name)(Path(root) / name, **options)
    return backend
