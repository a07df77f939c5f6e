"""The VectorIndex contract, run against every registered backend.

A new backend joins by registering in ``indexers.BACKENDS``: ``backend_factory`` is
parametrized over that registry, so every test below runs against it. Backends listed in
``EXACT`` must match exact search; the others must reach ``MIN_RECALL``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

from indexers import (
    BACKENDS,
    Backend,
    CollectionLost,
    CollectionSpec,
    DimensionMismatch,
    Filter,
    Payload,
    SearchHits,
    VectorIndex,
    create_backend,
)

EXACT = {"faiss"}  # flat indexes: results must equal an exact search
MIN_RECALL = 0.95
DIM = 16

BackendFactory = Callable[[], Backend]


@pytest.fixture(params=sorted(BACKENDS))
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    """Makes backend objects of one kind, all storing under the same root."""
    made: list[Backend] = []

    def make() -> Backend:
        backend = create_backend(request.param, tmp_path / "indexes")
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with suppress(Exception):
            backend.close()


@pytest.fixture
def backend(backend_factory: BackendFactory) -> Backend:
    return backend_factory()


@pytest.fixture
def index(backend: Backend) -> VectorIndex:
    return backend.open(CollectionSpec("coll", DIM, "cosine"))


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def as_set(ids: np.ndarray) -> set[int]:
    return {int(i) for i in ids}


def check_hits(hits: SearchHits, k: int, allowed: set[int] | None = None) -> None:
    """What every SearchHits must look like."""
    assert hits.ids.dtype == np.int64 and hits.ids.ndim == 1
    assert hits.scores.shape == hits.ids.shape
    assert len(hits.ids) <= k
    assert len(as_set(hits.ids)) == len(hits.ids), "an id twice"
    assert np.all(np.diff(hits.scores) <= 1e-6), "not best first"
    if allowed is not None:
        assert as_set(hits.ids) <= allowed


# -- basics ------------------------------------------------------------------------------------
def test_registry_and_protocol(backend: Backend, index: VectorIndex) -> None:
    assert backend.name in BACKENDS
    assert isinstance(index, VectorIndex)
    assert index.backend == backend.name
    assert index.spec == CollectionSpec("coll", DIM, "cosine")
    with pytest.raises(ValueError):
        create_backend("no-such-engine", Path("unused"))


def test_empty_index_returns_no_hits(index: VectorIndex) -> None:
    assert index.count() == 0
    assert len(index.ids()) == 0
    hits = index.search(unit_vectors(3), 5)
    assert len(hits) == 3
    for h in hits:
        check_hits(h, 5)
        assert len(h.ids) == 0


def test_upsert_search_count_ids(index: VectorIndex) -> None:
    vectors = unit_vectors(50)
    ids = np.arange(1000, 1050, dtype=np.int64)
    index.upsert(ids, vectors)
    assert index.count() == 50
    stored = index.ids()
    assert stored.dtype == np.int64 and as_set(stored) == as_set(ids)

    hits = index.search(vectors[[3, 17]], 5)
    assert len(hits) == 2
    for h, own in zip(hits, [1003, 1017], strict=True):
        check_hits(h, 5)
        assert len(h.ids) == 5
        assert h.ids[0] == own
        assert h.scores[0] == pytest.approx(1.0, abs=1e-4)


def test_large_and_negative_ids(index: VectorIndex) -> None:
    ids = [0, 2**62, 7]
    index.upsert(ids, unit_vectors(3))
    assert as_set(index.ids()) == set(ids)
    assert index.search(unit_vectors(3)[1:2], 1)[0].ids[0] == 2**62


def test_upsert_of_an_existing_id_replaces_its_vector(index: VectorIndex) -> None:
    v = unit_vectors(4)
    index.upsert([1, 2, 3], v[:3])
    index.upsert([2], v[3:4])
    assert index.count() == 3
    assert as_set(index.ids()) == {1, 2, 3}
    top = index.search(v[3:4], 1)[0]
    assert top.ids.tolist() == [2] and top.scores[0] == pytest.approx(1.0, abs=1e-4)
    # The old vector of 2 is gone: searching for it finds 2 only by its new vector's score.
    hits = index.search(v[1:2], 3)[0]
    score_of_2 = dict(zip(hits.ids.tolist(), hits.scores.tolist(), strict=True))[2]
    assert score_of_2 == pytest.approx(float(v[1] @ v[3]), abs=1e-4)


def test_delete(index: VectorIndex) -> None:
    v = unit_vectors(10)
    index.upsert(range(10), v)
    assert index.delete([2, 4, 99, -5]) == 2
    assert index.delete([]) == 0
    assert index.delete(np.array([2], dtype=np.int64)) == 0
    assert index.count() == 8
    assert as_set(index.ids()) == set(range(10)) - {2, 4}
    hits = index.search(v[[2]], 10)[0]
    assert 2 not in as_set(hits.ids) and 4 not in as_set(hits.ids)
    assert len(hits.ids) == 8


def test_allowed_ids_restrict_the_candidates(index: VectorIndex) -> None:
    v = unit_vectors(100)
    index.upsert(range(100), v)
    allowed = np.array([5, 50, 77, 1234], dtype=np.int64)  # 1234 is not stored
    for h in index.search(v[:4], 10, allowed_ids=allowed):
        check_hits(h, 10, {5, 50, 77})
        assert as_set(h.ids) == {5, 50, 77}
    best = index.search(v[[50]], 1, allowed_ids=allowed)[0]
    assert best.ids.tolist() == [50]
    narrow = index.search(v[[50]], 2, allowed_ids=np.array([5, 77], dtype=np.int64))[0]
    assert as_set(narrow.ids) == {5, 77}
    assert index.search(v[[3]], 1, allowed_ids=np.array([3], dtype=np.int64))[0].ids[0] == 3


def test_empty_allowed_set_gives_no_hits(index: VectorIndex) -> None:
    index.upsert(range(10), unit_vectors(10))
    hits = index.search(unit_vectors(2), 5, allowed_ids=np.empty(0, dtype=np.int64))
    assert [len(h.ids) for h in hits] == [0, 0]
    nothing = index.search(unit_vectors(1), 5, allowed_ids=np.array([999], dtype=np.int64))
    assert len(nothing[0].ids) == 0


def test_k_larger_than_the_collection_returns_all(index: VectorIndex) -> None:
    v = unit_vectors(7)
    index.upsert(range(7), v)
    (h,) = index.search(v[:1], 100)
    check_hits(h, 100)
    assert as_set(h.ids) == set(range(7))


def test_dimension_mismatch(index: VectorIndex) -> None:
    with pytest.raises(DimensionMismatch):
        index.upsert([1], unit_vectors(1, DIM + 1))
    with pytest.raises(DimensionMismatch):
        index.upsert([1], np.ones(DIM, dtype=np.float32))  # 1-d
    index.upsert([1], unit_vectors(1))
    with pytest.raises(DimensionMismatch):
        index.search(unit_vectors(1, DIM - 1), 1)
    assert index.count() == 1


def test_duplicate_ids_in_one_upsert_raise(index: VectorIndex) -> None:
    with pytest.raises(ValueError):
        index.upsert([1, 2, 1], unit_vectors(3))
    assert index.count() == 0
    with pytest.raises(ValueError):
        index.upsert([1, 2], unit_vectors(3))  # ids and vectors disagree
    assert index.count() == 0


def test_open_returns_the_same_collection(backend: Backend, index: VectorIndex) -> None:
    index.upsert([1, 2], unit_vectors(2))
    again = backend.open(CollectionSpec("coll", DIM, "cosine"))
    assert again.count() == 2
    with pytest.raises(DimensionMismatch):
        backend.open(CollectionSpec("coll", DIM * 2, "cosine"))
    other = backend.open(CollectionSpec("other", 3, "l2"))
    assert other.count() == 0 and index.count() == 2


# -- persistence -------------------------------------------------------------------------------
def test_reopen_after_close_has_the_same_content(backend_factory: BackendFactory) -> None:
    spec = CollectionSpec("persist", DIM, "cosine")
    v = unit_vectors(200, seed=1)
    queries = unit_vectors(5, seed=2)
    first = backend_factory()
    index = first.open(spec)
    index.upsert(range(200), v)
    index.delete([10, 11])
    index.upsert([12], unit_vectors(1, seed=3))
    index.flush()
    before = index.search(queries, 10)
    ids_before = as_set(index.ids())
    first.close()

    second = backend_factory()
    reopened = second.open(spec)
    assert reopened.count() == 198
    assert as_set(reopened.ids()) == ids_before
    after = reopened.search(queries, 10)
    for b, a in zip(before, after, strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_close_keeps_unflushed_writes(backend_factory: BackendFactory) -> None:
    spec = CollectionSpec("closing", DIM, "ip")
    first = backend_factory()
    first.open(spec).upsert([1, 2, 3], unit_vectors(3))
    first.close()  # close flushes
    assert as_set(backend_factory().open(spec).ids()) == {1, 2, 3}


def test_reopen_with_another_dimension_raises(backend_factory: BackendFactory) -> None:
    first = backend_factory()
    first.open(CollectionSpec("dims", DIM, "cosine")).upsert([1], unit_vectors(1))
    first.close()
    with pytest.raises(DimensionMismatch):
        backend_factory().open(CollectionSpec("dims", DIM + 8, "cosine"))
    with pytest.raises(DimensionMismatch):
        backend_factory().open(CollectionSpec("dims", DIM, "l2"))


def test_drop_removes_the_collection_and_its_storage(backend_factory: BackendFactory,
                                                     tmp_path: Path) -> None:
    first = backend_factory()
    index = first.open(CollectionSpec("gone", DIM, "cosine"))
    index.upsert(range(5), unit_vectors(5))
    index.flush()
    keep = first.open(CollectionSpec("kept", DIM, "cosine"))
    keep.upsert([1], unit_vectors(1))
    keep.flush()
    first.drop("gone")
    first.drop("never-existed")  # not an error
    first.close()

    # Nothing of it is left in storage: it opens afresh, even with another dimension.
    second = backend_factory()
    assert second.open(CollectionSpec("gone", DIM * 2, "l2")).count() == 0
    assert second.open(CollectionSpec("kept", DIM, "cosine")).count() == 1
    # Dropping an open collection, then opening it again on the same backend object.
    second.drop("gone")
    assert second.open(CollectionSpec("gone", DIM, "cosine")).count() == 0
    second.drop("gone")
    second.close()
    assert not any("gone" in p.name for p in tmp_path.rglob("*")), "storage left behind"


# -- concurrency -------------------------------------------------------------------------------
def test_searches_during_writes(index: VectorIndex) -> None:
    base = unit_vectors(300, seed=4)
    index.upsert(range(300), base)
    extra = unit_vectors(300, seed=5)
    every_id = set(range(600))
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for r in range(30):
                lo = 300 + 10 * r
                index.upsert(range(lo, lo + 10), extra[lo - 300 : lo - 290])
                index.delete(range(10 * r, 10 * r + 5))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def reader(seed: int) -> None:
        queries = unit_vectors(4, seed=seed)
        allowed = np.arange(0, 600, 3, dtype=np.int64)
        try:
            n = 0
            while not done.is_set() or n < 3:
                for h in index.search(queries, 10):
                    check_hits(h, 10, every_id)
                    assert len(h.ids) == 10
                for h in index.search(queries, 5, allowed_ids=allowed):
                    check_hits(h, 5, set(allowed.tolist()))
                assert 300 <= index.count() <= 600
                n += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, daemon=True)] + [
        threading.Thread(target=reader, args=(10 + i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []
    assert index.count() == 300 + 300 - 150
    assert as_set(index.ids()) == every_id - {i for r in range(30)
                                              for i in range(10 * r, 10 * r + 5)}


# -- congruence with exact search --------------------------------------------------------------
def exact_top_k(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "l2":
        scores = -((queries[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)
    else:
        scores = queries @ data.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_congruent_with_exact_search(backend: Backend, metric: str) -> None:
    n, dim, k = 2000, 64, 10
    rng = np.random.default_rng(42)
    data = rng.standard_normal((n, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    queries = unit_vectors(50, dim, seed=43)
    index = backend.open(CollectionSpec(f"congruence-{metric}", dim, metric))  # type: ignore[arg-type]
    for lo in range(0, n, 500):  # in several writes
        index.upsert(ids[lo : lo + 500], data[lo : lo + 500])

    want_ids, want_scores = exact_top_k(data, ids, queries, k, metric)
    got = index.search(queries, k)
    recall = np.mean([len(as_set(g.ids) & set(w.tolist())) / k
                      for g, w in zip(got, want_ids, strict=True)])
    assert recall >= MIN_RECALL
    if backend.name in EXACT:
        assert recall == 1.0
        for g, w_ids, w_scores in zip(got, want_ids, want_scores, strict=True):
            assert g.ids.tolist() == w_ids.tolist()
            np.testing.assert_allclose(g.scores, w_scores, rtol=1e-4, atol=1e-4)

    # The same within a filter: the exact answer over the allowed subset.
    allowed = ids[::7]
    mask = np.isin(ids, allowed)
    want_ids, _ = exact_top_k(data[mask], ids[mask], queries, k, metric)
    got = index.search(queries, k, allowed_ids=allowed)
    recall = np.mean([len(as_set(g.ids) & set(w.tolist())) / k
                      for g, w in zip(got, want_ids, strict=True)])
    assert recall >= MIN_RECALL
    if backend.name in EXACT:
        assert recall == 1.0


# -- payloads and filters pushed down ---------------------------------------------------------
PATHS = ["src/app.py", "src/app/main.py", "src/apple.py", "docs/guide.md", "docs/日本語.md",
         "README.md", "src/app.py.bak", "tests/test_app.py"]
LANGS = ["python", "python", "python", "markdown", "markdown", "markdown", "", "python"]


def payload_of(i: int) -> Payload:
    j = i % len(PATHS)
    meta: tuple[tuple[str, str], ...] = (("team", "core" if i % 3 == 0 else "web"),)
    if i % 4 == 0:
        meta = (("owner", "ana|bo'b\\"), *meta)  # quotes, bars, backslashes survive
    return Payload(doc_id=f"doc-{i % 40}", path=PATHS[j], language=LANGS[j],
                   kind=("function", "class", "section", "")[i % 4], metadata=meta)


FILTERS = [
    Filter(doc_ids=("doc-3", "doc-17", "doc-99")),
    Filter(path_prefix="src/app"),  # a character prefix: src/app.py, src/app/, src/apple.py
    Filter(path_prefix="src/app/"),
    Filter(path_prefix="docs/日"),
    Filter(path_prefix="%"),  # wildcard characters of LIKE/glob are plain characters
    Filter(path_prefix="src/app.py"),
    Filter(languages=("markdown",)),
    Filter(languages=("",)),
    Filter(kinds=("function", "class")),
    Filter(metadata=(("team", "core"),)),
    Filter(metadata=(("owner", "ana|bo'b\\"), ("team", "core"))),
    Filter(metadata=(("missing", ""),)),
    Filter(doc_ids=("doc-1", "doc-2", "doc-5", "doc-9"), path_prefix="src/",
           languages=("python",), kinds=("class", "section")),
    Filter(doc_ids=tuple(f"doc-{i}" for i in range(0, 40, 2)), metadata=(("team", "web"),)),
]


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: repr(f)[7:60])
def test_filters_pushed_down_match_the_reference_semantics(index: VectorIndex,
                                                           flt: Filter) -> None:
    n = 400
    vectors = unit_vectors(n, seed=7)
    ids = np.arange(5000, 5000 + n, dtype=np.int64)
    payloads = [payload_of(i) for i in range(n)]
    for lo in range(0, n, 100):
        index.upsert(ids[lo : lo + 100], vectors[lo : lo + 100], payloads[lo : lo + 100])
    passing = {int(ids[i]) for i in range(n) if flt.matches(payloads[i])}
    queries = unit_vectors(5, seed=8)
    k = 10
    for q, hits in zip(queries, index.search(queries, k, where=flt), strict=True):
        check_hits(hits, k, passing)
        assert len(hits.ids) == min(k, len(passing)), "fewer hits than pass the filter"
        if passing:  # the best passing vector is found
            mask = np.array([int(i) in passing for i in ids])
            best = ids[mask][int(np.argmax(vectors[mask] @ q))]
            assert int(best) in as_set(hits.ids)


def test_a_filter_everything_fails_gives_no_hits(index: VectorIndex) -> None:
    index.upsert([1, 2], unit_vectors(2), [payload_of(0), payload_of(1)])
    for flt in (Filter(doc_ids=("nobody",)), Filter(path_prefix="zzz"),
                Filter(metadata=(("team", "nobody"),))):
        hits = index.search(unit_vectors(2, seed=3), 5, where=flt)
        assert [len(h.ids) for h in hits] == [0, 0]
    # An empty filter restricts nothing.
    assert len(index.search(unit_vectors(1), 5, where=Filter())[0].ids) == 2


def test_replacing_a_vector_replaces_its_payload(index: VectorIndex) -> None:
    v = unit_vectors(3)
    index.upsert([1, 2, 3], v, [Payload("a", "old/x.py", "python"),
                                Payload("b", "old/y.py", "python"),
                                Payload("c", "keep.py", "python")])
    index.upsert([2], v[1:2], [Payload("b", "new/y.py", "rust")])
    index.delete([1])
    assert as_set(index.search(v, 5, where=Filter(path_prefix="old/"))[0].ids) == set()
    assert as_set(index.search(v, 5, where=Filter(path_prefix="new/"))[0].ids) == {2}
    assert as_set(index.search(v, 5, where=Filter(languages=("python",)))[0].ids) == {3}
    # Re-added after a delete, with a new payload.
    index.upsert([1], v[:1], [Payload("a2", "old/x.py", "go")])
    assert as_set(index.search(v, 5, where=Filter(doc_ids=("a2",)))[0].ids) == {1}


def test_payloads_and_filters_survive_a_reopen(backend_factory: BackendFactory) -> None:
    first = backend_factory()
    index = first.open(CollectionSpec("kept", DIM, "cosine"))
    v = unit_vectors(60, seed=2)
    index.upsert(range(60), v, [payload_of(i) for i in range(60)])
    index.delete(range(0, 60, 5))
    index.flush()
    first.close()
    again = backend_factory().open(CollectionSpec("kept", DIM, "cosine"))
    flt = Filter(kinds=("class",), metadata=(("team", "web"),))
    passing = {i for i in range(60) if i % 5 and flt.matches(payload_of(i))}
    hits = again.search(v[:1], 60, where=flt)[0]
    assert as_set(hits.ids) == passing


def test_payload_count_must_match(index: VectorIndex) -> None:
    with pytest.raises(ValueError):
        index.upsert([1, 2], unit_vectors(2), [payload_of(0)])
    assert index.count() == 0


def test_filtered_search_at_a_size_past_exact_search(backend: Backend) -> None:
    """Big enough that an engine may build an approximate index: a selective filter must
    still return every passing vector's best matches (no holes from a post-filter)."""
    n, dim = 6000, 32
    index = backend.open(CollectionSpec("wide", dim, "cosine"))
    data = unit_vectors(n, dim, seed=11)
    payloads = [Payload(f"d{i}", f"p/{i % 500:03d}/f.py", "python") for i in range(n)]
    for lo in range(0, n, 1000):
        index.upsert(range(lo, lo + 1000), data[lo : lo + 1000], payloads[lo : lo + 1000])
    flt = Filter(path_prefix="p/007/")  # 12 of 6000
    passing = {i for i in range(n) if payloads[i].path.startswith("p/007/")}
    assert len(passing) == 12
    for hits in index.search(unit_vectors(3, dim, seed=12), 10, where=flt):
        check_hits(hits, 10, passing)
        assert len(hits.ids) == 10


# -- faiss specifics ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bad\n", "a/b", "../up", ".hidden", "", "sp ace", "new\nline"])
def test_faiss_rejects_collection_names_that_are_not_plain_file_names(tmp_path: Path,
                                                                      name: str) -> None:
    backend = create_backend("faiss", tmp_path)
    with pytest.raises(ValueError):
        backend.open(CollectionSpec(name, DIM, "cosine"))
    with pytest.raises(ValueError):
        backend.drop(name)
    assert not (tmp_path / "faiss").exists() or not any((tmp_path / "faiss").iterdir())
    backend.close()


def _drop_behind_its_back(backend: Backend, index: VectorIndex) -> None:
    """Drop the collection through the engine's own client, as an operator (or an engine
    server restarted on an empty volume) would, unknown to the backend object."""
    from indexers.chroma_index import ChromaBackend, chroma_name
    from indexers.milvus_index import MilvusBackend, MilvusIndex

    if isinstance(backend, MilvusBackend):
        assert isinstance(index, MilvusIndex)
        backend._connect().drop_collection(index.collection)
    elif isinstance(backend, ChromaBackend):
        with backend._engine() as client:
            client.delete_collection(chroma_name(index.spec.name))
    else:
        raise AssertionError(f"no way to drop a {type(backend).__name__} collection")


# FAISS keeps its collections in the process: nothing drops one behind its back.
@pytest.mark.parametrize("name", sorted(set(BACKENDS) - {"faiss"}))
def test_a_collection_dropped_behind_its_back_is_lost(tmp_path: Path, name: str) -> None:
    """Every operation on a collection the engine no longer has raises CollectionLost
    naming it (the service rebuilds it from the catalog), never a bare engine error; a
    collection of that name opened anew starts empty and works."""
    backend = create_backend(name, tmp_path / "indexes")
    try:
        _lost_then_reopened(backend)
    finally:
        backend.close()


def _lost_then_reopened(backend: Backend) -> None:
    spec = CollectionSpec("lost.g1", DIM, "cosine")
    index = backend.open(spec)
    v = unit_vectors(20, seed=21)
    index.upsert(range(20), v)
    _drop_behind_its_back(backend, index)
    for op in (lambda: index.search(v[:1], 3), lambda: index.upsert([99], v[:1]),
               lambda: index.count(), lambda: index.ids(), lambda: index.delete([1])):
        with pytest.raises(CollectionLost) as e:
            op()
        assert e.value.collection == "lost.g1" and "lost.g1" in str(e.value)
    backend.drop("lost.g1")  # of a collection already gone: nothing to do
    again = backend.open(spec)
    assert again.count() == 0
    again.upsert([5], v[5:6])
    assert again.search(v[5:6], 1)[0].ids.tolist() == [5]
