"""Fusion and shaping: hand-computed cases."""

from __future__ import annotations

import pytest

from retriever.search.fusion import fuse, normalize, rank, shape


def test_minmax_and_zscore_normalization() -> None:
    assert normalize({"a": 2.0, "b": 4.0, "c": 3.0}, "minmax") == {"a": 0.0, "b": 1.0, "c": 0.5}
    z = normalize({"a": 1.0, "b": 3.0}, "zscore")
    assert z == pytest.approx({"a": -1.0, "b": 1.0})
    assert normalize({"a": 5.0, "b": 5.0}, "zscore") == {"a": 1.0, "b": 1.0}
    assert normalize({}, "minmax") == {}


def test_fuse_is_a_convex_combination_over_the_union() -> None:
    dense = {"a": 0.9, "b": 0.5, "c": 0.1}
    lexical = {"b": 10.0, "d": 2.0}
    f = fuse(dense, lexical, 0.5, "minmax")
    # dense: a 1, b .5, c 0; lexical: b 1, d 0; missing -> the side's floor (0)
    assert f == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.0, "d": 0.0})
    assert rank(f) == ["b", "a", "c", "d"]
    assert rank(fuse(dense, lexical, 1.0, "minmax"))[:3] == ["a", "b", "c"]
    assert rank(fuse(dense, lexical, 0.0, "minmax"))[0] == "b"


def test_a_missing_side_gets_its_floor_not_a_bonus_under_zscore() -> None:
    dense = {"a": 0.9, "b": 0.8, "c": 0.1}
    lexical = {"a": 5.0, "z": 1.0}
    f = fuse(dense, lexical, 0.5, "zscore")
    assert f["z"] < f["a"]
    assert f["c"] <= min(f["a"], f["b"])


def test_fuse_rejects_a_weight_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="dense_weight"):
        fuse({"a": 1.0}, {}, 1.5)


HITS = [("d1", "p1", 0.9), ("d1", "p1", 0.8), ("d2", "p2", 0.7), ("d3", "p1", 0.6),
        ("d2", "p2", 0.5), ("d4", "p4", 0.1)]


def _shape(**kw: object) -> list[tuple[str, str, float]]:
    return shape(HITS, kw.pop("top_k", 10), key_doc=lambda h: h[0],  # type: ignore[arg-type]
                 key_path=lambda h: h[1], score=lambda h: h[2], **kw)


def test_collapse_keeps_each_documents_best_chunk() -> None:
    assert [h[0] for h in _shape(collapse=True)] == ["d1", "d2", "d3", "d4"]
    assert _shape(collapse=True)[0][2] == 0.9


def test_min_score_max_per_path_and_top_k() -> None:
    assert len(_shape(min_score=0.55)) == 4
    assert [h[2] for h in _shape(max_per_path=1)] == [0.9, 0.7, 0.1]
    assert len(_shape(top_k=2)) == 2
