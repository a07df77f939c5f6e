"""Chroma-specific behaviour of indexers.chroma_index, on the real embedded engine.

The VectorIndex contract itself is tests/test_indexers.py (parametrized over every
backend); this file covers what only Chroma needs: the name mapping, the distance ->
score conversion per metric, filters made of hostile strings, how a replaced record sheds
its old payload (Chroma's upsert merges metadata), the exact completion of short answers,
the disk left by a dropped collection, connection failures, and that no embedding model is
ever loaded.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("chromadb")

import chromadb  # noqa: E402
from chromadb.config import Settings as ChromaSettings  # noqa: E402
from test_indexers import FILTERS, check_hits, exact_top_k, payload_of, unit_vectors  # noqa: E402

import indexers.chroma_index as chroma_index  # noqa: E402
from indexers import (  # noqa: E402
    CollectionSpec,
    EngineUnavailable,
    Filter,
    Payload,
    create_backend,
)
from indexers.chroma_index import ChromaBackend, chroma_name, compile_filter  # noqa: E402

# Chroma's own rule for collection names (its error message states it).
CHROMA_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{1,510})[A-Za-z0-9]$")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ChromaBackend]:
    b = ChromaBackend(tmp_path / "chroma")
    yield b
    b.close()


# -- names -------------------------------------------------------------------------------------
HOSTILE_NAMES = ["ns.g1", "a", "", "..", "x..y", "192.168.0.1", "sp ace.g2", "ünï/cøde.g3",
                 "-lead.trail-", "new\nline", "%_*?[]", "日本語.g1", "a" * 1000, "A.g1", "a.g1"]


def test_collection_names_map_to_valid_distinct_chroma_names(backend: ChromaBackend) -> None:
    mapped = [chroma_name(n) for n in HOSTILE_NAMES]
    for name, m in zip(HOSTILE_NAMES, mapped, strict=True):
        assert CHROMA_NAME.match(m) and ".." not in m, (name, m)
        assert chroma_name(name) == m  # deterministic
    assert len(set(mapped)) == len(HOSTILE_NAMES)  # "A.g1" and "a.g1" stay apart
    for i, name in enumerate(HOSTILE_NAMES):
        backend.open(CollectionSpec(name, 4, "cosine")).upsert([i], unit_vectors(1, 4))
    assert backend.collections() == sorted(HOSTILE_NAMES)
    backend.close()
    again = ChromaBackend(backend._root)
    try:
        assert again.collections() == sorted(HOSTILE_NAMES)
        for i, name in enumerate(HOSTILE_NAMES):
            assert again.open(CollectionSpec(name, 4, "cosine")).ids().tolist() == [i]
    finally:
        again.close()


def test_collections_lists_only_what_this_backend_made(backend: ChromaBackend) -> None:
    backend.open(CollectionSpec("ours.g1", 4, "l2"))
    # Another user of the same Chroma: a plain collection, and one squatting our mapped name
    # pattern without our metadata.
    client = chromadb.PersistentClient(path=str(backend._root),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    try:
        client.create_collection("someone-elses", embedding_function=None)
        client.create_collection("rtv-x-0123456789abcdef01234567", embedding_function=None,
                                 metadata={"retriever:name": "not-x"})
        assert backend.collections() == ["ours.g1"]
    finally:
        client.close()


def test_the_collection_stores_its_name_dimension_metric_and_space(
        backend: ChromaBackend) -> None:
    index = backend.open(CollectionSpec("ns with spaces.g7", 12, "ip"))
    col = index._col
    assert col.name == chroma_name("ns with spaces.g7")
    assert col.metadata["retriever:name"] == "ns with spaces.g7"
    assert (col.metadata["retriever:dimension"], col.metadata["retriever:metric"]) == (12, "ip")
    assert col.configuration_json["hnsw"]["space"] == "ip"


# -- scores --------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_scores_are_the_contracts_similarities(backend: ChromaBackend, metric: str) -> None:
    """cosine/ip: the dot product (Chroma's distance is 1 - it); l2: minus the squared
    distance (Chroma's l2 is already squared). Checked against numpy, for the engine's
    answers and for the exact path that completes short ones."""
    n, dim = 60, 8
    rng = np.random.default_rng(5)
    data = rng.standard_normal((n, dim)).astype(np.float32)
    if metric == "cosine":
        data /= np.linalg.norm(data, axis=1, keepdims=True)
    else:
        data *= rng.uniform(0.2, 3.0, (n, 1)).astype(np.float32)  # not unit length
    ids = np.arange(10, 10 + n, dtype=np.int64) * 7
    queries = unit_vectors(4, dim, seed=6) if metric == "cosine" else \
        rng.standard_normal((4, dim)).astype(np.float32)
    index = backend.open(CollectionSpec(f"scores-{metric}", dim, metric))  # type: ignore[arg-type]
    index.upsert(ids, data)
    want_ids, want_scores = exact_top_k(data, ids, queries, n, metric)
    for path, got in (("engine", index.search(queries, n)),
                      ("exact", index._exact(queries, n, None, None))):
        for g, w_ids, w_scores in zip(got, want_ids, want_scores, strict=True):
            check_hits(g, n)
            assert g.scores.dtype == np.float32
            assert g.ids.tolist() == w_ids.tolist(), path
            np.testing.assert_allclose(g.scores, w_scores, rtol=1e-4, atol=1e-4, err_msg=path)


# -- filters -----------------------------------------------------------------------------------
HOSTILE_PATHS = ["src/app.py", "a%b", "a_b", "a*b", "a.b", "a\\b", "(x)[y]{z}", "^start$",
                 "new\nline", "line", "😀/x", "😀", "é/é", "e\u0301/x", "quote\"d", "it's",
                 "tab\there", " lead", "$and", "#document", "a/b/c", "A/B", "", "💩.py",
                 "\\x{61}", "\\A"]
HOSTILE_VALUES = ["", "core", "ana|bo'b\\", "\"q\"", "[\"k\",\"v\"]", "$in", "#document",
                  "日本", "x\ny", "😀"]
HOSTILE_KEYS = ["team", "$and", "#document", "m:team", "doc_id", "rid", "path", "meta",
                "k\"ey", "", "日本"]


def hostile_payload(i: int) -> Payload:
    meta = {HOSTILE_KEYS[(i + j) % len(HOSTILE_KEYS)]: HOSTILE_VALUES[(i * 3 + j)
                                                                        % len(HOSTILE_VALUES)]
            for j in range(i % 4)}
    return Payload(doc_id=HOSTILE_VALUES[i % len(HOSTILE_VALUES)] + str(i % 3),
                   path=HOSTILE_PATHS[i % len(HOSTILE_PATHS)],
                   language=HOSTILE_VALUES[(i + 1) % len(HOSTILE_VALUES)],
                   kind=HOSTILE_VALUES[(i + 2) % len(HOSTILE_VALUES)],
                   metadata=tuple(sorted(meta.items())))


def hostile_filters(payloads: list[Payload]) -> list[Filter]:
    prefixes = sorted({p[:n] for p in HOSTILE_PATHS for n in (1, 2, len(p))} - {""})
    prefixes += ["%", "_", ".", "*", "a.", "\\", "(", "[", "li", "ine", "zz", "😀/", "e",
                 "\u0301"]
    filters = [Filter(path_prefix=p) for p in prefixes]
    filters += [Filter(doc_ids=(p.doc_id,)) for p in payloads[:12]]
    filters += [Filter(languages=(v,)) for v in HOSTILE_VALUES]
    filters += [Filter(kinds=(v, "nope")) for v in HOSTILE_VALUES]
    pairs = sorted({kv for p in payloads for kv in p.metadata})
    filters += [Filter(metadata=(kv,)) for kv in pairs]
    filters += [Filter(metadata=((k, ""),)) for k in HOSTILE_KEYS]  # present-and-empty only
    filters += [Filter(metadata=(("doc_id", p.doc_id),)) for p in payloads[:3]]  # no clash
    filters += [Filter(doc_ids=(payloads[i].doc_id,), path_prefix=payloads[i].path[:2],
                       metadata=payloads[i].metadata[:1]) for i in range(5, 40, 7)]
    return filters


def test_hostile_strings_in_filters_match_the_reference(backend: ChromaBackend) -> None:
    n = 120
    payloads = [hostile_payload(i) for i in range(n)]
    vectors = unit_vectors(n, seed=21)
    index = backend.open(CollectionSpec("hostile", vectors.shape[1], "cosine"))
    index.upsert(range(n), vectors, payloads)
    index.upsert(range(n, n + 5), unit_vectors(5, seed=22))  # no payload: only Filter() has them
    query = unit_vectors(1, seed=23)
    flts = hostile_filters(payloads)
    assert len(flts) > 100
    for flt in flts:
        passing = {i for i in range(n) if flt.matches(payloads[i])}
        (hits,) = index.search(query, n + 5, where=flt)
        assert set(hits.ids.tolist()) == passing, flt
    assert len(index.search(query, 200, where=Filter())[0].ids) == n + 5


def test_strings_chroma_cannot_store_are_refused_or_match_nothing(
        backend: ChromaBackend) -> None:
    """Lone surrogates (e.g. a non-UTF-8 file name decoded with surrogateescape) are not
    UTF-8: a payload holding one is refused, a filter holding one matches nothing."""
    index = backend.open(CollectionSpec("surrogates", 4, "cosine"))
    v = unit_vectors(2, 4)
    index.upsert([1], v[:1], [Payload("d", "a/b.py", metadata=(("k", "v"),))])
    for bad in (Payload("d", "a\udc80b"), Payload("d\ud800", "p"),
                Payload("d", "p", metadata=(("k\udfff", "v"),))):
        with pytest.raises(ValueError, match="surrogate"):
            index.upsert([2], v[1:], [bad])
    assert index.ids().tolist() == [1]
    for flt in (Filter(path_prefix="a\udc80"), Filter(doc_ids=("\ud800",)),
                Filter(metadata=(("k", "\udc80"),)), Filter(kinds=("\udc80",))):
        assert index.search(v, 5, where=flt)[0].ids.tolist() == [], flt
    # A criterion keeps its storable values.
    assert index.search(v, 5, where=Filter(doc_ids=("\ud800", "d")))[0].ids.tolist() == [1]


def test_prefix_is_a_character_prefix_from_the_start_of_the_path() -> None:
    _, doc = compile_filter(Filter(path_prefix="a.b*(c)%\n😀"))
    assert doc is not None
    rx = doc["$regex"]
    assert rx.startswith(r"\A") and "." not in rx and "*" not in rx and "%" not in rx
    assert re.fullmatch(r"\\A(?:[A-Za-z0-9]|\\x\{[0-9a-f]+\})*", rx)


def test_a_replaced_record_keeps_nothing_of_its_old_payload(backend: ChromaBackend) -> None:
    """Chroma's upsert merges metadata: every key of the old payload must still go."""
    index = backend.open(CollectionSpec("replace", 4, "cosine"))
    v = unit_vectors(1, 4)
    index.upsert([1], v, [Payload("d", "old/p.py", "python", "function",
                                  (("a", "1"), ("b", "2")))])
    index.upsert([1], v, [Payload("d", "new/p.py", "", "", (("a", "1"),))])
    assert index.search(v, 5, where=Filter(metadata=(("b", "2"),)))[0].ids.tolist() == []
    assert index.search(v, 5, where=Filter(metadata=(("a", "1"),)))[0].ids.tolist() == [1]
    assert index.search(v, 5, where=Filter(path_prefix="old"))[0].ids.tolist() == []
    assert index.search(v, 5, where=Filter(kinds=("function",)))[0].ids.tolist() == []
    index.upsert([1], v)  # now without a payload: it matches only the empty filter
    for flt in (Filter(doc_ids=("d",)), Filter(path_prefix="n"), Filter(languages=("",)),
                Filter(kinds=("",)), Filter(metadata=(("a", "1"),))):
        assert index.search(v, 5, where=flt)[0].ids.tolist() == [], flt
    assert index.search(v, 5, where=Filter())[0].ids.tolist() == [1]


def test_the_shared_filters_on_a_collection_written_in_one_call(backend: ChromaBackend) -> None:
    """FILTERS of the conformance suite, written as one upsert bigger than Chroma's batch
    limit would allow when it is small (the write is sliced)."""
    backend._connect()
    backend._max_batch = 37  # slice writes finely: each slice is a real Chroma call
    n = 300
    payloads = [payload_of(i) for i in range(n)]
    vectors = unit_vectors(n, seed=31)
    index = backend.open(CollectionSpec("sliced", vectors.shape[1], "cosine"))
    index.upsert(np.arange(n) * 3, vectors, payloads)
    assert index.count() == n
    for flt in FILTERS:
        passing = {3 * i for i in range(n) if flt.matches(payloads[i])}
        (hits,) = index.search(vectors[:1], n, where=flt)
        assert set(hits.ids.tolist()) == passing


# -- completing short answers exactly ------------------------------------------------------------
def test_short_engine_answers_are_completed_by_an_exact_scan(
        backend: ChromaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    n, dim, k = 400, 16, 10
    data = unit_vectors(n, dim, seed=41)
    payloads = [payload_of(i) for i in range(n)]
    ids = np.arange(n, dtype=np.int64)
    index = backend.open(CollectionSpec("short", dim, "cosine"))
    index.upsert(ids, data, payloads)
    queries = unit_vectors(3, dim, seed=42)
    flt = Filter(languages=("python",))
    mask = np.array([flt.matches(p) for p in payloads])
    want_ids, want_scores = exact_top_k(data[mask], ids[mask], queries, k, "cosine")

    where_, where_doc = compile_filter(flt)
    out = index.search(queries, k, where=flt)
    cut = [type(h)(ids=h.ids[:3], scores=h.scores[:3]) for h in out]  # as if HNSW missed
    index._complete(queries, k, where_, where_doc, cut, [0, 1, 2])
    for got, w_ids, w_scores in zip(cut, want_ids, want_scores, strict=True):
        assert got.ids.tolist() == w_ids.tolist()
        np.testing.assert_allclose(got.scores, w_scores, atol=1e-5)

    # Past exact_scan_limit it keeps what the engine found (and says so in the log).
    backend.exact_scan_limit = 5
    cut = [type(h)(ids=h.ids[:3], scores=h.scores[:3]) for h in out]
    index._complete(queries, k, where_, where_doc, cut, [0, 1, 2])
    assert [len(h.ids) for h in cut] == [3, 3, 3]

    # Allowed sets too large for one `$in` are scored exactly in slices.
    monkeypatch.setattr(chroma_index, "_MAX_IN", 16)
    allowed = ids[::3]
    sub = np.isin(ids, allowed) & mask
    want_ids, _ = exact_top_k(data[sub], ids[sub], queries, k, "cosine")
    got = index.search(queries, k, allowed_ids=allowed, where=flt)
    assert [g.ids.tolist() for g in got] == want_ids.tolist()


# -- storage -----------------------------------------------------------------------------------
def _segment_dirs(root: Path) -> set[str]:
    out = set()
    for p in root.iterdir():
        try:
            uuid.UUID(p.name)
        except ValueError:
            continue
        out.add(p.name)
    return out


def test_drop_removes_the_hnsw_files_chroma_leaves_behind(backend: ChromaBackend) -> None:
    root = backend._root
    keep = backend.open(CollectionSpec("keep", 8, "l2"))
    keep.upsert(range(1200), unit_vectors(1200, 8, seed=1))  # past sync_threshold: on disk
    kept_dirs = _segment_dirs(root)
    assert kept_dirs, "expected Chroma to have written its HNSW files"
    gone = backend.open(CollectionSpec("gone", 8, "l2"))
    gone.upsert(range(1200), unit_vectors(1200, 8, seed=2))
    assert _segment_dirs(root) > kept_dirs
    backend.drop("gone")
    assert _segment_dirs(root) == kept_dirs
    assert keep.count() == 1200 and backend.collections() == ["keep"]
    backend.close()
    again = ChromaBackend(root)
    try:
        assert again.open(CollectionSpec("keep", 8, "l2")).count() == 1200
        assert again.open(CollectionSpec("gone", 8, "cosine")).count() == 0
    finally:
        again.close()


KILLED_WRITER = '''
import os, signal, sys
import numpy as np
from pathlib import Path
from indexers import CollectionSpec, Payload
from indexers.chroma_index import ChromaBackend
index = ChromaBackend(Path(sys.argv[1])).open(CollectionSpec("crash", 8, "cosine"))
v = np.random.default_rng(0).standard_normal((1500, 8)).astype(np.float32)
v /= np.linalg.norm(v, axis=1, keepdims=True)
index.upsert(range(1500), v, [Payload(f"d{i}", f"p/{i}.py") for i in range(1500)])
index.delete(range(100))
index.upsert([5000], -v[:1], [Payload("last", "z/last.py")])
os.kill(os.getpid(), signal.SIGKILL)  # no flush, no close
'''


def test_writes_survive_a_killed_process_without_flush(tmp_path: Path) -> None:
    root = tmp_path / "chroma"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          env={**os.environ, "ANONYMIZED_TELEMETRY": "False"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")[-2000:]
    backend = ChromaBackend(root)
    try:
        index = backend.open(CollectionSpec("crash", 8, "cosine"))
        assert index.count() == 1401
        assert set(index.ids().tolist()) == set(range(100, 1500)) | {5000}
        v = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        (hits,) = index.search(-v, 1, where=Filter(path_prefix="z/"))
        assert hits.ids.tolist() == [5000] and hits.scores[0] == pytest.approx(1.0, abs=1e-4)
    finally:
        backend.close()


def test_ids_pages_past_one_page(backend: ChromaBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chroma_index, "_PAGE", 7)
    index = backend.open(CollectionSpec("paged", 4, "ip"))
    index.upsert([2**62, 0, -(2**63), 2**63 - 1, *range(1, 40)], unit_vectors(43, 4))
    assert index.delete([5, 6, 2**62, 12345]) == 3
    got = index.ids()
    assert set(got.tolist()) == {0, -(2**63), 2**63 - 1} | set(range(1, 40)) - {5, 6}
    assert len(got) == index.count() == 40
    with pytest.raises(ValueError):
        index.upsert([2**63], unit_vectors(1, 4))


# -- connections -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_url_is_engine_unavailable(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    backend = create_backend("chroma", tmp_path, url=f"http://127.0.0.1:{port}", timeout_s=1.0)
    with pytest.raises(EngineUnavailable, match=f"127.0.0.1:{port}"):
        backend.open(CollectionSpec("x", 4, "cosine"))
    assert time.monotonic() - started < 5


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        backend = ChromaBackend(tmp_path, url=f"http://127.0.0.1:{port}", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(EngineUnavailable):
            backend.collections()
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h:1", "http://"])
def test_a_malformed_url_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError):
        ChromaBackend(tmp_path, url=url).open(CollectionSpec("x", 4, "cosine"))


# -- no embedding model --------------------------------------------------------------------------
def test_no_embedding_function_or_model_is_ever_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chromadb.utils import embedding_functions as ef
    from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

    used: list[str] = []

    def tripwire(name: str) -> Callable[[object, object], object]:
        # Chroma checks an embedding function's __call__ signature: keep (self, input).
        def trip(self: object, input: object) -> object:
            used.append(name)
            raise AssertionError(f"{name} was called")
        return trip

    monkeypatch.setattr(ef.DefaultEmbeddingFunction, "__call__", tripwire("default ef"))
    monkeypatch.setattr(ONNXMiniLM_L6_V2, "__call__", tripwire("onnx ef"))
    monkeypatch.setattr(ONNXMiniLM_L6_V2, "_download_model_if_not_exists",
                        tripwire("onnx download"))
    models = Path.home() / ".cache" / "chroma" / "onnx_models"
    had_models = models.exists()

    backend = ChromaBackend(tmp_path)
    index = backend.open(CollectionSpec("noef", 8, "cosine"))
    assert index._col._embedding_function is None
    v = unit_vectors(30, 8)
    index.upsert(range(30), v, [payload_of(i) for i in range(30)])
    index.search(v[:2], 5, where=Filter(path_prefix="src/"))
    index.search(v[:2], 50)
    backend.collections()
    backend.close()
    reopened = ChromaBackend(tmp_path)
    again = reopened.open(CollectionSpec("noef", 8, "cosine"))
    assert again._col._embedding_function is None
    assert again.count() == 30
    reopened.drop("noef")
    reopened.close()
    assert used == []
    assert models.exists() == had_models


def test_telemetry_is_off_without_touching_the_environment(tmp_path: Path) -> None:
    before = dict(os.environ)
    backend = ChromaBackend(tmp_path)
    backend.open(CollectionSpec("t", 4, "cosine"))
    assert backend._client.get_settings().anonymized_telemetry is False
    backend.close()
    assert dict(os.environ) == before


def test_threads_share_one_collection_object(backend: ChromaBackend) -> None:
    import threading

    specs = [CollectionSpec("same", 4, "cosine")] * 8
    got: list[object] = []
    threads = [threading.Thread(target=lambda s=s: got.append(backend.open(s))) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(g) for g in got}) == 1


def test_every_metric_and_k_combination_returns_sorted_unique_hits(
        backend: ChromaBackend) -> None:
    data = unit_vectors(25, 6, seed=3)
    for metric, k in itertools.product(("cosine", "ip", "l2"), (1, 5, 25, 100)):
        index = backend.open(CollectionSpec(f"mk-{metric}", 6, metric))  # type: ignore[arg-type]
        if not index.count():
            index.upsert(range(25), data)
        for hits in index.search(data[:3], k):
            check_hits(hits, k)
            assert len(hits.ids) == min(k, 25)
