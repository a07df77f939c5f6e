"""Milvus specifics, against a real milvus-lite (the contract itself is tests/test_indexers.py):
collection names, filter expressions with hostile strings, the index built, the exact
fallback of a filtered approximate search, errors, persistence across processes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from indexers import (  # noqa: E402
    CollectionSpec,
    DimensionMismatch,
    EngineUnavailable,
    Filter,
    Payload,
    create_backend,
)
from indexers import milvus_index as mi  # noqa: E402
from indexers.base import EngineError  # noqa: E402

DIM = 8
MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[mi.MilvusBackend]:
    b = mi.MilvusBackend(tmp_path / "milvus")
    yield b
    b.close()


# -- names ---------------------------------------------------------------------------------------
HOSTILE_NAMES = ["docs.g1", "my-repo.v2.g13", "日本語.g1", "a b'\"\\.g2", "x/../y.g1", "-.g0",
                 "%_*.g7", "a.b", "a-b", "a_b", "", "ns\n.g1"]


def test_names_map_to_valid_distinct_milvus_names() -> None:
    mapped = [mi.milvus_name(n) for n in HOSTILE_NAMES]
    assert all(MILVUS_NAME.fullmatch(m) for m in mapped), mapped
    assert len(set(mapped)) == len(mapped)  # "a.b", "a-b" and "a_b" share a slug, not a name
    assert mapped == [mi.milvus_name(n) for n in HOSTILE_NAMES]  # deterministic
    assert mi.milvus_name("docs.g1").startswith("retriever_docs_g1_")
    assert mi.milvus_name("docs.g1", "other").startswith("other_docs_g1_")


def test_collections_lists_the_service_names_of_its_own_collections(
        backend: mi.MilvusBackend) -> None:
    names = ["ns-1.x.g3", "日本.g1", "a b'\"\\.g2"]
    for n in names:
        backend.open(CollectionSpec(n, DIM, "cosine"))
    client = backend._connect()
    # Not ours: another prefix, and one under our prefix without our properties.
    for foreign in ("someone_else", "retriever_stray"):
        client.create_collection(foreign, dimension=DIM)
    assert backend.collections() == sorted(names)
    # A foreign collection under the name "taken.g1" maps to is refused, not taken over.
    client.create_collection(mi.milvus_name("taken.g1"), dimension=DIM)
    with pytest.raises(EngineError):
        backend.open(CollectionSpec("taken.g1", DIM, "cosine"))
    client.drop_collection(mi.milvus_name("taken.g1"))
    backend.drop("日本.g1")
    assert backend.collections() == sorted(set(names) - {"日本.g1"})
    other = mi.MilvusBackend(backend._root, prefix="tenant2")
    try:
        assert other.collections() == []
        other.open(CollectionSpec("ns-1.x.g3", DIM, "l2"))  # same name, another prefix
        assert other.collections() == ["ns-1.x.g3"]
    finally:
        other.close()


def test_constructor_checks_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        mi.MilvusBackend(tmp_path, uri="ftp://host:1")
    with pytest.raises(ValueError):
        mi.MilvusBackend(tmp_path, prefix="1bad-prefix")
    with pytest.raises(ValueError):
        mi.MilvusBackend(tmp_path, consistency="eventually")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir()), "a constructor must not touch storage"


def test_an_unreachable_server_is_engine_unavailable(tmp_path: Path) -> None:
    backend = create_backend("milvus", tmp_path, uri="http://127.0.0.1:1", timeout=3.0)
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="127.0.0.1:1"):
        backend.open(CollectionSpec("docs.g1", DIM, "cosine"))
    with pytest.raises(EngineUnavailable):
        backend.collections()
    assert time.monotonic() - started < 15
    backend.close()


# -- filter expressions --------------------------------------------------------------------------
def test_quote_and_prefix_successor() -> None:
    assert mi.quote('a"b\\c\nd\re') == '"a\\"b\\\\c\\nd\\re"'
    assert mi.prefix_successor("src/a") == "src/b"
    assert mi.prefix_successor("a\U0010ffff") == "b"
    assert mi.prefix_successor("\U0010ffff\U0010ffff") is None
    assert mi.prefix_successor("\ud7ff") == "\ue000"  # past the surrogates
    assert mi.metadata_key("team") == "team"
    assert mi.metadata_key("a][b") == "~" + b"a][b".hex()
    assert mi.metadata_key("") == "~"
    assert mi.metadata_key("~x") != "~x"  # so that no plain key looks encoded
    assert mi.filter_expression(Filter()) == ""


HOSTILE = ['"', "'", "\\", '\\"', "%", "_", "a%b", "a_b", "\n", "\r\n", "\t", "]", "][", "[0]",
           '" or true or "', "') or (1==1", "~61", "~", "", " ", "日本", "😀", "\U0010ffff",
           "a\U0010ffff", "like", "$meta", "null", "\x01", "\x7f"]


def _hostile_payload(i: int) -> Payload:
    s = HOSTILE[i % len(HOSTILE)]
    t = HOSTILE[(i * 7 + 3) % len(HOSTILE)]
    return Payload(doc_id=s, path=f"{t}/{s}" if i % 2 else s + t, language=t, kind=s,
                   metadata=tuple(sorted({s: t, "k": s}.items())))


def test_hostile_strings_filter_exactly_as_the_reference(backend: mi.MilvusBackend) -> None:
    index = backend.open(CollectionSpec("hostile.g1", DIM, "cosine"))
    n = 3 * len(HOSTILE)
    payloads = [_hostile_payload(i) for i in range(n)]
    index.upsert(range(n), unit_vectors(n), payloads)
    index.upsert([n], unit_vectors(1, seed=9))  # no payload: matches only an empty filter
    filters = [Filter(doc_ids=(s,)) for s in HOSTILE]
    filters += [Filter(path_prefix=s) for s in HOSTILE if s]
    filters += [Filter(languages=(s, "x")) for s in HOSTILE]
    filters += [Filter(kinds=(s,)) for s in HOSTILE]
    filters += [Filter(metadata=((s, t),)) for s, t in zip(HOSTILE, HOSTILE[3:], strict=False)]
    filters += [Filter(metadata=(("k", s),)) for s in HOSTILE]
    q = unit_vectors(1, seed=5)
    for flt in filters:
        want = {i for i in range(n) if flt.matches(payloads[i])}
        got = index.search(q, n + 1, where=flt)[0]
        assert {int(i) for i in got.ids} == want, (flt, mi.filter_expression(flt))


def test_metadata_keys_are_stored_plain_when_they_can_be(backend: mi.MilvusBackend) -> None:
    index = backend.open(CollectionSpec("keys.g1", DIM, "cosine"))
    index.upsert([1], unit_vectors(1), [Payload("d", "p", metadata=(("a]b", "1"),
                                                                      ("team", "core")))])
    rows = backend._connect().query(index.collection, filter="id == 1",
                                    output_fields=["metadata", "has_payload"])
    assert rows[0]["metadata"] == {"team": "core", "~" + b"a]b".hex(): "1"}
    assert rows[0]["has_payload"] is True


# -- index and search ----------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "built"), [("auto", "HNSW"), ("FLAT", "FLAT"),
                                                ("ivf_flat", "IVF_FLAT")])
def test_the_index_type_is_built(tmp_path: Path, setting: str, built: str) -> None:
    backend = mi.MilvusBackend(tmp_path, index_type=setting)
    try:
        index = backend.open(CollectionSpec("idx.g1", DIM, "ip"))
        assert index.index_type == built
        desc = backend._connect().describe_index(index.collection, "vector")
        assert desc["index_type"] == built and desc["metric_type"] == "IP"
        v = unit_vectors(300)
        index.upsert(range(300), v)
        index.flush()  # sealed: searched through the index
        assert index.search(v[:1], 1)[0].ids.tolist() == [0]
    finally:
        backend.close()
    again = mi.MilvusBackend(tmp_path, index_type="HNSW")  # an existing index stays
    try:
        assert again.open(CollectionSpec("idx.g1", DIM, "ip")).index_type == built
    finally:
        again.close()


@pytest.mark.parametrize("exact_scan_limit", [20_000, 0])
def test_selective_filter_on_a_sealed_hnsw_segment_returns_k(tmp_path: Path,
                                                             exact_scan_limit: int) -> None:
    """milvus-lite's HNSW drops filtered-out nodes during the walk and comes back short
    under a selective filter: the backend counts the passing set and scans it exactly
    (or, past exact_scan_limit, searches again much wider)."""
    n, dim, k = 3000, 32, 10
    spec = CollectionSpec("sealed.g1", dim, "cosine")
    data = unit_vectors(n, dim, seed=11)
    payloads = [Payload(f"d{i}", f"p/{i % 250:03d}/f.py") for i in range(n)]
    first = mi.MilvusBackend(tmp_path)
    first.open(spec).upsert(range(n), data, payloads)
    first.close()  # sealed, and its HNSW index built (milvus-lite builds it in the background)
    backend = mi.MilvusBackend(tmp_path, exact_scan_limit=exact_scan_limit)
    try:
        index = backend.open(spec)
        flt = Filter(path_prefix="p/007/")
        passing = [i for i in range(n) if payloads[i].path.startswith("p/007/")]
        queries = unit_vectors(4, dim, seed=12)
        raw = backend._connect().search(
            index.collection, data=list(queries), limit=k, filter=mi.filter_expression(flt),
            search_params={"params": {"ef": index._owner.ef_search}})
        assert any(len(r) < k for r in raw), "the engine alone no longer comes back short"
        for q, hits in zip(queries, index.search(queries, k, where=flt), strict=True):
            assert len(hits.ids) == k
            want = np.array(passing)[np.argsort(-(data[passing] @ q))[:k]]
            assert set(hits.ids.tolist()) == set(want.tolist())
            np.testing.assert_allclose(hits.scores, np.sort(data[want] @ q)[::-1], atol=1e-4)
        allowed = np.array(passing[:5] + [10**9], dtype=np.int64)
        hits = index.search(queries, k, allowed_ids=allowed)
        assert all(set(h.ids.tolist()) == set(passing[:5]) for h in hits)
    finally:
        backend.close()


def test_l2_scores_are_negated_squared_distances(tmp_path: Path) -> None:
    spec = CollectionSpec("l2.g1", 2, "l2")
    origin = np.zeros((1, 2), dtype=np.float32)
    backend = mi.MilvusBackend(tmp_path)
    index = backend.open(spec)
    index.upsert([1, 2, 3], np.array([[0, 0], [3, 4], [1, 1]], dtype=np.float32))
    hits = index.search(origin, 3)[0]
    assert hits.ids.tolist() == [1, 3, 2]
    np.testing.assert_allclose(hits.scores, [0.0, -2.0, -25.0], atol=1e-5)
    backend.close()
    backend = mi.MilvusBackend(tmp_path)  # the same through a sealed segment's HNSW index
    try:
        np.testing.assert_allclose(backend.open(spec).search(origin, 3)[0].scores,
                                   [0.0, -2.0, -25.0], atol=1e-5)
    finally:
        backend.close()


def test_allowed_ids_over_several_expressions(backend: mi.MilvusBackend,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mi, "IDS_PER_EXPRESSION", 7)  # split into many small expressions
    index = backend.open(CollectionSpec("chunks.g1", DIM, "ip"))
    v = unit_vectors(200, seed=3)
    index.upsert(range(200), v, [Payload(f"d{i % 3}", "p") for i in range(200)])
    allowed = np.arange(0, 200, 4, dtype=np.int64)  # 50 ids: 8 expressions
    q = unit_vectors(3, seed=4)
    for row, hits in zip(q, index.search(q, 6, allowed_ids=allowed), strict=True):
        want = allowed[np.argsort(-(v[allowed] @ row))[:6]]
        assert hits.ids.tolist() == want.tolist()
    flt = Filter(doc_ids=("d1",))
    both = [i for i in allowed.tolist() if i % 3 == 1]
    hits = index.search(q, 100, allowed_ids=allowed, where=flt)[0]
    assert sorted(hits.ids.tolist()) == both
    assert index.delete(list(range(0, 40))) == 40  # over several expressions too
    assert index.count() == 160


def test_limits_are_value_errors(backend: mi.MilvusBackend) -> None:
    index = backend.open(CollectionSpec("limits.g1", DIM, "cosine"))
    with pytest.raises(ValueError):
        index.search(unit_vectors(1), mi.MAX_TOP_K + 1)
    with pytest.raises(ValueError):
        index.search(unit_vectors(1), 0)
    with pytest.raises(ValueError):
        index.upsert([1], unit_vectors(1), [Payload("d", "p" * (mi.MAX_ID_BYTES + 1))])
    with pytest.raises(ValueError):
        index.upsert([2**63], unit_vectors(1))
    assert index.count() == 0
    assert index.delete([2**63, -(2**70)]) == 0  # never storable: unknown, ignored
    with pytest.raises(DimensionMismatch):
        backend.open(CollectionSpec("limits.g1", DIM, "ip"))


def test_strong_consistency_setting(tmp_path: Path) -> None:
    backend = mi.MilvusBackend(tmp_path, consistency="strong")
    try:
        index = backend.open(CollectionSpec("strong.g1", DIM, "cosine"))
        v = unit_vectors(3)
        index.upsert([1, 2, 3], v)
        assert index.search(v[:1], 1)[0].ids.tolist() == [1]
        assert index.delete([1]) == 1
        assert 1 not in index.search(v[:1], 3)[0].ids.tolist()
    finally:
        backend.close()


# -- persistence ---------------------------------------------------------------------------------
def test_content_survives_another_process(tmp_path: Path) -> None:
    """What one process wrote and closed, another reads (milvus-lite's own files)."""
    writer = textwrap.dedent(f"""
        import numpy as np
        from indexers import CollectionSpec, Payload, create_backend
        b = create_backend("milvus", {str(tmp_path)!r})
        ix = b.open(CollectionSpec("proc.g1", 4, "ip"))
        ix.upsert([5, 6, 7], np.eye(3, 4, dtype=np.float32),
                  [Payload("a", "x/1"), Payload("b", "y/1"), Payload("c", "x/2")])
        ix.delete([6])
        b.close()
    """)
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", writer], cwd=root, check=True, timeout=120)
    backend = create_backend("milvus", tmp_path)
    try:
        assert backend.collections() == ["proc.g1"]
        index = backend.open(CollectionSpec("proc.g1", 4, "ip"))
        assert sorted(index.ids().tolist()) == [5, 7]
        hits = index.search(np.eye(1, 4, dtype=np.float32), 5, where=Filter(path_prefix="x/"))
        assert hits[0].ids.tolist() == [5, 7]
    finally:
        backend.close()


def test_a_released_collection_is_loaded_again(backend: mi.MilvusBackend) -> None:
    """A collection the engine holds but has not loaded ('collection not loaded', as after
    a server restart) is loaded and the call tried once more."""
    index = backend.open(CollectionSpec("released.g1", DIM, "cosine"))
    v = unit_vectors(20, seed=31)
    index.upsert(range(20), v)
    index.flush()
    backend._connect().release_collection(index.collection)
    assert index.search(v[3:4], 1)[0].ids.tolist() == [3]
    assert index.count() == 20
