"""Exact FAISS scoring on a GPU (faiss-gpu, ``indexers/_faiss_gpu.py``) against the CPU, in one
process on one machine.

    python bench/bench_faiss_gpu.py [--sizes 100000,1000000,4000000] [--dim 384]
                                    [--queries 200] [--cpu-queries 30] [--hnsw-sizes 100000]
                                    [--out bench/results/gpu-faiss.md]

Data as ``bench_faiss.py`` (a Gaussian mixture of 1,000 centres, cosine, payloads up to 1M).
One flat collection per size (``kind="flat"``, the default ``gpu=None`` so faiss-gpu is used
when it sees a device); the CPU figures come from the same collection with its GPU scorer
set aside, so both score the same rows. For each size:

* **copy**: the first search uploads the live rows to the device (seconds, GB/s);
* **single query** (k=10, one thread, p50/p99) on the GPU and on the CPU (one OpenMP thread,
  as the service runs it), and the GPU's recall against the exact answer (it is exact);
* **batch** of 32 queries: queries/s, GPU and CPU (CPU with every core for this one);
* **8 threads** searching at once on the GPU (one lock serialises GPU calls): queries/s;
* **after writes**: a replacement of 100 vectors then a search (uploads 100 rows), and a
  search after 1,000 deletes (k + 1,000 over-fetched, still exact);
* **filters**: a broad filter (33 % pass) is more than a k-selection can skip and is scored
  on the CPU; a selective one (0.1 %) is gathered and scored on the CPU (as without a GPU);
* **HNSW** on the CPU (M 32, efConstruction 40, efSearch 128) at ``--hnsw-sizes``: the
  approximate alternative the GPU's exact answer competes with (latency, recall).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_faiss import (  # noqa: E402
    BROAD,
    SELECTIVE,
    exact_top,
    latency,
    mixture,
    ms,
    payload_of,
    recall,
    timed,
)
from benchlib import cpu, cpu_line, gpu_line, log  # noqa: E402

from indexers import CollectionSpec  # noqa: E402
from indexers.faiss_index import FaissBackend, FaissIndex  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K = 10


def fill(index: FaissIndex, data: np.ndarray, with_payloads: bool) -> float:
    t = time.perf_counter()
    for lo in range(0, len(data), 20_000):
        hi = min(len(data), lo + 20_000)
        index.upsert(np.arange(lo, hi), data[lo:hi],
                     [payload_of(i) for i in range(lo, hi)] if with_payloads else None)
    return time.perf_counter() - t


def qps(search: Any, queries: np.ndarray, threads: int, seconds: float = 3.0) -> float:
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            search(queries[i % len(queries)][None, :])
            done[w] += 1
            i += threads

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def run_size(n: int, dim: int, nq: int, cpu_nq: int, hnsw: bool, tmp: Path) -> dict[str, Any]:
    log(f"n={n}: data")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = mixture(n, dim, centres, seed=1)
    queries = mixture(nq, dim, centres, seed=2)
    truth = exact_top(data, queries, K)
    with_payloads = n <= 1_000_000
    out: dict[str, Any] = {"n": n, "dim": dim, "payloads": with_payloads}
    spec = CollectionSpec(f"g{n}", dim, "cosine")
    index = FaissBackend(tmp / f"g{n}", kind="flat").open(spec)
    out["fill_s"] = round(fill(index, data, with_payloads), 1)
    scorer = index._gpu
    out["gpu"] = scorer is not None
    search = lambda q: index.search(q, K)  # noqa: E731
    cpu_faiss_threads = os.cpu_count() or 1

    def cpu_figures() -> None:  # the same rows, scored on the CPU
        log(f"n={n}: CPU")
        saved, index._gpu = index._gpu, None
        out["cpu_single"] = latency(search, queries[:cpu_nq])
        got = [h.ids for h in index.search(queries[:cpu_nq], K)]
        out["cpu_recall"] = recall(got, truth[:cpu_nq])
        index._omp_threads = cpu_faiss_threads  # the CPU at its best for a batch
        t = min(timed(lambda: index.search(queries[:32], K)) for _ in range(2))
        out["cpu_batch32_qps_all_cores"] = round(32 / t, 1)
        index._omp_threads = 1
        index._gpu = saved

    if scorer is None:
        cpu_figures()
    else:
        log(f"n={n}: GPU")
        first = timed(lambda: search(queries[:1]))
        out["gpu_copy_s"] = round(first, 3)
        out["gpu_copy_gb_s"] = round(n * dim * 4 / first / 1e9, 2)
        got = [h.ids for h in index.search(queries, K)]
        out["gpu_recall"] = recall(got, truth)
        out["gpu_single"] = latency(search, queries)
        t = min(timed(lambda: index.search(queries[:32], K)) for _ in range(5))
        out["gpu_batch32_qps"] = round(32 / t, 1)
        out["gpu_8threads_qps"] = round(qps(search, queries, 8), 1)
        out["gpu_1thread_qps"] = round(qps(search, queries, 1), 1)
        cpu_figures()
        # writes: each replacement of 100 uploads 100 rows at the next search and leaves
        # 100 dead rows; 500 deletes more: 1,000 dead, over-fetched (k + 1,000), still exact
        new = mixture(100, dim, centres, seed=3)
        repl = rng.choice(n - 10, 100, replace=False)
        times = []
        for r in range(5):
            index.upsert(repl + r, new, [payload_of(int(i)) for i in repl + r]
                         if with_payloads else None)
            times.append(timed(lambda r=r: search(queries[r : r + 1])))
        out["gpu_search_after_upsert_100"] = {"p50_ms": ms(float(np.median(times))),
                                              "max_ms": ms(max(times))}
        index.delete(rng.choice(n, 500, replace=False).tolist())
        d0 = scorer.declined
        out["gpu_single_with_1000_dead"] = latency(search, queries[:50])
        out["gpu_declined_with_1000_dead"] = scorer.declined - d0
        # past the rebuild mark (1,024 dead): the copy is rebuilt from the live rows in the
        # background, searches scored on the CPU meanwhile
        index.delete(rng.choice(n, 200, replace=False).tolist())
        t = time.perf_counter()
        search(queries[:1])
        live = index.stats()["live"]
        while scorer.stats()["gpu_rows"] != live and time.perf_counter() - t < 120:
            time.sleep(0.005)
        out["gpu_rebuild_s"] = round(time.perf_counter() - t, 3)
        if with_payloads:
            d0 = scorer.declined
            out["broad_filter"] = latency(lambda q: index.search(q, K, where=BROAD),
                                          queries[:10])
            out["broad_filter_declined"] = scorer.declined - d0
            out["selective_filter"] = latency(lambda q: index.search(q, K, where=SELECTIVE),
                                              queries[:50])
        out["gpu_stats"] = index.stats()
    index.close()
    if hnsw:
        log(f"n={n}: HNSW on the CPU")
        h = FaissBackend(tmp / f"h{n}", kind="hnsw",
                         build_threads=os.cpu_count() or 1).open(
            CollectionSpec(f"h{n}", dim, "cosine"))
        fill(h, data, False)
        t = time.perf_counter()
        h.wait_idle(3600)
        out["hnsw_build_s"] = round(time.perf_counter() - t, 1)
        hs = lambda q: h.search(q, K)  # noqa: E731
        out["hnsw_single"] = latency(hs, queries)
        out["hnsw_recall"] = recall([x.ids for x in h.search(queries, K)], truth)
        h.close()
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| vectors | GPU copy | GPU k=10 p50 / p99 | CPU flat p50 / p99 (1 thread) | "
            "CPU ÷ GPU p50 | GPU recall | batch 32: GPU / CPU (all cores) q/s | "
            "8 threads on GPU q/s | HNSW CPU p50 / recall |",
            "|---:|---|---|---|---:|---:|---|---:|---|"]
    for r in results:
        g, c = r.get("gpu_single", {}), r["cpu_single"]
        ratio = (f"{c['p50_ms'] / g['p50_ms']:.1f}×" if g else "-")
        hnsw = (f"{r['hnsw_single']['p50_ms']} ms / {r['hnsw_recall']:.3f}"
                if "hnsw_single" in r else "-")
        rows.append(
            f"| {r['n']:,} | {r.get('gpu_copy_s', '-')} s ({r.get('gpu_copy_gb_s', '-')} GB/s) "
            f"| {g.get('p50_ms', '-')} / {g.get('p99_ms', '-')} ms "
            f"| {c['p50_ms']} / {c['p99_ms']} ms | {ratio} | {r.get('gpu_recall', '-')} "
            f"| {r.get('gpu_batch32_qps', '-')} / {r['cpu_batch32_qps_all_cores']} "
            f"| {r.get('gpu_8threads_qps', '-')} (1 thread {r.get('gpu_1thread_qps', '-')}) "
            f"| {hnsw} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000,4000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cpu-queries", type=int, default=30)
    ap.add_argument("--hnsw-sizes", default="100000")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu-faiss.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    hnsw_sizes = {int(s) for s in args.hnsw_sizes.split(",") if s}
    machine = cpu()
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            r = run_size(n, args.dim, args.queries, args.cpu_queries, n in hnsw_sizes,
                         Path(tmp))
            log(json.dumps(r))
            results.append(r)
            write(args.out, machine, results, time.perf_counter() - t0)  # after each size


def write(out: Path, machine: dict, results: list[dict[str, Any]], seconds: float) -> None:
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": machine,
              "gpu": gpu_line(), "faiss": faiss.__version__, "results": results,
              "seconds": round(seconds, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = (f"# Exact FAISS search on a GPU vs the CPU\n\n{report['date']}; GPU "
            f"{report['gpu']}; CPU {cpu_line(machine)}; faiss {faiss.__version__}. "
            f"Run took {report['seconds']} s.\n\n{table(results)}\n")
    out.write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
