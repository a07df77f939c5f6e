"""The FAISS backend at scale: exact vs HNSW vs the previous flat-behind-one-mutex design.

    python bench/bench_faiss.py [--sizes 100000,1000000] [--dim 384] [--queries 200]
                                [--out bench/results/faiss-scale.md]

For each size, in one process, on the index classes alone (no service, no embedder):

* **Data.** A Gaussian mixture (1,000 centres, noise 0.6 per dimension relative to unit
  centres, L2-normalised, cosine): nearer to real embeddings than uniform random vectors,
  which are the worst case for HNSW. Queries come from the same mixture. Every vector has a
  payload: doc id (20 chunks per doc), path ``src/pkgNNN/modM.py`` (1,000 packages),
  language (python/go/rust in turn), kind. Ground truth: exact top-10 by brute force.
* **old**: the previous backend's discipline, rebuilt here as a baseline: one
  ``IndexIDMap2(IndexFlatIP)`` behind one mutex, ``remove_ids`` before every add, filters
  as an id list (``IDSelectorBatch``; resolving the ids in SQLite, as the service did, is
  not counted), snapshot serialised under the mutex searches need.
* **flat**: this backend, ``kind="flat"`` (exact, tombstones, bitmap selectors).
* **hnsw**: this backend, ``kind="hnsw"`` (M 32, efConstruction 80), built in the
  background when the flat snapshot is reopened with that kind (2 OpenMP threads for the
  build only, 1 per search). The table's row is at the efSearch the build calibrated (the
  default: the smallest of 128, 256, ... 1024 reaching recall@10 0.95 on the collection's
  own vectors); recall and latency are also reported at each efSearch from 64 to 1024.

Search latency: single-query k=10 searches in one thread, 1 OpenMP thread. Upsert and
delete: 100 vectors (an upsert replaces 100 stored ids), repeated. Filters: *selective*
(one package, 0.1 %) and *broad* (one language, 33 %); recall against the exact answer
within the filter. Snapshot: ``flush`` of the whole collection to local disk, while another
thread searches back to back: the longest search that overlapped the flush and the longest
gap between search completions are the stall. Writes the Markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import cpu, cpu_line, log  # noqa: E402

from indexers import CollectionSpec, Filter, Payload  # noqa: E402
from indexers.faiss_index import FaissBackend, FaissIndex  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K = 10
LANGS = ("python", "go", "rust")
SELECTIVE = Filter(path_prefix="src/pkg007/")
BROAD = Filter(languages=("python",))


# -- data ----------------------------------------------------------------------------------
def mixture(n: int, dim: int, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = centres[rng.integers(0, len(centres), hi - lo)]
        x = x + rng.standard_normal((hi - lo, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def payload_of(i: int) -> Payload:
    doc = i // 20
    return Payload(doc_id=f"doc-{doc}", path=f"src/pkg{doc % 1000:03d}/mod{doc % 37}.py",
                   language=LANGS[i % 3], kind=("function", "class", "section")[doc % 3])


def exact_top(data: np.ndarray, queries: np.ndarray, k: int,
              rows: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k row numbers (over ``rows`` when given), faiss brute force, 2 threads."""
    faiss.omp_set_num_threads(2)
    base = data if rows is None else np.ascontiguousarray(data[rows])
    _, idx = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(1)
    return idx if rows is None else rows[idx]


def recall(got: list[np.ndarray], want: np.ndarray) -> float:
    return float(np.mean([len(set(g.tolist()) & set(w.tolist())) / len(w)
                          for g, w in zip(got, want, strict=True)]))


# -- the previous design, as a baseline -----------------------------------------------------
class OldFlat:
    """IndexIDMap2(IndexFlatIP) behind one mutex, as the previous backend was."""

    def __init__(self, dim: int) -> None:
        self.lock = threading.Lock()
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        with self.lock:
            faiss.omp_set_num_threads(1)
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            self.index.add_with_ids(vectors, ids)

    def delete(self, ids: np.ndarray) -> None:
        with self.lock:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        with self.lock:
            faiss.omp_set_num_threads(1)
            params = None
            if allowed is not None:
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
            _, ids = self.index.search(q, k, params=params)
        return ids

    def flush(self, path: Path) -> None:
        with self.lock:
            data = faiss.serialize_index(self.index)
        with open(path, "wb") as fh:
            fh.write(data.data)
            fh.flush()
            os.fsync(fh.fileno())


# -- measuring -------------------------------------------------------------------------------
def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def latency(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    search(queries[:1])  # warm
    times = [timed(lambda q=q: search(q[None, :])) for q in queries]
    return {"p50_ms": ms(float(np.percentile(times, 50))),
            "p99_ms": ms(float(np.percentile(times, 99)))}


def stall(search: Callable[[np.ndarray], Any], queries: np.ndarray,
          action: Callable[[], Any]) -> dict[str, float]:
    """Run ``action`` while another thread searches back to back."""
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            search(queries[i % len(queries)][None, :])
            spans.append((t, time.perf_counter()))
            i += 1

    thread = threading.Thread(target=searcher, daemon=True)
    thread.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    action()
    t1 = time.perf_counter()
    time.sleep(0.2)
    stop.set()
    thread.join()
    during = [b - a for a, b in spans if b >= t0 and a <= t1]
    ends = [t0, *[b for _, b in spans if t0 <= b <= t1], t1]
    before = [b - a for a, b in spans if b < t0]
    return {"action_s": round(t1 - t0, 3),
            "searches_during": len(during),
            "max_search_ms": ms(max(during)) if during else ms(t1 - t0),
            "max_gap_ms": ms(max(b - a for a, b in zip(ends, ends[1:], strict=False))),
            "p50_before_ms": ms(float(np.median(before))) if before else 0.0}


def write_cost(write: Callable[[int], Any], reps: int) -> dict[str, float]:
    times = [timed(lambda r=r: write(r)) for r in range(reps)]
    return {"p50_ms": ms(float(np.median(times))), "max_ms": ms(max(times))}


# -- one size ----------------------------------------------------------------------------------
def run_size(n: int, dim: int, nq: int, tmp: Path,
             baselines: bool = True) -> dict[str, Any]:
    log(f"n={n}: data")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = mixture(n, dim, centres, seed=1)
    queries = mixture(nq, dim, centres, seed=2)
    ids = np.arange(n, dtype=np.int64)
    payloads = [payload_of(i) for i in range(n)]
    truth = exact_top(data, queries, K)
    sel_rows = np.flatnonzero((ids // 20) % 1000 == 7)  # path src/pkg007/...
    assert all(SELECTIVE.matches(payloads[int(i)]) for i in sel_rows)
    broad_rows = np.arange(0, n, 3, dtype=np.int64)
    truth_sel = exact_top(data, queries, K, sel_rows)
    truth_broad = exact_top(data, queries, K, broad_rows)
    flat_q = queries[: min(nq, 60 if n >= 500_000 else nq)]
    out: dict[str, Any] = {"n": n, "selective_passing": len(sel_rows),
                           "broad_passing": len(broad_rows)}
    reps = 10
    fresh = mixture(100 * reps * 2, dim, centres, seed=3)
    repl = np.random.default_rng(4).permutation(n)[: 100 * reps * 2].astype(np.int64)

    if baselines:
        log(f"n={n}: old (IndexIDMap2 + one mutex)")
        out["old"] = run_old(data, ids, flat_q, sel_rows, broad_rows, fresh, repl, reps, tmp)

    # -- flat ---------------------------------------------------------------------------------
    log(f"n={n}: flat")
    backend = FaissBackend(tmp / "idx", kind="flat")
    spec = CollectionSpec("bench", dim, "cosine")
    index = backend.open(spec)
    t = time.perf_counter()
    for lo in range(0, n, 10_000):
        index.upsert(ids[lo : lo + 10_000], data[lo : lo + 10_000], payloads[lo : lo + 10_000])
    res = {"fill_s": round(time.perf_counter() - t, 2)}
    if baselines:
        res.update(measure_index(index, data, flat_q, truth[: len(flat_q)],
                                 truth_sel[: len(flat_q)], truth_broad[: len(flat_q)], reps,
                                 fresh, repl, payloads))
    out["flat"] = res
    backend.close()

    # -- hnsw ---------------------------------------------------------------------------------
    log(f"n={n}: hnsw (reopen the flat snapshot as kind=hnsw: background build)")
    # compact_ratio 0.5: the repeated writes below must not start a compaction (measured
    # on its own at the end).
    backend = FaissBackend(tmp / "idx", kind="hnsw", build_threads=2, compact_ratio=0.5)
    t = time.perf_counter()
    index = backend.open(spec)
    res = {"open_flat_snapshot_s": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    assert index.wait_idle(3600)
    res["build_s"] = round(time.perf_counter() - t, 1)
    log(f"n={n}: hnsw built in {res['build_s']} s")
    stats = index.stats()
    assert stats["kind"] == "hnsw"
    res["calibrated"] = {"ef": stats["hnsw_ef_search"],
                         "own_vectors_recall": stats["hnsw_calibrated_recall"],
                         "vectors": stats["hnsw_calibrated_vectors"]}
    log(f"n={n}: calibrated {res['calibrated']}")
    gen = index._view.gen  # type: ignore[union-attr]  # bench only: each efSearch in turn
    by_ef = {}
    for ef in (64, 128, 256, 512, 1024):
        gen.ef = ef
        got = [h.ids for h in index.search(queries, K)]
        by_ef[ef] = {**latency(lambda q: index.search(q, K), queries), "recall": recall(got, truth)}
    gen.ef = stats["hnsw_ef_search"]  # the table's row: the calibrated default
    res["by_ef"] = by_ef
    res.update(measure_index(index, data, queries, truth, truth_sel, truth_broad, reps, fresh,
                             repl, payloads))
    index.wait_idle(600)
    t = time.perf_counter()
    index.upsert(ids[:1000], data[:1000], payloads[:1000])  # 1,000 replacements
    index.wait_idle(600)
    res["merge_1000_s"] = round(time.perf_counter() - t, 2)
    if n <= 200_000:
        gone = np.random.default_rng(5).permutation(n)[: n // 4]
        index.delete(gone.tolist())
        res["compaction"] = stall(lambda q: index.search(q, K), queries,
                                  lambda: (index.compact(), index.wait_idle(3600)))
        live = np.setdiff1d(ids, gone)
        res["compaction"]["recall_after"] = recall(
            [h.ids for h in index.search(queries, K)], exact_top(data, queries, K, live))
    backend.close()
    t = time.perf_counter()
    reopened = FaissBackend(tmp / "idx", kind="hnsw", compact_ratio=0.5)
    again = reopened.open(spec)
    res["reopen_s"] = round(time.perf_counter() - t, 2)
    assert again.stats()["kind"] == "hnsw"
    reopened.close()
    out["hnsw"] = res
    shutil.rmtree(tmp / "idx", ignore_errors=True)
    return out


def run_old(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, sel_rows: np.ndarray,
            broad_rows: np.ndarray, fresh: np.ndarray, repl: np.ndarray, reps: int,
            tmp: Path) -> dict[str, Any]:
    old = OldFlat(data.shape[1])
    for lo in range(0, len(ids), 100_000):
        old.index.add_with_ids(data[lo : lo + 100_000], ids[lo : lo + 100_000])
    res: dict[str, Any] = {"search": latency(lambda q: old.search(q, K), queries),
                           "recall": 1.0}
    res["selective"] = latency(lambda q: old.search(q, K, sel_rows), queries[:20])
    res["broad"] = latency(lambda q: old.search(q, K, broad_rows), queries[:20])
    res["snapshot"] = stall(lambda q: old.search(q, K), queries,
                            lambda: old.flush(tmp / "old.faiss"))
    (tmp / "old.faiss").unlink(missing_ok=True)
    res["upsert_100"] = write_cost(lambda r: old.upsert(
        repl[100 * r : 100 * r + 100], fresh[100 * r : 100 * r + 100]), reps)
    res["delete_100"] = write_cost(
        lambda r: old.delete(repl[100 * (reps + r) : 100 * (reps + r) + 100]), reps)
    return res


def measure_index(index: FaissIndex, data: np.ndarray, queries: np.ndarray,
                  truth: np.ndarray, truth_sel: np.ndarray, truth_broad: np.ndarray,
                  reps: int, fresh: np.ndarray, repl: np.ndarray,
                  payloads: list[Payload]) -> dict[str, Any]:
    res: dict[str, Any] = {"search": latency(lambda q: index.search(q, K), queries)}
    res["recall"] = recall([h.ids for h in index.search(queries, K)], truth)
    for name, flt, want in (("selective", SELECTIVE, truth_sel), ("broad", BROAD, truth_broad)):
        res[name] = latency(lambda q, f=flt: index.search(q, K, where=f), queries)
        res[name]["recall"] = recall([h.ids for h in index.search(queries, K, where=flt)],
                                     want)

        def cold(q: np.ndarray, f: Filter = flt) -> None:
            index._masks.clear()  # bench only: as after a write, the filter is evaluated
            index.search(q, K, where=f)

        res[name]["cold_p50_ms"] = latency(cold, queries[:50])["p50_ms"]
    res["snapshot"] = stall(lambda q: index.search(q, K), queries, index.flush)
    # Writes last (they change what the ground truth was computed on), undone at the end.
    ups, dels = repl[: 100 * reps], repl[100 * reps :]

    def upsert(r: int) -> None:
        rows = slice(100 * r, 100 * r + 100)
        index.upsert(ups[rows], fresh[rows], [payloads[int(i)] for i in ups[rows]])

    res["upsert_100"] = write_cost(upsert, reps)
    res["delete_100"] = write_cost(lambda r: index.delete(dels[100 * r : 100 * r + 100]),
                                   reps)
    index.upsert(repl, data[repl], [payloads[int(i)] for i in repl])
    return res


# -- report ------------------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    rows = ["| n | variant | search p50 / p99 ms | recall@10 | upsert 100 ms (p50 / max) | "
            "delete 100 ms | selective filter p50 ms, cold (recall) | broad filter p50 ms, "
            "cold (recall) "
            "| snapshot s | longest search during snapshot ms (gap) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for variant in ("old", "flat", "hnsw"):
            if variant not in r or "search" not in r[variant]:
                continue  # baselines skipped
            v = r[variant]
            sel, broad = v["selective"], v["broad"]
            rec = lambda x: (f", {x['cold_p50_ms']} ({x['recall']:.3f})"  # noqa: E731
                             if "recall" in x else "")
            rows.append(
                f"| {r['n']:,} | {variant} | {v['search']['p50_ms']} / {v['search']['p99_ms']} "
                f"| {v['recall']:.3f} | {v['upsert_100']['p50_ms']} / {v['upsert_100']['max_ms']} "
                f"| {v['delete_100']['p50_ms']} | {sel['p50_ms']}{rec(sel)} "
                f"| {broad['p50_ms']}{rec(broad)} | {v['snapshot']['action_s']} "
                f"| {v['snapshot']['max_search_ms']} ({v['snapshot']['max_gap_ms']}) |")
    return "\n".join(rows)


def details(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        h = r["hnsw"]
        lines.append(f"- **{r['n']:,} vectors** (selective filter passes "
                     f"{r['selective_passing']:,}, broad {r['broad_passing']:,}): flat fill "
                     f"{r['flat']['fill_s']} s (upserts of 10k with payloads); opening the "
                     f"flat snapshot {h['open_flat_snapshot_s']} s; HNSW build in the "
                     f"background {h['build_s']} s (2 threads); merging 1,000 replaced "
                     f"vectors into HNSW {h['merge_1000_s']} s (background; the upsert call "
                     f"returns at once, the rows are searched exactly until merged); reopening "
                     f"the HNSW snapshot {h['reopen_s']} s.")
        ef = ", ".join(f"ef {e}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, recall "
                       f"{v['recall']:.3f}" for e, v in h["by_ef"].items())
        lines.append(f"  - HNSW efSearch: {ef}.")
        c = h["calibrated"]
        lines.append(f"  - Calibrated at build (the default): efSearch {c['ef']}, recall@10 "
                     f"{c['own_vectors_recall']:.3f} on {c['vectors']:,} of the collection's "
                     "own vectors (each without itself); the table's hnsw row runs with it.")
        for variant in ("old", "flat", "hnsw"):
            if variant not in r or "snapshot" not in r[variant]:
                continue
            s = r[variant]["snapshot"]
            lines.append(f"  - {variant} snapshot: {s['action_s']} s, {s['searches_during']} "
                         f"searches overlapped it, longest {s['max_search_ms']} ms (p50 "
                         f"before: {s['p50_before_ms']} ms), longest gap between search "
                         f"completions {s['max_gap_ms']} ms.")
        if "compaction" in h:
            c = h["compaction"]
            lines.append(f"  - HNSW compaction after deleting 25 % (copy + rebuild in the "
                         f"background, swap): {c['action_s']} s, {c['searches_during']} "
                         f"searches meanwhile, longest {c['max_search_ms']} ms, longest gap "
                         f"{c['max_gap_ms']} ms; recall@10 after it "
                         f"{c['recall_after']:.3f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/faiss-scale.md")
    ap.add_argument("--no-baselines", action="store_true",
                    help="measure hnsw only (old and flat are filled, not measured)")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    machine = cpu()
    load0 = os.getloadavg()[0]
    started = datetime.now(UTC)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-faiss-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            t = time.perf_counter()
            results.append(run_size(n, args.dim, args.queries, Path(tmp),
                                    baselines=not args.no_baselines))
            log(f"n={n}: done in {time.perf_counter() - t:.0f} s")
    md = (f"# FAISS backend at scale ({started.isoformat(timespec='seconds')})\n\n"
          f"{cpu_line(machine)}; faiss {faiss.__version__}, numpy {np.__version__}; "
          f"{args.dim}-d cosine, k={K}, 1 OpenMP thread per search (2 for the HNSW build). "
          f"Load average (1 min) at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f} "
          "(above ~1 other work shared the 2 cores: absolute figures are then noisy, ratios "
          "within a row set — same process, same data — hold). Data: a Gaussian "
          "mixture (1,000 centres), not real embeddings; queries from the same mixture. "
          "`old` is the previous design rebuilt as a baseline (IndexIDMap2 behind one "
          "mutex, remove_ids per upsert, filter as an id list, snapshot serialised under "
          "the mutex). Produced by `python bench/bench_faiss.py`.\n\n"
          f"{table(results)}\n\n{details(results)}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
