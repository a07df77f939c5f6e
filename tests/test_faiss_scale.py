"""The FAISS backend past exact search: kinds chosen by size, tombstones and compaction on
HNSW, payload filters on approximate indexes, snapshots that do not stall searches, and
reopening each kind. Small dimensions and thresholds keep it fast; bench/bench_faiss.py
measures the same at 100k and 1M vectors."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexers import CollectionSpec, Filter, Payload
from indexers.faiss_index import FaissBackend, FaissIndex, FaissOptions

DIM = 32
K = 10


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def payload(i: int) -> Payload:
    return Payload(doc_id=f"doc-{i % 300}", path=f"src/m{i % 50:02d}/f{i % 7}.py",
                   language=("python", "go", "rust")[i % 3], kind=("function", "class")[i % 2],
                   metadata=(("team", "core" if i % 5 == 0 else "web"),))


def open_index(root: Path, name: str = "c", metric: str = "cosine", dim: int = DIM,
               **options: object) -> tuple[FaissBackend, FaissIndex]:
    backend = FaissBackend(root, **options)  # type: ignore[arg-type]
    return backend, backend.open(CollectionSpec(name, dim, metric))  # type: ignore[arg-type]


def fill(index: FaissIndex, vectors: np.ndarray, ids: np.ndarray, batch: int = 1000,
         payloads: bool = True) -> None:
    for lo in range(0, len(ids), batch):
        hi = min(len(ids), lo + batch)
        index.upsert(ids[lo:hi], vectors[lo:hi],
                     [payload(int(i)) for i in ids[lo:hi]] if payloads else None)


def exact(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]


def recall(index: FaissIndex, queries: np.ndarray, want: np.ndarray, k: int = K,
           where: Filter | None = None) -> float:
    got = index.search(queries, k, where=where)
    return float(np.mean([len(set(g.ids.tolist()) & set(w.tolist())) / max(1, len(w))
                          for g, w in zip(got, want, strict=True)]))


# -- kinds ---------------------------------------------------------------------------------
def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        FaissOptions(kind="lsh")
    with pytest.raises(ValueError):
        FaissOptions(hnsw_m=0)
    with pytest.raises(ValueError):
        FaissOptions(compact_ratio=0.0)
    with pytest.raises(ValueError):
        FaissOptions(hnsw_target_recall=1.5)
    with pytest.raises(ValueError):
        FaissOptions(hnsw_max_ef_search=0)
    with pytest.raises(TypeError):
        FaissBackend(Path("unused"), no_such_option=1)


def test_auto_switches_to_hnsw_past_the_threshold_and_back_when_it_shrinks(
        tmp_path: Path) -> None:
    _, index = open_index(tmp_path, auto_threshold=2000, exact_max=0, compact_min=100)
    data = unit_vectors(4000, seed=1)
    ids = np.arange(4000, dtype=np.int64)
    queries = unit_vectors(20, seed=2)
    fill(index, data[:1500], ids[:1500])
    assert index.wait_idle(30) and index.stats()["kind"] == "flat"
    fill(index, data[1500:], ids[1500:])
    # Searches go on, exact, while HNSW is built in the background.
    assert recall(index, queries, exact(data, ids, queries, K)) >= 0.95
    assert index.wait_idle(60)
    stats = index.stats()
    assert stats["kind"] == "hnsw" and stats["unmerged"] == 0 and stats["live"] == 4000
    assert recall(index, queries, exact(data, ids, queries, K)) >= 0.9
    # Below half the threshold it goes back to exact search (compaction time).
    index.delete(range(0, 3500))
    assert index.wait_idle(60)
    stats = index.stats()
    assert stats["kind"] == "flat" and stats["live"] == 500 and stats["tombstones"] == 0
    got = index.search(queries, K)
    want = exact(data[3500:], ids[3500:], queries, K)
    assert [g.ids.tolist() for g in got] == want.tolist()


def test_explicit_flat_stays_exact_at_any_size(tmp_path: Path) -> None:
    _, index = open_index(tmp_path, kind="flat", auto_threshold=10)
    data, ids = unit_vectors(3000, seed=3), np.arange(3000, dtype=np.int64)
    fill(index, data, ids)
    assert index.wait_idle(10) and index.stats()["kind"] == "flat"
    queries = unit_vectors(10, seed=4)
    assert [h.ids.tolist() for h in index.search(queries, K)] == \
        exact(data, ids, queries, K).tolist()


# -- tombstones on HNSW --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hnsw_data() -> tuple[np.ndarray, np.ndarray]:
    return unit_vectors(6000, seed=5), np.arange(10_000, 16_000, dtype=np.int64)


def test_deletes_and_replacements_on_hnsw(tmp_path: Path,
                                         hnsw_data: tuple[np.ndarray, np.ndarray]) -> None:
    data, ids = hnsw_data
    _, index = open_index(tmp_path, kind="hnsw", exact_max=0, compact_min=10**9)
    fill(index, data, ids)
    assert index.wait_idle(60) and index.stats()["kind"] == "hnsw"
    gone = ids[::4]
    assert index.delete(gone.tolist()) == len(gone)
    assert index.delete(gone.tolist()) == 0
    replaced = ids[1::4][:500]
    fresh = unit_vectors(500, seed=6)
    index.upsert(replaced, fresh)
    assert index.count() == 6000 - len(gone)
    assert set(index.ids().tolist()) == set(ids.tolist()) - set(gone.tolist())
    stats = index.stats()
    assert stats["tombstones"] == len(gone) + 500
    # A replaced vector is found by its new vector, never by its old one.
    for j in range(0, 500, 50):
        top = index.search(fresh[j : j + 1], 1)[0]
        assert top.ids.tolist() == [replaced[j]]
        assert top.scores[0] == pytest.approx(1.0, abs=1e-4)
    old_rows = data[1::4][:500]
    for j in range(0, 500, 50):
        hits = index.search(old_rows[j : j + 1], 50)[0]
        scores = dict(zip(hits.ids.tolist(), hits.scores.tolist(), strict=True))
        if int(replaced[j]) in scores:
            assert scores[int(replaced[j])] < 0.99
    # Deleted ids never come back, and k hits still come back.
    gone_set = set(gone.tolist())
    for hits in index.search(data[::4][:50], K):
        assert not gone_set & set(hits.ids.tolist())
        assert len(hits.ids) == K
    # Results agree with an exact search of what is live.
    current = data.copy()
    current[1::4][:500] = fresh
    live = np.ones(len(ids), dtype=bool)
    live[::4] = False
    queries = unit_vectors(30, seed=7)
    assert recall(index, queries, exact(current[live], ids[live], queries, K)) >= 0.9


def test_compaction_keeps_the_results(tmp_path: Path,
                                      hnsw_data: tuple[np.ndarray, np.ndarray]) -> None:
    data, ids = hnsw_data
    _, index = open_index(tmp_path, kind="hnsw", exact_max=0, compact_min=10**9,
                          compact_ratio=0.3)
    fill(index, data, ids)
    index.delete(ids[::3].tolist())
    assert index.wait_idle(60)
    assert index.stats()["tombstones"] == 2000  # below the share: no compaction
    queries = unit_vectors(30, seed=8)
    before = index.search(queries, K)
    generation = index.stats()["generation"]
    index.compact()
    assert index.wait_idle(60)
    stats = {k: v for k, v in index.stats().items() if not k.startswith("gpu_")}
    calibrated = stats.pop("hnsw_calibrated_recall")
    assert stats == {"kind": "hnsw", "slots": 4000, "live": 4000, "tombstones": 0,
                     "unmerged": 0, "rebuilding": False, "generation": generation + 1,
                     "hnsw_ef_search": 128, "hnsw_calibrated_vectors": 4000}
    assert calibrated >= 0.95  # the rebuilt graph was calibrated too
    after = index.search(queries, K)
    overlap = np.mean([len(set(a.ids.tolist()) & set(b.ids.tolist())) / K
                       for a, b in zip(after, before, strict=True)])
    assert overlap >= 0.9
    live = np.ones(len(ids), dtype=bool)
    live[::3] = False
    assert recall(index, queries, exact(data[live], ids[live], queries, K)) >= 0.9
    assert set(index.ids().tolist()) == set(ids[live].tolist())


def test_searches_and_writes_during_merges_and_compactions(tmp_path: Path) -> None:
    """Readers see k hits of live ids only while a writer upserts, replaces and deletes,
    the merger feeds HNSW and compactions swap generations under them."""
    _, index = open_index(tmp_path, kind="hnsw", exact_max=0, compact_min=200,
                          compact_ratio=0.1)
    data = unit_vectors(6000, seed=9)
    index.upsert(np.arange(2000), data[:2000])
    errors: list[BaseException] = []
    done = threading.Event()
    deleted: set[int] = set()

    def writer() -> None:
        try:
            for r in range(40):
                lo = 2000 + 100 * r
                index.upsert(np.arange(lo, lo + 100), data[lo : lo + 100])
                index.upsert(np.arange(r * 20, r * 20 + 10), unit_vectors(10, seed=100 + r))
                doomed = list(range(r * 20 + 10, r * 20 + 20))
                index.delete(doomed)
                deleted.update(doomed)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def reader(seed: int) -> None:
        queries = unit_vectors(4, seed=seed)
        try:
            while not done.is_set():
                for hits in index.search(queries, K):
                    assert len(hits.ids) == K
                    assert len(set(hits.ids.tolist())) == K
                    assert np.all(np.diff(hits.scores) <= 1e-6)
                    assert hits.ids.max() < 6000
                for hits in index.search(queries, 5, where=Filter(doc_ids=("nobody",))):
                    assert len(hits.ids) == 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, daemon=True)] + [
        threading.Thread(target=reader, args=(50 + i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []
    assert index.wait_idle(60)
    expected = set(range(6000)) - deleted
    assert set(index.ids().tolist()) == expected and index.count() == len(expected)
    stats = index.stats()
    assert stats["slots"] < 6400, "no compaction ran under the readers"  # 6,400 written
    assert stats["tombstones"] < 0.1 * stats["slots"] + 200


# -- payload filters on approximate indexes --------------------------------------------------
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_payload_filters_on_approximate_indexes(tmp_path: Path, kind: str,
                                                hnsw_data: tuple[np.ndarray, np.ndarray]
                                                ) -> None:
    data, ids = hnsw_data
    _, index = open_index(tmp_path, kind=kind, exact_max=100, ivf_nlist=32, ivf_nprobe=8)
    fill(index, data, ids)
    index.delete(ids[::10].tolist())
    assert index.wait_idle(60) and index.stats()["kind"] == kind
    queries = unit_vectors(20, seed=11)
    payloads = {int(i): payload(int(i)) for i in ids}
    live = {int(i) for i in ids[np.arange(len(ids)) % 10 != 0]}
    filters = [
        Filter(languages=("go",)),  # a third: the approximate index with a selector
        Filter(path_prefix="src/m1"),  # a fifth
        Filter(path_prefix="src/m07/", kinds=("class",)),  # few: scored exactly
        Filter(doc_ids=("doc-7", "doc-8")),  # 40: exact
        Filter(metadata=(("team", "core"),), languages=("rust", "python")),
        Filter(doc_ids=("doc-7",), path_prefix="src/m07/f0"),  # a handful
    ]
    for flt in filters:
        passing = np.array(sorted(i for i in live if flt.matches(payloads[i])), dtype=np.int64)
        assert len(passing)
        rows = passing - 10_000
        want = exact(data[rows], passing, queries, K)
        for hits in index.search(queries, K, where=flt):
            assert set(hits.ids.tolist()) <= set(passing.tolist())
            assert len(hits.ids) == min(K, len(passing))
        assert recall(index, queries, want, where=flt) >= (0.9 if len(passing) > 100 else 1.0)
    # allowed_ids still restrict, alone and with a filter.
    allowed = ids[5::40]
    for hits in index.search(queries, K, allowed_ids=allowed):
        assert set(hits.ids.tolist()) <= set(allowed.tolist()) - set(ids[::10].tolist())
        assert len(hits.ids) == K
    both = index.search(queries, K, allowed_ids=allowed, where=Filter(languages=("go",)))
    for hits in both:
        assert all(payloads[i].language == "go" for i in hits.ids.tolist())


def test_a_repeated_filter_sees_every_write(tmp_path: Path) -> None:
    """Filter bitmaps are reused while the collection is unchanged, never after a write."""
    _, index = open_index(tmp_path)
    data = unit_vectors(300, seed=22)
    fill(index, data, np.arange(300, dtype=np.int64))
    flt = Filter(doc_ids=("doc-5",))  # ids 5 only (doc-{i % 300})
    assert index.search(data[5:6], 3, where=flt)[0].ids.tolist() == [5]
    assert index.search(data[5:6], 3, where=flt)[0].ids.tolist() == [5]  # reused
    index.upsert([900], data[6:7], [Payload("doc-5", "x.py")])
    assert set(index.search(data[5:6], 3, where=flt)[0].ids.tolist()) == {5, 900}
    index.delete([5])
    assert index.search(data[5:6], 3, where=flt)[0].ids.tolist() == [900]
    index.upsert([900], data[6:7], [Payload("doc-6", "x.py")])
    assert index.search(data[5:6], 3, where=flt)[0].ids.tolist() == []


# -- persistence -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_reopen_of_each_kind(tmp_path: Path, kind: str) -> None:
    data, ids = unit_vectors(3000, seed=12), np.arange(3000, dtype=np.int64) * 7
    options = {"kind": kind, "exact_max": 0, "ivf_nlist": 16, "compact_min": 10**9}
    backend, index = open_index(tmp_path, metric="l2", **options)
    fill(index, data, ids)
    assert index.wait_idle(60) and index.stats()["kind"] == kind
    index.delete(ids[::5].tolist())
    index.upsert(ids[1:3], unit_vectors(2, seed=13), [Payload("new", "new.py")] * 2)
    index.upsert(np.array([99_999]), unit_vectors(1, seed=14))  # the tail, no payload
    queries = unit_vectors(10, seed=15)
    flt = Filter(languages=("go",), kinds=("class",))
    before = index.search(queries, K)
    before_filtered = index.search(queries, K, where=flt)
    stats = index.stats()
    backend.close()

    _, again = open_index(tmp_path, metric="l2", **options)
    assert again.quarantined == ()
    assert again.stats()["kind"] == kind and again.count() == stats["live"]
    assert again.stats()["tombstones"] == stats["tombstones"]
    for a, b in zip(again.search(queries, K), before, strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    for a, b in zip(again.search(queries, K, where=flt), before_filtered, strict=True):
        assert a.ids.tolist() == b.ids.tolist()
    assert again.ids_without_payload().tolist() == [99_999]
    assert again.search(queries[:1], 5, where=Filter(doc_ids=("new",)))[0].ids.tolist() in (
        [int(ids[1]), int(ids[2])], [int(ids[2]), int(ids[1])])


def test_a_snapshot_of_the_previous_version_loads_without_payloads(tmp_path: Path) -> None:
    data = unit_vectors(50, seed=16)
    legacy = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    legacy.add_with_ids(data, np.arange(100, 150, dtype=np.int64))
    directory = tmp_path / "old"
    directory.mkdir(parents=True)
    faiss.write_index(legacy, str(directory / "index.faiss"))
    digest = hashlib.sha256((directory / "index.faiss").read_bytes()).hexdigest()
    (directory / "meta.json").write_text(json.dumps(
        {"dimension": DIM, "metric": "cosine", "sha256": [digest]}))

    backend = FaissBackend(tmp_path)
    assert backend.verify("old") == []
    index = backend.open(CollectionSpec("old", DIM, "cosine"))
    assert index.quarantined == () and index.count() == 50
    assert sorted(index.ids_without_payload().tolist()) == list(range(100, 150))
    assert index.search(data[7:8], 1)[0].ids.tolist() == [107]
    assert index.search(data[7:8], 1, where=Filter(path_prefix="x"))[0].ids.tolist() == []
    index.upsert([107], data[7:8], [Payload("d", "x.py")])  # the service's refill
    assert index.search(data[7:8], 1, where=Filter(path_prefix="x"))[0].ids.tolist() == [107]
    backend.close()  # rewritten in the new format
    assert (directory / "index.faiss").read_bytes()[:4] != b"IxM2"
    again = FaissBackend(tmp_path)
    assert again.verify("old") == []
    assert again.open(CollectionSpec("old", DIM, "cosine")).count() == 50


# -- snapshots do not stall searches or writers --------------------------------------------
def max_gap_during(index: FaissIndex, queries: np.ndarray, action: object,
                   **search: object) -> tuple[float, float, int]:
    """(longest gap between search completions while ``action`` ran, how long it ran,
    searches completed meanwhile), searches running in another thread."""
    stamps: list[float] = []
    stop = threading.Event()

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            index.search(queries[i % len(queries) : i % len(queries) + 1], K, **search)
            stamps.append(time.perf_counter())
            i += 1

    thread = threading.Thread(target=searcher, daemon=True)
    thread.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    action()  # type: ignore[operator]
    t1 = time.perf_counter()
    time.sleep(0.1)
    stop.set()
    thread.join(timeout=10)
    inside = [t for t in stamps if t0 <= t <= t1]
    points = [t0, *inside, t1]
    return max(b - a for a, b in zip(points, points[1:], strict=False)), t1 - t0, len(inside)


def test_flush_does_not_stall_searches_or_writers(tmp_path: Path) -> None:
    n, dim = 300_000, 64
    _, index = open_index(tmp_path, dim=dim, kind="flat")
    data = unit_vectors(n, dim, seed=17)
    for lo in range(0, n, 50_000):
        index.upsert(np.arange(lo, lo + 50_000), data[lo : lo + 50_000])
    index.delete(range(0, n, 97))  # tombstones: searches use a selector
    queries = unit_vectors(16, dim, seed=18)
    gap, took, searches = max_gap_during(index, queries, index.flush)
    assert searches > 0
    assert gap < 0.5, f"a search waited {gap:.3f} s during a {took:.3f} s flush"
    # Writers go on during a flush too.
    index.upsert([n], unit_vectors(1, dim, seed=19))
    latencies: list[float] = []

    def write_during_flush() -> None:
        flusher = threading.Thread(target=index.flush)
        flusher.start()
        for j in range(20):
            t = time.perf_counter()
            index.upsert(np.arange(n + 1 + 10 * j, n + 11 + 10 * j),
                         unit_vectors(10, dim, seed=20 + j))
            latencies.append(time.perf_counter() - t)
        flusher.join()

    write_during_flush()
    assert max(latencies) < 0.5


def test_hnsw_flush_pauses_only_merges(tmp_path: Path,
                                       hnsw_data: tuple[np.ndarray, np.ndarray]) -> None:
    data, ids = hnsw_data
    _, index = open_index(tmp_path, kind="hnsw", exact_max=0)
    fill(index, data, ids)
    assert index.wait_idle(60)
    index.delete(ids[::50].tolist())
    queries = unit_vectors(16, seed=21)
    gap, _, searches = max_gap_during(index, queries, index.flush,
                                      where=Filter(languages=("go",)))
    assert searches > 0 and gap < 0.5


# -- efSearch calibrated to a recall target ---------------------------------------------------
def test_ef_search_is_calibrated_to_the_recall_target_and_kept_with_the_snapshot(
        tmp_path: Path) -> None:
    """A sparse graph (M 8, efConstruction 16) on hard data (uniform on the 32-d sphere)
    misses neighbours at efSearch 16: efSearch is raised until recall@10 on the
    collection's own vectors reaches the target (after the build, and again as merges
    double the graph), searches use it, a snapshot keeps it, and a graph loaded without
    one (an older meta.json) is calibrated in the background."""
    data, ids = unit_vectors(20_000, seed=21), np.arange(20_000, dtype=np.int64)
    queries = unit_vectors(50, seed=22)
    want = exact(data, ids, queries, K)
    sparse = {"kind": "hnsw", "hnsw_m": 8, "hnsw_ef_construction": 16, "hnsw_ef_search": 16,
              "exact_max": 0, "hnsw_max_ef_search": 2048}

    _, plain = open_index(tmp_path / "plain", hnsw_target_recall=0.0, **sparse)
    fill(plain, data, ids, batch=5000, payloads=False)
    assert plain.wait_idle(120)
    assert plain.stats()["hnsw_ef_search"] == 16 and plain.stats()["hnsw_calibrated_recall"] is None
    plain_recall = recall(plain, queries, want)

    backend, tuned = open_index(tmp_path / "tuned", hnsw_target_recall=0.95, **sparse)
    fill(tuned, data, ids, batch=5000, payloads=False)
    assert tuned.wait_idle(120)
    stats = tuned.stats()
    assert stats["hnsw_ef_search"] > 16 and stats["hnsw_calibrated_recall"] >= 0.95
    tuned_recall = recall(tuned, queries, want)
    assert plain_recall < 0.9 <= tuned_recall  # fresh queries, not the calibration's own
    before = [h.ids.tolist() for h in tuned.search(queries, K)]
    backend.close()

    backend, again = open_index(tmp_path / "tuned", hnsw_target_recall=0.95, **sparse)
    assert again.stats()["hnsw_ef_search"] == stats["hnsw_ef_search"]  # from meta.json
    assert again.stats()["hnsw_calibrated_recall"] == pytest.approx(
        stats["hnsw_calibrated_recall"])
    assert [h.ids.tolist() for h in again.search(queries, K)] == before
    backend.close()

    meta_path = tmp_path / "tuned" / "c" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["hnsw_ef"]
    del meta["hnsw_ef"]  # as written before calibration existed
    meta_path.write_text(json.dumps(meta))
    _, old = open_index(tmp_path / "tuned", hnsw_target_recall=0.95, **sparse)
    assert old.wait_idle(60)
    assert old.stats()["hnsw_ef_search"] == stats["hnsw_ef_search"]
    assert recall(old, queries, want) == pytest.approx(tuned_recall)


def test_calibration_stops_at_the_largest_ef_search_allowed(tmp_path: Path) -> None:
    data, ids = unit_vectors(20_000, seed=23), np.arange(20_000, dtype=np.int64)
    _, index = open_index(tmp_path, kind="hnsw", hnsw_m=4, hnsw_ef_construction=8,
                          hnsw_ef_search=8, hnsw_max_ef_search=24, hnsw_target_recall=1.0,
                          exact_max=0)
    fill(index, data, ids, batch=5000, payloads=False)
    assert index.wait_idle(120)
    stats = index.stats()
    assert stats["hnsw_ef_search"] == 24 and stats["hnsw_calibrated_recall"] < 1.0


def test_a_graph_grown_twice_as_large_by_merges_is_calibrated_again(tmp_path: Path) -> None:
    data, ids = unit_vectors(6000, seed=24), np.arange(6000, dtype=np.int64)
    _, index = open_index(tmp_path, kind="hnsw", hnsw_m=8, hnsw_ef_construction=16,
                          hnsw_ef_search=16, exact_max=0)
    fill(index, data[:2000], ids[:2000], batch=2000, payloads=False)
    assert index.wait_idle(60)
    first = index.stats()
    assert first["hnsw_calibrated_vectors"] == 2000 and first["generation"] == 1
    fill(index, data[2000:], ids[2000:], batch=250, payloads=False)  # merged, not rebuilt
    assert index.wait_idle(60)
    grown = index.stats()
    assert grown["generation"] == 1 and grown["unmerged"] == 0
    assert grown["hnsw_calibrated_vectors"] >= 4000
    assert grown["hnsw_calibrated_recall"] >= 0.95
    queries = unit_vectors(40, seed=25)
    assert recall(index, queries, exact(data, ids, queries, K)) >= 0.9


def test_other_calibration_settings_at_a_later_start_calibrate_again(tmp_path: Path) -> None:
    """A stored calibration holds for the settings it was made with: a new target (or
    floor, or cap) calibrates again at open; target 0 searches at the configured efSearch."""
    data, ids = unit_vectors(20_000, seed=26), np.arange(20_000, dtype=np.int64)
    sparse = {"kind": "hnsw", "hnsw_m": 8, "hnsw_ef_construction": 16, "hnsw_ef_search": 16,
              "exact_max": 0, "hnsw_max_ef_search": 4096}
    backend, index = open_index(tmp_path, hnsw_target_recall=0.8, **sparse)
    fill(index, data, ids, batch=5000, payloads=False)
    assert index.wait_idle(120)
    loose = index.stats()
    backend.close()

    backend, strict = open_index(tmp_path, hnsw_target_recall=0.99, **sparse)
    assert strict.wait_idle(120)
    tight = strict.stats()
    assert tight["hnsw_ef_search"] > loose["hnsw_ef_search"]
    assert tight["hnsw_calibrated_recall"] >= 0.99 > loose["hnsw_calibrated_recall"] >= 0.8
    backend.close()

    _, off = open_index(tmp_path, hnsw_target_recall=0.0, **sparse)
    assert off.wait_idle(60)
    assert off.stats()["hnsw_ef_search"] == 16
