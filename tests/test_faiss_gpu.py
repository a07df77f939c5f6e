"""Exact scoring on a GPU (indexers/_faiss_gpu.py): the device copy of a collection's rows
gives the same answers as the CPU scan through writes, replacements, deletes, filters,
rebuilds and compactions, and uploads only what was written since.

Both engines are tested. torch: the real ``TorchFlat`` on CUDA where torch sees it, else on
torch's CPU device (the same code). faiss: the real ``GpuIndexFlat`` where faiss-gpu sees a
GPU, else a CPU ``IndexFlat`` in its place (the code under test is then the mirror: slot map,
over-fetch, dropping what cannot pass, appends, rebuilds). On an H200 the torch engine ran on
CUDA (bench/results/gpu-faiss-h200.md)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from test_faiss_scale import DIM, payload, unit_vectors

from indexers import CollectionSpec, Filter
from indexers._faiss_gpu import MAX_K, GpuScorer, TorchFlat
from indexers.base import EngineUnavailable
from indexers.faiss_index import FaissBackend, FaissIndex, FaissOptions

HAS_FAISS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
HAS_CUDA = torch.cuda.is_available()
ENGINES = ["faiss", "torch"]


def _scorer(ip: bool, engine: str, rebuild_dead: int = MAX_K // 2) -> GpuScorer:
    lock = threading.Lock()
    if engine == "torch":
        factory = None if HAS_CUDA else (lambda: TorchFlat(torch, DIM, ip, "cpu"))
        return GpuScorer(faiss, None, lock, DIM, ip, rebuild_dead=rebuild_dead,
                         engine="torch", torch=torch, index_factory=factory)
    if HAS_FAISS_GPU:
        return GpuScorer(faiss, faiss.StandardGpuResources(), lock, DIM, ip,
                         rebuild_dead=rebuild_dead)
    flat = (lambda: faiss.IndexFlatIP(DIM)) if ip else (lambda: faiss.IndexFlatL2(DIM))
    return GpuScorer(faiss, None, lock, DIM, ip, rebuild_dead=rebuild_dead,
                     index_factory=flat)


def _pair(root: Path, engine: str, metric: str = "cosine", rebuild_dead: int = MAX_K // 2,
          **extra: object) -> tuple[FaissIndex, FaissIndex, GpuScorer]:
    """Two flat collections fed the same writes: one scored by the scorer, one on the CPU."""
    spec = CollectionSpec("c", DIM, metric)  # type: ignore[arg-type]
    opts = {"kind": "flat", "gpu": False, "exact_max": 0, **extra}
    gpu = FaissBackend(root / "gpu", **opts).open(spec)  # type: ignore[arg-type]
    cpu = FaissBackend(root / "cpu", **opts).open(spec)  # type: ignore[arg-type]
    scorer = _scorer(metric != "l2", engine, rebuild_dead)
    gpu._gpu = scorer
    return gpu, cpu, scorer


def _same(a: FaissIndex, b: FaissIndex, queries: np.ndarray, k: int,
          where: Filter | None = None) -> None:
    got, want = a.search(queries, k, where=where), b.search(queries, k, where=where)
    for g, w in zip(got, want, strict=True):
        assert g.ids.tolist() == w.ids.tolist()
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-4)


def _write(indexes: tuple[FaissIndex, ...], ids: np.ndarray, vectors: np.ndarray) -> None:
    for index in indexes:
        index.upsert(ids, vectors, [payload(int(i)) for i in ids])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_the_device_copy_answers_as_the_cpu_scan_through_every_kind_of_write(
        tmp_path: Path, metric: str, engine: str) -> None:
    gpu, cpu, scorer = _pair(tmp_path, engine, metric)
    rng = np.random.default_rng(7)
    queries = unit_vectors(8, seed=99)
    base = unit_vectors(3000, seed=1)
    _write((gpu, cpu), np.arange(3000), base)
    _same(gpu, cpu, queries, 10)
    assert scorer.searches == 1 and scorer.uploaded_rows == 3000
    # appends: only the new rows go to the device
    _write((gpu, cpu), np.arange(3000, 3500), unit_vectors(500, seed=2))
    _same(gpu, cpu, queries, 10)
    assert scorer.uploaded_rows == 3500
    # replacements and deletes: tombstones skipped by over-fetching, still exact
    again = rng.choice(3500, 200, replace=False)
    _write((gpu, cpu), again, unit_vectors(200, seed=3))
    gone = rng.choice(3500, 150, replace=False)
    for index in (gpu, cpu):
        index.delete(gone.tolist())
    _same(gpu, cpu, queries, 10)
    _same(gpu, cpu, queries, 50)
    # the nearest neighbours of a query deleted: the answer moves on to the next ones
    top = cpu.search(queries[:1], 5)[0].ids.tolist()
    for index in (gpu, cpu):
        index.delete(top)
    _same(gpu, cpu, queries, 10)
    assert scorer.declined == 0
    # a filter that a third pass: more than a k-selection can skip -> the CPU (faiss), or
    # a mask of the passing rows (torch)
    _same(gpu, cpu, queries, 10, Filter(languages=("go",)))
    assert (scorer.declined, scorer.masked) == ((1, 0) if engine == "faiss" else (0, 1))
    for index in (gpu, cpu):
        index.delete(list(range(0, 3500, 5)))  # drop every team=core row (i % 5 == 0)...
    # ...so team=web excludes only dead rows: answered by over-fetching (or on the CPU
    # while a rebuild runs), the same either way
    _same(gpu, cpu, queries, 10, Filter(metadata=(("team", "web"),)))
    _same(gpu, cpu, queries, 10, Filter(metadata=(("team", "core"),)))  # nothing passes


@pytest.mark.parametrize("engine", ENGINES)
def test_dead_rows_past_the_mark_rebuild_the_copy_in_the_background(tmp_path: Path,
                                                                     engine: str) -> None:
    gpu, cpu, scorer = _pair(tmp_path, engine, rebuild_dead=100)
    queries = unit_vectors(4, seed=5)
    _write((gpu, cpu), np.arange(2000), unit_vectors(2000, seed=6))
    _same(gpu, cpu, queries, 10)
    for index in (gpu, cpu):
        index.delete(list(range(0, 2000, 10)))  # 200 dead > 100
    _same(gpu, cpu, queries, 10)  # answered (over-fetching 200), and a rebuild started
    deadline = time.monotonic() + 30
    while scorer.stats()["gpu_rows"] != 1800 and time.monotonic() < deadline:
        _same(gpu, cpu, queries, 10)  # declined (CPU) while it builds: still the same
        time.sleep(0.01)
    assert scorer.stats()["gpu_rows"] == 1800  # the live rows only
    n = scorer.searches
    _same(gpu, cpu, queries, 10)
    assert scorer.searches == n + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_more_to_skip_than_a_selection_returns_is_masked_or_left_to_the_cpu(
        tmp_path: Path, engine: str) -> None:
    gpu, cpu, scorer = _pair(tmp_path, engine, rebuild_dead=10**9, compact_ratio=1.0)
    queries = unit_vectors(3, seed=8)
    _write((gpu, cpu), np.arange(6000), unit_vectors(6000, seed=9))
    _same(gpu, cpu, queries, 10)  # the device copy: all 6000
    for index in (gpu, cpu):
        index.delete(list(range(0, 6000, 2)))  # 3000 dead: k + 3000 > 2048
    _same(gpu, cpu, queries, 10)
    _same(gpu, cpu, queries, 10, Filter(metadata=(("team", "core"),)))
    if engine == "faiss":
        assert (scorer.declined, scorer.searches) == (2, 1)
    else:  # torch masks the rows: every search on the device
        assert (scorer.declined, scorer.searches, scorer.masked) == (0, 3, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_compaction_gives_the_new_generation_its_own_copy(tmp_path: Path,
                                                             engine: str) -> None:
    spec = CollectionSpec("c", DIM, "cosine")
    gpu = FaissBackend(tmp_path / "g", kind="flat", gpu=False, exact_max=0, compact_min=100,
                       compact_ratio=0.2).open(spec)
    cpu = FaissBackend(tmp_path / "c", kind="flat", gpu=False, exact_max=0).open(spec)
    scorer = _scorer(True, engine)
    gpu._gpu = scorer
    queries = unit_vectors(4, seed=11)
    _write((gpu, cpu), np.arange(1000), unit_vectors(1000, seed=12))
    _same(gpu, cpu, queries, 10)
    for index in (gpu, cpu):
        index.delete(list(range(400)))
    assert gpu.wait_idle(30)
    assert gpu.stats()["generation"] >= 1 and gpu.stats()["slots"] == 600
    _same(gpu, cpu, queries, 10)
    assert scorer.stats()["gpu_rows"] == 600


def test_gpu_true_without_a_gpu_says_what_to_install(tmp_path: Path) -> None:
    if HAS_CUDA or HAS_FAISS_GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineUnavailable, match="no GPU 0 is usable .*make install-gpu"):
        FaissBackend(tmp_path, gpu=True).open(CollectionSpec("c", DIM, "cosine"))
    # None (the default) quietly scores on the CPU
    index = FaissBackend(tmp_path / "d").open(CollectionSpec("c", DIM, "cosine"))
    assert index._gpu is None and "gpu_searches" not in index.stats()


def test_engine_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="gpu_engine"):
        FaissOptions(gpu_engine="cuda")
    assert FaissOptions().gpu is None and FaissOptions().gpu_engine == "auto"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build of torch and a GPU")
def test_on_a_gpu_the_default_uses_it(tmp_path: Path) -> None:
    index = FaissBackend(tmp_path).open(CollectionSpec("c", DIM, "cosine"))
    index.upsert(np.arange(100), unit_vectors(100), None)
    hits = index.search(unit_vectors(1, seed=3), 5)
    assert len(hits[0].ids) == 5
    assert index.stats()["gpu_searches"] == 1 and index.stats()["gpu_engine"] == "torch"


@pytest.mark.parametrize("engine", ENGINES)
def test_auto_stays_exact_on_a_gpu_up_to_gpu_exact_max(tmp_path: Path, engine: str) -> None:
    """Past auto_threshold a CPU collection builds HNSW; one scored on a GPU stays exact
    (recall 1.0, faster there) until gpu_exact_max live vectors, then builds it too."""
    spec = CollectionSpec("c", DIM, "cosine")  # type: ignore[arg-type]
    opts = {"kind": "auto", "gpu": False, "exact_max": 0, "auto_threshold": 1000,
            "gpu_exact_max": 3000}
    on_gpu = FaissBackend(tmp_path / "gpu", **opts).open(spec)  # type: ignore[arg-type]
    on_cpu = FaissBackend(tmp_path / "cpu", **opts).open(spec)  # type: ignore[arg-type]
    on_gpu._gpu = _scorer(True, engine)
    data = unit_vectors(4000, seed=5)
    queries = unit_vectors(8, seed=6)
    _write((on_gpu, on_cpu), np.arange(2500), data[:2500])
    assert on_gpu.wait_idle(60) and on_cpu.wait_idle(60)
    assert on_cpu.stats()["kind"] == "hnsw"
    assert on_gpu.stats()["kind"] == "flat"
    got = on_gpu.search(queries, 10)
    want = np.argsort(-(queries @ data[:2500].T), axis=1)[:, :10]
    assert [g.ids.tolist() for g in got] == want.tolist()
    _write((on_gpu,), np.arange(2500, 4000), data[2500:])
    assert on_gpu.wait_idle(60) and on_gpu.stats()["kind"] == "hnsw"
