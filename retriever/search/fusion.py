"""Fusing candidate lists and shaping the final hits: pure functions over scores.

Fusion is a convex combination of normalized scores over the union of both sides'
candidates: ``fused = w * norm(dense) + (1 - w) * norm(lexical)``. A candidate one side did
not return gets that side's floor (the lowest normalized score it returned), never a bonus.
Normalization is per query and per side: min-max maps the side's best to 1 and its worst to
0; z-score centres on the side's mean in units of its standard deviation (robust when one
side returns a long flat tail). Plain equal-weight RRF throws away how far ahead a strong
side's best candidates are; a weighted sum of normalized scores keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, TypeVar

Normalization = Literal["minmax", "zscore"]
K = TypeVar("K")
H = TypeVar("H")


def normalize(scores: Mapping[K, float], method: Normalization) -> dict[K, float]:
    """Scores rescaled per ``method``; an empty or constant side maps to all 1.0 (every
    candidate it returned is as good as its best)."""
    if not scores:
        return {}
    values = list(scores.values())
    if method == "minmax":
        lo, hi = min(values), max(values)
        if hi - lo <= 1e-12:
            return dict.fromkeys(scores, 1.0)
        return {k: (v - lo) / (hi - lo) for k, v in scores.items()}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std <= 1e-12:
        return dict.fromkeys(scores, 1.0)
    return {k: (v - mean) / std for k, v in scores.items()}


def fuse(dense: Mapping[K, float], lexical: Mapping[K, float], dense_weight: float,
         method: Normalization = "zscore") -> dict[K, float]:
    """Fused score of every candidate of either side. ``dense_weight`` in [0, 1]."""
    if not 0.0 <= dense_weight <= 1.0:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
    nd, nl = normalize(dense, method), normalize(lexical, method)
    floor_d = min(nd.values(), default=0.0)
    floor_l = min(nl.values(), default=0.0)
    w = dense_weight
    return {k: w * nd.get(k, floor_d) + (1.0 - w) * nl.get(k, floor_l)
            for k in dict.fromkeys([*dense, *lexical])}


def rank(scores: Mapping[K, float]) -> list[K]:
    """Keys best first; ties keep the mapping's order (stable)."""
    return sorted(scores, key=lambda k: -scores[k])


def shape(ranked: Iterable[H], top_k: int, *, key_doc: Callable[[H], str],
          key_path: Callable[[H], str], score: Callable[[H], float], collapse: bool = False,
          min_score: float | None = None, max_per_path: int = 0) -> list[H]:
    """The final hits from candidates best first: at most ``top_k``; with ``collapse`` one
    per document (its best chunk); only those scoring at least ``min_score``; at most
    ``max_per_path`` per path (0: no cap)."""
    out: list[H] = []
    docs: set[str] = set()
    per_path: dict[str, int] = {}
    for h in ranked:
        if min_score is not None and score(h) < min_score:
            continue
        if collapse:
            doc = key_doc(h)
            if doc in docs:
                continue
            docs.add(doc)
        if max_per_path:
            path = key_path(h)
            if per_path.get(path, 0) >= max_per_path:
                continue
            per_path[path] = per_path.get(path, 0) + 1
        out.append(h)
        if len(out) == top_k:
            break
    return out


def dedupe_first(items: Sequence[K]) -> list[K]:
    return list(dict.fromkeys(items))
